//! Process life: fork, exited threads, thread-local destructors and before main, under the tag design.
#[global_allocator]
static ALLOC: memgroup::TagAlloc = memgroup::TagAlloc::system();
include!("suite/process.rs");
