// Layouts: huge sizes give null and change no counter; every alignment from 1 B to 2 MiB works
// for alloc, alloc_zeroed and realloc; realloc to a huge size keeps the old block.

include!("common.rs");

use common::{exact, fresh, live};
use memgroup::Group;
use std::alloc::{alloc, alloc_zeroed, dealloc, realloc, Layout};
// The optimizer may drop an allocation whose result is only compared with null, and assume it
// succeeded (GlobalAlloc's documentation): the requests that must fail escape through it.
use std::hint::black_box;

const ALIGNS: std::ops::RangeInclusive<u32> = 0..=21; // 1 B ..= 2 MiB, as powers of two

fn aligns() -> impl Iterator<Item = usize> {
    ALIGNS.map(|k| 1usize << k)
}

/// Figures that an allocation which returned null must leave as they were.
fn counters(g: &Group) -> (usize, usize, usize, u64) {
    let s = exact(g);
    (s.usage, s.kmem, s.overhead, live(&s))
}

/// Tests that request impossible sizes run one at a time: two such requests in flight at once
/// are exactly the case `concurrent_huge_requests_do_not_wrap_counters` checks (in a child
/// process, so that its failure cannot spill into the other tests).
fn huge_lock() -> std::sync::MutexGuard<'static, ()> {
    static HUGE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HUGE.lock().unwrap_or_else(|e| e.into_inner())
}

fn huge_layouts() -> Vec<Layout> {
    let imax = isize::MAX as usize;
    let mut sizes = vec![
        imax,
        imax - 1,
        imax - 7,
        imax - 8,
        imax - 15,
        imax - 16,
        imax - 4096,
    ];
    sizes.extend([imax - (1 << 21), imax / 2 + 1, 1 << 62, 1 << 48, 1 << 47]);
    let mut layouts = Vec::new();
    for &size in &sizes {
        for align in [1usize, 2, 8, 16, 64, 4096, 1 << 21] {
            // Layouts whose size rounded up to the alignment passes isize::MAX cannot exist.
            if let Ok(l) = Layout::from_size_align(size, align) {
                layouts.push(l);
            }
        }
    }
    // usize::MAX and isize::MAX + 1 are not valid Layout sizes at all.
    assert!(Layout::from_size_align(usize::MAX, 1).is_err());
    assert!(Layout::from_size_align(imax + 1, 1).is_err());
    assert!(layouts.len() > 50);
    layouts
}

#[test]
fn huge_sizes_return_null_and_change_no_counter() {
    let _h = huge_lock();
    let g = fresh("huge");
    let layouts = huge_layouts();
    let before = counters(&g);
    for &layout in &layouts {
        // SAFETY: non-zero size; a null result is checked, never dereferenced.
        let (p, z) =
            g.run(|| unsafe { (black_box(alloc(layout)), black_box(alloc_zeroed(layout))) });
        assert!(p.is_null(), "alloc({layout:?}) must fail, got {p:?}");
        assert!(z.is_null(), "alloc_zeroed({layout:?}) must fail, got {z:?}");
        assert_eq!(counters(&g), before, "after a null alloc of {layout:?}");
    }
    // Also with a max and inside fallible/nofail: still null, still no change.
    g.set_max(Some(1 << 20));
    for &layout in &layouts {
        // SAFETY: as above.
        let p = g.run(|| memgroup::fallible(|| unsafe { black_box(alloc(layout)) }));
        assert!(p.is_null());
        // SAFETY: as above.
        let p = g.run(|| memgroup::nofail(|| unsafe { black_box(alloc(layout)) }));
        assert!(p.is_null(), "nofail cannot make an impossible size succeed");
        assert_eq!(
            counters(&g),
            before,
            "after a null alloc of {layout:?} with a max"
        );
    }
    // The group still works afterwards.
    let l = Layout::from_size_align(1000, 8).unwrap();
    // SAFETY: non-zero size; freed with the same layout.
    let p = g.run(|| unsafe { black_box(alloc(l)) });
    assert!(!p.is_null());
    let s = exact(&g);
    assert_eq!(s.usage, 1000 + s.overhead);
    // SAFETY: allocated above with l.
    unsafe { dealloc(p, l) };
    assert_eq!(counters(&g).0, 0);
}

/// A null allocation is no allocation: allocs and frees do not move, and neither do the peak
/// (a charge of ~isize::MAX recorded as the peak would make it meaningless for good) or the
/// events (no max is set).
#[test]
fn huge_sizes_leave_allocs_peak_and_events_alone() {
    let _h = huge_lock();
    let g = fresh("huge-counts");
    let small = g.run(|| common::Block::new(1000, 1));
    let before = exact(&g);
    for layout in huge_layouts() {
        // SAFETY: non-zero size; a null result is checked, never dereferenced.
        let p = g.run(|| unsafe { black_box(alloc(layout)) });
        assert!(p.is_null());
        let s = exact(&g);
        assert_eq!(
            (s.allocs, s.frees, s.peak, s.events),
            (before.allocs, before.frees, before.peak, before.events),
            "after a null alloc of {layout:?}"
        );
    }
    drop(small);
}

child_test! {
    /// Impossible sizes requested from several threads at once: each is refused without the
    /// counters ever holding a wrapped sum (two near-isize::MAX charges pass usize::MAX together).
    fn concurrent_huge_requests_do_not_wrap_counters => concurrent_huge_inner() {
        let imax = isize::MAX as usize;
        let groups: Vec<Group> = (0..3).map(|_| fresh("huge-race")).collect();
        let parent_of_all = Group::root();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // The root's usage is the process's heap: never near usize::MAX, never wrapped.
                let mut worst = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    worst = worst.max(parent_of_all.stat().usage);
                }
                worst
            })
        };
        let handles: Vec<_> = groups
            .iter()
            .cloned()
            .map(|g| {
                std::thread::spawn(move || {
                    for i in 0..3000usize {
                        let size = imax - 4096 - (i % 64) * 8;
                        let layout = Layout::from_size_align(size, 8).unwrap();
                        // SAFETY: non-zero size; the null result is checked.
                        let p = g.run(|| unsafe { black_box(alloc(layout)) });
                        assert!(p.is_null());
                    }
                    counters(&g)
                })
            })
            .collect();
        for h in handles {
            let (usage, kmem, overhead, live) = h.join().expect("no panic in the allocator");
            assert_eq!((usage, kmem, overhead, live), (0, 0, 0, 0));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let worst = watcher.join().unwrap();
        assert!(
            worst < 1 << 40,
            "the root's usage read {worst:#x}: a huge charge was counted"
        );
    }
}

/// Sizes to sweep at every alignment: zero, one, odd, around a page, above the batch.
fn sweep_sizes() -> [usize; 6] {
    [0, 1, 7, 4095, 4097, 100_001]
}

#[test]
fn every_alignment_alloc_write_free() {
    let g = fresh("aligns");
    for align in aligns() {
        for size in sweep_sizes() {
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: the allocator supports zero-size layouts (DESIGN.md, tag design); the
            // pointer is checked for null and alignment before use and freed with its layout.
            let p = g.run(|| unsafe { alloc(layout) });
            assert!(!p.is_null(), "alloc({layout:?}) returned null");
            assert_eq!(p as usize % align, 0, "alloc({layout:?}) misaligned: {p:?}");
            // SAFETY: p is valid for size bytes.
            unsafe {
                std::ptr::write_bytes(p, 0xEE, size);
                if size > 0 {
                    assert_eq!(*p, 0xEE);
                    assert_eq!(*p.add(size - 1), 0xEE);
                }
            }
            let s = exact(&g);
            assert_eq!(s.usage, size + s.overhead, "usage of one {layout:?} block");
            assert_eq!(live(&s), 1);
            // SAFETY: allocated above with this layout.
            unsafe { dealloc(p, layout) };
            let s = exact(&g);
            assert_eq!(
                (s.usage, s.overhead, live(&s)),
                (0, 0, 0),
                "after freeing {layout:?}"
            );
        }
    }
}

#[test]
fn many_blocks_at_mixed_alignments() {
    // Blocks of every alignment alive at once: each one's overhead is its own.
    let g = fresh("aligns-many");
    let mut blocks = Vec::new();
    let mut requested = 0;
    for align in aligns() {
        for size in [1, 24, 3000] {
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: non-zero size; checked for null; freed below with its layout.
            let p = g.run(|| unsafe { alloc(layout) });
            assert!(!p.is_null() && p as usize % align == 0);
            // SAFETY: valid for size bytes.
            unsafe { std::ptr::write_bytes(p, align as u8, size) };
            requested += size;
            blocks.push((p, layout));
        }
    }
    let s = exact(&g);
    assert_eq!(s.usage, requested + s.overhead);
    assert_eq!(live(&s), blocks.len() as u64);
    for (p, layout) in blocks {
        // SAFETY: written above; still live.
        let ok = unsafe { std::slice::from_raw_parts(p, layout.size()) }
            .iter()
            .all(|&x| x == layout.align() as u8);
        assert!(ok, "block {layout:?} kept its contents");
        // SAFETY: allocated with this layout.
        unsafe { dealloc(p, layout) };
    }
    let s = exact(&g);
    assert_eq!((s.usage, s.overhead, live(&s)), (0, 0, 0));
}

#[test]
fn alloc_zeroed_at_every_alignment() {
    let g = fresh("zeroed");
    for align in aligns() {
        for size in [0usize, 1, 7, 4099, 100_000] {
            let layout = Layout::from_size_align(size, align).unwrap();
            // First a dirty block of the same layout, freed, so a reuse would show garbage.
            // SAFETY: zero sizes are supported; null checked; freed with the layout.
            unsafe {
                let d = g.run(|| alloc(layout));
                assert!(!d.is_null());
                std::ptr::write_bytes(d, 0xA5, size);
                dealloc(d, layout);
            }
            // SAFETY: as above.
            let z = g.run(|| unsafe { alloc_zeroed(layout) });
            assert!(!z.is_null(), "alloc_zeroed({layout:?}) returned null");
            assert_eq!(z as usize % align, 0, "alloc_zeroed({layout:?}) misaligned");
            // SAFETY: z is valid for size bytes, zeroed.
            let zeroed = unsafe { std::slice::from_raw_parts(z, size) }
                .iter()
                .all(|&x| x == 0);
            assert!(zeroed, "alloc_zeroed({layout:?}) gave non-zero bytes");
            let s = exact(&g);
            assert_eq!(s.usage, size + s.overhead);
            // SAFETY: allocated above with this layout.
            unsafe { dealloc(z, layout) };
            assert_eq!(exact(&g).usage, 0);
        }
    }
}

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(131) ^ (i >> 8)) as u8
}

#[test]
fn realloc_preserves_contents_at_several_alignments() {
    let g = fresh("realloc");
    let other = fresh("realloc-other");
    let steps = [
        100usize, 5000, 65_535, 65_536, 65_537, 70_000, 200_000, 60_000, 64, 1, 131_072, 10,
    ];
    for align in [1usize, 2, 8, 16, 32, 64, 4096, 65_536, 1 << 21] {
        let mut layout = Layout::from_size_align(steps[0], align).unwrap();
        // SAFETY: non-zero size; null checked.
        let mut p = g.run(|| unsafe { alloc(layout) });
        assert!(!p.is_null());
        // SAFETY: p valid for layout.size() bytes.
        unsafe { (0..layout.size()).for_each(|i| *p.add(i) = pattern(i)) };
        for (k, &new_size) in steps.iter().enumerate().skip(1) {
            let keep = layout.size().min(new_size);
            // Alternate: in the owner's scope, in another group's scope, unscoped.
            // SAFETY: p is live with `layout`; new_size is non-zero and valid at `align`.
            let q = match k % 3 {
                0 => g.run(|| unsafe { realloc(p, layout, new_size) }),
                1 => other.run(|| unsafe { realloc(p, layout, new_size) }),
                _ => unsafe { realloc(p, layout, new_size) },
            };
            assert!(
                !q.is_null(),
                "realloc {} -> {new_size} at align {align}",
                layout.size()
            );
            assert_eq!(
                q as usize % align,
                0,
                "realloc result misaligned at {align}"
            );
            // SAFETY: q valid for new_size bytes; the first `keep` were preserved.
            let kept = (0..keep).all(|i| unsafe { *q.add(i) } == pattern(i));
            assert!(
                kept,
                "realloc {} -> {new_size} at align {align} lost data",
                layout.size()
            );
            // SAFETY: q valid for new_size bytes.
            unsafe { (0..new_size).for_each(|i| *q.add(i) = pattern(i)) };
            p = q;
            layout = Layout::from_size_align(new_size, align).unwrap();
            let s = exact(&g);
            assert_eq!(
                s.usage,
                new_size + s.overhead,
                "after realloc to {new_size} at {align}"
            );
            assert_eq!(live(&s), 1);
            assert_eq!(exact(&other).usage, 0);
        }
        // SAFETY: p is live with layout.
        unsafe { dealloc(p, layout) };
        let s = exact(&g);
        assert_eq!((s.usage, s.overhead, live(&s)), (0, 0, 0));
    }
    let o = exact(&other);
    assert_eq!((o.usage, o.allocs, o.frees), (0, 0, 0));
}

#[test]
fn realloc_to_a_huge_size_returns_null_and_keeps_the_block() {
    let _h = huge_lock();
    let g = fresh("realloc-huge");
    let imax = isize::MAX as usize;
    for align in [1usize, 8, 16, 4096, 1 << 21] {
        for old_size in [1000usize, 100_000] {
            let layout = Layout::from_size_align(old_size, align).unwrap();
            // SAFETY: non-zero size; null checked.
            let p = g.run(|| unsafe { alloc(layout) });
            assert!(!p.is_null());
            // SAFETY: valid for old_size bytes.
            unsafe { (0..old_size).for_each(|i| *p.add(i) = pattern(i)) };
            let before = exact(&g);
            for new_size in [imax - align + 1, imax - 4096 - align, imax / 2 + 1, 1 << 47] {
                if Layout::from_size_align(new_size, align).is_err() {
                    continue;
                }
                // SAFETY: p live with layout; new_size is valid at align (checked).
                let q = g.run(|| unsafe { realloc(p, layout, new_size) });
                assert!(q.is_null(), "realloc to {new_size} at {align} must fail");
                // SAFETY: on failure the old block is untouched and still live.
                let kept = (0..old_size).all(|i| unsafe { *p.add(i) } == pattern(i));
                assert!(kept, "a failed realloc must keep the old contents");
                let s = exact(&g);
                assert_eq!(
                    (s.usage, s.kmem, s.overhead, s.allocs, s.frees),
                    (
                        before.usage,
                        before.kmem,
                        before.overhead,
                        before.allocs,
                        before.frees
                    ),
                    "a failed realloc to {new_size} leaves the block charged once"
                );
            }
            assert_eq!(before.usage, old_size + before.overhead);
            // SAFETY: still live with layout.
            unsafe { dealloc(p, layout) };
            assert_eq!(exact(&g).usage, 0);
        }
    }
}

#[test]
fn zero_size_blocks_are_distinct_and_counted() {
    let g = fresh("zero");
    let layout = Layout::from_size_align(0, 1).unwrap();
    // SAFETY: the allocator supports zero sizes; checked; freed with the layout.
    let ptrs: Vec<*mut u8> = g.run(|| (0..100).map(|_| unsafe { alloc(layout) }).collect());
    assert!(ptrs.iter().all(|p| !p.is_null()));
    let s = exact(&g);
    // The Vec's own buffer is one more block.
    let vec_bytes = ptrs.capacity() * std::mem::size_of::<*mut u8>();
    assert_eq!(s.usage, vec_bytes + s.overhead);
    assert_eq!(live(&s), 101);
    for p in ptrs.iter().copied() {
        // SAFETY: allocated above with layout.
        unsafe { dealloc(p, layout) };
    }
    drop(ptrs);
    let s = exact(&g);
    assert_eq!((s.usage, s.overhead, live(&s)), (0, 0, 0));
}
