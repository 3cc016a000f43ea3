//! Model 1: two hierarchical charges racing at a limit (`Counter::try_charge`).
//!
//! A module of the library (see `src/lib.rs`). Groups: P (id 1, the root of the model) and
//! its child C (id 2). Two threads each charge an amount of which only one fits (or, in the
//! control case, both). Checked in every interleaving:
//! - exactly the expected number of charges succeed (never both when only one fits, and never
//!   neither: a CAS charge cannot make a racing one fail spuriously);
//! - a refused charge names the level and the limit that refused it;
//! - a refused charge leaves every counter unchanged: final `usage` and `kmem` on each level
//!   are exactly the sums of the successful charges that reach it;
//! - `usage` never passes `max`, and `kmem` never passes `kmem_max`, even transiently (the main
//!   thread samples them while the charges race), and `peak` stays within `max`;
//! - `try_charge` counts no `max` or `fail` events, and a refused charge no crossing of `high`.

use crate::core::counter::Limit;
use crate::{model, under, World, ROOT};

const P: u32 = 1;
const C: u32 = 2;

/// A charge: the group charged, bytes, kernel.
#[derive(Clone, Copy, Debug)]
struct Charge(u32, usize, bool);

struct Case {
    p_max: Option<usize>,
    p_kmem_max: Option<usize>,
    c_max: Option<usize>,
    c_kmem_max: Option<usize>,
    c_high: Option<usize>,
    a: Charge,
    b: Charge,
    /// `None`: both fit. `Some(refusal)`: exactly one fits, and the other is refused there.
    one_fits: Option<(u32, Limit)>,
}

fn race(case: Case) {
    let case: &'static Case = Box::leak(Box::new(case));
    model(3, move || {
        let mut p = ROOT;
        p.max = case.p_max;
        p.kmem_max = case.p_kmem_max;
        let mut c = under(P);
        c.max = case.c_max;
        c.kmem_max = case.c_kmem_max;
        let w = World::new(&[p, c], 64);
        w.counter(C).set_high(case.c_high);

        let run = move |ch: Charge| {
            loom::thread::spawn(move || {
                w.counter(ch.0)
                    .try_charge(ch.1, ch.2)
                    .map_err(|(at, limit)| (at.id, limit))
            })
        };
        let (ta, tb) = (run(case.a), run(case.b));

        // Usage never passes max, even for a moment.
        for id in [P, C] {
            let s = w.snap(id);
            assert!(s.usage <= s.max, "usage {} over max {}", s.usage, s.max);
            assert!(s.kmem <= s.kmem_max, "kmem {} over kmem_max", s.kmem);
        }

        let (ra, rb) = (ta.join().unwrap(), tb.join().unwrap());
        // A charge that raised a pressure level says so (its caller wakes the notifier), and
        // only then are levels pending: none for a refused charge, none lost.
        let raised = ra == Ok(true) || rb == Ok(true);
        let pending = [P, C].map(|id| w.counter(id).take_pending());
        assert_eq!(
            raised,
            pending != [0, 0],
            "raised {raised}, pending {pending:?}"
        );
        let (ra, rb) = (ra.map(|_| ()), rb.map(|_| ()));
        match case.one_fits {
            None => {
                assert_eq!(ra, Ok(()), "charge a refused although both fit");
                assert_eq!(rb, Ok(()), "charge b refused although both fit");
            }
            Some(refusal) => match (ra, rb) {
                (Ok(()), Err(e)) | (Err(e), Ok(())) => assert_eq!(e, refusal),
                other => panic!("exactly one charge must succeed: {other:?}"),
            },
        }

        for id in [P, C] {
            let (mut usage, mut kmem) = (0, 0);
            for (ch, r) in [(case.a, ra), (case.b, rb)] {
                if r.is_ok() && w.counter(ch.0).is_under(w.counter(id)) {
                    usage += ch.1;
                    kmem += if ch.2 { ch.1 } else { 0 };
                }
            }
            let s = w.snap(id);
            assert_eq!(s.usage, usage, "usage of group {id}");
            assert_eq!(s.kmem, kmem, "kmem of group {id}");
            assert!(s.peak <= s.max, "peak {} over max {}", s.peak, s.max);
            assert!(s.peak >= usage, "peak {} under usage {usage}", s.peak);
            // Only a charge that went through counts its crossing of C's `high` (on C and P);
            // the race may hide it (`after_charge` is racy), but never count it twice.
            let crossed = if case.c_high.is_some() { 1 } else { 0 };
            assert!(
                s.events[0] <= crossed,
                "group {id}: {} high events",
                s.events[0]
            );
            assert_eq!(
                s.events[1..],
                [0; 2],
                "try_charge counts no max or fail events"
            );
            assert_eq!((s.allocs, s.frees), (0, 0));
        }
    });
}

const NO_LIMITS: Case = Case {
    p_max: None,
    p_kmem_max: None,
    c_max: None,
    c_kmem_max: None,
    c_high: None,
    a: Charge(C, 6, false),
    b: Charge(C, 6, false),
    one_fits: None,
};

/// Both charge C; P's max refuses the second, which backs out of C. Both cross C's high
/// (5), but only the one that went through may count it.
#[test]
fn user_charges_race_at_parent_max() {
    race(Case {
        p_max: Some(10),
        c_high: Some(5),
        one_fits: Some((P, Limit::Max)),
        ..NO_LIMITS
    });
}

/// One charges C, the other P itself.
#[test]
fn user_charges_race_at_parent_max_from_two_levels() {
    race(Case {
        p_max: Some(10),
        b: Charge(P, 6, false),
        one_fits: Some((P, Limit::Max)),
        ..NO_LIMITS
    });
}

/// The limit on C refuses first, although P has the same one.
#[test]
fn user_charges_race_at_child_max() {
    race(Case {
        p_max: Some(10),
        c_max: Some(10),
        one_fits: Some((C, Limit::Max)),
        ..NO_LIMITS
    });
}

/// Usage has room everywhere; P's kmem_max refuses the second kernel charge, which backs
/// out of P's usage and of C's usage and kmem.
#[test]
fn kernel_charges_race_at_parent_kmem_max() {
    race(Case {
        p_max: Some(100),
        p_kmem_max: Some(10),
        a: Charge(C, 6, true),
        b: Charge(C, 6, true),
        one_fits: Some((P, Limit::KmemMax)),
        ..NO_LIMITS
    });
}

/// C's own kmem_max refuses, after its usage was charged: the refused charge backs it out.
#[test]
fn kernel_charges_race_at_child_kmem_max() {
    race(Case {
        c_max: Some(100),
        c_kmem_max: Some(10),
        a: Charge(C, 6, true),
        b: Charge(C, 6, true),
        one_fits: Some((C, Limit::KmemMax)),
        ..NO_LIMITS
    });
}

/// A kernel and a user charge race at P's max; kmem_max (with room for one kernel charge)
/// does not decide.
#[test]
fn kernel_and_user_charges_race_at_max() {
    race(Case {
        p_max: Some(10),
        p_kmem_max: Some(8),
        a: Charge(C, 6, true),
        b: Charge(C, 6, false),
        one_fits: Some((P, Limit::Max)),
        ..NO_LIMITS
    });
}

/// Control: kmem_max binds kernel charges only; a user charge beside a kernel one fits.
#[test]
fn kmem_max_does_not_refuse_user_charges() {
    race(Case {
        p_max: Some(12),
        p_kmem_max: Some(8),
        a: Charge(C, 6, true),
        b: Charge(P, 6, false),
        one_fits: None,
        ..NO_LIMITS
    });
}
