//! Pressure: levels, notifications, shrinkers, direct and background reclaim, the lock case and throttling, under the tag design.
#[global_allocator]
static ALLOC: memgroup::TagAlloc = memgroup::TagAlloc::system();
include!("suite/pressure.rs");
