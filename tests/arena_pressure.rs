//! Pressure: levels, notifications, shrinkers, direct and background reclaim, the lock case and throttling, under the arena design.
#![cfg(feature = "arena")]
#[global_allocator]
static ALLOC: memgroup::ArenaAlloc = memgroup::ArenaAlloc::system();
include!("suite/pressure.rs");
