//! Attribution: owners across threads, realloc and nested scopes; churn back to zero, under the tag design.
#[global_allocator]
static ALLOC: memgroup::TagAlloc = memgroup::TagAlloc::system();
include!("suite/attribution.rs");
