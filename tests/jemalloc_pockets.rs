//! Pockets: per-thread charges in front of the stocks, drained by limits, flush, removal, thread exit and fork; the 16-byte header's overhead, under the tag design over jemalloc (feature `jemalloc`).
#![cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: memgroup::TagAlloc<memgroup::Jemalloc> = memgroup::TagAlloc::jemalloc();
include!("suite/pockets.rs");
