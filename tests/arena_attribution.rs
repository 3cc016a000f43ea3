//! Attribution: owners across threads, realloc and nested scopes; churn back to zero, under the arena design.
#![cfg(feature = "arena")]
#[global_allocator]
static ALLOC: memgroup::ArenaAlloc = memgroup::ArenaAlloc::system();
include!("suite/attribution.rs");
