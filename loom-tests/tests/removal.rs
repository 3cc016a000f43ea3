//! Model 3: removing a group while its memory is freed (and allocated) elsewhere.
//!
//! A module of the library (see `src/lib.rs`). Groups: P (id 1) and its child C (id 2).
//! C holds 8 live bytes charged through CPU 0's stock (56 more sit in the slot). Thread A
//! removes C as `Group::remove` does (`set_offline`, then `drain_group`); thread B frees C's block,
//! on CPU 0 (the stock's CPU) or CPU 1 (after a migration).
//!
//! Checked in every interleaving: after a final drain P and C are exact (usage 0, one alloc and
//! one free each), and the stocks reported C `emptied` exactly once (it reached 0 while
//! offline, so its record would be freed) and never P (still online). The `promptly` variants
//! check the same before that drain: no slot filled for C after its drain kept its bytes.

use crate::core::stock::{key, Key};
use crate::{model, under, World, ROOT};

const P: u32 = 1;
const C: u32 = 2;
const BATCH: usize = 64;

/// P and C, with C's 8-byte block charged on CPU 0; returns its key.
fn setup() -> (World, Key) {
    let w = World::new(&[ROOT, under(P)], BATCH);
    let k = w.alloc(0, C, false, 8);
    assert_eq!(k, Some(key(C, false)));
    assert_eq!(w.snap(C).usage, BATCH);
    (w, key(C, false))
}

/// `Group::remove`'s part in the core.
fn remove(w: World, id: u32) {
    assert!(w.counter(id).set_offline(), "removed twice");
    w.stocks.drain_group(id);
}

/// What both groups show after everything is freed and drained.
fn check_freed(w: &World, allocs: (u64, u64)) {
    for (id, allocs) in [(C, allocs.0), (P, allocs.1)] {
        let s = w.snap(id);
        assert_eq!(s.usage, 0, "usage of group {id}");
        assert_eq!(s.kmem, 0, "kmem of group {id}");
        assert_eq!(
            (s.allocs, s.frees),
            (allocs, allocs),
            "counts of group {id}"
        );
    }
    assert!(!w.counter(C).is_online());
    assert_eq!(
        w.emptied(C),
        1,
        "C emptied while offline: its record must be freed once"
    );
    assert_eq!(w.emptied(P), 0, "P is online");
}

/// Thread A removes C while thread B frees C's block on `free_cpu`. `promptly`: also require
/// that, as soon as both are done and before any drain, C's usage is 0 and C was reported
/// emptied: freeing a removed group's last byte lets its record go without a flush.
fn removal_races_free(free_cpu: usize, promptly: bool) {
    model(3, move || {
        let (w, k) = setup();
        let a = loom::thread::spawn(move || remove(w, C));
        let b = loom::thread::spawn(move || w.free(free_cpu, k, 8));
        a.join().unwrap();
        b.join().unwrap();
        if promptly {
            check_emptied_promptly(&w);
        }
        w.flush();
        check_freed(&w, (1, 1));
    });
}

/// The removed group C, all of whose memory was freed, is empty and was reported emptied
/// before any drain: no stock slot kept its bytes.
fn check_emptied_promptly(w: &World) {
    assert_eq!(
        w.snap(C).usage,
        0,
        "C's freed bytes are still charged to it"
    );
    assert_eq!(w.emptied(C), 1, "C was not reported emptied");
}

#[test]
fn removal_races_free_on_stock_cpu() {
    removal_races_free(0, false);
}

#[test]
fn removal_races_free_after_migration() {
    removal_races_free(1, false);
}

/// Thread B is still inside C: it allocates a new block (served from C's stock if it wins
/// the race, else charged to P, C's nearest live ancestor, which the returned key says),
/// frees it, then frees C's old block.
fn removal_races_alloc_and_free(promptly: bool) {
    model(3, move || {
        let (w, k) = setup();
        let a = loom::thread::spawn(move || remove(w, C));
        let b = loom::thread::spawn(move || {
            let new = w.alloc(0, C, false, 8).expect("nothing is limited");
            assert!(new == k || new == key(P, false), "charged to {new}");
            w.free(0, new, 8);
            w.free(0, k, 8);
            new == k
        });
        a.join().unwrap();
        let to_c = b.join().unwrap();
        if promptly {
            check_emptied_promptly(&w);
        }
        w.flush();
        check_freed(&w, (1 + to_c as u64, 2));
    });
}

#[test]
fn removal_races_alloc_and_free_in_removed_group() {
    removal_races_alloc_and_free(false);
}

/// A removal must also clear C's claimed but empty slots, or a later free finds one on the fast
/// path and leaves its bytes there. C's blocks of 8 and 56 exhaust CPU 0's slot, and a third
/// block of 8 finds P's max (72) too tight to refill it: `take` left the slot claimed with
/// nothing in it, and the block was charged exactly. Thread B then frees all three on CPU 0.
fn removal_races_frees_into_claimed_empty_slot(promptly: bool) {
    model(3, move || {
        let (w, k) = setup();
        assert_eq!(w.alloc(0, C, false, 56), Some(k));
        w.counter(P).set_max(Some(72));
        assert_eq!(w.alloc(0, C, false, 8), Some(k));
        w.counter(P).set_max(None);
        assert_eq!(w.snap(C).usage, 72);
        let a = loom::thread::spawn(move || remove(w, C));
        let b = loom::thread::spawn(move || {
            for bytes in [8, 56, 8] {
                w.free(0, k, bytes);
            }
        });
        a.join().unwrap();
        b.join().unwrap();
        if promptly {
            check_emptied_promptly(&w);
        }
        w.flush();
        check_freed(&w, (3, 3));
    });
}

#[test]
fn removal_races_frees_into_exhausted_stock() {
    removal_races_frees_into_claimed_empty_slot(false);
}

// The same races, requiring the record to be released without a flush: a slow path that
// tests `is_online()` and then fills a slot (`refill_slot`, `claim`) may do so after A's `drain_group`
// emptied C's slots; it must then see C offline (`Stocks::recheck`) and drain again, or C's
// bytes sit in that slot, C's usage stays above 0 and it is not reported emptied until
// something drains the slot.

#[test]
fn removed_group_is_emptied_promptly_free_on_stock_cpu() {
    removal_races_free(0, true);
}

#[test]
fn removed_group_is_emptied_promptly_alloc_and_free() {
    removal_races_alloc_and_free(true);
}

#[test]
fn removed_group_is_emptied_promptly_frees_into_exhausted_stock() {
    removal_races_frees_into_claimed_empty_slot(true);
}

/// Here B claims a slot on CPU 1, which A's drain finds only if it reads the `span` B's claim
/// raised. `recheck` and `remove` pair up as a store-then-load on each side (Dekker) with
/// sequentially consistent accesses, which is correct in C11 but which loom cannot check:
/// loom treats `SeqCst` accesses as `AcqRel` (only `fence(SeqCst)` is modelled), so it reports
/// an execution where B's recheck reads `online` before A's swap while A's drain reads `span`
/// before B's raise, which no sequentially consistent order allows. With a `fence(SeqCst)`
/// between the store and the load on both sides, the model passes.
#[test]
fn removed_group_is_emptied_promptly_free_after_migration() {
    removal_races_free(1, true);
}
