//! Async tenants on tokio runtimes, under the arena design.
#![cfg(all(feature = "arena", feature = "tokio"))]
#[global_allocator]
static ALLOC: memgroup::ArenaAlloc = memgroup::ArenaAlloc::system();
include!("suite/async_tasks.rs");
