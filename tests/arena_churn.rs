//! Thread churn and fork under load: 10,000 short-lived threads with exact counters and bounded
//! resident memory, fork() while threads churn, under the arena design.
#![cfg(feature = "arena")]
#[global_allocator]
static ALLOC: memgroup::ArenaAlloc = memgroup::ArenaAlloc::system();
include!("suite/churn.rs");
