//! The attribution suite without membarrier(2) (MEMGROUP_MEMBARRIER=0, set before the first allocation): no pockets, the stocks' fallback, under the arena design (its fast path then raises its busy flag with an atomic swap).
#![cfg(feature = "arena")]
#[global_allocator]
static ALLOC: memgroup::ArenaAlloc = memgroup::ArenaAlloc::system();

include!("suite/no_membarrier.rs");
include!("suite/attribution.rs");
