//! The host's system calls: every `libc` call and every `unsafe` block that
//! talks to the kernel lives under here, each with its `SAFETY:` line, behind
//! a safe function named for what it does. The rest of the crate calls these
//! and never `libc` directly.
//!
//! One submodule per concern, so each reads on its own.

pub(crate) mod epoll;
pub(crate) mod fiber_stacks;
pub(crate) mod handoff;
pub(crate) mod huge_text;
pub(crate) mod pipe;
pub(crate) mod poll;
pub(crate) mod process;
pub(crate) mod resources;
pub(crate) mod shm;
pub(crate) mod signals;
pub(crate) mod socket;
pub(crate) mod systemd;
