//! Layouts: huge sizes, every alignment, zeroed memory and realloc, under the tag design.
#[global_allocator]
static ALLOC: memgroup::TagAlloc = memgroup::TagAlloc::system();
include!("suite/layouts.rs");

/// A block whose tag was overwritten (a heap overflow from the block before it, a pointer this
/// allocator did not return) aborts the process at its free rather than uncharging a wrong
/// group: for a header tag, and for a tag after a block aligned above 16.
#[test]
fn a_damaged_tag_aborts_at_free() {
    for (layout, at) in [
        (Layout::from_size_align(24, 8).unwrap(), -8isize),
        (Layout::from_size_align(48, 16).unwrap(), -8),
        (Layout::from_size_align(64, 64).unwrap(), 64),
    ] {
        // SAFETY: fork in a test; the child only allocates, writes and frees, then exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: a non-zero layout; the 8 bytes at `at` are the block's tag, inside the
            // inner allocation; the child exits without returning into the test harness.
            unsafe {
                // Both through black_box: an optimized build may otherwise drop the pair.
                let p = black_box(alloc(layout));
                let tag = p.offset(at).cast::<u64>();
                tag.write_unaligned(black_box(tag.read_unaligned() ^ (1 << 40)));
                dealloc(black_box(p), layout);
                libc::_exit(0);
            }
        }
        let status = common::wait_child(pid, std::time::Duration::from_secs(20)).expect("child");
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGABRT,
            "{layout:?}: the child should abort, status {status:#x}"
        );
    }
}
