//! Group removal: errors, names, reparenting, dying groups and bookkeeping charges, under the tag design.
#[global_allocator]
static ALLOC: memgroup::TagAlloc = memgroup::TagAlloc::system();
include!("suite/removal.rs");
