//! Drains: the content of stock slots and pockets taken back to the counters (memcg's
//! `drain_stock` / `drain_all_stock`), for `flush()`, a group's removal, a record's reuse and
//! a charge about to be refused at a limit; the pockets of threads that are gone; and the
//! counts that make drains exact.
//!
//! Every operation that holds bytes or counts outside a slot counts itself in, for as long
//! as it holds them: a refill between charging its batch and putting it in a slot, a pocket refill, an
//! eviction, in the `in_hand` count of the CPU whose slots it works on (a line that CPU's
//! slow paths write anyway); a drain, a delisted pocket, in `draining`, one count for the whole
//! process (drains already visit every CPU's line). Two things rest on these counts: the
//! group table reuses a freed record only after seeing every count at 0, so no word naming it
//! is still in someone's hands (see `Stocks::quiescent`); and a charge about to be refused at
//! a limit waits for the counts to drop before it drains, so bytes in flight are back in slots
//! where the drain can take them. A single count for every CPU would be written twice per
//! refill by every CPU, bouncing its line between them: what the stocks exist to avoid.

use super::counter::Counter;
use super::pocket::Pocket;
use super::stock::{has_content, key_id, key_is_kernel, word_allocs, word_bytes, word_frees};
use super::stock::{pad_total, word_key, Groups, Stocks};
use crate::sync::{fence, AtomicU64, Backoff, Ordering};

/// How long `wait_for_holders` waits, in `Backoff` rounds: through the spins and the yields
/// and a few sleeps, time for a preempted holder to be run again. Loom yields at every round,
/// so a few are enough there and many would only slow it.
const WAIT_ROUNDS: u32 = if cfg!(memgroup_loom) {
    4
} else {
    Backoff::SLEEPS_FROM + 4
};

impl<G: Groups, const N: usize> Stocks<G, N> {
    /// Runs `f`, which may hold bytes or counts taken out of a slot of `cpu` (or a batch
    /// charged to the counters and not yet in a slot), counted in that CPU's `in_hand`
    /// meanwhile: the count of the CPU the operation works on, not necessarily the one it runs
    /// on (it may migrate), so it is raised and lowered on the same line.
    ///
    /// Orderings: `span` is raised (if it must be) before the count, and the scans
    /// (`quiescent`, `wait_for_holders`) load `span` before the counts, all sequentially
    /// consistent. So a scan that loads `span` after this raise, in that single order, sees
    /// this CPU in its range, and its load of the count, later still, sees the count raised
    /// until `f` is done: a holder that raised its count before a scan began is never missed.
    pub(super) fn holding<R>(&self, cpu: usize, f: impl FnOnce() -> R) -> R {
        let i = cpu & (N - 1);
        // A sequentially consistent load (not a relaxed one): when it sees another thread's
        // raise, that raise precedes this count's in the single order too.
        if self.span.load(Ordering::SeqCst) <= i {
            self.span.fetch_max(i + 1, Ordering::SeqCst);
        }
        let count = &self.cpus[i].in_hand;
        count.fetch_add(1, Ordering::SeqCst);
        let r = f();
        count.fetch_sub(1, Ordering::SeqCst);
        r
    }

    /// Runs `f` (a drain, or the delisting of a pocket), which may hold words taken out of slots
    /// or pockets of any CPU, counted in `draining` meanwhile.
    pub(super) fn holding_drain<R>(&self, f: impl FnOnce() -> R) -> R {
        self.draining.0.fetch_add(1, Ordering::SeqCst);
        let r = f();
        self.draining.0.fetch_sub(1, Ordering::SeqCst);
        r
    }

    /// Whether some operation holds bytes or counts outside any slot: a look at `draining`,
    /// then at each CPU's `in_hand` up to `span`; with `wait`, each count is waited for (for a
    /// bounded time, with `backoff`) before the next is looked at. Every holder that counted
    /// itself in before this call began and is still holding when its count is looked at is
    /// seen (see `holding`).
    fn in_hand(&self, backoff: Option<&mut Backoff>) -> bool {
        let span = self.span.load(Ordering::SeqCst).min(N);
        let counts = core::iter::once(&self.draining.0)
            .chain(self.cpus[..span].iter().map(|stock| &stock.in_hand));
        match backoff {
            None => counts.into_iter().any(|n| n.load(Ordering::SeqCst) != 0),
            Some(b) => {
                for n in counts {
                    while n.load(Ordering::SeqCst) != 0 {
                        if b.rounds() >= WAIT_ROUNDS {
                            return true;
                        }
                        b.wait();
                    }
                }
                false
            }
        }
    }

    /// Whether no operation holds words outside the slots (every count looked at read 0). A
    /// record freed (and drained) before this call began can no longer be named by a slot
    /// word any thread holds when it returns true, so it may be reused: each operation that
    /// took such a word counted itself in before the drain ended, and was seen done.
    pub(crate) fn quiescent(&self) -> bool {
        !self.in_hand(None)
    }

    /// Waits (briefly: these are a few hundred instructions, unless their thread is not
    /// running) for the slow paths and drains elsewhere that hold bytes outside any slot,
    /// where a drain cannot take them: a refill's batch charged but not yet in a slot, a
    /// slot's content taken but not yet released. The wait backs off to yielding and then to
    /// sleeping, so that a holder preempted on this very CPU gets to finish; it is bounded
    /// (`WAIT_ROUNDS`), as a holder may be stopped (by a signal or a debugger).
    pub(super) fn wait_for_holders(&self) {
        self.in_hand(Some(&mut Backoff::new()));
    }

    /// After a slow path filled a slot for `c`, which was online when it looked: if `c` has
    /// gone offline since, its `remove` may have drained the slots before this one was filled,
    /// so drain again. (The refill and this load, and `remove`'s store and drain, are all
    /// sequentially consistent: one of the two drains sees the slot.)
    #[inline(always)]
    pub(super) fn recheck(&self, c: &Counter) {
        fence(Ordering::SeqCst);
        if !c.is_online() {
            self.drain_group(c.id);
        }
    }

    /// Empties every slot, on every CPU, whose group satisfies `pred`: the bytes go back to the
    /// counters and the pending counts are added to them.
    pub(crate) fn drain(&self, pred: impl Fn(&Counter) -> bool) {
        self.drain_where(|w| has_content(w) && pred(self.groups.counter(key_id(word_key(w)))));
    }

    /// Empties and releases every slot naming group `id`, empty ones included, so that no
    /// fast path finds a slot for it any more: for a group being removed (whose new charges
    /// then take the slow path, which sends them to a live ancestor) and for a record being
    /// freed.
    pub(crate) fn drain_group(&self, id: u32) {
        self.drain_where(|w| w != 0 && key_id(word_key(w)) == id);
    }

    /// Takes every slot word, on every CPU, for which `take(word)` says so, and drains it into
    /// its group's counters. A CAS lost to a concurrent change is retried while `take` still
    /// says so: a charge that fails at a limit must not miss bytes because the slot's owner
    /// was busy with it.
    ///
    /// Pockets too: if any pocket's word looks takeable, every owner is kept out of its pocket
    /// meanwhile (see `super::pocket`).
    fn drain_where(&self, take: impl Fn(u64) -> bool) {
        self.holding_drain(|| {
            let span = self.span.load(Ordering::SeqCst).min(N);
            for slot in self.cpus[..span].iter().flat_map(|stock| &stock.slots) {
                self.drain_slot(slot, &take);
            }
            if self.pockets.any(&take) {
                self.pockets.stop(|| self.groups.barrier());
                for p in self.pockets.iter() {
                    self.drain_stopped_pocket(p, &take);
                }
                self.pockets.resume();
            }
        });
    }

    /// Takes each of a stopped pocket's words (and its extra; the own and the far one) if
    /// `take` says so, and drains them.
    fn drain_stopped_pocket(&self, p: &Pocket, take: impl Fn(u64) -> bool) {
        for (word, extra) in p.words() {
            let mut w = word.load(Ordering::SeqCst);
            while take(w) {
                match word.compare_exchange(w, 0, Ordering::SeqCst, Ordering::Relaxed) {
                    Ok(_) => {
                        // The owner is kept out, and other takers only take the extra with a
                        // word.
                        let extra = extra.swap(0, Ordering::SeqCst);
                        self.drain_pocket_word(w, extra);
                        break;
                    }
                    Err(now) => w = now,
                }
            }
        }
    }

    /// Drains a pocket's word and extra into its group's counters.
    pub(super) fn drain_pocket_word(&self, w: u64, extra: u64) {
        if w == 0 {
            return;
        }
        let c = self.groups.counter(key_id(word_key(w)));
        // Before the bytes go: they keep an offline group's record alive. (A claimed word
        // without content has no extra, as the owner keeps it, but one would not be lost.)
        c.adjust_overhead(pad_total(w, extra) as i64 as isize);
        if has_content(w) {
            self.drain_word(w);
        }
    }

    /// Takes one slot's word if `take` says so, and drains it.
    fn drain_slot(&self, slot: &AtomicU64, take: impl Fn(u64) -> bool) {
        let mut w = slot.load(Ordering::SeqCst);
        while take(w) {
            match slot.compare_exchange(w, 0, Ordering::SeqCst, Ordering::Relaxed) {
                Ok(_) => {
                    self.drain_word(w);
                    break;
                }
                Err(now) => w = now,
            }
        }
    }

    /// Drains a word taken out of a slot into its group's counters.
    pub(super) fn drain_word(&self, w: u64) {
        let key = word_key(w);
        let c = self.groups.counter(key_id(key));
        c.count(word_allocs(w), word_frees(w));
        self.uncharge_counters(c, key_is_kernel(key), word_bytes(w) as usize);
    }

    /// Uncharges `bytes` from `c`'s counters, and frees an offline group's record once its
    /// usage reaches 0.
    pub(super) fn uncharge_counters(&self, c: &Counter, kernel: bool, bytes: usize) {
        if bytes != 0 && c.uncharge(bytes, kernel) && !c.is_online() {
            self.groups.emptied(c);
        }
    }

    /// Empties the pocket of a thread that is gone (at its exit, or in a `fork()` child for
    /// the parent's other threads) into the counters, and frees it for the next new thread.
    /// Its owner must not use it any more.
    pub(crate) fn delist_pocket(&self, p: &Pocket) {
        self.holding_drain(|| {
            for (word, extra) in p.words() {
                let w = word.swap(0, Ordering::SeqCst);
                // Whoever takes a word takes its extra (a drain may have taken both first).
                if w != 0 {
                    let extra = extra.swap(0, Ordering::SeqCst);
                    self.drain_pocket_word(w, extra);
                }
            }
        });
        self.pockets.delist(p);
    }

    /// Before `fork()`: keeps every thread out of its pocket until `thaw_pockets`, so that no
    /// pocket is caught in use by a thread the child will not have.
    pub(crate) fn freeze_pockets(&self) {
        self.pockets.stop(|| self.groups.barrier());
    }

    /// After `fork()`, in the parent.
    pub(crate) fn thaw_pockets(&self) {
        self.pockets.resume();
    }

    /// After `fork()`, in the child, whose only thread is the caller (in no stock operation):
    /// nothing is in anyone's hands or pocket but its own, whatever the parent's other threads
    /// were doing at the fork. Their pockets are emptied into the counters and freed; what a
    /// thread held in its hands at the fork (a slot's content between take and refill) is
    /// lost to the child, which can be off by that much.
    pub(crate) fn reset_in_child(&self, own: *const Pocket) {
        for stock in &self.cpus {
            stock.in_hand.store(0, Ordering::SeqCst);
        }
        self.draining.0.store(0, Ordering::SeqCst);
        self.pockets.reset_in_child();
        for p in self.pockets.iter() {
            if !core::ptr::eq(p, own) && p.is_live() {
                self.delist_pocket(p);
            }
        }
    }
}
