//! Layouts: huge sizes, every alignment, zeroed memory and realloc, under the tag design over jemalloc (feature `jemalloc`).
#![cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: memgroup::TagAlloc<memgroup::Jemalloc> = memgroup::TagAlloc::jemalloc();
include!("suite/layouts.rs");
