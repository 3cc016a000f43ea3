//! The notifier's wake-up: the charge path raises levels on counters (`Counter::signal`) and
//! rings the `Doorbell`; the notifier marks the bell, takes the pending levels, and sleeps on
//! a futex unless the bell rang since its mark. No level may be left pending with the notifier
//! asleep, and levels raised before delivery coalesce.
//!
//! The futex is modelled as the kernel's: the wait checks `rung == mark` once, atomically with
//! going to sleep, and then only a wake (counted in `wakes`) ends it. Each ring that reports a
//! possible sleeper adds a wake. A lost wake-up leaves the notifier spinning forever, which
//! loom reports.

use super::model;
use crate::core::counter::{Counter, LOW, MEDIUM};
use crate::core::doorbell::Doorbell;
use crate::sync::{AtomicUsize, Ordering};

struct Shared {
    bell: Doorbell,
    wakes: AtomicUsize,
    counters: [Counter; 2],
}

fn shared() -> &'static Shared {
    Box::leak(Box::new(Shared {
        bell: Doorbell::new(),
        wakes: AtomicUsize::new(0),
        counters: [Counter::new(1, None), Counter::new(2, None)],
    }))
}

/// A charge raising `levels` on counter `i`: what `Stocks::raised` and `pressure::wake` do.
fn raise(s: &Shared, i: usize, levels: u8) {
    if s.counters[i].signal(levels) && s.bell.ring() {
        s.wakes.fetch_add(1, Ordering::SeqCst);
    }
}

/// The notifier (`pressure::notifier`) until it has delivered `want[i]` on each counter;
/// returns what it delivered, per counter, as the union of the levels it took.
fn notifier(s: &Shared, want: [u8; 2]) -> [u8; 2] {
    let mut got = [0u8; 2];
    loop {
        let mark = s.bell.mark();
        for (i, c) in s.counters.iter().enumerate() {
            got[i] |= c.take_pending();
        }
        if got[0] & want[0] == want[0] && got[1] & want[1] == want[1] {
            return got;
        }
        let seen = s.wakes.load(Ordering::SeqCst);
        if s.bell.may_sleep(mark) && s.bell.word().load(Ordering::SeqCst) == mark {
            // Asleep: only a wake ends it.
            while s.wakes.load(Ordering::SeqCst) == seen {
                loom::thread::yield_now();
            }
        }
        s.bell.awake();
    }
}

/// Two charges on two threads raise levels on two counters while the notifier scans.
#[test]
fn levels_raised_during_a_scan_are_delivered() {
    model(3, || {
        let s = shared();
        let a = loom::thread::spawn(move || raise(s, 0, MEDIUM));
        let b = loom::thread::spawn(move || raise(s, 1, LOW));
        let got = notifier(s, [MEDIUM, LOW]);
        a.join().unwrap();
        b.join().unwrap();
        assert_eq!(got, [MEDIUM, LOW]);
        assert!(s.counters.iter().all(|c| c.take_pending() == 0));
    });
}

/// The same level raised twice on one counter, and another level on it, race the notifier:
/// whatever it took is all it was asked for, and nothing stays pending once it has both.
#[test]
fn repeated_levels_coalesce_and_none_is_lost() {
    model(3, || {
        let s = shared();
        let a = loom::thread::spawn(move || {
            raise(s, 0, MEDIUM);
            raise(s, 0, MEDIUM);
        });
        let b = loom::thread::spawn(move || raise(s, 0, LOW));
        let got = notifier(s, [MEDIUM | LOW, 0]);
        a.join().unwrap();
        b.join().unwrap();
        // A second MEDIUM raised after the first was taken is pending or was taken: either
        // way nothing was lost; and nothing but what was raised was delivered.
        let rest = s.counters[0].take_pending();
        assert_eq!((got[0] | rest) & !(MEDIUM | LOW), 0);
        assert_eq!(got[0] & (MEDIUM | LOW), MEDIUM | LOW);
    });
}
