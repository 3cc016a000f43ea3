// Included by the tests/fault_nomembarrier*.rs instances: memgroup without membarrier(2).

/// Sets MEMGROUP_MEMBARRIER=0 before `main`, so before memgroup reads it at its first
/// allocation (no Rust code allocates in constructors); child processes inherit it.
#[used]
#[link_section = ".init_array"]
static NO_MEMBARRIER: extern "C" fn() = {
    extern "C" fn no_membarrier() {
        // SAFETY: single-threaded (before main); both strings are NUL-terminated.
        unsafe { libc::setenv(c"MEMGROUP_MEMBARRIER".as_ptr(), c"0".as_ptr(), 1) };
    }
    no_membarrier
};

#[test]
fn membarrier_is_off() {
    assert_eq!(std::env::var("MEMGROUP_MEMBARRIER").as_deref(), Ok("0"));
}
