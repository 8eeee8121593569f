//! A test-only WASI command component (`wasi:cli/run`, no `handle` export), so
//! the host's refusal of a component that does not export `handle` can be
//! tested.

fn main() {
    println!("a command, not a handler");
}
