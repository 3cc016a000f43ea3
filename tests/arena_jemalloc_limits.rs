//! Limits: hierarchy, exact limits with stocks, policies at the limit, events and peak, under the arena design over jemalloc.
//! Features `arena` and `jemalloc`: blocks above the slab sizes (8 KiB) go to jemalloc, tagged.
#![cfg(all(feature = "arena", feature = "jemalloc"))]
#[global_allocator]
static ALLOC: memgroup::ArenaAlloc<memgroup::Jemalloc> =
    memgroup::ArenaAlloc::new(memgroup::Jemalloc);
include!("suite/slabs_first.rs");
include!("suite/limits.rs");
