//! Export: the Prometheus exposition against stat(), under the tag design.
#[global_allocator]
static ALLOC: memgroup::TagAlloc = memgroup::TagAlloc::system();
include!("suite/export.rs");
