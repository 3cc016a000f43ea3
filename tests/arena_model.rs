//! Model-based stress test: random operations checked against a reference model, under the arena design.
#![cfg(feature = "arena")]
#[global_allocator]
static ALLOC: memgroup::ArenaAlloc = memgroup::ArenaAlloc::system();
include!("suite/slabs_first.rs");
include!("suite/model.rs");
