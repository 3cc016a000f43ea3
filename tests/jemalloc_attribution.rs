//! Attribution: owners across threads, realloc and nested scopes; churn back to zero, under the tag design over jemalloc (feature `jemalloc`).
#![cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: memgroup::TagAlloc<memgroup::Jemalloc> = memgroup::TagAlloc::jemalloc();
include!("suite/attribution.rs");
