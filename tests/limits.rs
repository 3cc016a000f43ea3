//! Limits: hierarchy, exact limits with stocks, policies at the limit, events and peak, under the tag design.
#[global_allocator]
static ALLOC: memgroup::TagAlloc = memgroup::TagAlloc::system();
include!("suite/limits.rs");
