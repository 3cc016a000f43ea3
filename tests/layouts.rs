//! Layouts: huge sizes, every alignment, zeroed memory and realloc, under the tag design.
#[global_allocator]
static ALLOC: memgroup::TagAlloc = memgroup::TagAlloc::system();
include!("suite/layouts.rs");
