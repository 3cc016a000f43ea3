//! The charge path, once, below both designs: a thread's pocket, then its CPU's stock, then
//! the counters with their limits, drains and reclaim (memcg's `try_charge`).
//!
//! The tag design charges every block here ([`Stocks::charge_block`], then
//! [`Stocks::charge_block_slow`] when the pocket cannot serve it), the arena design every slab
//! ([`Stocks::charge`]), and the loom models (`loom-tests/`) drive these very functions. What
//! the path needs of the calling thread (its CPU, its scope's limit mode, its pocket's state)
//! it asks through [`Caller`], each only on the branch that needs it: the pocket's fast path
//! reads none of them.

use super::pocket::Pocket;
use super::stock::{key_id, Groups, Key, Mode, Stocks};

/// The calling thread, as the charge path sees it: implemented by the embedding (the calling
/// thread's state, `crate::thread::Thread`) and by the loom models (a CPU number and a pocket).
pub(crate) trait Caller {
    /// The CPU it runs on: the index of the stock it charges.
    fn cpu(&self) -> usize;
    /// What may happen when one of its charges would pass a limit.
    fn mode(&self) -> Mode;
    /// Whether it has no pocket and will have none (pockets are off, or it is exiting): its
    /// blocks are charged to the CPU's stock directly.
    fn pocketless(&self) -> bool;
    /// Its pocket, if it is on the pockets' list; with `adopt`, put on the list now if it never
    /// had its chance (`None` if it cannot have one).
    fn listed_pocket(&self, adopt: bool) -> Option<&Pocket>;
}

impl<G: Groups, const N: usize> Stocks<G, N> {
    /// Charges `bytes` (and `objects` new blocks) to `key`: the CPU's stock, else its slow path
    /// (a refill from the counters, or an exact charge). Returns the key actually charged,
    /// which differs when the group was removed and a new block goes to its nearest live
    /// ancestor; `None` when refused.
    #[inline(always)]
    pub(crate) fn charge(
        &self,
        t: &impl Caller,
        key: Key,
        bytes: usize,
        objects: u64,
    ) -> Option<Key> {
        let cpu = t.cpu();
        if self.consume(cpu, key, bytes, objects) {
            return Some(key);
        }
        self.charge_slow(cpu, key, bytes, objects, t.mode())
    }

    /// Uncharges `bytes` (and `objects` blocks freed) from `key`: to the CPU's stock, else
    /// through its slow path.
    #[inline(always)]
    pub(crate) fn uncharge(&self, t: &impl Caller, key: Key, bytes: usize, objects: u64) {
        // The slow path reads the CPU again: keeping it live across the fast path's loop costs
        // that loop a register (two instructions per free with pockets off).
        if !self.refill(t.cpu(), key, bytes, objects) {
            self.uncharge_slow(t.cpu(), key, bytes, objects);
        }
    }

    /// The fast path of a block's charge: the thread's pocket `p` (with no locked instruction),
    /// or, for a thread that has no pocket, the CPU's stock. `pad` is the block's overhead
    /// beyond the tag formula (see `Counter::adjust_overhead`). False when neither can serve
    /// it; then call `charge_block_slow`. A thread whose pocket is not on the list fails here
    /// (its pocket holds nothing), and its slow path gives it its pocket.
    #[inline(always)]
    pub(crate) fn charge_block(
        &self,
        t: &impl Caller,
        p: &Pocket,
        key: Key,
        bytes: usize,
        pad: usize,
    ) -> bool {
        self.pocket_charge(p, key, bytes, pad)
            || t.pocketless() && self.consume(t.cpu(), key, bytes, 1) && {
                self.pad_overhead(key, pad as isize);
                true
            }
    }

    /// A block's charge that `charge_block` could not serve: the CPU's stock (refilled from
    /// the counters if it is short), or the counters directly for a block over a batch; then
    /// the pocket, if the block is small, is filled for the next ones (not for a removed
    /// group's key, whose blocks go to an ancestor). Returns the key charged, or `None` when
    /// refused (nothing is then changed).
    #[cold]
    #[inline(never)]
    pub(crate) fn charge_block_slow(
        &self,
        t: &impl Caller,
        key: Key,
        bytes: usize,
        pad: usize,
    ) -> Option<Key> {
        let cpu = t.cpu();
        let charged = if bytes <= self.batch() && self.consume(cpu, key, bytes, 1) {
            key
        } else {
            self.charge_slow(cpu, key, bytes, 1, t.mode())?
        };
        self.pad_overhead(charged, pad as isize);
        if charged == key && bytes <= self.pocket_size() / 2 {
            if let Some(p) = t.listed_pocket(true) {
                self.fill(cpu, p, key);
            }
        }
        Some(charged)
    }

    /// The fast path of a block's uncharge, as `charge_block` charged it: into the thread's
    /// pocket `p`, or, for a thread that has no pocket, to the CPU's stock (through its slow
    /// path if need be). False when the pocket cannot take it; then call
    /// `uncharge_block_slow`.
    #[inline(always)]
    pub(crate) fn uncharge_block(
        &self,
        t: &impl Caller,
        p: &Pocket,
        key: Key,
        bytes: usize,
        pad: usize,
    ) -> bool {
        self.pocket_uncharge(p, key, bytes, pad)
            || t.pocketless() && {
                // Before the bytes go: they keep a removed group's record alive.
                self.pad_overhead(key, -(pad as isize));
                self.uncharge(t, key, bytes, 1);
                true
            }
    }

    /// A block's uncharge that the thread's pocket could not take: it goes to the CPU's
    /// stock, and a pocket that holds the key (so it was full) is brought back to half.
    #[cold]
    #[inline(never)]
    pub(crate) fn uncharge_block_slow(&self, t: &impl Caller, key: Key, bytes: usize, pad: usize) {
        // Before the bytes go: they keep a removed group's record alive.
        self.pad_overhead(key, -(pad as isize));
        self.uncharge(t, key, bytes, 1);
        if let Some(p) = t.listed_pocket(false) {
            if bytes <= self.pocket_size() / 2 && self.pocket_holds(p, key) {
                self.fill(t.cpu(), p, key);
            }
        }
    }

    /// Adds a block's `pad` to its group's overhead figure, or (negative) takes it off, for a
    /// block charged or uncharged outside a pocket (which counts it itself).
    #[inline(always)]
    pub(crate) fn pad_overhead(&self, key: Key, delta: isize) {
        if delta != 0 {
            self.groups.counter(key_id(key)).adjust_overhead(delta);
        }
    }
}
