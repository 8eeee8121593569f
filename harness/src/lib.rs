//! One harness for a server run as a child process: start it with its stderr
//! collected as a log ([`Launch`], [`Process`]), wait for a log line such as
//! `listening on IP:PORT` ([`listening_addr`]), signal it, and stop it (its
//! whole process group when it has its own) when dropped; walk its process
//! tree in /proc ([`proc`]); and poll a condition until a deadline
//! ([`poll`]).
//!
//! Used by `host check --run` (at run time, so std and libc only), the
//! integration tests and the bench. Nothing here panics: each caller decides
//! what a missing line or a timeout means.

mod log;
pub mod proc;
mod process;
mod wait;

pub use log::Missing;
pub use process::{listening_addr, Launch, Process};
pub use wait::poll;
