//! Async tenants on tokio runtimes, under the tag design over jemalloc (features `jemalloc` and `tokio`).
#![cfg(all(feature = "jemalloc", feature = "tokio"))]
#[global_allocator]
static ALLOC: memgroup::TagAlloc<memgroup::Jemalloc> = memgroup::TagAlloc::jemalloc();
include!("suite/async_tasks.rs");
