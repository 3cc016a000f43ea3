//! Model 2: per-CPU stocks: refills, fast paths, overflow and eviction racing drains and a
//! charge that fails at the limit.
//!
//! A module of the library (see `src/lib.rs`). Groups: R (id 1, root), P (id 2, the limited
//! one) under R, its children C (3) and D (4), and Q (5) under R, outside P. Batch 64, so an
//! 8-byte allocation refills a slot with 64 and leaves 56 in it; two slots per CPU under loom.
//!
//! Checked in every interleaving: after a final drain the counters are exact (`usage` and
//! `kmem` equal the live bytes the model charged, on every level; `allocs` and `frees` equal
//! the blocks it allocated and freed); before that drain they over-report by at most the
//! stocks' capacity; a refused charge changes nothing and counts one `max` and one `fail`
//! event on the refusing level and its ancestors (a forced one, one `max` event); no drain
//! stays counted in. And the limit is exact: a charge refused at P's `max` with stocks holding
//! bytes under P drains them and succeeds when real usage plus the request fits, and fails
//! (or is forced, under `nofail`) when it does not, even while the drained slots are in use.

use crate::core::counter::Snapshot;
use crate::core::stock::{key, Mode};
use crate::{model, under, World, ROOT};

const R: u32 = 1;
const P: u32 = 2;
const C: u32 = 3;
const D: u32 = 4;
const Q: u32 = 5;
const BATCH: usize = 64;

fn world(p_max: Option<usize>) -> World {
    let mut p = under(R);
    p.max = p_max;
    World::new(&[ROOT, p, under(P), under(P), under(R)], BATCH)
}

/// What group `id` should show: live bytes (`usage`), kernel live bytes, blocks allocated
/// and freed, charges refused at its limit or below (events `max` and `fail`) and charges
/// forced over it (event `max` only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Expect {
    usage: usize,
    kmem: usize,
    allocs: u64,
    frees: u64,
    refused: u64,
    forced: u64,
}

fn check(w: &World, id: u32, e: Expect) {
    let s: Snapshot = w.snap(id);
    let got = Expect {
        usage: s.usage,
        kmem: s.kmem,
        allocs: s.allocs,
        frees: s.frees,
        refused: s.events[2],
        forced: s.events[1] - s.events[2].min(s.events[1]),
    };
    assert_eq!(got, e, "group {id} (events {:?})", s.events);
    assert!(
        s.events[1] >= s.events[2],
        "group {id}: a fail event without a max event"
    );
    assert_eq!(s.events[0], 0, "group {id}: no high is set");
}

/// Thread A allocates 8 bytes on CPU 0, 8 on CPU 1 (after migrating), and frees the first on
/// CPU 1: refills, a claim on each CPU, a fast uncharge. Thread B charges 40 bytes to C's
/// sibling D exactly (`charge_exact`, as a large or removed-group charge does), racing them:
/// once A's two refills are in, P's max refuses it (128 + 40 > `p_max`), so it drains P's
/// stocks (C's slots on both CPUs, one perhaps being refilled or freed into) and retries.
/// Every charge that is refused changes nothing and counts its events; after a final drain
/// the counters hold exactly the charges that succeeded.
///
/// Real usage never passes 16 + 40, but a refill's batch is charged to the counters before it
/// reaches a slot, where no drain can take it; so a charge is sure to pass only if the limit
/// also leaves room for that one batch in flight: `p_max` 120 = 16 + 40 + 64. Then every
/// charge must succeed.
fn refills_race_failing_charge(p_max: usize, all_fit: bool) {
    model(2, move || {
        let w = world(Some(p_max));
        let a = loom::thread::spawn(move || {
            let k = key(C, false);
            let first = w.alloc(0, C, false, 8);
            let second = w.alloc(1, C, false, 8);
            assert!(first.is_none_or(|got| got == k) && second.is_none_or(|got| got == k));
            if first.is_some() {
                w.free(1, k, 8);
            }
            (first.is_some(), second.is_some())
        });
        let b = loom::thread::spawn(move || {
            w.stocks
                .charge_exact(w.counter(D), false, 40, 1, Mode::Fallible)
        });
        let (first, second) = a.join().unwrap();
        let ok = b.join().unwrap();
        if all_fit {
            assert!(first && second, "A's allocation refused: {first} {second}");
            assert!(
                ok,
                "B's charge refused with live 16 + 40 + a batch <= {p_max}"
            );
        }

        // Nothing is forced: usage never passes max, even with bytes still in stocks.
        let p = w.snap(P).usage;
        assert!(p <= p_max, "P's usage {p} over its max {p_max}");
        w.flush();

        let c = Expect {
            usage: 8 * second as usize,
            allocs: first as u64 + second as u64,
            frees: first as u64,
            ..Expect::default()
        };
        let d = Expect {
            usage: 40 * ok as usize,
            allocs: ok as u64,
            ..Expect::default()
        };
        let refused = !first as u64 + !second as u64 + !ok as u64;
        assert_eq!(
            w.reclaims() as u64,
            refused,
            "one direct reclaim per refused charge"
        );
        let p = Expect {
            usage: c.usage + d.usage,
            allocs: c.allocs + d.allocs,
            frees: c.frees,
            refused,
            ..Expect::default()
        };
        check(&w, C, c);
        check(&w, D, d);
        check(&w, P, p);
        check(&w, R, p);
        check(&w, Q, Expect::default());
    });
}

#[test]
fn refills_race_failing_charge_with_room_for_a_batch() {
    refills_race_failing_charge(120, true);
}

/// With less room (`p_max` 100 >= 16 + 40 but < 16 + 40 + 64) B's charge may be refused while
/// A holds a refill's batch in flight; the accounting must stay exact whatever happens.
#[test]
fn refills_race_failing_charge_near_the_limit() {
    refills_race_failing_charge(100, false);
}

/// Exactness with a refill in flight (see `refills_race_failing_charge`): B must not be
/// refused while real usage (at most 16) plus its 40 bytes is within P's max of 100, even when
/// A's refill holds a batch charged to the counters but not yet in a slot (e.g. B is refused
/// at 64 + 40, drains CPU 0's slot (P: 8), A refills on CPU 1 (P: 72)): `charge_exact` waits
/// for refills in flight, then drains again.
#[test]
fn refill_in_flight_refuses_a_charge_that_fits() {
    refills_race_failing_charge(100, true);
}

/// Thread A allocates 8 bytes on CPU 0 and 8 on CPU 1, then frees both on CPU 1: the second
/// free overflows the slot (64 + 8 > batch), so `uncharge_slow` keeps half a batch and
/// returns the rest. Thread B drains every stock meanwhile.
#[test]
fn drain_races_refills_and_overflow() {
    model(3, || {
        let w = world(None);
        let a = loom::thread::spawn(move || {
            let k = key(C, false);
            assert_eq!(w.alloc(0, C, false, 8), Some(k));
            assert_eq!(w.alloc(1, C, false, 8), Some(k));
            w.free(1, k, 8);
            w.free(1, k, 8);
        });
        let b = loom::thread::spawn(move || w.stocks.drain(|_| true));
        a.join().unwrap();
        b.join().unwrap();

        // Nothing is live: what is counted sits in stocks, at most a batch per CPU and group
        // (CPU 0's slot never holds more than the 56 its refill left).
        let held = w.snap(P).usage;
        assert!(held <= 56 + BATCH, "{held} bytes over-reported");
        w.flush();

        let c = Expect {
            allocs: 2,
            frees: 2,
            ..Expect::default()
        };
        check(&w, C, c);
        check(&w, P, c);
        check(&w, R, c);
        check(&w, D, Expect::default());
    });
}

/// A slot's bytes and pending counts go to the counters once, whoever takes them. C's blocks
/// of 8 and `second` bytes leave CPU 0's slot short (56 - `second` bytes) with two allocations
/// pending; thread A's next allocation of 8 there takes the slot (`take`) to refill it, and
/// frees the block again; thread B drains every stock meanwhile. If `take` reported a word
/// that B's drain took instead, its counts would be added twice and its bytes invented.
///
/// Both variants failed while `take` returned the word its closure last saw even when its CAS
/// lost to the drain (commit "leaner allocation fast path"); `take` now returns a word only
/// when its CAS took it.
fn drain_races_refill_of_a_short_slot(second: usize) {
    model(3, move || {
        let w = world(None);
        let k = key(C, false);
        assert_eq!(w.alloc(0, C, false, 8), Some(k));
        assert_eq!(w.alloc(0, C, false, second), Some(k));
        assert_eq!(w.snap(C).usage, BATCH);
        let a = loom::thread::spawn(move || {
            assert_eq!(w.alloc(0, C, false, 8), Some(k));
            w.free(0, k, 8);
        });
        let b = loom::thread::spawn(move || w.stocks.drain(|_| true));
        a.join().unwrap();
        b.join().unwrap();
        w.flush();

        let c = Expect {
            usage: 8 + second,
            allocs: 3,
            frees: 1,
            ..Expect::default()
        };
        check(&w, C, c);
        check(&w, P, c);
    });
}

/// The slot has no bytes left, only counts.
#[test]
fn drain_races_refill_of_an_exhausted_slot() {
    drain_races_refill_of_a_short_slot(56);
}

/// The slot has 4 bytes left, fewer than the 8 asked for.
#[test]
fn drain_races_refill_of_a_short_slot_with_bytes() {
    drain_races_refill_of_a_short_slot(52);
}

/// Two threads on the same CPU (one preempted or migrated mid-operation), three keys for two
/// slots: C's kernel key holds a slot from the start; A allocates and frees under C's user
/// key, B under D's, so their claims race each other and evict.
#[test]
fn same_cpu_claims_and_evictions() {
    model(2, || {
        let w = world(None);
        let kernel = w.alloc(0, C, true, 8);
        assert_eq!(kernel, Some(key(C, true)));
        let user = move |id| {
            loom::thread::spawn(move || {
                let k = w.alloc(0, id, false, 8);
                assert_eq!(k, Some(key(id, false)));
                w.free(0, key(id, false), 8);
            })
        };
        let (a, b) = (user(C), user(D));
        a.join().unwrap();
        b.join().unwrap();
        // At most a batch per slot over the 8 live bytes.
        let held = w.snap(P).usage - 8;
        assert!(held <= 2 * BATCH, "{held} bytes over-reported");
        w.flush();

        check(
            &w,
            C,
            Expect {
                usage: 8,
                kmem: 8,
                allocs: 2,
                frees: 1,
                ..Expect::default()
            },
        );
        let d = Expect {
            allocs: 1,
            frees: 1,
            ..Expect::default()
        };
        check(&w, D, d);
        let p = Expect {
            usage: 8,
            kmem: 8,
            allocs: 3,
            frees: 2,
            ..Expect::default()
        };
        check(&w, P, p);
        check(&w, R, p);
    });
}

/// C with 8 bytes live on each CPU and 56 more in each CPU's stock (P's usage: 128), and then
/// P's max set to `p_max`.
fn stocked(p_max: usize) -> World {
    let w = world(None);
    let k = key(C, false);
    assert_eq!(w.alloc(0, C, false, 8), Some(k));
    assert_eq!(w.alloc(1, C, false, 8), Some(k));
    assert_eq!(w.snap(P).usage, 2 * BATCH);
    w.counter(P).set_max(Some(p_max));
    w
}

/// Exact limits. C has 16 live bytes and 56 more in a stock on each CPU (P's usage: 128).
/// Thread B charges 40 bytes to D exactly, refused at first; it drains P's stocks and
/// retries, so it must succeed when P's max is 56 (16 + 40), and when it is 55 fail
/// (`Fallible`) or be forced over the limit (`NoFail`). Thread A meanwhile allocates and frees
/// under Q, outside P, on CPU 0: its slot sits next to C's, and B's drain must leave it alone.
fn exact_limit(p_max: usize, mode: Mode) {
    model(3, move || {
        let w = stocked(p_max);
        let fits = 16 + 40 <= p_max;

        let a = loom::thread::spawn(move || {
            let q = w.alloc(0, Q, false, 8);
            assert_eq!(q, Some(key(Q, false)));
            w.free(0, key(Q, false), 8);
        });
        let b =
            loom::thread::spawn(move || w.stocks.charge_exact(w.counter(D), false, 40, 1, mode));
        a.join().unwrap();
        let ok = b.join().unwrap();
        let refused = !fits && mode == Mode::Fallible;
        assert_eq!(
            ok, !refused,
            "P's max {p_max}, real usage 16, request 40, {mode:?}"
        );
        assert_eq!(
            w.reclaims(),
            !fits as usize,
            "a direct reclaim before refusing or forcing"
        );
        // Q's stock was not drained for P's limit.
        assert_eq!(w.snap(Q).usage, BATCH);
        w.flush();

        check(
            &w,
            C,
            Expect {
                usage: 16,
                allocs: 2,
                ..Expect::default()
            },
        );
        let d = Expect {
            usage: if ok { 40 } else { 0 },
            allocs: ok as u64,
            ..Expect::default()
        };
        check(&w, D, d);
        let p = Expect {
            usage: 16 + d.usage,
            allocs: 2 + d.allocs,
            refused: refused as u64,
            forced: (!fits && ok) as u64,
            ..Expect::default()
        };
        check(&w, P, p);
        check(
            &w,
            Q,
            Expect {
                allocs: 1,
                frees: 1,
                ..Expect::default()
            },
        );
        check(
            &w,
            R,
            Expect {
                allocs: p.allocs + 1,
                frees: 1,
                ..p
            },
        );
    });
}

#[test]
fn failing_charge_drains_stocks_and_fits_exactly() {
    exact_limit(56, Mode::Fallible);
}

#[test]
fn failing_charge_drains_stocks_and_still_fails_one_over() {
    exact_limit(55, Mode::Fallible);
}

#[test]
fn nofail_charge_drains_stocks_and_is_forced_one_over() {
    exact_limit(55, Mode::NoFail);
}

/// Exact limit against a concurrent fast path on the drained slot itself: as in
/// `exact_limit`, C has 16 live bytes and 56 stocked on each CPU, and B's 40 fit P's max of
/// 56 once the stocks are drained; thread A frees 8 of C's bytes on CPU 0 meanwhile (a fast
/// uncharge into the very slot B's drain is taking, or a new slot if it was taken). Real
/// usage never passes 16 and no bytes are ever in flight outside a slot or a counter, so B
/// must succeed.
#[test]
fn failing_charge_drains_slot_racing_fast_free() {
    model(3, || {
        let w = stocked(56);
        let k = key(C, false);

        let a = loom::thread::spawn(move || w.free(0, k, 8));
        let b = loom::thread::spawn(move || {
            w.stocks
                .charge_exact(w.counter(D), false, 40, 1, Mode::Fallible)
        });
        a.join().unwrap();
        let ok = b.join().unwrap();
        assert!(ok, "refused with real usage at most 16 + 40 <= max 56");
        w.flush();

        let c = Expect {
            usage: 8,
            allocs: 2,
            frees: 1,
            ..Expect::default()
        };
        check(&w, C, c);
        let p = Expect {
            usage: 48,
            allocs: 3,
            frees: 1,
            ..Expect::default()
        };
        check(&w, P, p);
    });
}

/// A pocket's refill from a stock holding less than half a pocket (`Stocks::consume_up_to`,
/// from `refill_pocket`): the pocket takes all the stock has, no more, and no byte is lost on
/// the way. One thread, so one execution. The pocket holds at most `BATCH / 8` = 8 bytes and
/// a refill wants half of that, 4.
///
/// C's first pocketless block charges a batch (64) to the counters and stocks 56 on CPU 0; a
/// second block of 53 leaves 3 there. A pocket's first block, of 1 byte, misses the empty
/// pocket, takes its byte from the stock (2 left) and refills the pocket with those 2. The
/// thread then migrates to CPU 1, whose stock holds nothing of C, and allocates 2 bytes: only
/// the pocket can serve them without charging the counters another batch. After a drain the
/// counters hold exactly the 64 live bytes: a pocket that took more than the stock gave it,
/// or less than the stock lost, would leave them off.
#[test]
fn pocket_refill_takes_what_a_short_stock_holds() {
    model(0, || {
        let w = world(None);
        let k = key(C, false);
        assert_eq!(w.alloc(0, C, false, 8), Some(k));
        assert_eq!(w.alloc(0, C, false, 53), Some(k));
        let p = w.pocket();
        assert_eq!(w.pocket_alloc(0, p, C, false, 1, 0), Some(k));
        assert_eq!(
            w.snap(C).usage,
            BATCH,
            "the refill charged the counters nothing"
        );
        assert!(w.stocks.pocket_holds(p, k), "the pocket serves C");
        assert_eq!(w.pocket_alloc(1, p, C, false, 2, 0), Some(k));
        assert_eq!(
            w.snap(C).usage,
            BATCH,
            "the pocket served 2 bytes on CPU 1: it took the 2 that CPU 0's stock held"
        );
        w.flush();

        let c = Expect {
            usage: 8 + 53 + 1 + 2,
            allocs: 4,
            ..Expect::default()
        };
        check(&w, C, c);
        check(&w, P, c);
        check(&w, R, c);
    });
}
