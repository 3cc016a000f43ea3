//! Async tenants on tokio runtimes, under the tag design.
#![cfg(feature = "tokio")]
#[global_allocator]
static ALLOC: memgroup::TagAlloc = memgroup::TagAlloc::system();
include!("suite/async_tasks.rs");
