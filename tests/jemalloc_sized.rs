//! jemalloc's sized free: every `dealloc` and `realloc` that the tag design makes of jemalloc
//! names exactly the layout that jemalloc allocated (jemalloc's `sdallocx` trusts the size and
//! alignment it is given), checked by a recording inner allocator; `alloc_zeroed` over reused
//! memory and in-place `realloc` through the tag design (feature `jemalloc`).
#![cfg(feature = "jemalloc")]

use memgroup::{Group, Jemalloc, TagAlloc, TAG_SIZE};
use std::alloc::{alloc, alloc_zeroed, dealloc, realloc, GlobalAlloc, Layout};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

/// jemalloc, with every live inner block's layout kept in a fixed table (no allocation):
/// `dealloc` and `realloc` check the layout they are given against it before passing it on.
struct Recording;

#[global_allocator]
static ALLOC: TagAlloc<Recording> = TagAlloc::new(Recording);

const SLOTS: usize = 1 << 20;
const EMPTY: usize = 0;
const GONE: usize = 1;
static KEYS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(EMPTY) }; SLOTS];
static SIZES: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static ALIGNS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];

/// Inner blocks recorded, layouts checked, wrong layouts seen, blocks the table could not hold.
static RECORDED: AtomicUsize = AtomicUsize::new(0);
static CHECKED: AtomicUsize = AtomicUsize::new(0);
static WRONG: AtomicUsize = AtomicUsize::new(0);
static FULL: AtomicUsize = AtomicUsize::new(0);
/// The first wrong check: pointer, size and alignment given.
static FIRST_WRONG: [AtomicUsize; 3] = [const { AtomicUsize::new(0) }; 3];

fn home(p: usize) -> usize {
    (p >> 3).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SLOTS.trailing_zeros())
}

fn record(p: *mut u8, layout: Layout) {
    if p.is_null() {
        return;
    }
    let p = p as usize;
    let mut i = home(p);
    for _ in 0..SLOTS {
        let k = KEYS[i].load(Ordering::Acquire);
        if (k == EMPTY || k == GONE)
            && KEYS[i]
                .compare_exchange(k, p, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            SIZES[i].store(layout.size(), Ordering::Release);
            ALIGNS[i].store(layout.align(), Ordering::Release);
            RECORDED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        i = (i + 1) % SLOTS;
    }
    FULL.fetch_add(1, Ordering::Relaxed);
}

fn slot(p: usize) -> Option<usize> {
    let mut i = home(p);
    for _ in 0..SLOTS {
        match KEYS[i].load(Ordering::Acquire) {
            EMPTY => return None,
            k if k == p => return Some(i),
            _ => i = (i + 1) % SLOTS,
        }
    }
    None
}

/// The layout recorded for a live inner block.
fn recorded(p: *const u8) -> Option<(usize, usize)> {
    slot(p as usize).map(|i| {
        (
            SIZES[i].load(Ordering::Acquire),
            ALIGNS[i].load(Ordering::Acquire),
        )
    })
}

/// Whether `layout` is the one `p` was allocated with.
fn matches(p: *mut u8, layout: Layout) -> bool {
    recorded(p) == Some((layout.size(), layout.align()))
}

/// [`matches`], counting the checks and the wrong layouts.
fn verify(p: *mut u8, layout: Layout) {
    CHECKED.fetch_add(1, Ordering::Relaxed);
    if !matches(p, layout) && WRONG.fetch_add(1, Ordering::Relaxed) == 0 {
        FIRST_WRONG[0].store(p as usize, Ordering::Relaxed);
        FIRST_WRONG[1].store(layout.size(), Ordering::Relaxed);
        FIRST_WRONG[2].store(layout.align(), Ordering::Relaxed);
    }
}

fn forget(p: *mut u8) {
    if let Some(i) = slot(p as usize) {
        KEYS[i].store(GONE, Ordering::Release);
    }
}

// SAFETY: every call is passed on to jemalloc unchanged; the table only observes.
unsafe impl GlobalAlloc for Recording {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { Jemalloc.alloc(layout) };
        record(p, layout);
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { Jemalloc.alloc_zeroed(layout) };
        record(p, layout);
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        verify(ptr, layout);
        // Forgotten before jemalloc may hand the address out again.
        forget(ptr);
        // SAFETY: the caller's contract, passed on.
        unsafe { Jemalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        verify(ptr, layout);
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { Jemalloc.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // The old block is gone (or is the new one); a failed realloc keeps it.
            forget(ptr);
            // SAFETY: the caller's contract makes this layout valid.
            record(p, unsafe {
                Layout::from_size_align_unchecked(new_size, layout.align())
            });
        }
        p
    }
}

fn assert_no_wrong_layout() {
    assert_eq!(FULL.load(Ordering::Relaxed), 0, "the table overflowed");
    assert_eq!(
        WRONG.load(Ordering::Relaxed),
        0,
        "jemalloc was given a wrong layout: first {:#x}, size {}, align {}",
        FIRST_WRONG[0].load(Ordering::Relaxed),
        FIRST_WRONG[1].load(Ordering::Relaxed),
        FIRST_WRONG[2].load(Ordering::Relaxed),
    );
}

/// Where the tag design says a block sits in jemalloc's block, and that block's layout: an
/// 8-byte header for alignments up to 8, 16 for 16-aligned blocks, the tag after larger-aligned
/// ones (README, "Design").
fn inner_of(p: *mut u8, layout: Layout) -> (*mut u8, (usize, usize)) {
    let align = layout.align();
    let header = match align {
        0..=8 => TAG_SIZE,
        16 => 16,
        _ => 0,
    };
    let size = layout.size() + TAG_SIZE + if align == 16 { 8 } else { 0 };
    (p.wrapping_sub(header), (size, align.max(8)))
}

fn exact(g: &Group) -> memgroup::Stat {
    g.flush();
    g.stat()
}

fn fresh(name: &str) -> Group {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    Group::new(&format!("{name}-{}", SEQ.fetch_add(1, Ordering::Relaxed))).unwrap()
}

const SIZES_TRIED: [usize; 14] = [
    1,
    7,
    8,
    9,
    15,
    16,
    17,
    100,
    4095,
    4096,
    4097,
    14 << 10,
    65_539,
    1 << 20,
];

fn alignments() -> impl Iterator<Item = usize> {
    (0..=21).map(|k| 1usize << k)
}

#[test]
fn the_checker_sees_a_wrong_layout() {
    let b = black_box(Box::new([3u8; 100]));
    let p = (&*b as *const [u8; 100]).cast_mut().cast::<u8>();
    let (base, (size, align)) = inner_of(p, Layout::new::<[u8; 100]>());
    assert_eq!(
        recorded(base),
        Some((size, align)),
        "the block's inner record"
    );
    assert_eq!(size, 108);
    assert!(matches(base, Layout::from_size_align(108, 8).unwrap()));
    assert!(!matches(base, Layout::from_size_align(100, 8).unwrap()));
    assert!(!matches(base, Layout::from_size_align(108, 16).unwrap()));
    assert!(!matches(p, Layout::from_size_align(108, 8).unwrap()));
    drop(b);
    assert_eq!(recorded(base), None, "a freed block is forgotten");
    assert_no_wrong_layout();
}

#[test]
fn sized_free_gets_exactly_the_allocated_layout() {
    let g = fresh("sized");
    let (checked, recorded_before) = (
        CHECKED.load(Ordering::Relaxed),
        RECORDED.load(Ordering::Relaxed),
    );
    let mut ops = 0;
    g.run(|| {
        for align in alignments() {
            for size in SIZES_TRIED {
                let l = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero sizes; every block is freed with the layout it has.
                unsafe {
                    let p = black_box(alloc(l));
                    let z = black_box(alloc_zeroed(l));
                    assert!(!p.is_null() && !z.is_null());
                    for (q, l) in [(p, l), (z, l)] {
                        let (base, inner) = inner_of(q, l);
                        assert_eq!(recorded(base), Some(inner), "{l:?}");
                    }
                    p.write_bytes(0x5a, size);
                    let grown = size * 2 + 1;
                    let p = black_box(realloc(p, l, grown));
                    assert!(!p.is_null());
                    let lg = Layout::from_size_align(grown, align).unwrap();
                    assert_eq!(recorded(inner_of(p, lg).0), Some(inner_of(p, lg).1));
                    assert!((0..size).all(|i| *p.add(i) == 0x5a), "{l:?} grown");
                    let shrunk = size / 3 + 1;
                    let p = black_box(realloc(p, lg, shrunk));
                    assert!(!p.is_null());
                    let ls = Layout::from_size_align(shrunk, align).unwrap();
                    assert_eq!(recorded(inner_of(p, ls).0), Some(inner_of(p, ls).1));
                    assert!((0..shrunk).all(|i| *p.add(i) == 0x5a), "{l:?} shrunk");
                    dealloc(p, ls);
                    // Freed on another thread (another group's scope: the owner's tag decides).
                    let z = z as usize;
                    std::thread::spawn(move || dealloc(z as *mut u8, l))
                        .join()
                        .unwrap();
                }
                ops += 4;
            }
        }
        // Collections: Vec growth, String, boxed slices, a hash map.
        let mut v: Vec<u64> = Vec::new();
        for i in 0..10_000 {
            v.push(black_box(i));
        }
        v.shrink_to_fit();
        let s: String = (0..1000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let m: std::collections::HashMap<u32, Box<[u8]>> = (0..500)
            .map(|i| (i, vec![i as u8; i as usize + 1].into()))
            .collect();
        black_box((&v, &s, &m));
    });
    let st = exact(&g);
    assert_eq!((st.usage, st.allocs, st.frees), (0, st.frees, st.allocs));
    assert!(
        CHECKED.load(Ordering::Relaxed) - checked >= ops,
        "the inner frees went through the checker"
    );
    assert!(RECORDED.load(Ordering::Relaxed) - recorded_before >= ops);
    assert_no_wrong_layout();
    g.remove().unwrap();
}

#[test]
fn sized_free_at_limits_and_failed_requests() {
    let g = fresh("sized-limit");
    g.set_max(Some(1 << 20));
    let l = Layout::from_size_align(64 << 10, 64).unwrap();
    // Made outside the group: its growth inside fallible() could not be refused safely.
    let mut held = Vec::with_capacity(64);
    g.run(|| {
        memgroup::fallible(|| loop {
            // SAFETY: non-zero size; null is checked.
            let p = unsafe { black_box(alloc(l)) };
            if p.is_null() {
                break;
            }
            held.push(p as usize);
        });
        // A realloc refused at the limit keeps the block and its inner layout.
        let p = held[0] as *mut u8;
        // SAFETY: a live block of layout l; on null it stays ours.
        let q = memgroup::fallible(|| unsafe { black_box(realloc(p, l, 1 << 20)) });
        assert!(q.is_null());
        assert_eq!(recorded(inner_of(p, l).0), Some(inner_of(p, l).1));
    });
    // Limits are exact: as many blocks as fit, each charged its inner size.
    assert_eq!(held.len(), (1 << 20) / (l.size() + TAG_SIZE));
    assert!(exact(&g).events.fail >= 2);
    for p in held {
        // SAFETY: live blocks of layout l.
        unsafe { dealloc(p as *mut u8, l) };
    }
    assert_eq!(exact(&g).usage, 0);
    // A request jemalloc refuses (charged, then uncharged): null, no inner block recorded.
    let h = fresh("sized-huge");
    let huge = Layout::from_size_align(1 << 47, 8).unwrap();
    // SAFETY: non-zero size; null is checked.
    let p = h.run(|| unsafe { black_box(alloc(huge)) });
    assert!(p.is_null());
    let st = exact(&h);
    assert_eq!((st.usage, st.allocs - st.frees), (0, 0));
    assert_no_wrong_layout();
    g.remove().unwrap();
    h.remove().unwrap();
}

#[test]
fn alloc_zeroed_over_reused_memory() {
    let g = fresh("zeroed");
    let mut reused = 0;
    g.run(|| {
        for align in alignments().take(13) {
            for size in SIZES_TRIED {
                let l = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero sizes; every block is freed with its layout.
                unsafe {
                    let dirty = black_box(alloc(l));
                    assert!(!dirty.is_null());
                    dirty.write_bytes(0xa5, size);
                    // The tag region too, where the block had one.
                    dealloc(dirty, l);
                    let z = black_box(alloc_zeroed(l));
                    assert!(!z.is_null());
                    reused += usize::from(z == dirty);
                    assert!(
                        (0..size).all(|i| *z.add(i) == 0),
                        "alloc_zeroed({l:?}) not zero"
                    );
                    dealloc(z, l);
                }
            }
        }
    });
    // jemalloc's thread cache hands the block just freed back: the zeroing was really tested
    // over dirty memory.
    assert!(reused > 50, "only {reused} blocks reused");
    assert_eq!(exact(&g).usage, 0);
    assert_no_wrong_layout();
    g.remove().unwrap();
}

#[test]
fn realloc_in_place_within_jemalloc_size_class() {
    let g = fresh("inplace");
    let mut in_place = 0;
    g.run(|| {
        for align in [1, 8, 16, 32, 64, 4096] {
            for size in [20, 100, 1000, 3000] {
                let l = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero sizes; every block is freed with the layout it has.
                unsafe {
                    let p = black_box(alloc(l));
                    assert!(!p.is_null());
                    for i in 0..size {
                        *p.add(i) = i as u8;
                    }
                    let (base, (inner, _)) = inner_of(p, l);
                    let usable = tikv_jemallocator::usable_size(base);
                    assert!(usable >= inner);
                    // Grow into the size class's slack: jemalloc keeps the block where it is.
                    let grown = size + (usable - inner);
                    g.flush();
                    let before = g.stat().usage;
                    let q = black_box(realloc(p, l, grown));
                    assert!(!q.is_null());
                    in_place += usize::from(q == p);
                    if usable > inner {
                        assert_eq!(q, p, "{l:?} to {grown} moved (usable {usable})");
                    }
                    assert!(
                        (0..size).all(|i| *q.add(i) == i as u8),
                        "{l:?} grown in place"
                    );
                    g.flush();
                    assert_eq!(
                        g.stat().usage - before,
                        grown - size,
                        "{l:?} growth charged"
                    );
                    // And back down within the class: in place, uncharged.
                    let q2 = black_box(realloc(
                        q,
                        Layout::from_size_align(grown, align).unwrap(),
                        size,
                    ));
                    assert_eq!(q2, q, "{l:?} shrunk in place");
                    g.flush();
                    assert_eq!(g.stat().usage, before);
                    assert!((0..size).all(|i| *q2.add(i) == i as u8));
                    dealloc(q2, l);
                }
            }
        }
    });
    assert!(in_place >= 20, "{in_place}");
    assert_eq!(exact(&g).usage, 0);
    assert_no_wrong_layout();
    g.remove().unwrap();
}
