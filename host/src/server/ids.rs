//! Connection ids: unique within one run of the host and increasing from 1,
//! even across prefork's worker processes, since the counter lives in a page
//! of memory shared with every process forked after it was made.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context as _, Result};

use crate::sys::shm::SharedU64;

/// The run's connection counter. Clones share it.
#[derive(Clone)]
pub(crate) struct ConnectionIds {
    counter: Arc<SharedU64>,
}

impl ConnectionIds {
    pub(crate) fn new() -> Result<ConnectionIds> {
        let counter = SharedU64::new().context("cannot map the connection counter")?;
        Ok(ConnectionIds {
            counter: Arc::new(counter),
        })
    }

    pub(crate) fn next(&self) -> u64 {
        self.counter.get().fetch_add(1, Ordering::Relaxed) + 1
    }
}
