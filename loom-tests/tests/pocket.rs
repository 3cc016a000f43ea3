//! Per-thread pockets (`core::pocket`) in front of the per-CPU stocks: an owner charging and
//! uncharging its pocket with plain loads and stores while other threads take its content (a
//! drain, a charge refused at a limit, a group's removal) or delist it.
//!
//! A module of the library (see `src/lib.rs`). Batch 128, so a pocket holds at most 16 bytes
//! and `refill_pocket` puts 8 in it; blocks are 8 bytes, so a pocket serves a block or two between
//! refills, and a third free overflows it. A block's `pad` (8 for a 16-aligned block) goes to the
//! pocket's `extra` when the pocket serves it, else straight to its group's overhead figure.
//! Threads reach the pocket and the stocks as `src/tag.rs` does (`World::pocket_alloc`,
//! `World::pocket_free`).
//!
//! Under loom the owner's `light_fence` is a full fence, and the model's `Groups::barrier`
//! (standing for `membarrier(2)`) another, so these models check the stop protocol as the
//! design states it: an owner touches its word only after raising `busy` and seeing `stop` at
//! 0; a taker raises `stop`, runs the barrier, waits for every `busy` to drop, then takes the
//! word (and `extra` with it) by compare-and-swap. If an owner could touch its word while a
//! taker is at work (no `stop` check, no barrier, no wait), its plain store would overwrite a
//! taker's take, and the content would be drained twice or a change lost.
//!
//! Checked in every interleaving: after a final drain every counter is exact (`usage` equals
//! the live blocks' bytes, `allocs` and `frees` the blocks allocated and freed, `overhead` the
//! live blocks' pads), and no drain stays counted in.

use crate::core::pocket::Pocket;
use crate::core::stock::{key, Key};
use crate::expect::{check, sum, Expect};
use crate::{model, under, World, ROOT};

const BATCH: usize = 128;
/// A block's bytes: half a pocket, so a `refill_pocket` makes room for exactly one.
const BLOCK: usize = 8;
/// The pad of a 16-aligned block.
const PAD: usize = 8;

// ---- 1. An owner's fast paths and refills racing a drain ------------------------------------

mod drain {
    use super::*;

    const R: u32 = 1;
    const C: u32 = 2;
    const D: u32 = 3;

    /// R with children C and D; one pocket, holding 8 bytes of C, beside a block `x` of C
    /// (padded) that CPU 0's stock served (its slot keeps 112 more).
    fn setup() -> (World, &'static crate::core::pocket::Pocket) {
        let w = World::new(&[ROOT, under(R), under(R)], BATCH);
        let p = w.pocket();
        assert_eq!(
            w.pocket_alloc(0, p, C, false, BLOCK, PAD),
            Some(key(C, false))
        );
        assert_eq!(
            w.snap(C).usage,
            BATCH,
            "one refill: 8 bytes live, 8 pocketed, 112 stocked"
        );
        (w, p)
    }

    /// The owner allocates a padded block `y` (from its pocket, or from the stock and a refill
    /// if a drain emptied the pocket first), frees `x` (into the pocket, or past it), and, if
    /// `free_all`, `y` too; thread B drains every stock and pocket meanwhile. Each pocket
    /// access races the drain's stop: a drain that took the word while the owner wrote it
    /// would drain bytes and counts the owner then keeps using (usage and counts twice), or
    /// the owner's store would bring back content the drain already drained.
    fn owner_races_drain(free_all: bool) {
        model(2, move || {
            let (w, p) = setup();
            let k = key(C, false);
            let a = loom::thread::spawn(move || {
                assert_eq!(w.pocket_alloc(0, p, C, false, BLOCK, PAD), Some(k));
                w.pocket_free(0, p, k, BLOCK, PAD);
                if free_all {
                    w.pocket_free(0, p, k, BLOCK, PAD);
                }
            });
            let b = loom::thread::spawn(move || w.stocks.drain(|_| true));
            a.join().unwrap();
            b.join().unwrap();
            // Before a flush: counted, at least what is live, at most a slot and a pocket
            // more.
            let live = if free_all { 0 } else { BLOCK };
            let usage = w.snap(C).usage;
            assert!(
                (live..=live + BATCH + BATCH / 8).contains(&usage),
                "C's usage {usage} with {live} bytes live"
            );
            w.flush();

            let c = Expect {
                usage: live,
                allocs: 2,
                frees: 1 + free_all as u64,
                overhead: if free_all { 0 } else { PAD as isize },
                ..Expect::default()
            };
            check(&w, C, c);
            check(&w, R, c);
            check(&w, D, Expect::default());
        });
    }

    #[test]
    fn pocket_alloc_and_free_race_drain() {
        owner_races_drain(false);
    }

    #[test]
    fn pocket_alloc_and_frees_race_drain_all_freed() {
        owner_races_drain(true);
    }

    /// A refill for the same key keeps the word's pad in the pocket: the owner allocates
    /// padded blocks `y` (the pocket's last bytes) and `z` (the stock; then the refill for C,
    /// which moves the word's count to the stock, tops the pocket up to half from the stock,
    /// and keeps `y`'s pad in `extra`), then frees `x`, `y` and `z`; thread B drains
    /// meanwhile. A pad kept but lost, or kept and also added to the counter, leaves C's
    /// overhead off.
    #[test]
    fn same_key_refill_keeps_the_pad_racing_drain() {
        model(2, || {
            let (w, p) = setup();
            let k = key(C, false);
            let a = loom::thread::spawn(move || {
                assert_eq!(w.pocket_alloc(0, p, C, false, BLOCK, PAD), Some(k));
                assert_eq!(w.pocket_alloc(0, p, C, false, BLOCK, PAD), Some(k));
                for _ in 0..3 {
                    w.pocket_free(0, p, k, BLOCK, PAD);
                }
            });
            let b = loom::thread::spawn(move || w.stocks.drain(|_| true));
            a.join().unwrap();
            b.join().unwrap();
            w.flush();
            let c = Expect {
                allocs: 3,
                frees: 3,
                ..Expect::default()
            };
            check(&w, C, c);
            check(&w, R, c);
            check(&w, D, Expect::default());
        });
    }

    /// Frees of another group's blocks into the far word, racing a drain: two blocks of D
    /// (padded), charged on CPU 1 by a thread with no pocket, are freed by the owner of the
    /// pocket (which holds C): the first past the pocket (to CPU 0's stock; then the far word
    /// is given D), the second into the far word (its pad into the far word's extra). Thread B
    /// drains meanwhile, racing the far word's claim (its take of the far word, its store of
    /// D's) and the free into it. A far word written while the drain took it would lose or
    /// double D's bytes, counts or pad.
    #[test]
    fn far_frees_race_drain() {
        model(2, || {
            let (w, p) = setup();
            let d = key(D, false);
            for _ in 0..2 {
                assert_eq!(w.alloc(1, D, false, BLOCK), Some(d));
            }
            w.counter(D).adjust_overhead(2 * PAD as isize);
            let a = loom::thread::spawn(move || {
                w.pocket_free(0, p, d, BLOCK, PAD);
                w.pocket_free(0, p, d, BLOCK, PAD);
            });
            let b = loom::thread::spawn(move || w.stocks.drain(|_| true));
            a.join().unwrap();
            b.join().unwrap();
            w.flush();
            assert!(
                !w.stocks.pocket_far_holds(p, d) || w.snap(D).usage == 0,
                "a drained far word holds nothing"
            );
            let c = Expect {
                usage: BLOCK,
                allocs: 1,
                overhead: PAD as isize,
                ..Expect::default()
            };
            let dd = Expect {
                allocs: 2,
                frees: 2,
                ..Expect::default()
            };
            check(&w, C, c);
            check(&w, D, dd);
            check(&w, R, sum(c, dd));
        });
    }

    /// The owner switches groups: its pocket holds C's bytes when it allocates a block `d` of
    /// D (padded), which the stock serves; the `refill_pocket` for D gives C's content back to CPU 0's
    /// stock and puts 8 of D's bytes in the pocket. It then frees `d` into the pocket (its
    /// pad into `extra`). Thread B drains meanwhile, racing the refill's take of the pocket, its
    /// refill of C's slot with C's content, and its store of D's word.
    #[test]
    fn pocket_switching_groups_races_drain() {
        model(2, || {
            let (w, p) = setup();
            let d = key(D, false);
            let a = loom::thread::spawn(move || {
                assert_eq!(w.pocket_alloc(0, p, D, false, BLOCK, PAD), Some(d));
                w.pocket_free(0, p, d, BLOCK, PAD);
            });
            let b = loom::thread::spawn(move || w.stocks.drain(|_| true));
            a.join().unwrap();
            b.join().unwrap();
            w.flush();

            let c = Expect {
                usage: BLOCK,
                allocs: 1,
                overhead: PAD as isize,
                ..Expect::default()
            };
            let d = Expect {
                allocs: 1,
                frees: 1,
                ..Expect::default()
            };
            check(&w, C, c);
            check(&w, D, d);
            check(&w, R, sum(c, d));
        });
    }
}

// ---- 2. Exact limits: a charge at the limit takes another thread's pocket ------------------

mod limit {
    use super::*;

    const R: u32 = 1;
    const P: u32 = 2;
    const C: u32 = 3;
    const D: u32 = 4;

    /// What thread A does while B charges.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Owner {
        /// Nothing: its pocket just holds bytes.
        Idle,
        /// Frees its live block `x` (into its pocket, or past it if a drain emptied it).
        Frees,
        /// Frees `x`, then allocates a block and frees it again.
        Churns,
        /// Allocates a block `d` of D, which CPU 0's slot for D serves: the `refill_pocket` for D then
        /// holds the pocket's 8 bytes of C in its hands until it refills C's slot with them.
        Switches,
    }

    impl Owner {
        /// The most bytes A has live at once.
        fn live(self) -> usize {
            match self {
                Owner::Switches => 2 * BLOCK,
                _ => BLOCK,
            }
        }
    }

    /// B's request: a block of D that fits P's max only if A's pocket is drained.
    const REQUEST: usize = 40;

    /// A's pocket holds 8 bytes of C (`x`, 8 bytes, live; `y` allocated from the pocket and
    /// freed into it, so the pocket has counts too), CPU 0's slot 112 more: P's usage is 128,
    /// its real usage 8. Thread B charges `REQUEST` bytes to D on CPU 1 through its own
    /// (empty) pocket: the pocket fails, the stock has no slot, the refill of a batch is
    /// refused, and `charge_exact` drains P's stocks and pockets, then retries. Draining only
    /// the stocks would leave 8 + 8 + 40 = 56 > 48 = P's max (with `Switches`, 64 > 56).
    ///
    /// With `p_max` at A's most live bytes + 40 the charge fits once A's pocket is drained,
    /// so it must succeed, and so must A's; with one less and A idle it must be refused. A
    /// refused charge, or one that succeeds, must leave the counters exact: a pocket taken
    /// twice (by B's drain and by A's own access) would count its bytes or counts twice.
    fn charge_takes_pocket(p_max: usize, owner: Owner) {
        // The longer threads: three preemptions take some 15 s with `Churns`, two 10 s with
        // `Switches` (whose race needs one: A preempted inside its refill).
        let preemptions = match owner {
            Owner::Idle | Owner::Frees => 3,
            Owner::Churns => 2,
            Owner::Switches => 1,
        };
        model(preemptions, move || {
            let w = World::new(&[ROOT, under(R), under(P), under(P)], BATCH);
            let (pa, pb) = (w.pocket(), w.pocket());
            let (c, d) = (key(C, false), key(D, false));
            assert_eq!(w.pocket_alloc(0, pa, C, false, BLOCK, PAD), Some(c));
            assert_eq!(w.pocket_alloc(0, pa, C, false, BLOCK, PAD), Some(c));
            w.pocket_free(0, pa, c, BLOCK, PAD);
            let switches = owner == Owner::Switches;
            if switches {
                // A slot for D on CPU 0, full (a batch, an allocation and a free).
                assert_eq!(w.alloc(0, D, false, BLOCK), Some(d));
                w.free(0, d, BLOCK);
            }
            assert_eq!(w.snap(P).usage, BATCH * (1 + switches as usize));
            w.counter(P).set_max(Some(p_max));

            let a = loom::thread::spawn(move || match owner {
                Owner::Idle => true,
                Owner::Frees => {
                    w.pocket_free(0, pa, c, BLOCK, PAD);
                    true
                }
                Owner::Churns => {
                    w.pocket_free(0, pa, c, BLOCK, PAD);
                    let got = w.pocket_alloc(0, pa, C, false, BLOCK, 0);
                    if let Some(k) = got {
                        w.pocket_free(0, pa, k, BLOCK, 0);
                    }
                    got.is_some()
                }
                Owner::Switches => w.pocket_alloc(0, pa, D, false, BLOCK, 0) == Some(d),
            });
            let b = loom::thread::spawn(move || w.pocket_alloc(1, pb, D, false, REQUEST, 0));
            let a_ok = a.join().unwrap();
            let got = b.join().unwrap();
            let ok = got.is_some();
            if owner.live() + REQUEST <= p_max {
                assert_eq!(got, Some(d), "refused, with A's pocket holding enough");
                assert!(
                    a_ok,
                    "A's block refused, with {} + 40 <= P's max",
                    owner.live()
                );
            } else if owner == Owner::Idle {
                assert_eq!(got, None, "charged over P's max: 8 + 40 > {p_max}");
            }
            let p_usage = w.snap(P).usage;
            assert!(p_usage <= p_max, "P's usage {p_usage} over its max {p_max}");
            w.flush();

            let x_freed = matches!(owner, Owner::Frees | Owner::Churns);
            let churns = (owner == Owner::Churns) as u64;
            let c = Expect {
                usage: if x_freed { 0 } else { BLOCK },
                allocs: 2 + churns,
                frees: 1 + x_freed as u64 + churns,
                overhead: if x_freed { 0 } else { PAD as isize },
                ..Expect::default()
            };
            // B's block, and with `Switches` the setup's block and A's.
            let d = Expect {
                usage: if ok { REQUEST } else { 0 } + if switches { BLOCK } else { 0 },
                allocs: ok as u64 + 2 * switches as u64,
                frees: switches as u64,
                ..Expect::default()
            };
            let refused = !ok as u64;
            assert_eq!(w.reclaims() as u64, refused, "a direct reclaim per refusal");
            check(&w, C, c);
            check(&w, D, d);
            let p = Expect {
                refused,
                ..sum(c, d)
            };
            check(&w, P, p);
            check(&w, R, p);
        });
    }

    #[test]
    fn failing_charge_takes_idle_pocket_and_fits_exactly() {
        charge_takes_pocket(48, Owner::Idle);
    }

    #[test]
    fn failing_charge_takes_idle_pocket_and_still_fails_one_over() {
        charge_takes_pocket(47, Owner::Idle);
    }

    #[test]
    fn failing_charge_takes_pocket_racing_free_into_it() {
        charge_takes_pocket(48, Owner::Frees);
    }

    #[test]
    fn failing_charge_takes_pocket_racing_alloc_and_free() {
        charge_takes_pocket(48, Owner::Churns);
    }

    /// B must not be refused while A's refill holds its pocket's former content (8 bytes of C)
    /// between taking it and refilling CPU 0's stock with it, where no drain can take it:
    /// `refill_pocket` counts itself in `in_hand`, so `charge_exact` waits for it, then drains again.
    #[test]
    fn failing_charge_waits_for_pocket_content_in_a_fill() {
        charge_takes_pocket(56, Owner::Switches);
    }
}

// ---- 3. A refill racing a group's removal -----------------------------------------------------

mod removal {
    use super::*;

    const P: u32 = 1;
    const C: u32 = 2;
    const D: u32 = 3;

    /// `Group::remove`'s part in the core.
    fn remove(w: World, id: u32) {
        assert!(w.counter(id).set_offline(), "removed twice");
        w.stocks.drain_group(id);
    }

    /// After both threads are done, before any drain: C (removed, every block freed) is empty
    /// and was reported emptied, and no pocket names it. Then, after a flush, both groups are
    /// exact.
    fn check_removed(w: &World, c_allocs: u64, p_allocs: u64) {
        assert!(
            !w.pocket_names(C),
            "a pocket still names removed group C (its drain missed a refill)"
        );
        assert_eq!(
            w.snap(C).usage,
            0,
            "C's freed bytes are still charged to it"
        );
        assert_eq!(w.emptied(C), 1, "C was not reported emptied");
        w.flush();
        let c = Expect {
            allocs: c_allocs,
            frees: c_allocs,
            ..Expect::default()
        };
        check(w, C, c);
        check(
            w,
            P,
            Expect {
                allocs: p_allocs,
                frees: p_allocs,
                ..Expect::default()
            },
        );
        assert_eq!(w.emptied(C), 1, "C emptied twice");
        assert_eq!(w.emptied(P), 0, "P is online");
    }

    /// P, C and D under P; C's blocks `x` (padded, from CPU 0's stock, which keeps 112) and
    /// `y` (padded, from the pocket, which is left with no bytes): the pocket is exhausted.
    /// Returns C's key.
    fn setup() -> (World, &'static crate::core::pocket::Pocket, Key) {
        let w = World::new(&[ROOT, under(P), under(P)], BATCH);
        let p = w.pocket();
        let k = key(C, false);
        assert_eq!(w.pocket_alloc(0, p, C, false, BLOCK, PAD), Some(k));
        assert_eq!(w.pocket_alloc(0, p, C, false, BLOCK, PAD), Some(k));
        (w, p, k)
    }

    /// Thread A allocates a block `z` of C with its pocket exhausted: the stock serves it
    /// (or, once C is offline and its slot drained, P does), then `refill_pocket` takes the pocket's
    /// counts, gives them back to CPU 0's stock, takes 8 bytes from there and stores a new
    /// word for C. A then frees `z`. Thread B removes C meanwhile. A refill that stores its word
    /// after the drain passed the pocket must see C offline and drain again
    /// (`Stocks::recheck`), or the pocket keeps naming C (and holding its bytes, so C's
    /// record is never freed). Once both are done, A frees `y` and `x`.
    #[test]
    fn alloc_fill_races_removal() {
        model(2, || {
            let (w, p, k) = setup();
            let a = loom::thread::spawn(move || {
                let z = w
                    .pocket_alloc(0, p, C, false, BLOCK, 0)
                    .expect("nothing is limited");
                assert!(z == k || z == key(P, false), "charged to {z}");
                w.pocket_free(0, p, z, BLOCK, 0);
                z == k
            });
            let b = loom::thread::spawn(move || remove(w, C));
            let to_c = a.join().unwrap();
            b.join().unwrap();
            assert!(
                !w.pocket_names(C),
                "a pocket still names removed group C (its drain missed a refill)"
            );
            w.pocket_free(0, p, k, BLOCK, PAD);
            w.pocket_free(0, p, k, BLOCK, PAD);
            check_removed(&w, 2 + to_c as u64, 3);
        });
    }

    /// The free side: A's pocket is full (16 bytes of C), so A's free of `y` overflows it:
    /// the block goes to CPU 0's stock (or, C offline, to the counters), and `refill_pocket` brings
    /// the pocket back to 8 bytes, giving the rest to the stock. A then frees its last block.
    /// Thread B removes C meanwhile.
    #[test]
    fn free_fill_races_removal() {
        model(2, || {
            let (w, p, k) = setup();
            assert_eq!(w.pocket_alloc(0, p, C, false, BLOCK, 0), Some(k));
            w.pocket_free(0, p, k, BLOCK, PAD);
            let a = loom::thread::spawn(move || {
                w.pocket_free(0, p, k, BLOCK, PAD);
                w.pocket_free(0, p, k, BLOCK, 0);
            });
            let b = loom::thread::spawn(move || remove(w, C));
            a.join().unwrap();
            b.join().unwrap();
            check_removed(&w, 3, 3);
        });
    }

    /// A refill for another group gives C's bytes back: A's pocket holds 8 of C's bytes (only
    /// `x` was allocated) when A allocates a block of D, which a refill of a slot for D on
    /// CPU 0 serves; the `refill_pocket` for D takes C's bytes out of the pocket and refills
    /// C's slot with them, claiming a new one if the drain emptied it. Thread B removes C meanwhile. A
    /// refill after the drain passed that slot must be drained again (`refill_pocket` rechecks the
    /// group it took out of the pocket too), or C's bytes sit in a slot and C, once `x` is
    /// freed, is not emptied.
    #[test]
    fn fill_for_another_group_races_removal() {
        model(2, || {
            let w = World::new(&[ROOT, under(P), under(P)], BATCH);
            let p = w.pocket();
            let (k, d) = (key(C, false), key(D, false));
            assert_eq!(w.pocket_alloc(0, p, C, false, BLOCK, PAD), Some(k));
            let a = loom::thread::spawn(move || {
                assert_eq!(w.pocket_alloc(0, p, D, false, BLOCK, 0), Some(d));
                w.pocket_free(0, p, d, BLOCK, 0);
            });
            let b = loom::thread::spawn(move || remove(w, C));
            a.join().unwrap();
            b.join().unwrap();
            w.pocket_free(0, p, k, BLOCK, PAD);
            check_removed(&w, 1, 2);
            check(
                &w,
                D,
                Expect {
                    allocs: 1,
                    frees: 1,
                    ..Expect::default()
                },
            );
        });
    }

    /// The pocket holds a word of C with no bytes and one allocation (block `y`). Thread A
    /// allocates for D, so `refill_pocket` takes C's word in hand and refills CPU 0's stock with it.
    /// Meanwhile thread B removes C (offline, drain), frees C's blocks (usage 0: emptied) and,
    /// as `free_if_unused` does, drains again; the record may then be reused as soon as the
    /// stocks are `quiescent()`, so at that moment no slot may name C. (It found `refill_pocket`
    /// rechecking C after its `holding` had ended: a slot claimed for C's counts outlived both
    /// drains while `in_hand` was already 0.)
    #[test]
    fn quiescent_while_a_fill_holds_a_removed_groups_counts() {
        model(3, || {
            let w = World::new(&[ROOT, under(P), under(P)], BATCH);
            let p = w.pocket();
            let kc = key(C, false);
            assert_eq!(w.pocket_alloc(0, p, C, false, BLOCK, 0), Some(kc)); // x: stock + refill
            assert_eq!(w.pocket_alloc(0, p, C, false, BLOCK, 0), Some(kc)); // y: pocket, now dry
            let a = loom::thread::spawn(move || {
                let _ = w.pocket_alloc(0, p, D, false, BLOCK, 0);
            });
            let b = loom::thread::spawn(move || {
                w.counter(C).set_offline();
                w.stocks.drain_group(C);
                w.stocks.uncharge_slow(1, kc, BLOCK, 1);
                w.stocks.uncharge_slow(1, kc, BLOCK, 1);
                if w.emptied(C) > 0 {
                    w.stocks.drain_group(C);
                    if w.stocks.quiescent() {
                        for cpu in 0..2 {
                            assert!(
                                !w.stocks.consume(cpu, kc, 0, 0),
                                "quiescent, yet CPU {cpu}'s stock names the freed record C"
                            );
                        }
                    }
                }
            });
            a.join().unwrap();
            b.join().unwrap();
        });
    }
}

// ---- 4. Delisting a pocket racing a drain ---------------------------------------------------

mod delist {
    use super::*;

    /// A root group: every counter change is one level, to keep the model small.
    const C: u32 = 1;

    /// A pocket holding content for C (no bytes, one allocation, and `y_pad` in `extra`: the
    /// block `y` it served beside `x`, not padded, which CPU 0's stock served) is delisted by
    /// its exiting owner, thread A, as its thread-exit hook does, while thread B drains. The
    /// word and its `extra` must be drained once, by whichever takes the word: drained twice,
    /// the allocation is counted twice; by neither, it is lost; and an `extra` taken by the
    /// one that did not take the word is lost with it.
    fn delist_races_drain(y_pad: usize) {
        model(3, move || {
            let w = World::new(&[ROOT], BATCH);
            let p = w.pocket();
            let k = key(C, false);
            assert_eq!(w.pocket_alloc(0, p, C, false, BLOCK, 0), Some(k));
            assert_eq!(w.pocket_alloc(0, p, C, false, BLOCK, y_pad), Some(k));
            assert_eq!(w.snap(C).overhead, 0, "y's pad sits in the pocket");

            let a = loom::thread::spawn(move || w.stocks.delist_pocket(p));
            let b = loom::thread::spawn(move || w.stocks.drain(|_| true));
            a.join().unwrap();
            b.join().unwrap();
            assert!(!p.is_live(), "a delisted pocket is off the list");
            let q = w.pocket();
            assert!(
                w.stocks
                    .pockets()
                    .iter()
                    .map(|r| r as *const Pocket)
                    .eq([q as *const Pocket]),
                "the next thread's pocket takes the freed place"
            );
            w.flush();

            let c = Expect {
                usage: 2 * BLOCK,
                allocs: 2,
                overhead: y_pad as isize,
                ..Expect::default()
            };
            check(&w, C, c);
        });
    }

    #[test]
    fn delist_races_drain_word_drained_once() {
        delist_races_drain(0);
    }

    /// The same with a padded block, so the pocket has an `extra`: whoever takes the word
    /// must take the `extra` with it. (It found `delist_pocket` swapping `extra` out even when
    /// a drain had taken the word first, dropping it: 8 bytes of overhead expected, 0 found.)
    #[test]
    fn delist_races_drain_extra_drained_once() {
        delist_races_drain(PAD);
    }
}

// ---- 5. A thread going while another walks the pockets ------------------------------------

mod delist_walk {
    use super::*;
    use loom::sync::atomic::{AtomicBool, Ordering};

    /// A pocket lives in its thread's thread-local block, which goes with the thread once its
    /// exit hook has taken the pocket off the list (`delist_pocket`, then `delist`). Thread
    /// A is that hook, and marks the pocket gone once it returns; thread B walks the pockets
    /// (a counted walk, as a drain's look is) and touches each one it reaches. B must never
    /// reach a pocket already gone: `delist` clears the pocket's place, then waits for every
    /// walk counted before it looked. Without the wait, B can load the place before it is
    /// cleared and touch the pocket after A is done.
    #[test]
    fn no_walk_reaches_a_pocket_whose_thread_went() {
        model(3, || {
            let w = World::new(&[ROOT], BATCH);
            let p = w.pocket();
            let gone: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
            let a = loom::thread::spawn(move || {
                w.stocks.delist_pocket(p);
                gone.store(true, Ordering::SeqCst);
            });
            let b = loom::thread::spawn(move || {
                w.stocks.pockets().any_pocket(|q| {
                    let live = q.is_live();
                    assert!(!gone.load(Ordering::SeqCst), "a walk reached a gone pocket");
                    let _ = live;
                    false
                })
            });
            a.join().unwrap();
            b.join().unwrap();
            assert!(!p.is_live());
            assert_eq!(
                w.stocks.pockets().iter().count(),
                0,
                "no pocket on the list"
            );
        });
    }
}
