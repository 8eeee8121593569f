//! RESP framing, pure: where a client's command ends (an array of bulk
//! strings, or an inline command line) and its name; where one of the
//! server's replies ends (RESP2 and RESP3 types) and whether it answers a
//! command (a push or an attribute does not).

/// What is at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<T> {
    /// A whole item: its value and its length in bytes.
    Complete(T, usize),
    /// Not all of it has arrived yet.
    Incomplete,
    /// Not RESP: the reason.
    Invalid(&'static str),
}

/// The longest inline command or header line taken.
const MAX_LINE: usize = 64 * 1024;
/// The most arguments of one command, and elements of one reply.
const MAX_ITEMS: i64 = 1 << 20;
/// The longest bulk string (Redis's own `proto-max-bulk-len`).
const MAX_BULK: i64 = 512 << 20;
/// How deep replies nest.
const MAX_DEPTH: usize = 64;

/// A client's command at the start of `buf`: its name in upper case (None
/// for an empty inline line, which Redis ignores without a reply).
pub fn command(buf: &[u8]) -> Parsed<Option<String>> {
    if buf.is_empty() {
        return Parsed::Incomplete;
    }
    if buf[0] != b'*' {
        return inline(buf);
    }
    let (count, mut pos) = match number(buf, 1) {
        Ok(Some(found)) => found,
        Ok(None) => return Parsed::Incomplete,
        Err(why) => return Parsed::Invalid(why),
    };
    if !(0..=MAX_ITEMS).contains(&count) {
        return Parsed::Invalid("invalid multibulk length");
    }
    let mut name = None;
    for index in 0..count {
        match buf.get(pos) {
            None => return Parsed::Incomplete,
            Some(b'$') => {}
            Some(_) => return Parsed::Invalid("expected '$' in a command"),
        }
        let (len, start) = match number(buf, pos + 1) {
            Ok(Some(found)) => found,
            Ok(None) => return Parsed::Incomplete,
            Err(why) => return Parsed::Invalid(why),
        };
        if !(0..=MAX_BULK).contains(&len) {
            return Parsed::Invalid("invalid bulk length");
        }
        let end = start + len as usize;
        if buf.len() < end + 2 {
            return Parsed::Incomplete;
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Parsed::Invalid("a bulk string does not end in CRLF");
        }
        if index == 0 {
            name = Some(upper(&buf[start..end]));
        }
        pos = end + 2;
    }
    Parsed::Complete(name, pos)
}

/// An inline command: words on one line.
fn inline(buf: &[u8]) -> Parsed<Option<String>> {
    let Some(newline) = buf.iter().take(MAX_LINE).position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_LINE {
            Parsed::Invalid("inline command too long")
        } else {
            Parsed::Incomplete
        };
    };
    let name = buf[..newline]
        .split(|b| b.is_ascii_whitespace())
        .find(|word| !word.is_empty())
        .map(upper);
    Parsed::Complete(name, newline + 1)
}

fn upper(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).to_ascii_uppercase()
}

/// The line starting at `from`, without its CRLF, and where the next starts.
fn line(buf: &[u8], from: usize) -> Result<Option<(&[u8], usize)>, &'static str> {
    let rest = buf.get(from..).unwrap_or_default();
    match rest.windows(2).take(MAX_LINE).position(|w| w == b"\r\n") {
        Some(at) => Ok(Some((&rest[..at], from + at + 2))),
        None if rest.len() > MAX_LINE => Err("line too long"),
        None => Ok(None),
    }
}

/// The integer on the line at `from`, and where the next line starts.
fn number(buf: &[u8], from: usize) -> Result<Option<(i64, usize)>, &'static str> {
    let Some((text, next)) = line(buf, from)? else {
        return Ok(None);
    };
    let text = std::str::from_utf8(text).map_err(|_| "invalid length")?;
    let n = text.parse::<i64>().map_err(|_| "invalid length")?;
    Ok(Some((n, next)))
}

/// One of the server's replies at the start of `buf`: whether it answers a
/// command (false for a RESP3 push or attribute, relayed as they come).
pub fn reply(buf: &[u8]) -> Parsed<bool> {
    match value_end(buf, 0, 0) {
        Ok(Some(end)) => Parsed::Complete(!matches!(buf[0], b'>' | b'|'), end),
        Ok(None) => Parsed::Incomplete,
        Err(why) => Parsed::Invalid(why),
    }
}

/// Where the value starting at `pos` ends.
fn value_end(buf: &[u8], pos: usize, depth: usize) -> Result<Option<usize>, &'static str> {
    if depth > MAX_DEPTH {
        return Err("reply nested too deep");
    }
    let Some(&kind) = buf.get(pos) else {
        return Ok(None);
    };
    match kind {
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {
            Ok(line(buf, pos + 1)?.map(|(_, next)| next))
        }
        b'$' | b'=' | b'!' => {
            let Some((len, start)) = number(buf, pos + 1)? else {
                return Ok(None);
            };
            if len < 0 {
                return Ok(Some(start));
            }
            if len > MAX_BULK {
                return Err("invalid bulk length");
            }
            let end = start + len as usize + 2;
            Ok((buf.len() >= end).then_some(end))
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let Some((count, mut next)) = number(buf, pos + 1)? else {
                return Ok(None);
            };
            if count < 0 {
                return Ok(Some(next));
            }
            if count > MAX_ITEMS {
                return Err("invalid multibulk length");
            }
            let items = if matches!(kind, b'%' | b'|') {
                count * 2
            } else {
                count
            };
            for _ in 0..items {
                match value_end(buf, next, depth + 1)? {
                    Some(end) => next = end,
                    None => return Ok(None),
                }
            }
            Ok(Some(next))
        }
        _ => Err("not a RESP reply"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        let set = b"*3\r\n$3\r\nset\r\n$1\r\nk\r\n$1\r\nv\r\n";
        assert_eq!(
            command(set),
            Parsed::Complete(Some("SET".into()), set.len())
        );
        for cut in 0..set.len() {
            assert_eq!(command(&set[..cut]), Parsed::Incomplete, "cut at {cut}");
        }
        assert_eq!(
            command(b"PING\r\n*1"),
            Parsed::Complete(Some("PING".into()), 6)
        );
        assert_eq!(command(b"\r\n"), Parsed::Complete(None, 2));
        assert_eq!(
            command(b"*1\r\n+x\r\n"),
            Parsed::Invalid("expected '$' in a command")
        );
    }

    #[test]
    fn replies() {
        assert_eq!(reply(b"+OK\r\n"), Parsed::Complete(true, 5));
        assert_eq!(reply(b"$-1\r\n"), Parsed::Complete(true, 5));
        let array = b"*2\r\n$1\r\na\r\n:5\r\n";
        assert_eq!(reply(array), Parsed::Complete(true, array.len()));
        for cut in 0..array.len() {
            assert_eq!(reply(&array[..cut]), Parsed::Incomplete, "cut at {cut}");
        }
        assert_eq!(reply(b">1\r\n+x\r\n"), Parsed::Complete(false, 8));
        assert_eq!(reply(b"%1\r\n+a\r\n+b\r\n"), Parsed::Complete(true, 12));
        assert_eq!(reply(b"?"), Parsed::Invalid("not a RESP reply"));
    }
}
