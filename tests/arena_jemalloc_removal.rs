//! Group removal: errors, names, reparenting, dying groups and bookkeeping charges, under the arena design over jemalloc.
//! Features `arena` and `jemalloc`: blocks above the slab sizes (8 KiB) go to jemalloc, tagged.
#![cfg(all(feature = "arena", feature = "jemalloc"))]
#[global_allocator]
static ALLOC: memgroup::ArenaAlloc<memgroup::Jemalloc> =
    memgroup::ArenaAlloc::new(memgroup::Jemalloc);
include!("suite/removal.rs");
