//! Bad input from the environment: every MEMGROUP_* variable with garbage, overflowing, negative and boundary values, under the tag design.
#[global_allocator]
static ALLOC: memgroup::TagAlloc = memgroup::TagAlloc::system();
const IS_ARENA: bool = false;
include!("suite/env.rs");
