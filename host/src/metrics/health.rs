//! Health and readiness as the metrics address serves them: the host
//! process's [`Readiness`] (kept in the shared metrics mapping, see
//! `Metrics::set_readiness`), and what `GET /healthz`, `GET /readyz` and the
//! index page `GET /` answer.

/// How ready the host process says it is, for `GET /readyz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// Not every tenant listens with a worker yet (the mapping's zero).
    Starting,
    /// Every tenant listens and has a live worker process.
    Ready,
    /// A tenant has no live worker process (one died; its replacement is
    /// not running yet).
    NoWorker,
    /// Shutdown has begun: the listeners are closing, the workers draining.
    Draining,
}

impl Readiness {
    pub(super) fn code(self) -> u64 {
        match self {
            Readiness::Starting => 0,
            Readiness::Ready => 1,
            Readiness::NoWorker => 2,
            Readiness::Draining => 3,
        }
    }

    pub(super) fn from_code(code: u64) -> Readiness {
        match code {
            1 => Readiness::Ready,
            2 => Readiness::NoWorker,
            3 => Readiness::Draining,
            _ => Readiness::Starting,
        }
    }

    /// `GET /readyz`: its status and its one line of text.
    pub(super) fn answer(self) -> (u16, &'static str) {
        match self {
            Readiness::Ready => (200, "ready"),
            Readiness::Starting => (503, "not ready: starting"),
            Readiness::NoWorker => (503, "not ready: a tenant has no live worker process"),
            Readiness::Draining => (503, "not ready: shutting down"),
        }
    }
}

/// `GET /healthz`: answered by the metrics process, which the kernel ends
/// when the host process ends (`PR_SET_PDEATHSIG`).
pub(super) const HEALTHY: &str = "ok";

/// `GET /`: what this address serves.
pub(super) const INDEX: &str = "\
host serve: metrics and health
GET /metrics  Prometheus metrics (text format 0.0.4)
GET /healthz  200 while the host process runs
GET /readyz   200 once every tenant listens and has a live worker process; \
503 while starting, while a tenant has none, and from the start of a shutdown
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_survives_its_code() {
        for state in [
            Readiness::Starting,
            Readiness::Ready,
            Readiness::NoWorker,
            Readiness::Draining,
        ] {
            assert_eq!(Readiness::from_code(state.code()), state);
            let (status, _) = state.answer();
            assert_eq!(status == 200, state == Readiness::Ready);
        }
    }
}
