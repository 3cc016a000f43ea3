//! The layouts suite with the tag design over mimalloc: TagAlloc is generic over its inner allocator.
#[global_allocator]
static ALLOC: memgroup::TagAlloc<mimalloc::MiMalloc> = memgroup::TagAlloc::new(mimalloc::MiMalloc);
include!("suite/layouts.rs");
