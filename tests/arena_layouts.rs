//! Layouts: huge sizes, every alignment, zeroed memory and realloc, under the arena design.
#![cfg(feature = "arena")]
#[global_allocator]
static ALLOC: memgroup::ArenaAlloc = memgroup::ArenaAlloc::system();
include!("suite/layouts.rs");
