//! Group removal: errors, names, reparenting, dying groups and bookkeeping charges, under the arena design.
#![cfg(feature = "arena")]
#[global_allocator]
static ALLOC: memgroup::ArenaAlloc = memgroup::ArenaAlloc::system();
include!("suite/removal.rs");
