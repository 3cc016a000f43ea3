//! The removal suite without membarrier(2) (MEMGROUP_MEMBARRIER=0, set before the first allocation): no pockets, the stocks' fallback, under the tag design.
#[global_allocator]
static ALLOC: memgroup::TagAlloc = memgroup::TagAlloc::system();

include!("suite/no_membarrier.rs");
include!("suite/removal.rs");
