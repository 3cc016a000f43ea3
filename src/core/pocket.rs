//! Per-thread pockets in front of the per-CPU stocks.
//!
//! A CPU's stock slot is shared by every thread that runs on that CPU, so each operation on it
//! is a compare-and-swap: one locked instruction per allocation and one per free, the largest
//! part of the tag design's cost. A pocket is a slot that belongs to one thread: a few bytes
//! (at most `batch / 4`) pre-charged to one group key, with the same word format as a stock
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
//! A pocket lives in its owner's thread-local block (so the owner reaches it with no pointer
//! to load), and is named on a list of places that only grows and whose places are never
//! freed: a thread that exits empties its pocket and frees its place for the next new
//! thread. Takers walk the list with no lock; what keeps a pocket they reach from going away
//! with its thread is the walk's count: every walk is counted (in `walkers`, or in `stop` for
//! a taker), and an exiting thread, having cleared its place, waits until no walk is counted,
//! so no walker can still hold a pointer into its thread-local block (both sides sequentially
//! consistent: either the walker's count is seen, or the cleared place is).

use core::cell::Cell;

use crate::sync::{
    fence, light_fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Backoff, Ordering,
};

// `Pocket::new` is `const` for the thread-local block it lives in; loom's atomics are not.

/// One thread's pocket, in its thread-local block (only its owner writes it, except for
/// takers).
#[repr(C)]
pub(crate) struct Pocket {
    /// Raised by the owner around each access to `word`.
    busy: AtomicU32,
    /// On the list (between `enlist` and `delist`).
    live: AtomicBool,
    /// The content: a stock slot word (see `super::stock`), 0 when unclaimed (always, for a
    /// pocket not on the list: its owner's fast paths then fail, and its slow paths decide).
    pub(super) word: AtomicU64,
    /// Overhead bytes the blocks counted in `word` add to the tag formula (wrapping: the sum
    /// of +pad per allocation and -pad per free), due to the group of `word` with it. Changed
    /// only with counts in `word`, so a word without content has none.
    pub(super) extra: AtomicU64,
    /// The key the owner last gave `word`, sealed (as a block's tag holds it: a free's tag
    /// is compared with it, so a block of the pocket's key needs no other check of its tag)
    /// and as `checked` (for the word check). The owner's alone: no taker reads or writes
    /// them (they are plain cells). Stale once a taker took the word (0), which is harmless:
    /// the word check refuses an unclaimed word (see `super::stock`).
    sealed: Cell<u64>,
    check: Cell<u64>,
    /// The most bytes the word may hold (`batch / POCKET_SHARE`), set with the key: a free
    /// reads it here rather than computing it from the batch. The owner's alone, as above.
    cap: Cell<u64>,
    /// A second word, for the owner's frees of blocks of another key (blocks allocated by
    /// another thread in another group: a consumer's, a server's handed-over buffers), which
    /// it takes in as `word` takes its own key's frees, never charged from; with its own
    /// extra, its key sealed and checked (owner-only cells, as above), and the same cap.
    /// Takers take it as they take `word`.
    pub(super) far: AtomicU64,
    pub(super) far_extra: AtomicU64,
    far_sealed: Cell<u64>,
    far_check: Cell<u64>,
    /// Raised by 2 per `swap_words` (odd while the words trade places; the owner's alone to
    /// write), so that a taker's racy look at both words (`Pockets::any`) knows when a word it
    /// looks for may have moved from the word it read second to the one it read first.
    swaps: AtomicU32,
}

// SAFETY: the only fields that are not atomics, `sealed`, `check`, `cap`, `far_sealed` and
// `far_check`, are read and written by the pocket's owner alone (`key`, `set_key`, `far_key`,
// `set_far_key`, `swap_words`, `stash_far`, called by the owner's fast and slow paths); other
// threads reach a pocket only to take its words and extras, through the atomics.
unsafe impl Sync for Pocket {}

/// A pocket off the list, holding nothing: the one body of both `Pocket::new`s.
macro_rules! empty_pocket {
    () => {
        Pocket {
            busy: AtomicU32::new(0),
            live: AtomicBool::new(false),
            word: AtomicU64::new(0),
            extra: AtomicU64::new(0),
            sealed: Cell::new(0),
            check: Cell::new(0),
            cap: Cell::new(0),
            far: AtomicU64::new(0),
            far_extra: AtomicU64::new(0),
            far_sealed: Cell::new(0),
            far_check: Cell::new(0),
            swaps: AtomicU32::new(0),
        }
    };
}

impl Pocket {
    /// A thread's pocket, off the list.
    #[cfg(not(memgroup_loom))]
    pub(crate) const fn new() -> Pocket {
        empty_pocket!()
    }

    /// As above; loom's atomics have no `const` constructor.
    #[cfg(memgroup_loom)]
    pub(crate) fn new() -> Pocket {
        empty_pocket!()
    }

    /// The key the owner last gave its word, sealed and `checked`, and its cap (only for the
    /// owner).
    #[inline(always)]
    pub(super) fn key(&self) -> (u64, u64, u64) {
        (self.sealed.get(), self.check.get(), self.cap.get())
    }

    /// Records the key the owner gives its word, and its cap (only for the owner, before the
    /// word).
    #[inline(always)]
    pub(super) fn set_key(&self, sealed: u64, check: u64, cap: u64) {
        self.sealed.set(sealed);
        self.check.set(check);
        self.cap.set(cap);
    }

    /// The key the owner last gave its far word, sealed and `checked` (only for the owner).
    #[inline(always)]
    pub(super) fn far_key(&self) -> (u64, u64) {
        (self.far_sealed.get(), self.far_check.get())
    }

    /// Records the key the owner gives its far word, and the cap (only for the owner, before
    /// the word).
    #[inline(always)]
    pub(super) fn set_far_key(&self, sealed: u64, check: u64, cap: u64) {
        self.far_sealed.set(sealed);
        self.far_check.set(check);
        self.cap.set(cap);
    }

    /// Its two (word, extra) pairs: the own key's, then the far one's.
    pub(super) fn words(&self) -> [(&AtomicU64, &AtomicU64); 2] {
        [(&self.word, &self.extra), (&self.far, &self.far_extra)]
    }

    /// Whether it is on the list.
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

    /// `update` on the far word and its extra.
    #[inline(always)]
    pub(super) fn update_far(
        &self,
        stop: &AtomicU32,
        pad: u64,
        step: impl FnOnce(u64) -> Option<u64>,
    ) -> bool {
        self.with(stop, |p| {
            let (word, extra) = (&p.far, &p.far_extra);
            match step(word.load(Ordering::Relaxed)) {
                Some(new) => {
                    word.store(new, Ordering::Relaxed);
                    let e = extra.load(Ordering::Relaxed);
                    extra.store(e.wrapping_add(pad), Ordering::Relaxed);
                    true
                }
                None => false,
            }
        }) == Some(true)
    }

    /// The owner's take of the whole content of a word (the far one, or the own one) and its
    /// extra, leaving the word unclaimed.
    #[inline]
    pub(super) fn take_own(&self, stop: &AtomicU32, far: bool) -> Option<(u64, u64)> {
        self.with(stop, |p| {
            let (word, extra) = p.words()[far as usize];
            let taken = (word.load(Ordering::Relaxed), extra.load(Ordering::Relaxed));
            word.store(0, Ordering::Relaxed);
            extra.store(0, Ordering::Relaxed);
            taken
        })
    }

    /// The owner's switch to the key its far word holds, if `holds(far word)` says it is the
    /// one wanted: the two words, their extras and the owner's cells for them (sealed key, check)
    /// trade places in one access, so the far word's content is charged from and the own
    /// word's kept for its key's frees, neither going to the stocks. False (nothing touched)
    /// if the far word does not hold that key or a taker is at work. Takers take both words
    /// alike, so a drain before or after the swap finds every byte in one of them.
    #[inline]
    pub(super) fn swap_words(&self, stop: &AtomicU32, holds: impl FnOnce(u64) -> bool) -> bool {
        self.with(stop, |p| {
            let far = p.far.load(Ordering::Relaxed);
            if !holds(far) {
                return false;
            }
            // A seqlock's write, for the looks (see `Pockets::any`): odd before the words
            // change, even again after (compiler-only fences on x86).
            let n = p.swaps.load(Ordering::Relaxed);
            p.swaps.store(n.wrapping_add(1), Ordering::Relaxed);
            fence(Ordering::Release);
            let far_extra = p.far_extra.load(Ordering::Relaxed);
            p.far
                .store(p.word.load(Ordering::Relaxed), Ordering::Relaxed);
            p.far_extra
                .store(p.extra.load(Ordering::Relaxed), Ordering::Relaxed);
            p.word.store(far, Ordering::Relaxed);
            p.extra.store(far_extra, Ordering::Relaxed);
            p.swaps.store(n.wrapping_add(2), Ordering::Release);
            p.sealed.swap(&p.far_sealed);
            p.check.swap(&p.far_check);
            true
        }) == Some(true)
    }

    /// The owner's move of a word it took out of its own word (`held` and its `extra`, with
    /// content) into its far word, for that key's frees and a later `swap_words`: returns
    /// what the far word held (its word and extra, for the stocks), or `None` if a taker is at
    /// work (then nothing is touched, and `held` is still the caller's).
    #[inline]
    pub(super) fn stash_far(
        &self,
        stop: &AtomicU32,
        held: u64,
        extra: u64,
        sealed: u64,
        check: u64,
    ) -> Option<(u64, u64)> {
        self.with(stop, |p| {
            let old = (
                p.far.load(Ordering::Relaxed),
                p.far_extra.load(Ordering::Relaxed),
            );
            p.far_sealed.set(sealed);
            p.far_check.set(check);
            p.far.store(held, Ordering::Relaxed);
            p.far_extra.store(extra, Ordering::Relaxed);
            old
        })
    }
}

/// A place on the list of pockets: never freed; free (null) for the next new thread once its
/// pocket's thread is gone.
pub(crate) struct Place {
    pocket: AtomicPtr<Pocket>,
    /// The next place on the list; set before the place is published, then fixed.
    next: AtomicPtr<Place>,
}

impl Place {
    #[cfg(not(memgroup_loom))]
    pub(crate) const fn new() -> Place {
        Place {
            pocket: AtomicPtr::new(core::ptr::null_mut()),
            next: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    #[cfg(memgroup_loom)]
    pub(crate) fn new() -> Place {
        Place {
            pocket: AtomicPtr::new(core::ptr::null_mut()),
            next: AtomicPtr::new(core::ptr::null_mut()),
        }
    }
}

/// Every pocket, the count of takers at work, and the count of other walks.
pub(crate) struct Pockets {
    head: AtomicPtr<Place>,
    /// Takers at work (and a `fork()` in progress): owners keep out of their words meanwhile.
    /// A taker's walk is counted here.
    pub(super) stop: AtomicU32,
    /// Walks that are not a taker's (`any`).
    walkers: AtomicU32,
}

impl Pockets {
    #[cfg(not(memgroup_loom))]
    pub(crate) const fn new() -> Pockets {
        Pockets {
            head: AtomicPtr::new(core::ptr::null_mut()),
            stop: AtomicU32::new(0),
            walkers: AtomicU32::new(0),
        }
    }

    #[cfg(memgroup_loom)]
    pub(crate) fn new() -> Pockets {
        Pockets {
            head: AtomicPtr::new(core::ptr::null_mut()),
            stop: AtomicU32::new(0),
            walkers: AtomicU32::new(0),
        }
    }

    /// Puts a thread's pocket on the list: in a free place, else in `fresh` (a new, never
    /// freed place, or `None` if none can be had: then the pocket stays off the list and
    /// this returns false), which is published. The pocket must hold nothing, and stay where
    /// it is until `delist`.
    pub(crate) fn enlist(
        &self,
        p: &Pocket,
        fresh: impl FnOnce() -> Option<&'static Place>,
    ) -> bool {
        let ptr = p as *const Pocket as *mut Pocket;
        p.live.store(true, Ordering::Relaxed);
        for place in self.places() {
            if place.pocket.load(Ordering::Relaxed).is_null()
                && place
                    .pocket
                    .compare_exchange(
                        core::ptr::null_mut(),
                        ptr,
                        Ordering::SeqCst,
                        Ordering::Relaxed,
                    )
                    .is_ok()
            {
                return true;
            }
        }
        let Some(place) = fresh() else {
            p.live.store(false, Ordering::Relaxed);
            return false;
        };
        place.pocket.store(ptr, Ordering::Relaxed);
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            place.next.store(head, Ordering::Relaxed);
            match self.head.compare_exchange_weak(
                head,
                place as *const Place as *mut Place,
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => head = now,
            }
        }
    }

    /// Takes a pocket off the list, once its owner took its word out, and waits until no
    /// walk can still reach it: then its thread may go, and its thread-local block with it.
    pub(crate) fn delist(&self, p: &Pocket) {
        let ptr = p as *const Pocket as *mut Pocket;
        for place in self.places() {
            if place.pocket.load(Ordering::Relaxed) == ptr {
                place.pocket.store(core::ptr::null_mut(), Ordering::SeqCst);
            }
        }
        p.live.store(false, Ordering::Release);
        // A walk counted after these loads starts after the store above, so it cannot see
        // the pocket; one counted before them is waited for. (The fences pair the store and
        // these loads with a walk's count and its loads of the places: sequentially
        // consistent accesses alone do not order a store before a later load in loom's
        // model.) Walks are short (a taker's is a drain), and `fork()` holds one only across
        // the fork.
        fence(Ordering::SeqCst);
        let mut backoff = Backoff::new();
        while self.stop.load(Ordering::SeqCst) != 0 || self.walkers.load(Ordering::SeqCst) != 0 {
            backoff.wait();
        }
    }

    fn places(&self) -> impl Iterator<Item = &'static Place> {
        let mut place = self.head.load(Ordering::SeqCst);
        core::iter::from_fn(move || {
            // SAFETY: places on the list are never freed, and `next` was set before the place
            // was published (on `head`, sequentially consistent).
            let this: &'static Place = unsafe { place.as_ref()? };
            place = this.next.load(Ordering::Relaxed);
            Some(this)
        })
    }

    /// The pockets on the list. Only for a walk counted in `stop` (between `stop` and
    /// `resume`), for a `fork()` child (whose only thread is the caller), or for the owners'
    /// own pockets: a pocket reached otherwise may be gone with its thread.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Pocket> {
        self.places().filter_map(|place| {
            // SAFETY: a pocket on the list stays in place until `delist`, which waits for the
            // walks counted in `stop` or `walkers` (the caller's walk is one of them, or no
            // other thread runs) before its thread may go.
            unsafe { place.pocket.load(Ordering::SeqCst).as_ref() }
        })
    }

    /// Whether any pocket satisfies `pred`: a walk counted in `walkers`, so that no pocket
    /// it reaches goes away meanwhile.
    pub(crate) fn any_pocket(&self, pred: impl Fn(&Pocket) -> bool) -> bool {
        self.walkers.fetch_add(1, Ordering::SeqCst);
        // Before the places are read (see `delist`).
        fence(Ordering::SeqCst);
        let found = self.iter().any(pred);
        self.walkers.fetch_sub(1, Ordering::SeqCst);
        found
    }

    /// Whether any pocket's word satisfies `pred` (a racy look, to skip a stop that would find
    /// nothing).
    pub(super) fn any(&self, pred: impl Fn(u64) -> bool) -> bool {
        self.any_pocket(|p| {
            // A seqlock's read: an owner's `swap_words` between the two loads could move the
            // word sought from the far word (read second) to the own one (read first), or
            // back; a look that overlapped a swap counts as a find (the stop then decides).
            let swaps = p.swaps.load(Ordering::Acquire);
            let found = p
                .words()
                .iter()
                .any(|(w, _)| pred(w.load(Ordering::SeqCst)));
            fence(Ordering::Acquire);
            found || swaps & 1 != 0 || p.swaps.load(Ordering::Relaxed) != swaps
        })
    }

    /// Keeps every owner out of its word until `resume`: raises `stop`, runs `barrier` (after
    /// which every owner's `busy` store is visible, or its `stop` load sees ours), and waits
    /// for the owners in their words to leave. The caller's walk of the pockets, until
    /// `resume`, is counted in `stop` (see `delist`).
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
            for (word, extra) in p.words() {
                if word.load(Ordering::Relaxed) == 0 {
                    extra.store(0, Ordering::Relaxed);
                }
            }
        }
        self.walkers.store(0, Ordering::SeqCst);
        self.stop.store(0, Ordering::SeqCst);
    }
}
