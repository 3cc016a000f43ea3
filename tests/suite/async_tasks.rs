// Async tenants: futures in groups on real tokio runtimes, guard, spawn, panics, nesting.

include!("common.rs");

use common::{exact, fresh, Cost};
use memgroup::{Error, Group, GroupFutureExt};
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};

/// Larger than the stock batch: charged exactly.
const BIG: usize = 100_000;

fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// What a group whose tasks ran on a runtime may keep once the runtime is gone: the runtime's
/// own allocations made while polling the group's tasks (measured in this session's runs: 0 in
/// both designs; earlier up to 72 bytes in the tag design and one 4 KiB slab page in the arena,
/// before exited threads' heaps were adopted). A few KiB at most, as the README says.
fn after_runtime_residue() -> usize {
    if Cost::of_size(16).per_unit > 1 {
        8 << 10
    } else {
        1 << 10
    }
}

/// Records the current group's name when dropped.
struct NoteDrop(Arc<Mutex<Option<String>>>);

impl Drop for NoteDrop {
    fn drop(&mut self) {
        *self.0.lock().unwrap() = Some(memgroup::current().name());
    }
}

#[test]
fn in_group_polls_and_drops_in_the_group() {
    let g = fresh("as-poll-drop");
    let seen = Arc::new(Mutex::new(None));
    let note = NoteDrop(seen.clone());
    let g2 = g.clone();
    let fut = async move {
        let _note = note;
        assert_eq!(memgroup::current(), g2, "polled outside its group");
        std::future::pending::<()>().await
    }
    .in_group(&g);
    let mut fut = Box::pin(fut);
    let mut cx = Context::from_waker(Waker::noop());
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    assert_eq!(
        memgroup::current(),
        Group::root(),
        "the poll left its scope"
    );
    drop(fut);
    assert_eq!(seen.lock().unwrap().as_deref(), Some(g.name().as_str()));
    assert_eq!(memgroup::current(), Group::root());
}

#[test]
fn tasks_of_several_groups_hop_workers_and_free_each_others_memory() {
    let rt = multi_thread();
    let groups: Vec<Group> = (0..3).map(|i| fresh(&format!("as-hop{i}"))).collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let held_ok = Arc::new(AtomicUsize::new(0));
    rt.block_on(async {
        // The consumer frees every group's buffers, in the root.
        let consumer = tokio::spawn(async move {
            let mut n = 0;
            while let Some(v) = rx.recv().await {
                black_box(&v);
                n += 1;
            }
            n
        });
        let mut tasks = Vec::new();
        for g in &groups {
            for t in 0..4 {
                let tx = tx.clone();
                let held_ok = held_ok.clone();
                let g2 = g.clone();
                let task = g.run(|| {
                    memgroup::tokio::spawn(async move {
                        let mut keep = Vec::new();
                        for i in 0..20 {
                            let v = black_box(vec![(t + i) as u8; BIG]);
                            tokio::task::yield_now().await;
                            if i % 2 == 0 {
                                tx.send(v).unwrap();
                            } else {
                                keep.push(v);
                            }
                        }
                        if exact(&g2).usage >= keep.len() * BIG {
                            held_ok.fetch_add(1, SeqCst);
                        }
                        assert_eq!(memgroup::current(), g2);
                    })
                });
                tasks.push(task);
            }
        }
        drop(tx);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(consumer.await.unwrap(), 3 * 4 * 10);
    });
    assert_eq!(
        held_ok.load(SeqCst),
        12,
        "a group did not show what its task held"
    );
    // The residue: what each group keeps after its tasks ended, the runtime still alive.
    let residue: Vec<usize> = groups.iter().map(|g| exact(g).usage).collect();
    eprintln!("residue per group after its tasks ended (runtime alive): {residue:?} bytes");
    for (g, r) in groups.iter().zip(&residue) {
        assert!(
            *r < 16 << 10,
            "{} keeps {r} bytes after its tasks ended",
            g.name()
        );
    }
    drop(rt);
    for g in &groups {
        let s = exact(g);
        assert_eq!(
            (s.usage, s.allocs, s.frees),
            (0, s.allocs, s.allocs),
            "{}",
            g.name()
        );
    }
}

#[test]
fn current_thread_runtime_interleaves_two_tenants() {
    let rt = current_thread();
    let (a, b) = (fresh("as-ct-a"), fresh("as-ct-b"));
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let tenant = |g: &Group| {
        let barrier = barrier.clone();
        let g2 = g.clone();
        async move {
            let one = black_box(vec![1u8; BIG]);
            tokio::task::yield_now().await;
            let two = black_box(vec![2u8; BIG]);
            barrier.wait().await;
            let usage = exact(&g2).usage;
            barrier.wait().await;
            drop((one, two));
            usage
        }
        .in_group(g)
    };
    let (ua, ub) = rt.block_on(async { tokio::join!(tenant(&a), tenant(&b)) });
    for (name, u) in [("a", ua), ("b", ub)] {
        assert!(
            (2 * BIG..2 * BIG + (32 << 10)).contains(&u),
            "tenant {name} shows {u} bytes while holding {}",
            2 * BIG
        );
    }
    drop(rt);
    assert_eq!(exact(&a).usage, 0);
    assert_eq!(exact(&b).usage, 0);
}

#[test]
fn aborted_task_frees_its_state_in_its_group() {
    let rt = multi_thread();
    let g = fresh("as-abort");
    let seen = Arc::new(Mutex::new(None));
    let note = NoteDrop(seen.clone());
    let held = rt.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = g.run(|| {
            memgroup::tokio::spawn(async move {
                let _note = note;
                let v = black_box(vec![7u8; 3 * BIG]);
                tx.send(()).unwrap();
                std::future::pending::<()>().await;
                drop(v);
            })
        });
        rx.await.unwrap();
        let held = exact(&g).usage;
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        held
    });
    assert!(held >= 3 * BIG, "the task's buffer was not charged: {held}");
    assert_eq!(seen.lock().unwrap().as_deref(), Some(g.name().as_str()));
    drop(rt);
    let left = exact(&g).usage;
    eprintln!("abort: the group keeps {left} bytes after the runtime is gone");
    assert!(left <= after_runtime_residue(), "{left} bytes left");
}

#[test]
fn in_current_group_captures_the_scope_where_it_is_called() {
    let rt = current_thread();
    let g = fresh("as-current");
    let fut = g.run(|| async { memgroup::current() }.in_current_group());
    assert_eq!(rt.block_on(fut), g);
    let outside = async { memgroup::current() }.in_current_group();
    assert_eq!(rt.block_on(outside), Group::root());
    // spawn_blocking runs in the spawner's group too.
    let _in_rt = rt.enter();
    let name =
        rt.block_on(g.run(|| memgroup::tokio::spawn_blocking(|| memgroup::current().name())));
    assert_eq!(name.unwrap(), g.name());
}

#[test]
fn guard_cancels_a_runaway_tenant_while_a_well_behaved_one_completes() {
    const STEP: usize = 64 << 10;
    const MAX: usize = 1 << 20;
    let rt = multi_thread();
    let (bad, good) = (fresh("as-runaway"), fresh("as-behaved"));
    bad.set_max(Some(MAX));
    good.set_max(Some(MAX));
    let grown = Arc::new(AtomicUsize::new(0));
    let (r_bad, r_good) = rt.block_on(async {
        let grown2 = grown.clone();
        let runaway = tokio::spawn(bad.guard(async move {
            let mut hoard = Vec::new();
            loop {
                hoard.push(black_box(vec![3u8; STEP]));
                grown2.fetch_add(STEP, SeqCst);
                tokio::task::yield_now().await;
            }
        }));
        let behaved = tokio::spawn(good.guard(async {
            let mut keep = Vec::new();
            for _ in 0..4 {
                keep.push(black_box(vec![4u8; STEP]));
                tokio::task::yield_now().await;
            }
            keep.len()
        }));
        (runaway.await.unwrap(), behaved.await.unwrap())
    });
    assert!(matches!(r_bad, Err(Error::OverLimit)), "{r_bad:?}");
    assert_eq!(r_good.unwrap(), 4);
    let grown = grown.load(SeqCst);
    assert!(
        grown > MAX - 2 * STEP && grown < MAX + 4 * STEP,
        "cancelled after {grown} bytes with max {MAX}"
    );
    let left = exact(&bad).usage;
    assert!(
        left <= after_runtime_residue(),
        "the cancelled future's memory was not freed: {left} bytes left"
    );
    assert_eq!(good.stat().events.max, 0);
}

#[test]
fn guard_of_a_group_without_max_never_cancels() {
    let g = fresh("as-guard-unlimited");
    let rt = current_thread();
    let r = rt.block_on(g.guard(async {
        let v = black_box(vec![0u8; 4 * BIG]);
        tokio::task::yield_now().await;
        v.len()
    }));
    assert_eq!(r.unwrap(), 4 * BIG);
}

#[test]
fn a_panic_inside_a_poll_restores_the_scope_and_leaks_nothing() {
    let g = fresh("as-panic");
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let fut = pin!(async {
            let v = black_box(vec![9u8; BIG]);
            if black_box(true) {
                // resume_unwind: no panic hook, so no backtrace captured (and cached by std)
                // inside the group.
                std::panic::resume_unwind(Box::new("boom in a poll"));
            }
            drop(v);
        }
        .in_group(&g));
        let mut cx = Context::from_waker(Waker::noop());
        let _ = fut.poll(&mut cx);
    }));
    assert!(r.is_err());
    assert_eq!(
        memgroup::current(),
        Group::root(),
        "the scope was not restored"
    );
    // What std allocates lazily during the first unwind on a thread and keeps (24 bytes in
    // the tag design when it happens) is the group's; in the arena that one live object holds
    // a 4 KiB slab page.
    let left = exact(&g).usage;
    assert!(left <= after_runtime_residue(), "{left} bytes left");
    // Through a runtime: the task's panic is a JoinError, the worker's scope restored.
    let rt = multi_thread();
    let _in_rt = rt.enter();
    let err = rt
        .block_on(g.run(|| {
            memgroup::tokio::spawn(async {
                let _v = black_box(vec![9u8; BIG]);
                std::panic::resume_unwind(Box::new("boom in a task"));
            })
        }))
        .unwrap_err();
    assert!(err.is_panic());
    let root_after = rt.block_on(tokio::spawn(async { memgroup::current() }));
    assert_eq!(root_after.unwrap(), Group::root());
    drop(_in_rt);
    drop(rt);
    let left = exact(&g).usage;
    assert!(left <= after_runtime_residue(), "{left} bytes left");
}

#[test]
fn nested_groups_and_scopes_inside_async_blocks() {
    let rt = current_thread();
    let (outer, inner) = (fresh("as-nest-outer"), fresh("as-nest-inner"));
    let outer2 = outer.clone();
    let inner2 = inner.clone();
    let (o_usage, i_kmem, refused) = rt.block_on(
        async move {
            let a = black_box(vec![1u8; BIG]);
            let (i_kmem, refused) = async {
                assert_eq!(memgroup::current(), inner2);
                let k = memgroup::kernel(|| black_box(vec![2u8; BIG]));
                tokio::task::yield_now().await;
                let kmem = exact(&inner2).kmem;
                inner2.set_max(Some(exact(&inner2).usage + 1024));
                let refused = memgroup::fallible(|| {
                    let mut v: Vec<u8> = Vec::new();
                    v.try_reserve(4 * BIG).is_err()
                });
                drop(k);
                (kmem, refused)
            }
            .in_group(&inner2)
            .await;
            assert_eq!(memgroup::current(), outer2, "the inner group was not left");
            let usage = exact(&outer2).usage;
            drop(a);
            (usage, i_kmem, refused)
        }
        .in_group(&outer),
    );
    assert!(
        (BIG..BIG + (16 << 10)).contains(&o_usage),
        "outer {o_usage}"
    );
    assert!(
        i_kmem >= BIG,
        "kernel(..) in an async block was not kmem: {i_kmem}"
    );
    assert!(
        refused,
        "fallible(..) in an async block did not refuse over max"
    );
    assert_eq!(exact(&outer).usage, 0);
    assert_eq!(exact(&inner).usage, 0);
}
