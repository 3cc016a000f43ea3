//! The attribution suite with memgroup started while no pthread key was left (PTHREAD_KEYS_MAX reached): it cannot hook thread exit, so threads get no pockets, under the tag design.
#[global_allocator]
static ALLOC: memgroup::TagAlloc = memgroup::TagAlloc::system();
const IS_ARENA: bool = false;
include!("suite/fault_keys.rs");
