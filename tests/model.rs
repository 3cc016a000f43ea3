//! Model-based stress test: random operations checked against a reference model, under the tag design.
#[global_allocator]
static ALLOC: memgroup::TagAlloc = memgroup::TagAlloc::system();
include!("suite/model.rs");
