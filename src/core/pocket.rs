//! Per-thread pockets in front of the per-CPU stocks.
//!
//! A CPU's stock slot is shared by every thread that runs on that CPU, so each operation on it
//! is a compare-and-swap: one locked instruction per allocation and one per free, the largest
//! part of the tag design's cost. A pocket is a slot that belongs to one thread: a few bytes
//! (at most `batch / 8`) pre-charged to one group key, with the same word format as a stock
//! slot, which its owner charges and uncharges with plain loads and stores. It is filled from,
//! and emptied into, the CPU stocks, so the counters move no more often than before.
//!
//! Other threads must sometimes take a pocket's content: a charge about to be refused at a
//! limit, `flush()`, a group's removal. They do it with the asymmetric Dekker pattern the
//! arena's heaps use. The owner raises its pocket's `busy` flag, then checks the pockets'
//! common `stop` count, and touches its word only if no one is stopping pockets; a taker
//! raises `stop`, runs a barrier that makes every thread's earlier stores visible (the
//! embedding's `membarrier(2)`, standing for the full fence the owner's path leaves out), then
//! waits for each pocket's `busy` to drop before taking its word with a compare-and-swap. So
//! the owner's path has no locked instruction and no fence, and a pocket's word is written
//! either by its owner (while no taker runs) or by takers (with atomic read-modify-writes).
//!
//! Pockets are never freed: the embedding keeps them on one list that only grows, and a
//! pocket whose thread exited is emptied and reused by the next new thread. So a taker walks
//! the list with no lock.

use crate::sync::{light_fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Backoff, Ordering};

/// One thread's pocket, on its own cache line (only its owner writes it, except for takers).
#[repr(C, align(64))]
pub(crate) struct Pocket {
    /// Raised by the owner around each access to `word`.
    busy: AtomicU32,
    /// Owned by a thread; false: free for the next new thread.
    live: AtomicBool,
    /// The content: a stock slot word (see `super::stock`), 0 when unclaimed.
    pub(super) word: AtomicU64,
    /// Overhead bytes the blocks counted in `word` add to the tag formula (wrapping: the sum
    /// of +pad per allocation and -pad per free), due to the group of `word` with it. Changed
    /// only with counts in `word`, so a word without content has none.
    pub(super) extra: AtomicU64,
    /// The next pocket on the list; set before the pocket is published, then fixed.
    next: AtomicPtr<Pocket>,
}

impl Pocket {
    /// A pocket for a new thread (made at run time only, so one `new` serves loom too).
    pub(crate) fn new() -> Pocket {
        Pocket {
            busy: AtomicU32::new(0),
            live: AtomicBool::new(true),
            word: AtomicU64::new(0),
            extra: AtomicU64::new(0),
            next: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    /// Whether a thread owns it.
    pub(crate) fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// The owner's access: runs `f` on the pocket (plain loads and stores) unless a taker is
    /// at work (then `None`, and nothing is touched).
    #[inline(always)]
    pub(super) fn with<R>(&self, stop: &AtomicU32, f: impl FnOnce(&Pocket) -> R) -> Option<R> {
        self.busy.store(1, Ordering::Relaxed);
        // The store-load fence between `busy` and `stop` is the taker's barrier.
        light_fence();
        let r = if stop.load(Ordering::SeqCst) == 0 {
            Some(f(self))
        } else {
            None
        };
        self.busy.store(0, Ordering::Release);
        r
    }

    /// The owner's access for a word it changes: replaces it by `step(word)` if `step` accepts
    /// it, and adds `pad` (wrapping) to `extra`. False if `step` refuses or a taker is at work.
    #[inline(always)]
    pub(super) fn update(
        &self,
        stop: &AtomicU32,
        pad: u64,
        step: impl FnOnce(u64) -> Option<u64>,
    ) -> bool {
        self.with(stop, |p| match step(p.word.load(Ordering::Relaxed)) {
            Some(new) => {
                p.word.store(new, Ordering::Relaxed);
                let extra = p.extra.load(Ordering::Relaxed);
                p.extra.store(extra.wrapping_add(pad), Ordering::Relaxed);
                true
            }
            None => false,
        }) == Some(true)
    }

    /// The owner's take of the whole content (word and extra), leaving the pocket unclaimed.
    pub(super) fn take_own(&self, stop: &AtomicU32) -> Option<(u64, u64)> {
        self.with(stop, |p| {
            let taken = (
                p.word.load(Ordering::Relaxed),
                p.extra.load(Ordering::Relaxed),
            );
            p.word.store(0, Ordering::Relaxed);
            p.extra.store(0, Ordering::Relaxed);
            taken
        })
    }
}

/// Every pocket, and the count of takers at work.
pub(crate) struct Pockets {
    head: AtomicPtr<Pocket>,
    /// Takers at work (and a `fork()` in progress): owners keep out of their words meanwhile.
    pub(super) stop: AtomicU32,
}

impl Pockets {
    #[cfg(not(memgroup_loom))]
    pub(crate) const fn new() -> Pockets {
        Pockets {
            head: AtomicPtr::new(core::ptr::null_mut()),
            stop: AtomicU32::new(0),
        }
    }

    #[cfg(memgroup_loom)]
    pub(crate) fn new() -> Pockets {
        Pockets {
            head: AtomicPtr::new(core::ptr::null_mut()),
            stop: AtomicU32::new(0),
        }
    }

    /// A pocket for a new thread: a free one from the list, else `fresh` (a new, zeroed,
    /// never-freed pocket, or `None` if none can be had), which is published.
    pub(crate) fn adopt(
        &self,
        fresh: impl FnOnce() -> Option<&'static Pocket>,
    ) -> Option<&'static Pocket> {
        for p in self.iter() {
            if !p.live.load(Ordering::Relaxed)
                && p.live
                    .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return Some(p);
            }
        }
        let p = fresh()?;
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            p.next.store(head, Ordering::Relaxed);
            match self.head.compare_exchange_weak(
                head,
                p as *const Pocket as *mut Pocket,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(p),
                Err(now) => head = now,
            }
        }
    }

    /// Gives a pocket up for reuse, once its owner took its word out.
    pub(crate) fn abandon(&self, p: &Pocket) {
        p.live.store(false, Ordering::Release);
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &'static Pocket> {
        let mut p = self.head.load(Ordering::Acquire);
        core::iter::from_fn(move || {
            // SAFETY: pockets on the list are never freed, and `next` was set before the
            // pocket was published (Release/Acquire on `head`).
            let this: &'static Pocket = unsafe { p.as_ref()? };
            p = this.next.load(Ordering::Relaxed);
            Some(this)
        })
    }

    /// Whether any pocket's word satisfies `pred` (a racy look, to skip a stop that would find
    /// nothing).
    pub(super) fn any(&self, pred: impl Fn(u64) -> bool) -> bool {
        self.iter().any(|p| pred(p.word.load(Ordering::SeqCst)))
    }

    /// Keeps every owner out of its word until `resume`: raises `stop`, runs `barrier` (after
    /// which every owner's `busy` store is visible, or its `stop` load sees ours), and waits
    /// for the owners in their words to leave.
    pub(super) fn stop(&self, barrier: impl FnOnce()) {
        self.stop.fetch_add(1, Ordering::SeqCst);
        barrier();
        for p in self.iter() {
            let mut backoff = Backoff::new();
            while p.busy.load(Ordering::Acquire) != 0 {
                // An owner is a few instructions from leaving, unless it was preempted there
                // (perhaps on this CPU, by this thread): the backoff lets it run.
                backoff.wait();
            }
        }
    }

    pub(super) fn resume(&self) {
        self.stop.fetch_sub(1, Ordering::Release);
    }

    /// In a `fork()` child, whose only thread is the caller and is in no pocket: no taker
    /// runs and no owner is busy, whatever the parent's threads were doing at the fork (a
    /// thread that had just raised `busy` to look at `stop`, a taker between its `stop` and
    /// `resume`). An extra left without its word (a taker caught between the two) goes too.
    pub(super) fn reset_in_child(&self) {
        for p in self.iter() {
            p.busy.store(0, Ordering::Relaxed);
            if p.word.load(Ordering::Relaxed) == 0 {
                p.extra.store(0, Ordering::Relaxed);
            }
        }
        self.stop.store(0, Ordering::SeqCst);
    }
}
