// Included by the arena's test binaries whose tests look at slabs from a group's first block
// (tests/arena.rs) or model the arena's charges as whole slabs (the limits and model suites):
// memgroup as before issue 12.3, every group heap taking slabs from its first block of a class.
// Small groups served the tag way first are tests/arena_small.rs's.

/// Sets MEMGROUP_ARENA_SLAB_AFTER=0 before `main`, so before memgroup reads it at its first
/// allocation (no Rust code allocates in constructors); child processes inherit it.
#[used]
#[link_section = ".init_array"]
static SLABS_FIRST: extern "C" fn() = {
    extern "C" fn slabs_first() {
        // SAFETY: single-threaded (before main); both strings are NUL-terminated.
        unsafe { libc::setenv(c"MEMGROUP_ARENA_SLAB_AFTER".as_ptr(), c"0".as_ptr(), 1) };
    }
    slabs_first
};
