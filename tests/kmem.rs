//! Kernel memory: kmem accounting, the three kmem_max configurations and MEMGROUP_KMEM=0, under the tag design.
#[global_allocator]
static ALLOC: memgroup::TagAlloc = memgroup::TagAlloc::system();
include!("suite/kmem.rs");
