//! The notifier's doorbell: how the charge path wakes the thread that delivers pressure
//! levels without losing a wake-up and without a syscall per ring.
//!
//! A charge sets bits on a counter (`Counter::signal`), then rings. The notifier reads `mark`,
//! scans the counters for bits, and sleeps only if nobody rang since its mark. The sleep is a
//! futex wait on `rung` (done by the caller), which returns at once if `rung` moved; a ring
//! that finds the notifier sleeping (or about to sleep) wakes it. Both sides store, fence and
//! load (Dekker), so a ring either is seen by the notifier's last check or sees `sleeping`.

use crate::sync::{fence, AtomicBool, AtomicU32, Ordering};

pub(crate) struct Doorbell {
    rung: AtomicU32,
    sleeping: AtomicBool,
}

impl Doorbell {
    #[cfg(not(memgroup_loom))]
    pub(crate) const fn new() -> Doorbell {
        Doorbell {
            rung: AtomicU32::new(0),
            sleeping: AtomicBool::new(false),
        }
    }

    #[cfg(memgroup_loom)]
    pub(crate) fn new() -> Doorbell {
        Doorbell {
            rung: AtomicU32::new(0),
            sleeping: AtomicBool::new(false),
        }
    }

    /// Rings, after the caller made its work visible. Returns whether the notifier may be
    /// asleep: then the caller wakes it (a futex wake on `word`).
    pub(crate) fn ring(&self) -> bool {
        self.rung.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.sleeping.load(Ordering::SeqCst)
    }

    /// The notifier, before it scans: the value to sleep on.
    pub(crate) fn mark(&self) -> u32 {
        self.rung.load(Ordering::SeqCst)
    }

    /// The notifier, after its scan: whether it may sleep (a futex wait on `word` while it
    /// holds `mark`). Call `awake` when it wakes or decides not to sleep.
    pub(crate) fn may_sleep(&self, mark: u32) -> bool {
        self.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.rung.load(Ordering::SeqCst) == mark
    }

    pub(crate) fn awake(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
    }

    /// The word to futex-wait and wake on.
    pub(crate) fn word(&self) -> &AtomicU32 {
        &self.rung
    }
}
