//! Thread churn and fork under load: 10,000 short-lived threads with exact counters and bounded
//! resident memory, fork() while threads churn, under the tag design.
#[global_allocator]
static ALLOC: memgroup::TagAlloc = memgroup::TagAlloc::system();
include!("suite/churn.rs");
