// Thread-local keys exhausted (issue 14.3): before `main` (so in every child process of the
// suite too), a constructor takes every pthread key, makes memgroup start (its first
// allocations, small and large: memgroup creates its thread-exit keys there and finds none),
// then gives a few keys back for the Rust runtime, which needs them for its own
// thread-locals (without any it aborts: "out of TLS keys"). The attribution suite then runs in
// that process: memgroup without its thread-exit hooks (no pockets in the tag design; every
// block from the inner allocator in the arena design) must stay exact.

/// Whether the constructor found no key left just before memgroup's first allocation.
static NO_KEY_AT_START: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[used]
#[link_section = ".init_array"]
static EXHAUST_KEYS: extern "C" fn() = {
    extern "C" fn exhaust_keys() {
        const GIVEN_BACK: usize = 16;
        let mut taken = [0 as libc::pthread_key_t; GIVEN_BACK];
        let mut n = 0usize;
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: a valid out-pointer and no destructor.
        while unsafe { libc::pthread_key_create(&mut key, None) } == 0 {
            taken[n % GIVEN_BACK] = key;
            n += 1;
        }
        // SAFETY: as above.
        let none_left = unsafe { libc::pthread_key_create(&mut key, None) } != 0;
        for size in [8, 100, 1 << 20] {
            let layout = std::alloc::Layout::from_size_align(size, 8).unwrap();
            // SAFETY: a non-zero size; the block is freed with its layout.
            unsafe {
                let p = std::hint::black_box(std::alloc::alloc(layout));
                if !p.is_null() {
                    std::alloc::dealloc(p, layout);
                }
            }
        }
        NO_KEY_AT_START.store(none_left && n >= GIVEN_BACK, std::sync::atomic::Ordering::Relaxed);
        for &k in &taken[..n.min(GIVEN_BACK)] {
            // SAFETY: a key created above, deleted once.
            unsafe { libc::pthread_key_delete(k) };
        }
    }
    exhaust_keys
};

#[test]
fn memgroup_started_without_a_key() {
    assert!(
        NO_KEY_AT_START.load(std::sync::atomic::Ordering::Relaxed),
        "every key was taken when memgroup started"
    );
    if IS_ARENA {
        // The arena could not hook thread exit: it is off, small blocks go to the inner
        // allocator (in the tag design's format).
        #[cfg(feature = "arena")]
        {
            let b = std::hint::black_box(Box::new(7u64));
            // SAFETY: a live block of this binary's global allocator.
            let slab = unsafe { memgroup::slab_of(&*b as *const u64 as *const u8) };
            assert!(slab.is_none(), "no slab without the arena's thread-exit key");
        }
    }
}

include!("attribution.rs");
