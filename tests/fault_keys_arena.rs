//! The attribution suite with memgroup started while no pthread key was left (PTHREAD_KEYS_MAX reached): the arena cannot hook thread exit and hands every block to the inner allocator, under the arena design.
#![cfg(feature = "arena")]
#[global_allocator]
static ALLOC: memgroup::ArenaAlloc = memgroup::ArenaAlloc::system();
const IS_ARENA: bool = true;
include!("suite/fault_keys.rs");
