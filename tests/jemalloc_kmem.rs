//! Kernel memory: kmem accounting, the three kmem_max configurations and MEMGROUP_KMEM=0, under the tag design over jemalloc (feature `jemalloc`).
#![cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: memgroup::TagAlloc<memgroup::Jemalloc> = memgroup::TagAlloc::jemalloc();
include!("suite/kmem.rs");
