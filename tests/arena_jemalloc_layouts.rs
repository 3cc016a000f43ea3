//! Layouts: huge sizes, every alignment, zeroed memory and realloc, under the arena design over jemalloc.
//! Features `arena` and `jemalloc`: blocks above the slab sizes (8 KiB) go to jemalloc, tagged.
#![cfg(all(feature = "arena", feature = "jemalloc"))]
#[global_allocator]
static ALLOC: memgroup::ArenaAlloc<memgroup::Jemalloc> =
    memgroup::ArenaAlloc::new(memgroup::Jemalloc);
include!("suite/layouts.rs");
