// The process's resident memory, one copy for the tests and the benches: `include!`d by
// tests/suite/common.rs (inside its `mod common`) and by benches/common/mod.rs, so it must not use
// inner attributes.

/// The process's resident memory in bytes (`/proc/self/statm`, second field, in pages).
pub fn resident() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("reading /proc/self/statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .expect("statm's resident field");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    pages * page
}
