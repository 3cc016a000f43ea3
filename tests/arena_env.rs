//! Bad input from the environment: every MEMGROUP_* variable with garbage, overflowing, negative and boundary values, under the arena design.
#![cfg(feature = "arena")]
#[global_allocator]
static ALLOC: memgroup::ArenaAlloc = memgroup::ArenaAlloc::system();
const IS_ARENA: bool = true;
include!("suite/env.rs");
