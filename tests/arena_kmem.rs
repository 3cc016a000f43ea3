//! Kernel memory: kmem accounting, the three kmem_max configurations and MEMGROUP_KMEM=0, under the arena design.
#![cfg(feature = "arena")]
#[global_allocator]
static ALLOC: memgroup::ArenaAlloc = memgroup::ArenaAlloc::system();
include!("suite/kmem.rs");
