// Attribution: the owner of a block is the group current at allocation, whoever frees or
// reallocates it; nested scopes; a multi-thread churn that must end with every counter at 0.

include!("common.rs");

use common::{
    drop_one, send_one,
    block_cost, churn_threads, exact, fresh, fresh_child, live,
    Block, Cost, Rng, Tenants,
};
use memgroup::{current, kernel, stock_batch, Group};
use std::collections::HashMap;
use std::sync::mpsc;

#[test]
fn cross_thread_free_uncharges_the_owner() {
    let a = fresh("xfree-a");
    let b = fresh("xfree-b");
    let sizes: Vec<usize> = (0..200)
        .map(|i| (i * 37) % 4096 + 1)
        .chain([70_000, 300_000])
        .collect();
    let mut blocks = Vec::with_capacity(sizes.len());
    a.run(|| {
        for &s in &sizes {
            blocks.push(Block::filled(s, 0x5A));
        }
    });
    let requested: usize = sizes.iter().sum();
    let sa = exact(&a);
    assert_eq!(sa.usage, requested + sa.overhead);
    assert_eq!(sa.allocs, sizes.len() as u64);

    let b2 = b.clone();
    std::thread::spawn(move || b2.run(|| drop(blocks)))
        .join()
        .unwrap();
    let sa = exact(&a);
    assert_eq!(
        (sa.usage, sa.overhead, sa.kmem),
        (0, 0, 0),
        "the owner was uncharged"
    );
    assert_eq!(sa.frees, sizes.len() as u64);
    let sb = exact(&b);
    assert_eq!(
        (sb.usage, sb.allocs, sb.frees),
        (0, 0, 0),
        "the freeing group is untouched"
    );
}

#[test]
fn cross_thread_free_from_unscoped_thread() {
    let a = fresh("xfree2-a");
    let (tx, rx) = mpsc::channel::<Block>();
    let t = std::thread::spawn(move || {
        let mut n = 0;
        for b in rx {
            n += b.size();
        }
        n
    });
    let mut sent = 0;
    a.run(|| {
        for i in 1..=500usize {
            let b = Block::filled(i * 3, 1);
            sent += b.size();
            tx.send(b).unwrap();
        }
    });
    drop(tx);
    assert_eq!(t.join().unwrap(), sent);
    let s = exact(&a);
    assert_eq!((s.usage, s.overhead), (0, 0));
    assert_eq!(live(&s), 0);
    assert!(
        s.allocs >= 500,
        "the blocks (and the channel's own nodes) were charged to a"
    );
}

#[test]
fn realloc_keeps_the_owner() {
    let a = fresh("realloc-a");
    let b = fresh("realloc-b");
    let check = |blk: &Block, step: &str| {
        let sa = exact(&a);
        assert_eq!(
            sa.usage,
            blk.size() + sa.overhead,
            "{step}: owner charged the new size"
        );
        assert_eq!(live(&sa), 1, "{step}: still one block");
        let sb = exact(&b);
        assert_eq!(
            (sb.usage, sb.allocs, sb.frees),
            (0, 0, 0),
            "{step}: other scope untouched"
        );
    };
    let pattern = |i: usize| (i * 31 + 7) as u8;
    let mut blk = a.run(|| Block::new(1000, 16));
    blk.bytes_mut()
        .iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = pattern(i));
    check(&blk, "alloc");
    let steps: [(usize, bool); 6] = [
        (5000, true),     // grow, small, in b's scope
        (200_000, false), // grow across the batch, no scope
        (300, true),      // shrink from large to small, in b's scope
        (100_000, true),  // grow across the batch in b's scope
        (60_000, false),  // shrink to just under the batch
        (64, true),
    ];
    let mut valid = 1000;
    for (size, in_b) in steps {
        blk = if in_b {
            b.run(|| blk.realloc(size))
        } else {
            blk.realloc(size)
        }
        .ok()
        .expect("realloc");
        valid = valid.min(size);
        assert!(blk.bytes()[..valid]
            .iter()
            .enumerate()
            .all(|(i, x)| *x == pattern(i)));
        blk.bytes_mut()
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = pattern(i));
        valid = size;
        check(&blk, &format!("realloc to {size}"));
    }
    b.run(|| drop(blk));
    let sa = exact(&a);
    assert_eq!((sa.usage, sa.overhead, live(&sa)), (0, 0, 0));
}

#[test]
fn collections_grown_outside_the_scope_stay_with_the_owner() {
    let a = fresh("grow-a");
    let b = fresh("grow-b");
    let mut v: Vec<u8> = a.run(|| Vec::with_capacity(10));
    let mut s: String = a.run(|| String::with_capacity(10));
    b.run(|| {
        v.reserve_exact(100_000);
        s.reserve_exact(500);
    });
    let (vc, sc) = (v.capacity(), s.capacity());
    let sa = exact(&a);
    assert_eq!(sa.usage, vc + sc + sa.overhead);
    assert_eq!(live(&sa), 2);
    assert_eq!(exact(&b).usage, 0);
    v.truncate(0);
    v.shrink_to_fit(); // frees the buffer
    s.shrink_to(0);
    let sa = exact(&a);
    assert_eq!(sa.usage, s.capacity() + sa.overhead);
    drop(s);
    assert_eq!(exact(&a).usage, 0);
}

#[test]
fn nested_scopes() {
    let root = Group::root();
    assert_eq!(current(), root, "a fresh thread charges the root");
    let a = fresh("nest-a");
    let b = fresh_child(&a, "b");
    let c = fresh("nest-c");
    assert_eq!(b.parent(), Some(a.clone()));
    assert_eq!(
        b.name(),
        format!("{}/{}", a.name(), b.name().rsplit('/').next().unwrap())
    );
    assert!(b.name().starts_with("nest-a-") && b.name().contains("/b-"));
    let a0 = exact(&a);

    let guard = a.enter();
    let in_a = current() == a;
    let x = Block::new(1000, 1);
    let (in_b, in_c, back_in_b, y, z) = b.run(|| {
        let in_b = current() == b;
        let y = Block::new(2000, 1);
        let (in_c, z) = {
            let _g = c.enter();
            (current() == c, Block::new(3000, 1))
        };
        (in_b, in_c, current() == b, y, z)
    });
    let back_in_a = current() == a;
    let w = Block::new(4000, 1);
    drop(guard);
    assert!(in_a && in_b && in_c && back_in_b && back_in_a);
    assert_eq!(current(), root, "all scopes left");

    let sb = exact(&b);
    assert_eq!(sb.usage, 2000 + sb.overhead);
    let sc = exact(&c);
    assert_eq!(sc.usage, 3000 + sc.overhead);
    let sa = exact(&a);
    assert_eq!(
        sa.usage - a0.usage,
        1000 + 2000 + 4000 + (sa.overhead - a0.overhead)
    );
    assert_eq!(live(&sa) - live(&a0), 3);
    // A value returned from run() stays charged to the group after the scope ends.
    let r = c.run(|| Box::new([7u8; 512]));
    let sc = exact(&c);
    assert_eq!(sc.usage, 3000 + 512 + sc.overhead);
    drop((x, y, z, w, r));
    assert_eq!(exact(&b).usage, 0);
    assert_eq!(exact(&c).usage, 0);
    assert_eq!(exact(&a).usage, a0.usage);
}

/// Entered guards are plain values: safe code can drop them out of order. Once every guard is
/// gone the thread must be back where it started, charging nothing to the groups it left.
#[test]
fn guards_dropped_out_of_order() {
    let root = Group::root();
    let a = fresh("ooo-a");
    let b = fresh("ooo-b");
    let ga = a.enter();
    let gb = b.enter();
    drop(ga);
    drop(gb);
    let back_at_root = current() == root;
    let stray = Block::new(10_000, 1);
    let (sa, sb) = (exact(&a), exact(&b));
    drop(stray);
    assert!(
        back_at_root,
        "after dropping every guard the thread charges the root"
    );
    assert_eq!((sa.usage, sa.allocs), (0, 0), "a was left: {sa:?}");
    assert_eq!((sb.usage, sb.allocs), (0, 0), "b was left: {sb:?}");
}

/// A panic inside a scope leaves the thread where it was: group, kind and limit mode.
#[test]
fn scopes_restored_after_a_panic() {
    let root = Group::root();
    let g = fresh("panic-g");
    // Room for the panic's own allocations, not for a 5000-byte block.
    g.set_max(Some(block_cost(5000, 1) - 1));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        g.run(|| memgroup::fallible(|| kernel(|| std::panic::resume_unwind(Box::new(7u8)))))
    }));
    // The payload was boxed inside the scope: kernel memory of g, freed here.
    let payload = r.expect_err("the closure panicked");
    assert_eq!(payload.downcast_ref::<u8>(), Some(&7));
    assert_eq!(exact(&g).kmem, exact(&g).usage);
    drop(payload);
    assert_eq!(current(), root, "back at the root");
    // No longer fallible nor kernel: an over-limit allocation in g is forced, as user memory.
    let b = g.run(|| Block::new(5000, 1));
    let s = exact(&g);
    assert_eq!((s.usage, s.kmem), (5000 + s.overhead, 0));
    assert_eq!((s.events.max, s.events.fail), (1, 0));
    drop(b);
}

#[test]
fn scopes_are_per_thread() {
    let a = fresh("perthread-a");
    let _g = a.enter();
    let other = std::thread::spawn(|| current() == Group::root())
        .join()
        .unwrap();
    assert!(other, "another thread is not in this thread's scope");
    assert_eq!(current(), a);
}

/// stat() may over-report by the stocks' slack, at most one batch per CPU, never under-report.
#[test]
fn stat_over_reports_at_most_a_batch_per_cpu() {
    let g = fresh("slack");
    let mut held = Vec::with_capacity(1200);
    g.run(|| {
        for i in 0..1000usize {
            held.push(Block::new(i % 300 + 1, 1));
        }
    });
    let s = exact(&g);
    assert_eq!(
        s.usage,
        held.iter().map(Block::size).sum::<usize>() + s.overhead
    );
    // Allocate more without flushing and look at the fast figure.
    g.run(|| {
        for i in 0..200usize {
            held.push(Block::new(i + 1, 1));
        }
    });
    let fast = g.stat().usage;
    let s = exact(&g);
    assert_eq!(
        s.usage,
        held.iter().map(Block::size).sum::<usize>() + s.overhead
    );
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize;
    assert!(
        fast >= s.usage,
        "stat() never under-reports: {fast} < {}",
        s.usage
    );
    assert!(
        fast - s.usage <= stock_batch() * cpus,
        "slack {} > batch x {cpus}",
        fast - s.usage
    );
    drop(held);
    assert_eq!(exact(&g).usage, 0);
}

enum Item {
    Bytes(Vec<u8>),
    Text(String),
    Boxed(Box<[u64; 8]>),
    Map(HashMap<u32, String>),
    Raw(Block),
}

fn make_item(rng: &mut Rng) -> Item {
    let size = if rng.one_in(25) {
        rng.range(64 * 1024 + 1, 300_000)
    } else {
        rng.range(1, 4096)
    };
    match rng.next() % 5 {
        0 => Item::Bytes(vec![size as u8; size]),
        1 => Item::Text("x".repeat(size)),
        2 => Item::Boxed(Box::new([size as u64; 8])),
        3 => {
            let n = rng.range(1, 40);
            Item::Map((0..n as u32).map(|k| (k, format!("{k}:{size}"))).collect())
        }
        _ => {
            let b = Block::new(size, 1 << rng.range(0, 7));
            // SAFETY: the block is valid for `size` bytes.
            unsafe { std::ptr::write_bytes(b.ptr(), 1, size) };
            Item::Raw(b)
        }
    }
}

fn mutate(item: &mut Item, rng: &mut Rng) {
    match item {
        Item::Bytes(v) => {
            let n = rng.range(1, 5000);
            v.extend(std::iter::repeat_n(3u8, n));
            if rng.one_in(3) {
                v.truncate(v.len() / 2);
                v.shrink_to_fit();
            }
        }
        Item::Text(s) => s.push_str(&"y".repeat(rng.range(1, 3000))),
        Item::Boxed(b) => b[0] += 1,
        Item::Map(m) => {
            let k = rng.next() as u32;
            m.insert(k, "z".repeat(rng.range(1, 200)));
        }
        Item::Raw(b) => b.bytes_mut()[0] ^= 1,
    }
}

/// THE key property: several threads churn several groups, hand blocks to each other and free
/// each other's blocks; once everything is freed every group is exactly back to zero.
#[test]
fn churn_across_threads_and_groups_returns_to_zero() {
    const THREADS: usize = 4;
    let tenants = Tenants::new("churn-t");
    let groups = tenants.groups.clone();
    churn_threads(THREADS, 100_000, 250, 0xC0FFEE, move |rng, held, senders, rx| {
        let g = &groups[rng.range(0, groups.len() - 1)];
        match rng.next() % 100 {
            0..=39 => {
                let item = if rng.one_in(8) {
                    g.run(|| kernel(|| make_item(rng)))
                } else {
                    g.run(|| make_item(rng))
                };
                held.push(item);
            }
            40..=54 => send_one(rng, g, held, senders),
            55..=69 => held.extend(rx.try_iter()),
            70..=89 => drop_one(rng, g, held),
            90..=99 if !held.is_empty() => {
                let i = rng.range(0, held.len() - 1);
                if rng.one_in(2) {
                    g.run(|| mutate(&mut held[i], rng));
                } else {
                    mutate(&mut held[i], rng);
                }
            }
            _ => {}
        }
    });
    tenants.check_back_to_zero();
}

child_test! {
    /// MEMGROUP_BATCH=0 turns the stocks off: stat() is exact without flush().
    fn no_stocks_stat_is_exact_without_flush => no_stocks_inner("MEMGROUP_BATCH" = "0") {
        assert_eq!(stock_batch(), 0);
        let g = fresh("nostock");
        let mut held = Vec::with_capacity(300);
        let mut requested = 0;
        for i in 1..=300usize {
            held.push(g.run(|| Block::new(i * 11, 1)));
            requested += i * 11;
            let s = g.stat();
            assert_eq!(
                s.usage,
                requested + s.overhead,
                "exact without flush after {i} blocks"
            );
            assert_eq!(s.allocs, i as u64);
        }
        let other = fresh("nostock-other");
        let t = std::thread::spawn(move || other.run(|| drop(held)));
        t.join().unwrap();
        let s = g.stat();
        assert_eq!((s.usage, s.overhead, live(&s)), (0, 0, 0));
        // Exact limits without stocks: floor(max / cost) small blocks fit (charged one unit at a
        // time: a block in the tag design, a slab in the arena design; see `Cost`).
        let cost = {
            let b = g.run(|| Block::new(100, 1));
            let c = g.stat().usage;
            drop(b);
            c
        };
        let model = Cost::of_size(100);
        assert_eq!(
            model.unit, cost,
            "stat() without flush agrees with the flushed probe"
        );
        let max = 10 * cost + cost / 2;
        g.set_max(Some(max));
        let expect = model.fit(max);
        let mut fit = Vec::with_capacity(expect + 1);
        memgroup::fallible(|| {
            g.run(|| {
                while let Some(b) = Block::try_new(100, 1) {
                    fit.push(b);
                    if fit.len() > expect {
                        break;
                    }
                }
            })
        });
        assert_eq!(fit.len(), expect);
        assert_eq!(g.stat().usage, 10 * cost);
    }
}

child_test! {
    /// A custom batch: stocks exist, and flush() still makes everything exact.
    fn custom_batch_is_used_and_flush_is_exact => custom_batch_inner("MEMGROUP_BATCH" = "4096") {
        assert_eq!(stock_batch(), 4096);
        let g = fresh("batch4k");
        let mut held = Vec::with_capacity(400);
        g.run(|| {
            for i in 1..=400usize {
                held.push(Block::new(i * 29 % 9000 + 1, 1));
            }
        });
        let requested: usize = held.iter().map(Block::size).sum();
        let s = exact(&g);
        assert_eq!(s.usage, requested + s.overhead);
        drop(held);
        let s = exact(&g);
        assert_eq!((s.usage, s.overhead, live(&s)), (0, 0, 0));
    }
}
