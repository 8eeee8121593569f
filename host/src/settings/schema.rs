//! The config file's shape as serde reads it: the tables and keys it may
//! hold (anything else refused), and for each value type what it expects,
//! written into serde's message after [`EXPECTED`] so the file's reader can
//! say it in the host's words.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Unexpected, Visitor};
use toml::Spanned;

use super::model::StrategyKind;
use super::outbound::MAX_OUTBOUND;
use super::values::{MAX_CHILDREN, MAX_CONNECTIONS, MAX_PROCESSES, MAX_WORKERS};

/// The file as serde reads it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRoot {
    pub defaults: Option<Spanned<Table<FileLayer>>>,
    pub metrics: Option<Spanned<Table<FileMetrics>>>,
    pub tenants: Option<Spanned<Tenants>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileMetrics {
    pub addr: Option<Spanned<Text<MetricsAddr>>>,
}

/// `[defaults]` or a `[tenants.NAME]` table: its keys are [`Setting::key`]s.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct FileLayer {
    pub handler: Option<Spanned<Text<HandlerPath>>>,
    pub listen: Option<List<Addresses>>,
    pub strategy: Option<Spanned<StrategyName>>,
    pub workers: Option<Spanned<Count<{ MAX_WORKERS }>>>,
    pub processes: Option<Spanned<Count<{ MAX_PROCESSES }>>>,
    pub max_children: Option<Spanned<Count<{ MAX_CHILDREN }>>>,
    pub max_connections: Option<Spanned<Count<{ MAX_CONNECTIONS }>>>,
    pub max_memory: Option<Spanned<Text<Size>>>,
    pub timeout: Option<Spanned<Text<Duration>>>,
    pub idle_timeout: Option<Spanned<Text<Duration>>>,
    pub drain_timeout: Option<Spanned<Text<Duration>>>,
    pub env: Option<Entries<Env>>,
    pub dirs: Option<DirEntries>,
    pub allow: Option<List<Networks>>,
    pub deny: Option<List<Networks>>,
    pub proxy_protocol: Option<Spanned<Text<ProxyVersionName>>>,
    pub proxy_from: Option<List<Networks>>,
    pub proxy_header_timeout: Option<Spanned<Text<Duration>>>,
    pub allow_precompiled: Option<Flag>,
    pub allow_outbound: Option<List<OutboundGrants>>,
    pub max_outbound: Option<Spanned<Count<{ MAX_OUTBOUND }>>>,
    /// Host-wide: read from `[defaults]` only (`file::read` refuses it in a
    /// tenant's table).
    pub log_level: Option<Spanned<Text<LogLevelText>>>,
}

/// What a value must be, for messages: `WHOLE` of the value, `ITEM` of
/// each item of an array or entry of a table.
pub(super) trait Expect {
    const WHOLE: &'static str;
    const ITEM: &'static str = "";
}

macro_rules! expect {
    ($name:ident, $whole:expr) => {
        expect!($name, $whole, "");
    };
    ($name:ident, $whole:expr, $item:expr) => {
        pub(super) struct $name;
        impl Expect for $name {
            const WHOLE: &'static str = $whole;
            const ITEM: &'static str = $item;
        }
    };
}

expect!(HandlerPath, "a path to a component");
expect!(Size, "a size such as \"64MiB\"");
expect!(Duration, "a duration such as \"30s\"");
expect!(ProxyVersionName, "\"v1\", \"v2\" or \"any\"");
expect!(MetricsAddr, "an address such as \"127.0.0.1:9464\"");
expect!(LogLevelText, "a level such as \"warn\"");
expect!(
    Addresses,
    "an array of addresses, e.g. [\"127.0.0.1:7001\", \"unix:/run/host.sock\"]",
    "an address such as \"127.0.0.1:7001\" or \"unix:/run/host.sock\""
);
expect!(
    Networks,
    "an array of networks, e.g. [\"10.0.0.0/8\"]",
    "a network such as \"10.0.0.0/8\""
);
expect!(
    OutboundGrants,
    "an array of grants, e.g. [\"127.0.0.1:6379\"]",
    "a grant such as \"127.0.0.1:6379\""
);
expect!(
    Env,
    "a table of strings, e.g. { GREETING = \"hi\" }",
    "a string"
);
expect!(
    Dirs,
    "a table of host path = guest path, e.g. { \"/srv/static\" = \"/static\" }",
    "a guest path such as \"/static\", or { guest = \"/data\", mode = \"rw\" }"
);
expect!(DirMode, "\"ro\" or \"rw\"");

/// The items of `E`: expected to be `E::ITEM`.
pub(super) struct Item<E>(PhantomData<E>);

impl<E: Expect> Expect for Item<E> {
    const WHOLE: &'static str = E::ITEM;
}

/// Starts what a visitor expects, so `file::Doc::explain` finds it in serde's
/// message (`invalid type: ..., expected EXPECTED`) whatever comes before.
pub(super) const EXPECTED: &str = "\u{1}";

/// A string.
pub(super) struct Text<E>(pub String, PhantomData<E>);

impl<'de, E: Expect> Deserialize<'de> for Text<E> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<E>(PhantomData<E>);
        impl<E: Expect> Visitor<'_> for V<E> {
            type Value = Text<E>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "{EXPECTED}{}", E::WHOLE)
            }
            fn visit_str<Er: de::Error>(self, text: &str) -> Result<Text<E>, Er> {
                Ok(Text(text.to_string(), PhantomData))
            }
        }
        deserializer.deserialize_any(V(PhantomData))
    }
}

/// An array of strings, each spanned.
pub(super) struct List<E>(pub Vec<Spanned<Text<Item<E>>>>);

impl<'de, E: Expect> Deserialize<'de> for List<E> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<E>(PhantomData<E>);
        impl<'de, E: Expect> Visitor<'de> for V<E> {
            type Value = List<E>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "{EXPECTED}{}", E::WHOLE)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<List<E>, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(List(items))
            }
        }
        deserializer.deserialize_any(V(PhantomData))
    }
}

/// A table of strings, each entry spanned by its key, in file order.
pub(super) struct Entries<E>(pub Vec<(Spanned<String>, String)>, PhantomData<E>);

impl<'de, E: Expect> Deserialize<'de> for Entries<E> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<E>(PhantomData<E>);
        impl<'de, E: Expect> Visitor<'de> for V<E> {
            type Value = Entries<E>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "{EXPECTED}{}", E::WHOLE)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<E>, A::Error> {
                let mut entries = Vec::new();
                while let Some((key, value)) = map.next_entry::<Spanned<String>, Text<Item<E>>>()? {
                    entries.push((key, value.0));
                }
                entries.sort_by_key(|(key, _)| key.span().start);
                Ok(Entries(entries, PhantomData))
            }
        }
        deserializer.deserialize_any(V(PhantomData))
    }
}

/// `dirs`: host path = guest path, or host path = `{ guest = "/data",
/// mode = "rw" }`; each entry spanned by its key, in file order.
pub(super) struct DirEntries(pub Vec<(Spanned<String>, DirTarget)>);

/// Where a granted directory is seen, and whether the guest may write there.
pub(super) struct DirTarget {
    pub guest: String,
    pub writable: bool,
}

/// The table form of a [`DirTarget`].
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DirTable {
    guest: Option<Text<Item<Dirs>>>,
    mode: Option<ModeName>,
}

/// `"ro"` (false) or `"rw"` (true).
struct ModeName(bool);

impl<'de> Deserialize<'de> for ModeName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ModeName;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "{EXPECTED}{}", DirMode::WHOLE)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<ModeName, E> {
                match text {
                    "ro" => Ok(ModeName(false)),
                    "rw" => Ok(ModeName(true)),
                    _ => Err(E::invalid_value(Unexpected::Str(text), &self)),
                }
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for DirEntries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DirEntries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "{EXPECTED}{}", Dirs::WHOLE)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<DirEntries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<Spanned<String>, DirTarget>()? {
                    entries.push(entry);
                }
                entries.sort_by_key(|(key, _)| key.span().start);
                Ok(DirEntries(entries))
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for DirTarget {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DirTarget;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "{EXPECTED}{}", Dirs::ITEM)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<DirTarget, E> {
                Ok(DirTarget {
                    guest: text.to_string(),
                    writable: false,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<DirTarget, A::Error> {
                let table = DirTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let guest = table.guest.ok_or_else(|| {
                    de::Error::custom(
                        "a directory's table needs guest, the path the guest sees it at, e.g. { guest = \"/data\", mode = \"rw\" }",
                    )
                })?;
                Ok(DirTarget {
                    guest: guest.0,
                    writable: table.mode.is_some_and(|m| m.0),
                })
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A table holding a `T`, and nothing else: serde's derived structs would
/// also take an array of their values in order.
pub(super) struct Table<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Table<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Table<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "{EXPECTED}a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Table<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Table)
            }
        }
        deserializer.deserialize_any(V(PhantomData))
    }
}

/// `[tenants]`: each `[tenants.NAME]` table, in file order.
pub(super) struct Tenants(pub Vec<(Spanned<String>, Spanned<Table<FileLayer>>)>);

impl<'de> Deserialize<'de> for Tenants {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Tenants;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "{EXPECTED}[tenants.NAME] tables")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Tenants, A::Error> {
                let mut tenants = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    tenants.push(entry);
                }
                tenants.sort_by_key(|(name, _): &(Spanned<String>, _)| name.span().start);
                Ok(Tenants(tenants))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A count from 1 to `MAX`.
pub(super) struct Count<const MAX: u32>(pub u32);

impl<'de, const MAX: u32> Deserialize<'de> for Count<MAX> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<const MAX: u32>;
        impl<const MAX: u32> Visitor<'_> for V<MAX> {
            type Value = Count<MAX>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "{EXPECTED}an integer from 1 to {MAX}")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Count<MAX>, E> {
                match u32::try_from(n) {
                    Ok(n) if (1..=MAX).contains(&n) => Ok(Count(n)),
                    _ => Err(E::invalid_value(Unexpected::Signed(n), &self)),
                }
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Count<MAX>, E> {
                match u32::try_from(n) {
                    Ok(n) if (1..=MAX).contains(&n) => Ok(Count(n)),
                    _ => Err(E::invalid_value(Unexpected::Unsigned(n), &self)),
                }
            }
        }
        deserializer.deserialize_any(V::<MAX>)
    }
}

/// `true` or `false`.
pub(super) struct Flag(pub bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Flag;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "{EXPECTED}true or false")
            }
            fn visit_bool<E: de::Error>(self, yes: bool) -> Result<Flag, E> {
                Ok(Flag(yes))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A strategy's name.
pub(super) struct StrategyName(pub StrategyKind);

impl<'de> Deserialize<'de> for StrategyName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = StrategyName;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                let names: Vec<_> = StrategyKind::ALL
                    .iter()
                    .map(|kind| format!("{:?}", kind.name()))
                    .collect();
                let (last, rest) = names.split_last().expect("strategies");
                write!(f, "{EXPECTED}{} or {last}", rest.join(", "))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<StrategyName, E> {
                StrategyKind::ALL
                    .into_iter()
                    .find(|kind| kind.name() == text)
                    .map(StrategyName)
                    .ok_or_else(|| E::invalid_value(Unexpected::Str(text), &self))
            }
        }
        deserializer.deserialize_any(V)
    }
}
