// Group removal: errors, names, threads inside removed groups, reparenting of live charges,
// dying groups, thousands of groups, and the bookkeeping charged to the parent.

include!("common.rs");

use common::{exact, fresh, fresh_child, live, unique_name, Block};
use memgroup::{dying_groups, fallible, nofail, Error, Group, OnLimit};
use std::sync::{Arc, Barrier, Mutex, MutexGuard};

/// dying_groups() is process-wide: the tests of this binary that remove groups run one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn assert_display(e: &Error) {
    let text = e.to_string();
    assert!(!text.trim().is_empty(), "Display of {e:?} is empty");
    let as_std: &dyn std::error::Error = e;
    assert_eq!(as_std.to_string(), text);
}

#[test]
fn remove_errors() {
    let _s = serial();
    let e = Group::root().remove().unwrap_err();
    assert_eq!(e, Error::Root);
    assert_display(&e);

    let g = fresh("rm-twice");
    let g2 = g.clone();
    assert!(!g2.is_removed());
    g.remove().expect("first remove");
    assert!(g2.is_removed());
    let e = g2.clone().remove().unwrap_err();
    assert_eq!(e, Error::Removed);
    assert_display(&e);
    let e = g2.child("x").unwrap_err();
    assert_eq!(e, Error::Removed, "child() of a removed group");

    let p = fresh("rm-haschildren");
    let c = fresh_child(&p, "c");
    let e = p.clone().remove().unwrap_err();
    assert_eq!(e, Error::HasChildren);
    assert_display(&e);
    assert!(!p.is_removed());
    c.remove().expect("leaf first");
    p.remove().expect("then the parent");
}

#[test]
fn invalid_and_duplicate_names() {
    let _s = serial();
    let long = "n".repeat(65);
    for bad in ["", "/", "a/b", "/a", "a/", ".", "..", "a\0b", long.as_str()] {
        match Group::new(bad) {
            Err(e @ Error::InvalidName { .. }) => {
                assert_display(&e);
                if let Error::InvalidName { name, reason } = &e {
                    assert_eq!(name, bad);
                    assert!(!reason.is_empty());
                }
            }
            other => panic!("Group::new({bad:?}) gave {other:?}"),
        }
        let p = fresh("badnames");
        assert!(
            matches!(p.child(bad), Err(Error::InvalidName { .. })),
            "child({bad:?})"
        );
        p.remove().unwrap();
    }
    // 64 bytes is allowed; so are dots inside a name.
    let ok64 = format!("{:m<64}", unique_name("ok64"));
    assert_eq!(ok64.len(), 64);
    let g = Group::new(&ok64).expect("a 64-byte name is valid");
    assert_eq!(g.name(), ok64);
    let dots = fresh("a..b.");
    assert!(dots.name().starts_with("a..b."));

    // Duplicates among siblings.
    let name = unique_name("dup");
    let first = Group::new(&name).unwrap();
    let e = Group::new(&name).unwrap_err();
    assert_eq!(e, Error::Exists { name: name.clone() });
    assert_display(&e);
    let c = first.child("same").unwrap();
    assert_eq!(
        first.child("same").unwrap_err(),
        Error::Exists {
            name: "same".into()
        }
    );
    // The same name under another parent is fine.
    let other = fresh("dup-other");
    let c2 = other.child("same").expect("same name, different parent");
    assert_ne!(c, c2);
    assert_eq!(c.name(), format!("{name}/same"));
    for grp in [c, c2, first, other, g, dots] {
        grp.remove().unwrap();
    }
}

#[test]
fn name_reuse_after_remove() {
    let _s = serial();
    let name = unique_name("reuse");
    let g = Group::new(&name).unwrap();
    g.remove().unwrap();
    let g = Group::new(&name).expect("the name of an empty removed group is free");
    // Also when the removed group is still dying (holds live memory).
    let dying0 = dying_groups();
    let held = g.run(|| Block::new(5000, 1));
    let old = g.clone();
    g.remove().unwrap();
    assert_eq!(dying_groups(), dying0 + 1);
    let g2 = Group::new(&name).expect("the name of a dying group is free");
    assert_ne!(g2, old, "a new group, not the removed one");
    assert!(!g2.is_removed() && old.is_removed());
    drop(old);
    assert_eq!(dying_groups(), dying0 + 1, "still dying: it holds memory");
    let s = exact(&g2);
    assert_eq!(
        (s.usage, s.allocs),
        (0, 0),
        "the new group does not inherit the old charges"
    );
    drop(held);
    assert_eq!(dying_groups(), dying0);
    g2.remove().unwrap();
}

#[test]
fn thread_inside_a_removed_group_charges_the_parent() {
    let _s = serial();
    let p = fresh("inside-p");
    let c = fresh_child(&p, "c");
    // A Barrier does not allocate when waiting, so nothing but the blocks is charged in c.
    let barrier = Arc::new(Barrier::new(2));
    let (c2, b2) = (c.clone(), barrier.clone());
    let t = std::thread::spawn(move || {
        let entered = c2.enter();
        let before = Block::new(100_000, 1);
        b2.wait(); // entered and allocated: main removes c now
        b2.wait(); // c was removed
        let after = Block::new(200_000, 1);
        drop(entered);
        (before, after)
    });
    barrier.wait();
    let pc = exact(&p);
    c.remove().expect("removing a group a thread is inside");
    barrier.wait();
    let (before, after) = t.join().unwrap();
    // Both blocks are charged to p: the first reparented, the second charged to p directly.
    let s = exact(&p);
    let o_after = s.overhead - pc.overhead;
    assert_eq!(
        s.usage,
        pc.usage + 200_000 + o_after,
        "the thread inside c charged the parent"
    );
    assert_eq!(live(&s), live(&pc) + 1);
    drop(after);
    let s = exact(&p);
    assert_eq!(s.usage, pc.usage, "freeing it uncharges the parent exactly");
    drop(before);
    let s = exact(&p);
    assert_eq!(
        (s.usage, s.kmem, live(&s)),
        (0, 0, 0),
        "c's bookkeeping freed too: {s:?}"
    );
}

#[test]
fn entering_a_removed_group_charges_the_parent() {
    let _s = serial();
    let dying0 = dying_groups();
    let p = fresh("enter-removed-p");
    let c = fresh_child(&p, "c");
    let c2 = c.clone();
    let p0 = exact(&p); // c's bookkeeping, kept while a handle holds c's record
    c.remove().unwrap();
    assert!(c2.is_removed());
    let b = c2.run(|| Block::new(70_000, 1));
    let s = exact(&p);
    assert_eq!(
        s.usage,
        p0.usage + 70_000 + s.overhead,
        "charged to the parent"
    );
    drop(b);
    assert_eq!(exact(&p).usage, p0.usage);
    drop(c2);
    let s = exact(&p);
    assert_eq!(
        (s.usage, s.kmem, live(&s)),
        (0, 0, 0),
        "the last handle frees c's record"
    );
    assert_eq!(dying_groups(), dying0);
}

#[test]
fn live_charges_reparented_and_dying_groups_return() {
    let _s = serial();
    let dying0 = dying_groups();
    let p = fresh("reparent-p");
    let c = fresh_child(&p, "c");
    let gc = fresh_child(&c, "gc");
    let mut blocks = Vec::with_capacity(101);
    gc.run(|| {
        for i in 1..=100usize {
            blocks.push(Block::new(i * 10, 1));
        }
        blocks.push(Block::new(150_000, 1));
    });
    let requested: usize = blocks.iter().map(Block::size).sum();
    let p1 = exact(&p);
    let c1 = exact(&c);
    let gc1 = exact(&gc);
    assert_eq!(gc1.usage, requested + gc1.overhead);
    gc.remove().expect("remove the leaf holding memory");
    assert_eq!(
        dying_groups(),
        dying0 + 1,
        "a removed group with live memory is dying"
    );
    let (p2, c2) = (exact(&p), exact(&c));
    assert_eq!(
        (c2.usage, c2.kmem, c2.overhead),
        (c1.usage, c1.kmem, c1.overhead),
        "charges stay"
    );
    assert_eq!(p2.usage, p1.usage);
    // A removed child does not block removing its parent; the charges move up again.
    c.remove()
        .expect("removed children do not count as children");
    assert_eq!(
        dying_groups(),
        dying0 + 2,
        "c holds gc's charges and bookkeeping"
    );
    assert_eq!(exact(&p).usage, p1.usage);
    // Free half: still dying.
    let rest = blocks.split_off(50);
    drop(blocks);
    assert_eq!(dying_groups(), dying0 + 2);
    let s = exact(&p);
    let rest_req: usize = rest.iter().map(Block::size).sum();
    assert!(s.usage > rest_req && s.usage < p1.usage);
    // Free the rest from another thread: all records go, and p is exactly empty.
    std::thread::spawn(move || drop(rest)).join().unwrap();
    assert_eq!(
        dying_groups(),
        dying0,
        "dying groups freed once their memory is freed"
    );
    let s = exact(&p);
    assert_eq!(
        (s.usage, s.kmem, s.overhead, live(&s)),
        (0, 0, 0, 0),
        "{s:?}"
    );
    p.remove().unwrap();
}

/// A block of a removed group keeps its owner through realloc: growth and shrinkage move the
/// removed group's (hence the parent's) counters, and the last free lets the record go.
#[test]
fn realloc_of_a_removed_groups_block() {
    let _s = serial();
    let dying0 = dying_groups();
    let p = fresh("rm-realloc-p");
    let c = fresh_child(&p, "c");
    let blk = c.run(|| Block::new(1000, 16));
    let small = c.run(|| Block::new(100, 1));
    c.remove().unwrap();
    assert_eq!(dying_groups(), dying0 + 1);
    let bk = {
        let s = exact(&p);
        s.usage - (1000 + 100 + s.overhead)
    };
    let other = fresh("rm-realloc-other");
    let blk = other.run(|| blk.realloc(200_000)).ok().expect("grow");
    assert_eq!(exact(&other).usage, 0, "not charged to the scope");
    let s = exact(&p);
    assert_eq!(
        s.usage,
        bk + 200_000 + 100 + s.overhead,
        "growth charged to the owner's chain"
    );
    let blk = blk.realloc(3000).ok().expect("shrink below the batch");
    let s = exact(&p);
    assert_eq!(s.usage, bk + 3000 + 100 + s.overhead);
    let blk = blk.realloc(50).ok().expect("shrink");
    let s = exact(&p);
    assert_eq!(s.usage, bk + 50 + 100 + s.overhead);
    drop(small);
    assert_eq!(
        dying_groups(),
        dying0 + 1,
        "still holds the reallocated block"
    );
    drop(blk);
    assert_eq!(dying_groups(), dying0, "freed with its last block");
    let s = exact(&p);
    assert_eq!((s.usage, s.kmem, live(&s)), (0, 0, 0));
    other.remove().unwrap();
}

/// Removal racing with threads that keep charging and freeing in the group (small blocks, so
/// the stocks are busy): nothing may be lost in a stock of the removed group; once everything
/// is freed the record goes and the parent is exactly empty.
#[test]
fn remove_races_with_charges() {
    let _s = serial();
    let dying0 = dying_groups();
    let p = fresh("rm-race-p");
    // A deep chain makes every counter walk, hence the race window, longer.
    let mut chain = vec![p.clone()];
    for d in 0..12 {
        let next = chain.last().unwrap().child(&format!("d{d}")).unwrap();
        chain.push(next);
    }
    let base = exact(&p);
    for round in 0..300u64 {
        let c = fresh_child(chain.last().unwrap(), "c");
        let start = Arc::new(Barrier::new(5));
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let (c, start) = (c.clone(), start.clone());
                std::thread::spawn(move || {
                    let mut rng = common::Rng::new(round * 4 + t);
                    let mut held = Vec::with_capacity(400);
                    let entered = c.enter();
                    drop(c); // only the scope holds the group now
                    start.wait();
                    for _ in 0..1000 {
                        if held.len() < 400 && !rng.one_in(3) {
                            held.push(Block::new(rng.range(1, 16_384), 8));
                        } else if !held.is_empty() {
                            held.swap_remove(rng.range(0, held.len() - 1));
                        }
                    }
                    drop(entered);
                    held
                })
            })
            .collect();
        start.wait();
        // Remove in the middle of the churn, at a different moment each round.
        let until =
            std::time::Instant::now() + std::time::Duration::from_micros(20 + round % 50 * 20);
        while std::time::Instant::now() < until {
            std::hint::spin_loop();
        }
        c.remove().unwrap();
        let held: Vec<Vec<Block>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        // Free half from here (a third scope) and half from a fresh thread.
        let (mine, theirs): (Vec<_>, Vec<_>) = held
            .into_iter()
            .flatten()
            .enumerate()
            .partition(|(i, _)| i % 2 == 0);
        drop(mine);
        std::thread::spawn(move || drop(theirs)).join().unwrap();
        let dying_after_free = dying_groups();
        let fast = p.stat();
        let s = exact(&p);
        let dying_after_flush = dying_groups();
        assert_eq!(
            (dying_after_free, dying_after_flush),
            (dying0, dying0),
            "round {round}: the removed group's record is freed with its last byte \
             (before flush / after flush; p before flush: {fast:?})"
        );
        assert_eq!(
            (s.usage, s.kmem, live(&s)),
            (base.usage, base.kmem, live(&base)),
            "round {round}: {s:?}"
        );
    }
    drop(p);
    while let Some(g) = chain.pop() {
        g.remove().unwrap();
    }
    assert_eq!(dying_groups(), dying0);
}

#[test]
fn dying_groups_unchanged_by_empty_removal() {
    let _s = serial();
    let dying0 = dying_groups();
    let g = fresh("empty-rm");
    let b = g.run(|| Block::new(3000, 1));
    drop(b);
    g.remove().unwrap();
    assert_eq!(
        dying_groups(),
        dying0,
        "a group holding nothing is freed at once"
    );
}

#[test]
fn thousands_of_groups() {
    let _s = serial();
    const N: usize = 5000;
    let dying0 = dying_groups();
    let p = fresh("many");
    let p0 = exact(&p);
    assert_eq!(p0.usage, 0);
    let mut kept = Vec::with_capacity(N);
    for i in 0..N {
        let c = p.child(&format!("s{i}")).expect("child");
        let b = c.run(|| Block::new(16 + i % 500, 1));
        if i % 2 == 0 {
            // Removed with live memory: dying until the block is freed.
            c.remove().unwrap();
            kept.push(b);
        } else {
            drop(b);
            c.remove().unwrap();
        }
    }
    assert_eq!(dying_groups(), dying0 + N / 2);
    let s = exact(&p);
    let requested: usize = kept.iter().map(Block::size).sum();
    assert!(
        s.kmem > 0,
        "the dying children's bookkeeping is still charged"
    );
    assert_eq!(s.usage - s.kmem, requested + s.overhead);
    // Names of removed groups are free again.
    let again = p.child("s0").expect("reuse a dying group's name");
    again.remove().unwrap();
    drop(kept);
    assert_eq!(dying_groups(), dying0);
    let s = exact(&p);
    assert_eq!(
        (s.usage, s.kmem, s.overhead, live(&s)),
        (0, 0, 0, 0),
        "{s:?}"
    );
    p.remove().unwrap();
}

/// What the bookkeeping of a child named `name` costs `parent` (created and removed to measure).
fn bookkeeping(parent: &Group, name: &str) -> usize {
    let before = exact(parent);
    let c = parent.child(name).unwrap();
    let s = exact(parent);
    assert_eq!(
        s.usage - before.usage,
        s.kmem - before.kmem,
        "bookkeeping is kernel memory"
    );
    c.remove().unwrap();
    assert_eq!(
        exact(parent).usage,
        before.usage,
        "an empty child's bookkeeping goes at removal"
    );
    s.kmem - before.kmem
}

#[test]
fn bookkeeping_is_charged_to_the_parent_as_kmem() {
    let _s = serial();
    let p = fresh("bk");
    let s0 = exact(&p);
    assert_eq!((s0.usage, s0.kmem), (0, 0));
    let c1 = p.child("aa").unwrap();
    let s1 = exact(&p);
    assert!(s1.kmem > 0, "a child's record is charged to its parent");
    assert_eq!(s1.usage, s1.kmem);
    let c1s = exact(&c1);
    assert_eq!((c1s.usage, c1s.kmem), (0, 0), "not to the child itself");
    let c2 = p.child("bb").unwrap();
    let s2 = exact(&p);
    assert_eq!(
        s2.kmem,
        2 * s1.kmem,
        "two children of equal names cost twice one"
    );
    // Grandchildren's bookkeeping is charged to their parent, hence to p too.
    let gc = c1.child("cc").unwrap();
    let c1s = exact(&c1);
    assert!(c1s.kmem > 0);
    assert_eq!(c1s.usage, c1s.kmem);
    assert_eq!(exact(&p).kmem, 2 * s1.kmem + c1s.kmem);
    gc.remove().unwrap();
    c1.remove().unwrap();
    assert_eq!(exact(&p).kmem, s1.kmem);
    c2.remove().unwrap();
    let s = exact(&p);
    assert_eq!((s.usage, s.kmem), (0, 0));
    p.remove().unwrap();
}

#[test]
fn child_fails_when_the_parent_cannot_hold_its_bookkeeping() {
    let _s = serial();
    // max one byte too small, whatever the policy (default Overcharge, Fail, inside nofail).
    for policy in [OnLimit::Overcharge, OnLimit::Fail] {
        let p = fresh("bk-limit");
        let b = bookkeeping(&p, "aa");
        p.set_on_limit(policy);
        p.set_max(Some(b - 1));
        assert_eq!(p.child("aa").unwrap_err(), Error::OverLimit, "{policy:?}");
        let e = nofail(|| p.child("aa")).unwrap_err();
        assert_eq!(e, Error::OverLimit, "nofail does not apply to bookkeeping");
        assert_display(&e);
        let s = exact(&p);
        assert_eq!(
            (s.usage, s.kmem),
            (0, 0),
            "a refused child changes no counter"
        );
        p.set_max(Some(b));
        let c = p.child("aa").expect("exactly fits");
        assert_eq!(exact(&p).usage, b);
        assert_eq!(
            p.child("bb").unwrap_err(),
            Error::OverLimit,
            "a second does not fit"
        );
        c.remove().unwrap();
        p.remove().unwrap();
    }
    // kmem_max applies to bookkeeping as well.
    let p = fresh("bk-kmem-limit");
    let b = bookkeeping(&p, "aa");
    p.set_kmem_max(Some(b - 1));
    assert_eq!(fallible(|| p.child("aa")).unwrap_err(), Error::OverLimit);
    assert_eq!(p.child("aa").unwrap_err(), Error::OverLimit);
    p.set_kmem_max(Some(b));
    p.child("aa").unwrap().remove().unwrap();
    // An ancestor's limit too.
    let gp = fresh("bk-gp");
    let parent = gp.child("pp").unwrap();
    let b = bookkeeping(&parent, "aa");
    let used = exact(&gp).usage;
    gp.set_max(Some(used + b - 1));
    assert_eq!(
        parent.child("aa").unwrap_err(),
        Error::OverLimit,
        "grandparent's max"
    );
    assert_eq!(exact(&gp).usage, used);
    gp.set_max(Some(used + b));
    let c = parent.child("aa").expect("fits the grandparent exactly");
    assert_eq!(exact(&gp).usage, used + b);
    for g in [c, parent, gp, p] {
        g.remove().unwrap();
    }
}

#[test]
fn names_and_parents() {
    let _s = serial();
    let a = fresh("names");
    let b = a.child("b").unwrap();
    let c = b.child("c").unwrap();
    assert_eq!(c.name(), format!("{}/b/c", a.name()));
    assert_eq!(c.parent(), Some(b.clone()));
    assert_eq!(b.parent(), Some(a.clone()));
    assert_eq!(a.parent(), Some(Group::root()));
    assert_eq!(Group::root().name(), "/");
    // A group's name stays readable after removal.
    let name = c.name();
    let c2 = c.clone();
    c.remove().unwrap();
    assert_eq!(c2.name(), name);
    b.remove().unwrap();
    a.remove().unwrap();
}
