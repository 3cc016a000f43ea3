//! Process life: fork, exited threads, thread-local destructors and before main, under the tag design over jemalloc (feature `jemalloc`).
#![cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: memgroup::TagAlloc<memgroup::Jemalloc> = memgroup::TagAlloc::jemalloc();
include!("suite/process.rs");
