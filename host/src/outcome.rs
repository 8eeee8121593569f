//! How a connection ended: the twelve outcomes, their stable names (the
//! `outcome=` of the `closed` line and the `outcome` label of
//! `host_connections_total`) and their order (the index of their counter in
//! the shared metrics). Adding one here adds its name, its counter and its
//! series at once.

/// How a connection ended. The error text of those that have one travels
/// beside it (the connection report's `Ending`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// `handle` returned `ok`.
    Ok,
    /// `handle` returned `err(text)`.
    HandlerError,
    /// The guest trapped (or a host call it made failed fatally).
    Trap,
    /// The instance needed more than `--max-memory` and could not go on.
    MemoryLimit,
    /// `handle` ran past `--timeout`.
    Timeout,
    /// The client sent nothing, or read nothing, for the idle timeout.
    IdleTimeout,
    /// The client reset the connection.
    ClientReset,
    /// The host ended the connection while shutting down.
    Shutdown,
    /// The host could not set the connection up (or its process died).
    HostError,
    /// The tenant's allow/deny lists refused the peer; nothing ran.
    Denied,
    /// A balancer's connection (`proxy-from`) did not start with a PROXY
    /// protocol header the tenant takes, whole, in time; nothing ran.
    BadProxyHeader,
    /// An HTTP request the host could not parse or give to a guest (it
    /// answered 400 itself); nothing ran.
    BadRequest,
}

impl Outcome {
    /// Every outcome, in label order: `ALL[o.index()] == o`.
    pub(crate) const ALL: [Outcome; 12] = [
        Outcome::Ok,
        Outcome::HandlerError,
        Outcome::Trap,
        Outcome::MemoryLimit,
        Outcome::Timeout,
        Outcome::IdleTimeout,
        Outcome::ClientReset,
        Outcome::Shutdown,
        Outcome::HostError,
        Outcome::Denied,
        Outcome::BadProxyHeader,
        Outcome::BadRequest,
    ];

    /// The stable name in log lines and metrics labels.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::HandlerError => "handler-error",
            Outcome::Trap => "trap",
            Outcome::MemoryLimit => "memory-limit",
            Outcome::Timeout => "timeout",
            Outcome::IdleTimeout => "idle-timeout",
            Outcome::ClientReset => "client-reset",
            Outcome::Shutdown => "shutdown",
            Outcome::HostError => "host-error",
            Outcome::Denied => "denied",
            Outcome::BadProxyHeader => "bad-proxy-header",
            Outcome::BadRequest => "bad-request",
        }
    }

    /// Its place in [`Outcome::ALL`], and so its counter's.
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::Outcome;

    #[test]
    fn all_lists_each_outcome_at_its_index_under_a_unique_name() {
        for (index, outcome) in Outcome::ALL.into_iter().enumerate() {
            assert_eq!(outcome.index(), index, "{outcome:?}");
        }
        let mut names: Vec<_> = Outcome::ALL.iter().map(|o| o.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Outcome::ALL.len());
    }
}
