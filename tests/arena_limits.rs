//! Limits: hierarchy, exact limits with stocks, policies at the limit, events and peak, under the arena design.
#![cfg(feature = "arena")]
#[global_allocator]
static ALLOC: memgroup::ArenaAlloc = memgroup::ArenaAlloc::system();
include!("suite/slabs_first.rs");
include!("suite/limits.rs");
