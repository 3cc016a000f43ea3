//! Fault injection under the arena design: its inner allocator (large blocks) failing every Nth call, at random and only for large requests; memgroup's own mappings (heaps, segments) failing.
#![cfg(feature = "arena")]
#[global_allocator]
static ALLOC: memgroup::ArenaAlloc<faulty::Faulty> = memgroup::ArenaAlloc::new(faulty::Faulty);
const IS_ARENA: bool = true;
include!("suite/faults.rs");
