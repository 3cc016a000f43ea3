// Limits: hierarchy, exact limits with per-CPU stocks, the at-the-limit policies, events, peak.

include!("common.rs");

use common::{
    block_cost, exact, fresh, fresh_child, live,
    size_for_cost, Block, Cost,
};
use memgroup::{fallible, nofail, Group, OnLimit};

/// A Vec<u8> whose buffer is exactly `size` bytes, or the allocator's refusal.
fn try_bytes(size: usize) -> Result<Vec<u8>, std::collections::TryReserveError> {
    let mut v = Vec::<u8>::new();
    v.try_reserve_exact(size)?;
    assert_eq!(v.capacity(), size, "u8 vectors reserve exactly");
    Ok(v)
}

#[test]
fn charge_counts_in_every_ancestor() {
    let p = fresh("hier-p");
    let c = fresh_child(&p, "c");
    let gc = fresh_child(&c, "gc");
    let (p0, c0, gc0) = (exact(&p), exact(&c), exact(&gc));
    // A leaf holding nothing is exactly empty; its parents hold their children's bookkeeping.
    assert_eq!((gc0.usage, gc0.kmem, gc0.overhead), (0, 0, 0));
    assert!(
        c0.kmem > 0 && c0.usage >= c0.kmem,
        "c holds gc's bookkeeping as kmem: {c0:?}"
    );
    assert!(
        p0.usage > c0.usage && p0.kmem > c0.kmem,
        "p holds c's figures and c's bookkeeping"
    );

    let sizes = [1usize, 100, 4096, 70_000, 300_000];
    let blocks: Vec<Block> = {
        let mut v = Vec::with_capacity(sizes.len());
        gc.run(|| {
            for &s in &sizes {
                v.push(Block::new(s, 1));
            }
        });
        v
    };
    let requested: usize = sizes.iter().sum();
    let (p1, c1, gc1) = (exact(&p), exact(&c), exact(&gc));
    assert_eq!(gc1.usage, requested + gc1.overhead);
    assert_eq!(gc1.allocs, sizes.len() as u64);
    assert_eq!(gc1.kmem, 0);
    for (before, after, who) in [(&c0, &c1, "c"), (&p0, &p1, "p")] {
        assert_eq!(after.usage - before.usage, gc1.usage, "{who} usage delta");
        assert_eq!(
            after.overhead - before.overhead,
            gc1.overhead,
            "{who} overhead delta"
        );
        assert_eq!(
            after.allocs - before.allocs,
            gc1.allocs,
            "{who} allocs delta"
        );
        assert_eq!(
            after.kmem, before.kmem,
            "{who} kmem unchanged by user allocations"
        );
    }
    drop(blocks);
    let (p2, c2, gc2) = (exact(&p), exact(&c), exact(&gc));
    assert_eq!((gc2.usage, gc2.overhead, live(&gc2)), (0, 0, 0));
    assert_eq!(c2.usage, c0.usage);
    assert_eq!(p2.usage, p0.usage);
    assert_eq!(live(&p2), live(&p0));
}

#[test]
fn child_limit_enforced() {
    let p = fresh("climit-p");
    let c = fresh_child(&p, "c");
    let max = 200_000;
    c.set_max(Some(max));
    assert_eq!(c.stat().max, Some(max));
    let fits = size_for_cost(max);
    let p0 = exact(&p);

    let r = c.run(|| fallible(|| try_bytes(fits + 1)));
    assert!(r.is_err(), "one byte over the child's max must fail");
    let (c1, p1) = (exact(&c), exact(&p));
    assert_eq!(
        (c1.usage, c1.allocs),
        (0, 0),
        "a failed charge changes no counter"
    );
    assert_eq!(
        p1.usage, p0.usage,
        "a failed charge changes no ancestor counter"
    );
    assert_eq!((c1.events.max, c1.events.fail), (1, 1));
    assert_eq!(
        (
            p1.events.max - p0.events.max,
            p1.events.fail - p0.events.fail
        ),
        (1, 1)
    );

    let v = c
        .run(|| fallible(|| try_bytes(fits)))
        .expect("an exact fit must succeed");
    let c2 = exact(&c);
    assert_eq!(c2.usage, max);
    assert_eq!(c2.usage, fits + c2.overhead);
    assert_eq!(
        (c2.events.max, c2.events.fail),
        (1, 1),
        "a fitting charge is no event"
    );
    drop(v);
    assert_eq!(exact(&c).usage, 0);
}

#[test]
fn ancestor_limit_enforced() {
    let p = fresh("alimit-p");
    let c = fresh_child(&p, "c");
    let gc = fresh_child(&c, "gc");
    let base = exact(&p).usage; // c's and gc's bookkeeping
    let room = 150_000;
    p.set_max(Some(base + room));
    let fits = size_for_cost(room);
    let (p0, c0) = (exact(&p), exact(&c));

    let r = gc.run(|| fallible(|| try_bytes(fits + 1)));
    assert!(r.is_err(), "one byte over the grandparent's max must fail");
    let (p1, c1, gc1) = (exact(&p), exact(&c), exact(&gc));
    assert_eq!(p1.usage, base);
    assert_eq!(c1.usage, c0.usage);
    assert_eq!((gc1.usage, gc1.allocs), (0, 0));
    // Events go to the group whose limit was hit and its ancestors, not to those below it.
    assert_eq!(
        (
            p1.events.max - p0.events.max,
            p1.events.fail - p0.events.fail
        ),
        (1, 1)
    );
    assert_eq!((c1.events.max, c1.events.fail), (0, 0));
    assert_eq!((gc1.events.max, gc1.events.fail), (0, 0));

    let v = gc
        .run(|| fallible(|| try_bytes(fits)))
        .expect("an exact fit must succeed");
    assert_eq!(exact(&p).usage, base + room);
    drop(v);
    assert_eq!(exact(&p).usage, base);
}

/// "A failed charge leaves no counter changed": not even the peak or the high events of the
/// groups below the one that refused, which the charge walks through before it is refused.
#[test]
fn failed_charge_leaves_peak_and_high_events_alone() {
    let p = fresh("nochange-p");
    let c = fresh_child(&p, "c");
    let base = exact(&p).usage;
    p.set_max(Some(base + 100_000));
    c.set_high(Some(50_000));
    let (p0, c0) = (exact(&p), exact(&c));
    assert!(c.run(|| fallible(|| try_bytes(200_000))).is_err());
    let (p1, c1) = (exact(&p), exact(&c));
    assert_eq!((c1.usage, c1.allocs), (0, 0));
    assert_eq!(
        (c1.peak, c1.events.high, p1.peak, p1.events.high),
        (c0.peak, 0, p0.peak, p0.events.high),
        "a refused charge must raise no peak and cross no high (c's and p's peak and high events)"
    );
}

/// Threads racing at a limit (each with stock slack on its own CPU) never pass max together,
/// and once they stop, the limit is exact again for whoever charges next.
#[test]
fn concurrent_fallible_charges_never_pass_max() {
    let g = fresh("race");
    let max = 500_000;
    g.set_max(Some(max));
    let small = Cost::of_size(300);
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let g = g.clone();
            std::thread::spawn(move || {
                let mut held = Vec::with_capacity(2000);
                g.run(|| {
                    fallible(|| {
                        let mut refusals = 0;
                        while refusals < 50 && held.len() < 2000 {
                            match Block::try_new(300, 1) {
                                Some(b) => held.push(b),
                                None => refusals += 1,
                            }
                        }
                    })
                });
                held
            })
        })
        .collect();
    let mut all: Vec<Vec<Block>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let s = exact(&g);
    let n: usize = all.iter().map(Vec::len).sum();
    assert_eq!(s.usage, small.of(n));
    assert!(s.usage <= max && s.peak <= max, "never above max: {s:?}");
    // Quiet now: exactly floor(max / cost) blocks fit, whatever the racers left in the stocks.
    let mut more = Vec::with_capacity(small.fit(max) + 1);
    g.run(|| {
        fallible(|| {
            while let Some(b) = Block::try_new(300, 1) {
                more.push(b);
            }
        })
    });
    assert_eq!(n + more.len(), small.fit(max), "{n} blocks from the racers");
    all.push(more);
    drop(all);
    assert_eq!(exact(&g).usage, 0);
}

/// Fill a group to just below its max with many small charges (served by per-CPU stocks, which
/// then hold pre-charged slack), then ask for exactly the rest: the stocks must be drained first.
#[test]
fn exact_fit_after_draining_stocks() {
    let p = fresh("fit-p");
    let g = fresh_child(&p, "g");
    let max = 1_000_000;
    g.set_max(Some(max));
    let small = 100;
    let cost = Cost::of_size(small);
    let n = cost.fit(max - 90_000);
    let mut blocks = Vec::with_capacity(n + 1);
    g.run(|| {
        for _ in 0..n {
            blocks.push(Block::new(small, 1));
        }
    });
    let real0 = cost.of(n);
    let real = real0;
    let gap = max - real;
    assert!(
        gap > memgroup::stock_batch(),
        "the rest must be charged directly"
    );
    let fits = size_for_cost(gap);
    let p0 = exact(&p);
    let stocked = g.stat().usage; // the counter, with whatever slack the stocks hold
    assert!(stocked >= real);

    let r = g.run(|| fallible(|| try_bytes(fits + 1)));
    assert!(
        r.is_err(),
        "real usage + request passes max by one byte: must fail"
    );
    let g1 = exact(&g);
    assert_eq!(g1.usage, real, "a failed charge changes no counter");
    assert_eq!(g1.allocs, n as u64);
    assert_eq!((g1.events.max, g1.events.fail), (1, 1));
    assert_eq!(exact(&p).usage, p0.usage);

    // One more small block: the stock refills and holds slack again.
    g.run(|| blocks.push(Block::new(small, 1)));
    let real = cost.of(n + 1);
    let fits = size_for_cost(max - real);
    let v = g
        .run(|| fallible(|| try_bytes(fits)))
        .expect("the exact rest must fit");
    let g2 = exact(&g);
    assert_eq!(g2.usage, max);
    assert_eq!(g2.peak, max, "never charged above max, and reached it");
    assert_eq!((g2.events.max, g2.events.fail), (1, 1));
    // Now at max exactly: not even one byte more.
    let r = g.run(|| fallible(|| try_bytes(1)));
    assert!(r.is_err());
    let g3 = exact(&g);
    assert_eq!(g3.usage, max);
    assert_eq!((g3.events.max, g3.events.fail), (2, 2));
    drop(v);
    drop(blocks);
    let g4 = exact(&g);
    assert_eq!((g4.usage, live(&g4)), (0, 0));
    assert_eq!(exact(&p).usage, p0.usage - real0);
}

/// Small charges near the limit: the stock cannot refill a whole batch, so charges must fall back
/// to exact amounts; exactly floor(max / cost) blocks fit.
#[test]
fn small_charges_fill_to_exactly_max() {
    // A max below the batch (no refill ever fits) and one above it.
    for max in [5_003, 200_003] {
        let g = fresh("smallfill");
        g.set_max(Some(max));
        let small = 100;
        let cost = Cost::of_size(small);
        let expect_fit = cost.fit(max);
        let mut blocks = Vec::with_capacity(expect_fit + 1);
        g.run(|| {
            fallible(|| {
                while blocks.len() <= expect_fit {
                    match Block::try_new(small, 1) {
                        Some(b) => blocks.push(b),
                        None => break,
                    }
                }
            })
        });
        assert_eq!(
            blocks.len(),
            expect_fit,
            "blocks of {small} bytes ({cost:?}) fitting in {max}"
        );
        let s = exact(&g);
        assert_eq!(s.usage, cost.of(expect_fit));
        assert_eq!(
            (s.events.max, s.events.fail),
            (1, 1),
            "only the refused block is an event"
        );
        // Free one, and exactly one fits again.
        blocks.pop();
        let again = g.run(|| fallible(|| (Block::try_new(small, 1), Block::try_new(small, 1))));
        assert!(again.0.is_some() && again.1.is_none());
        drop(again);
        drop(blocks);
        assert_eq!(exact(&g).usage, 0);
    }
}

#[test]
fn fallible_realloc_over_limit_keeps_block() {
    let g = fresh("realloc-limit");
    g.set_max(Some(100_000));
    let mut b = g.run(|| Block::new(1000, 8));
    b.bytes_mut()
        .iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = i as u8);
    let b = match g.run(|| fallible(|| b.realloc(200_000))) {
        Ok(_) => panic!("growing past max inside fallible must fail"),
        Err(b) => b,
    };
    assert!(b.bytes().iter().enumerate().all(|(i, x)| *x == i as u8));
    let s = exact(&g);
    assert_eq!(
        s.usage,
        1000 + s.overhead,
        "the old block is still charged, once"
    );
    assert_eq!(live(&s), 1);
    assert_eq!(s.events.fail, 1);
    let b = g
        .run(|| fallible(|| b.realloc(50_000)))
        .ok()
        .expect("growing within max");
    let s = exact(&g);
    assert_eq!(s.usage, 50_000 + s.overhead);
    drop(b);
    assert_eq!(exact(&g).usage, 0);
}

#[test]
fn overcharge_by_default() {
    let p = fresh("over-p");
    let g = fresh_child(&p, "g");
    let max = 100_000;
    g.set_max(Some(max));
    let p0 = exact(&p);
    // An infallible allocation over the limit: forced, the process goes on.
    // black_box: the optimizer may otherwise elide an allocation nobody writes to.
    let v: Vec<u8> = g.run(|| std::hint::black_box(Vec::with_capacity(150_000)));
    assert_eq!(v.capacity(), 150_000);
    let s = exact(&g);
    assert_eq!(s.usage, 150_000 + s.overhead);
    assert!(s.usage > max);
    assert_eq!(s.peak, s.usage);
    assert_eq!((s.events.max, s.events.fail), (1, 0));
    // try_reserve outside fallible(..) under Overcharge is forced too.
    let w = g
        .run(|| try_bytes(10_000))
        .expect("Overcharge forces try_reserve too");
    let s = exact(&g);
    assert_eq!(s.usage, 160_000 + s.overhead);
    assert_eq!((s.events.max, s.events.fail), (2, 0));
    let top = s.usage;
    let p1 = exact(&p);
    assert_eq!(
        (
            p1.events.max - p0.events.max,
            p1.events.fail - p0.events.fail
        ),
        (2, 0)
    );
    drop((v, w));
    let s = exact(&g);
    assert_eq!(s.usage, 0);
    assert_eq!(
        s.peak, top,
        "peak is the highest usage, overcharge included"
    );
}

#[test]
fn fail_policy_refuses_plain_try_reserve() {
    let g = fresh("failpol");
    let max = 100_000;
    g.set_max(Some(max));
    g.set_on_limit(OnLimit::Fail);
    assert!(
        g.run(|| try_bytes(200_000)).is_err(),
        "Fail refuses without fallible(..)"
    );
    let s = exact(&g);
    assert_eq!((s.usage, s.allocs), (0, 0));
    assert_eq!((s.events.max, s.events.fail), (1, 1));
    let v = g.run(|| try_bytes(50_000)).expect("within max");
    assert_eq!(exact(&g).usage, block_cost(50_000, 1));
    drop(v);
    assert_eq!(exact(&g).usage, 0);
}

#[test]
fn fail_policy_on_the_chain() {
    // Limit on p (Overcharge), charged group c has Fail: refused.
    let p = fresh("failchain-p");
    let c = fresh_child(&p, "c");
    p.set_max(Some(exact(&p).usage + 100_000));
    c.set_on_limit(OnLimit::Fail);
    assert!(
        c.run(|| try_bytes(200_000)).is_err(),
        "charged group has Fail"
    );
    let s = exact(&p);
    assert_eq!((s.events.max, s.events.fail), (1, 1));

    // Limit on q with Fail, charged group d below it (Overcharge): refused.
    let q = fresh("failchain-q");
    let d = fresh_child(&q, "d");
    q.set_max(Some(exact(&q).usage + 100_000));
    q.set_on_limit(OnLimit::Fail);
    assert!(
        d.run(|| try_bytes(200_000)).is_err(),
        "the limit's group has Fail"
    );
    assert_eq!(exact(&d).usage, 0);
    let s = exact(&q);
    assert_eq!((s.events.max, s.events.fail), (1, 1));

    // Fail above the group whose limit was hit: the policy holds for its whole subtree.
    let r = fresh("failchain-r");
    let e = fresh_child(&r, "e");
    r.set_on_limit(OnLimit::Fail);
    e.set_max(Some(100_000));
    assert!(
        e.run(|| try_bytes(200_000)).is_err(),
        "an ancestor's Fail holds at a descendant's own limit"
    );
    let s = exact(&e);
    assert_eq!((s.usage, s.allocs), (0, 0));
    assert_eq!((s.events.max, s.events.fail), (1, 1));

    // No Fail anywhere on the chain: the charge is forced past the limit.
    let t = fresh("failchain-t");
    let f = fresh_child(&t, "f");
    f.set_max(Some(100_000));
    let v = f.run(|| try_bytes(200_000)).expect("Overcharge forces");
    let s = exact(&f);
    assert_eq!(s.usage, 200_000 + s.overhead);
    assert_eq!((s.events.max, s.events.fail), (1, 0));
    drop(v);
}

#[test]
fn nofail_forces_under_fail_policy() {
    let g = fresh("nofail");
    let max = 100_000;
    g.set_max(Some(max));
    g.set_on_limit(OnLimit::Fail);
    let v = g
        .run(|| nofail(|| try_bytes(200_000)))
        .expect("nofail forces the charge");
    let s = exact(&g);
    assert_eq!(s.usage, 200_000 + s.overhead);
    assert_eq!((s.events.max, s.events.fail), (1, 0));
    // Innermost wins: fallible inside nofail refuses, nofail inside fallible forces.
    assert!(g.run(|| nofail(|| fallible(|| try_bytes(10)))).is_err());
    let w = g
        .run(|| fallible(|| nofail(|| try_bytes(10))))
        .expect("innermost nofail forces");
    let s = exact(&g);
    assert_eq!(s.usage, 200_010 + s.overhead);
    assert_eq!((s.events.max, s.events.fail), (3, 1));
    drop((v, w));
    assert_eq!(exact(&g).usage, 0);
}

#[test]
fn events_on_limit_group_and_ancestors() {
    let p = fresh("events-p");
    let c = fresh_child(&p, "c");
    let gc = fresh_child(&c, "gc");
    c.set_max(Some(exact(&c).usage + 100_000));
    let p0 = exact(&p);
    // Forced (default policy).
    let v = gc.run(|| Block::new(150_000, 1));
    // Refused (fallible).
    assert!(gc.run(|| fallible(|| Block::try_new(150_000, 1))).is_none());
    let (p1, c1, gc1) = (exact(&p), exact(&c), exact(&gc));
    assert_eq!(
        (gc1.events.max, gc1.events.fail),
        (0, 0),
        "below the limit's group: none"
    );
    assert_eq!((c1.events.max, c1.events.fail), (2, 1));
    assert_eq!(
        (
            p1.events.max - p0.events.max,
            p1.events.fail - p0.events.fail
        ),
        (2, 1)
    );
    assert_eq!(gc1.usage, 150_000 + gc1.overhead);
    drop(v);
}

#[test]
fn events_high_on_crossing() {
    let p = fresh("high-p");
    let c = fresh_child(&p, "c");
    let high = 100_000;
    c.set_high(Some(high));
    assert_eq!(c.stat().high, Some(high));
    let p0 = exact(&p);
    let size = 70_000; // above the batch: charged directly
    let mut held = Vec::with_capacity(4);
    c.run(|| held.push(Block::new(size, 1)));
    assert_eq!(exact(&c).events.high, 0, "below high");
    c.run(|| held.push(Block::new(size, 1)));
    assert_eq!(exact(&c).events.high, 1, "crossed high");
    c.run(|| held.push(Block::new(size, 1)));
    assert_eq!(exact(&c).events.high, 1, "still above: no new crossing");
    held.truncate(1);
    assert!(exact(&c).usage <= high);
    c.run(|| held.push(Block::new(size, 1)));
    let s = exact(&c);
    assert_eq!(s.events.high, 2, "crossed again");
    assert_eq!((s.events.max, s.events.fail), (0, 0), "high is no max");
    let p1 = exact(&p);
    assert_eq!(
        p1.events.high - p0.events.high,
        2,
        "counted on the ancestors too"
    );
    drop(held);
}

#[test]
fn peak_tracks_the_maximum() {
    let g = fresh("peak");
    let a = g.run(|| Block::new(100_000, 1));
    let b = g.run(|| Block::new(200_000, 1));
    let both = exact(&g).usage;
    assert_eq!(both, block_cost(100_000, 1) + block_cost(200_000, 1));
    drop(b);
    let s = exact(&g);
    assert_eq!(s.usage, block_cost(100_000, 1));
    assert_eq!(s.peak, both);
    drop(a);
    let s = exact(&g);
    assert_eq!((s.usage, s.peak), (0, both));
}

#[test]
fn set_max_none_clears_the_limit() {
    let g = fresh("clear");
    g.set_max(Some(50_000));
    g.set_high(Some(40_000));
    g.set_kmem_max(Some(30_000));
    let s = g.stat();
    assert_eq!(
        (s.max, s.high, s.kmem_max),
        (Some(50_000), Some(40_000), Some(30_000))
    );
    assert!(g.run(|| fallible(|| try_bytes(100_000))).is_err());
    g.set_max(None);
    g.set_high(None);
    g.set_kmem_max(None);
    let s = g.stat();
    assert_eq!((s.max, s.high, s.kmem_max), (None, None, None));
    let v = g
        .run(|| fallible(|| try_bytes(100_000)))
        .expect("no limit any more");
    let s = exact(&g);
    assert_eq!(s.usage, 100_000 + s.overhead);
    assert_eq!((s.events.max, s.events.fail, s.events.high), (1, 1, 0));
    drop(v);
}

child_test! {
    /// The root's max is a process-wide limit: run alone in a child process so no other test sees it.
    fn root_max_is_a_process_limit => root_max_inner() {
        let root = Group::root();
        assert_eq!(root.name(), "/");
        assert_eq!(root.parent(), None);
        let mib = 1 << 20;
        let s0 = exact(&root);
        assert!(s0.usage > 0, "the root counts everything");
        root.set_max(Some(s0.usage + mib));
        assert_eq!(root.stat().max, Some(s0.usage + mib));

        // The root also counts the harness's own threads, which may allocate between two
        // snapshots (its main thread does once, when it first blocks waiting for this test): a
        // failed charge that changed the count would change it on every try, so one quiet try
        // out of five shows it does not.
        let mut tries = Vec::with_capacity(5);
        let s1 = loop {
            let before = exact(&root);
            let r = fallible(|| try_bytes(2 * mib));
            assert!(r.is_err(), "over the root's max inside fallible");
            let s1 = exact(&root);
            assert_eq!(s1.events.fail - before.events.fail, 1);
            assert_eq!(s1.events.max - before.events.max, 1);
            tries.push((before.allocs, s1.allocs));
            if s1.allocs == before.allocs || tries.len() == 5 {
                break s1;
            }
        };
        assert!(
            tries.iter().any(|(a, b)| a == b),
            "a failed charge changes no counter: allocs before and after each try {tries:?}"
        );
        // Also refused when charged through a group below the root.
        let g = fresh("under-root");
        assert!(g.run(|| fallible(|| try_bytes(2 * mib))).is_err());
        let gs = exact(&g);
        assert_eq!((gs.usage, gs.events.max, gs.events.fail), (0, 0, 0));

        let small = fallible(|| try_bytes(mib / 2)).expect("within the root's max");
        // Default policy on the root: an infallible allocation is forced above max.
        let big: Vec<u8> = std::hint::black_box(Vec::with_capacity(2 * mib));
        let s2 = exact(&root);
        assert!(s2.usage > s0.usage + mib, "forced above the root's max");
        assert!(s2.events.max > s1.events.max);
        drop(big);
        root.set_max(None);
        assert_eq!(root.stat().max, None);
        let ok = fallible(|| try_bytes(2 * mib)).expect("the root's limit is gone");
        drop((small, ok));
    }
}
