//! Fault injection under the tag design: an inner allocator failing every Nth call, at random and only for large requests; memgroup's own mappings failing.
#[global_allocator]
static ALLOC: memgroup::TagAlloc<faulty::Faulty> = memgroup::TagAlloc::new(faulty::Faulty);
const IS_ARENA: bool = false;
include!("suite/faults.rs");
