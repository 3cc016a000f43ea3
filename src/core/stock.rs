//! Per-CPU stocks of pre-charged bytes: memcg's `memcg_stock_pcp`.
//!
//! Charging the shared counters on every allocation would bounce their cache lines between
//! CPUs. Instead each CPU keeps a few slots, each holding bytes already charged to one group
//! (in `batch`-sized steps) together with the allocations and frees not yet added to that
//! group's counters. A small charge takes bytes from the slot of its group on the current CPU;
//! a small uncharge gives them back. Only when a slot runs dry, overflows or is evicted do the
//! shared counters move.
//!
//! A slot is one `AtomicU64` holding `key | frees | allocs | bytes`, so every operation on it
//! is a single compare-and-swap: a thread that migrates to another CPU between reading its CPU
//! number and the CAS is still correct (it just touched another CPU's line), and a drain from
//! another CPU can take a slot's bytes at any moment without losing or inventing any.
//!
//! Slots per CPU: seven (the kernel's count since 6.16), so tenants that share a CPU do not
//! evict each other at every switch. A group whose slot is evicted has its bytes returned to
//! its counter.
//!
//! In front of the stocks, each thread may have a pocket (`super::pocket`): a slot of its own,
//! holding at most `batch / 4` bytes for one key, which it charges with no locked instruction.
//! Pockets are filled from and emptied into this CPU's slots, and drains take their content as
//! they take the slots'.
//!
//! This file has the slots, their word format and their fast paths; `super::drain` has the
//! drains (slots and pockets back to the counters) and the counts that make them exact, and
//! `super::charge` the slow paths (slot and pocket refills, down to the counters with their
//! limits and reclaim) and the whole charge path the designs call.

use super::counter::Counter;
use super::pocket::{Pocket, Pockets};
use crate::sync::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Slots per CPU. Loom models use two, to stay small.
pub(crate) const SLOTS: usize = if cfg!(memgroup_loom) { 2 } else { 7 };

/// The largest batch: a slot never holds more bytes than a batch.
pub(crate) const MAX_BATCH: usize = 1 << 23;

/// A pocket holds at most `batch / POCKET_SHARE` bytes, and is filled to half of that.
///
/// A quarter: larson's blocks (16 B to 4 KiB, 2 KiB on average) emptied or filled an 8 KiB
/// pocket (an eighth) every 5 steps or so, 16 KiB pockets every 20 (callgrind, 1 thread: 22,800
/// slow paths per 60,000 steps against 6,900, and 703 against 656 instructions a step). A half
/// (32 KiB) saves 11 more a step, for twice the slack per thread.
///
/// The loom models keep an eighth: their sizes (a batch of 128 bytes, blocks of 8, a pocket of
/// 16 that a third free overflows) are chosen for it.
pub(crate) const POCKET_SHARE: usize = if cfg!(memgroup_loom) { 8 } else { 4 };

// A slot word, from the low bits up: bytes (24 bits), a guard bit, the allocations it can
// still count (8 bits, counting down), a guard bit, the frees it can still count (8 bits,
// counting down), a guard bit, the key (21 bits). Guards are 1 in every claimed word. So a
// charge is one subtraction of `bytes + one allocation`, and it fits exactly when it borrows
// through no guard and the key is unchanged: one mask and one compare check the key, the
// bytes and the count at once. An uncharge is one addition of `bytes - one free`.
const BYTES_BITS: u32 = 24;
const COUNT_BITS: u32 = 8;
const ALLOCS_SHIFT: u32 = BYTES_BITS + 1;
const FREES_SHIFT: u32 = ALLOCS_SHIFT + COUNT_BITS + 1;
const KEY_SHIFT: u32 = FREES_SHIFT + COUNT_BITS + 1;
const BYTES_MASK: u64 = (1 << BYTES_BITS) - 1;
pub(super) const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;
const GUARDS: u64 =
    1 << BYTES_BITS | 1 << (ALLOCS_SHIFT + COUNT_BITS) | 1 << (FREES_SHIFT + COUNT_BITS);
const CONTENT_MASK: u64 = (1 << KEY_SHIFT) - 1;
/// The content of a claimed slot holding nothing.
const EMPTY: u64 = GUARDS | COUNT_MAX << ALLOCS_SHIFT | COUNT_MAX << FREES_SHIFT;
/// The bits a fast path checks after its arithmetic: the key and the guards.
const CHECK_MASK: u64 = !CONTENT_MASK | GUARDS;

/// What a pocket adds to its `extra` per block besides the block's pad (and takes off per
/// free). Any value would do: `pad_total` takes it out again, from the word's counts that
/// moved with it. It is the tag design's tag size, so that `pad + PAD_BIAS` is the block's
/// header, a value the tag design has at hand: one instruction on each side (added or
/// subtracted in place), where the bare pad, derived from the header, took two on an
/// allocation and five on a free.
pub(super) const PAD_BIAS: u64 = 8;

/// The pad bytes a pocket's `extra` stands for, with the word it was counted with.
#[inline(always)]
pub(super) const fn pad_total(w: u64, extra: u64) -> u64 {
    let blocks = word_allocs(w).wrapping_sub(word_frees(w));
    extra.wrapping_sub(PAD_BIAS.wrapping_mul(blocks))
}

/// The largest group id a key can hold. The all-ones key is left out: an unclaimed word (0)
/// minus a charge would read as it.
pub(crate) const MAX_ID: u32 = (1 << (64 - KEY_SHIFT - 1)) - 2;

/// A group and a kind of memory: `id << 1 | kernel`. Key 0 names no group.
pub(crate) type Key = u32;

#[inline(always)]
pub(crate) const fn key(id: u32, kernel: bool) -> Key {
    id << 1 | kernel as u32
}

#[inline(always)]
pub(crate) const fn key_id(key: Key) -> u32 {
    key >> 1
}

#[inline(always)]
pub(crate) const fn key_is_kernel(key: Key) -> bool {
    key & 1 != 0
}

/// The upper half of a sealed key is the key xor this.
pub(crate) const SEAL: u32 = 0x9e37_79b9;

/// A key with a check half: `key | (key ^ SEAL) << 32`. The tag design stores this with
/// every block (so a damaged tag is seen), the thread keeps its key in this form, so a new
/// block's tag is one thread-local load, and a pocket its own key, so a free's tag is checked
/// against it with one compare.
#[inline(always)]
pub(crate) const fn sealed(key: Key) -> u64 {
    key as u64 | ((key ^ SEAL) as u64) << 32
}

/// The key of a sealed key, if the seal holds.
#[inline(always)]
pub(crate) const fn unseal(word: u64) -> Option<Key> {
    let key = word as Key;
    if (word >> 32) as u32 == key ^ SEAL {
        Some(key)
    } else {
        None
    }
}

/// What may happen when a charge would pass a limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The groups' `OnLimit` policies decide.
    Policy,
    /// Refuse (inside `fallible`).
    Fallible,
    /// Force (inside `nofail`).
    NoFail,
}

/// The group table, as the stocks see it.
pub(crate) trait Groups {
    /// The counter of the group with this id. Only called with ids that a live slot word or a
    /// charge names, whose group records are therefore alive.
    fn counter(&self, id: u32) -> &Counter;
    /// `c` is offline and its usage just reached 0: free its record if nothing else holds it.
    fn emptied(&self, c: &Counter);
    /// A counter's pressure levels were raised: wake whoever delivers them. Must not allocate
    /// or take a lock that user code can hold.
    fn wake(&self);
    /// A charge to `at`'s chain is about to be refused or forced: ask for `bytes` to be
    /// reclaimed under `at` and wait a bounded time. Returns whether anything was tried (then
    /// the charge is retried once).
    fn reclaim(&self, at: &Counter, bytes: usize) -> bool;
    /// The heavy side of the pockets' asymmetric fence: returns once every thread has run a
    /// full memory fence (or is not running), as `membarrier(2)` does.
    fn barrier(&self);
}

/// A claimed word: `bytes` (at most `BYTES_MASK`), and `allocs` and `frees` not yet counted
/// (each at most `COUNT_MAX`).
#[inline(always)]
pub(super) const fn word(key: Key, bytes: u64, allocs: u64, frees: u64) -> u64 {
    (key as u64) << KEY_SHIFT
        | GUARDS
        | (COUNT_MAX - frees) << FREES_SHIFT
        | (COUNT_MAX - allocs) << ALLOCS_SHIFT
        | bytes
}

/// What `word(key, ..)` has under `CHECK_MASK`: the form of `key` a fast path compares with.
/// The thread keeps its key in this form too (beside the sealed one), so a pocket charge
/// does not recompute it.
#[inline(always)]
pub(crate) const fn checked(key: Key) -> u64 {
    (key as u64) << KEY_SHIFT | GUARDS
}

/// Whether a slot word holds bytes or counts (an unclaimed or claimed-empty one does not).
#[inline(always)]
pub(super) const fn has_content(w: u64) -> bool {
    w != 0 && w & CONTENT_MASK != EMPTY
}

#[inline(always)]
pub(super) const fn word_key(w: u64) -> Key {
    (w >> KEY_SHIFT) as Key
}

#[inline(always)]
pub(super) const fn word_bytes(w: u64) -> u64 {
    w & BYTES_MASK
}

#[inline(always)]
pub(super) const fn word_allocs(w: u64) -> u64 {
    COUNT_MAX - ((w >> ALLOCS_SHIFT) & COUNT_MAX)
}

#[inline(always)]
pub(super) const fn word_frees(w: u64) -> u64 {
    COUNT_MAX - ((w >> FREES_SHIFT) & COUNT_MAX)
}

/// One CPU's slots, on their own cache line (64 bytes: seven slots and two counts).
#[repr(C, align(64))]
pub(crate) struct CpuStock {
    pub(super) slots: [AtomicU64; SLOTS],
    /// Round-robin eviction cursor; a hint, so racy updates are fine.
    pub(super) victim: AtomicU32,
    /// Slow paths working on these slots that hold bytes or counts outside any slot (see
    /// `Stocks::holding`).
    pub(super) in_hand: AtomicU32,
}

impl CpuStock {
    #[cfg(not(memgroup_loom))]
    pub(crate) const fn new() -> CpuStock {
        CpuStock {
            slots: [const { AtomicU64::new(0) }; SLOTS],
            victim: AtomicU32::new(0),
            in_hand: AtomicU32::new(0),
        }
    }

    #[cfg(memgroup_loom)]
    pub(crate) fn new() -> CpuStock {
        CpuStock {
            slots: core::array::from_fn(|_| AtomicU64::new(0)),
            victim: AtomicU32::new(0),
            in_hand: AtomicU32::new(0),
        }
    }
}

/// The stocks of all CPUs, and the charge and uncharge paths through them.
pub(crate) struct Stocks<G: Groups, const N: usize> {
    pub(super) cpus: [CpuStock; N],
    /// One more than the highest CPU index whose slots or `in_hand` were ever used: drains and
    /// the scans of the counts look no further. Written at most once per CPU.
    pub(super) span: AtomicUsize,
    pub(super) batch: AtomicUsize,
    /// Drains (and delisted pockets) holding words taken out of slots or pockets, not yet
    /// drained into the counters. On a line of its own: the one above is read by every fast path.
    pub(super) draining: Draining,
    pub(super) pockets: Pockets,
    pub(super) groups: G,
}

impl<G: Groups, const N: usize> Stocks<G, N> {
    /// `N` must be a power of two: CPU numbers are masked into it.
    #[cfg(not(memgroup_loom))]
    pub(crate) const fn new(batch: usize, groups: G) -> Self {
        assert!(N.is_power_of_two());
        Stocks {
            cpus: [const { CpuStock::new() }; N],
            span: AtomicUsize::new(0),
            batch: AtomicUsize::new(batch),
            draining: Draining(AtomicU32::new(0)),
            pockets: Pockets::new(),
            groups,
        }
    }

    #[cfg(memgroup_loom)]
    pub(crate) fn new_loom(batch: usize, groups: G) -> Self {
        assert!(N.is_power_of_two());
        Stocks {
            cpus: core::array::from_fn(|_| CpuStock::new()),
            span: AtomicUsize::new(0),
            batch: AtomicUsize::new(batch),
            draining: Draining(AtomicU32::new(0)),
            pockets: Pockets::new(),
            groups,
        }
    }

    /// Sets the batch; 0 turns stocks off. Called once, before any slot is filled.
    pub(crate) fn set_batch(&self, batch: usize) {
        self.batch.store(batch.min(MAX_BATCH), Ordering::Relaxed);
    }

    #[inline(always)]
    pub(crate) fn batch(&self) -> usize {
        self.batch.load(Ordering::Relaxed)
    }

    #[inline(always)]
    pub(super) fn stock(&self, cpu: usize) -> &CpuStock {
        &self.cpus[cpu & (N - 1)]
    }

    /// The fast path of a charge (memcg's `consume_stock`): takes `bytes` from this CPU's slot
    /// for `key` and counts `objects` allocations there. False when the slot cannot serve it;
    /// then call `charge_slow`.
    #[inline(always)]
    pub(crate) fn consume(&self, cpu: usize, key: Key, bytes: usize, objects: u64) -> bool {
        bytes <= MAX_BATCH && self.update(cpu, take(key, bytes, objects))
    }

    /// Takes up to `bytes` (and no object) from this CPU's slot for `key`: all it holds if
    /// that is less. For a pocket's refill, which would otherwise leave the pocket empty (and
    /// every next allocation to the slow path) while the stock holds less than it wants.
    /// Returns the bytes taken.
    pub(super) fn consume_up_to(&self, cpu: usize, key: Key, bytes: usize) -> usize {
        let check = checked(key);
        let got = core::cell::Cell::new(0);
        // The word is ours only if our CAS took it (a drain may take it first); taking at
        // most the bytes it holds borrows nothing, so its key and guards stay as they are.
        let took = self.update(cpu, |w| {
            let n = word_bytes(w).min(bytes as u64);
            got.set(n);
            (n != 0 && w & CHECK_MASK == check).then_some(w - n)
        });
        if took {
            got.get() as usize
        } else {
            0
        }
    }

    /// The fast path of an uncharge (memcg's `refill_stock`): gives `bytes` back to this CPU's
    /// slot for `key` and counts `objects` frees there. The group must be online. False when
    /// the slot cannot take it; then call `uncharge_slow`.
    #[inline(always)]
    pub(crate) fn refill(&self, cpu: usize, key: Key, bytes: usize, objects: u64) -> bool {
        self.update(cpu, give(key, bytes, objects, self.batch()))
    }

    /// `charge` on this thread's pocket, with no locked instruction, of a block (`objects`
    /// is 1) of the key whose `checked` form is `check`, whose overhead is `pad` bytes more
    /// than the tag formula counts (see `Counter::adjust_overhead`). False when the pocket cannot serve it; then charge the
    /// stocks, and refill the pocket (`refill_pocket`).
    #[inline(always)]
    pub(crate) fn pocket_charge(&self, p: &Pocket, check: u64, bytes: usize, pad: usize) -> bool {
        bytes <= MAX_BATCH
            && p.update(
                &self.pockets.stop,
                pad as u64 + PAD_BIAS,
                take_checked(check, bytes, 1),
            )
    }

    /// `uncharge` on this thread's pocket of a block, as `pocket_charge` charged it, whose
    /// tag is `tag` (its key, sealed). False when the pocket cannot take it (its key is
    /// another, or it would be over its size); then uncharge the stocks, and refill the pocket
    /// (`refill_pocket`) if it holds the key (it is full). A tag equal to the pocket's sealed
    /// key is a valid one: only a tag that is not needs the seal checked (`unseal`).
    #[inline(always)]
    pub(crate) fn pocket_uncharge(&self, p: &Pocket, tag: u64, bytes: usize, pad: usize) -> bool {
        if tag != p.key().0 {
            return false;
        }
        let pad = (pad as u64 + PAD_BIAS).wrapping_neg();
        // The check and the cap are read in the step, where they are compared.
        p.update(&self.pockets.stop, pad, |w| {
            let (_, check, cap) = p.key();
            give_checked(check, bytes, 1, cap as usize)(w)
        })
    }

    /// `pocket_uncharge` of a block of another key than the pocket's own, `key`: into the
    /// pocket's far word, if it holds that key. False when it cannot take it.
    #[inline(always)]
    pub(crate) fn far_uncharge(&self, p: &Pocket, key: Key, bytes: usize, pad: usize) -> bool {
        if sealed(key) != p.far_key().0 || bytes > MAX_BATCH {
            return false;
        }
        let pad = (pad as u64 + PAD_BIAS).wrapping_neg();
        p.update_far(&self.pockets.stop, pad, |w| {
            let (_, check) = p.far_key();
            let (_, _, cap) = p.key();
            give_checked(check, bytes, 1, cap as usize)(w)
        })
    }

    /// A block's growth (`grow`) or shrinkage by `bytes` (a `realloc` that keeps the block's
    /// alignment, so its header and pad) on this thread's pocket, with no locked instruction,
    /// if the block's tag `tag` is the pocket's own key (its owner's, removed or not: the
    /// block keeps it) and the pocket has the bytes or the room. No block is counted. False
    /// when the pocket cannot serve it; then charge or uncharge the block's owner through the
    /// stocks (`Stocks::charge` or `uncharge` with no object).
    #[inline(always)]
    pub(crate) fn pocket_resize(&self, p: &Pocket, tag: u64, bytes: usize, grow: bool) -> bool {
        if !self.pocket_vouches(p, tag) || bytes > MAX_BATCH {
            return false;
        }
        p.update(&self.pockets.stop, 0, |w| {
            let (_, check, cap) = p.key();
            if grow {
                // Never the last bytes: a word left without content must have no extra (a
                // refill may have kept its pad there), and one with bytes has content.
                take_checked(check, bytes, 0)(w).filter(|&new| word_bytes(new) != 0)
            } else {
                give_checked(check, bytes, 0, cap as usize)(w)
            }
        })
    }

    /// Whether `tag` is this thread's pocket's own key, sealed (so a valid tag: see
    /// `pocket_uncharge`).
    #[inline(always)]
    pub(crate) fn pocket_vouches(&self, p: &Pocket, tag: u64) -> bool {
        tag == p.key().0
    }

    /// The most bytes a pocket holds (`batch / POCKET_SHARE`).
    pub(crate) fn pocket_size(&self) -> usize {
        self.batch() / POCKET_SHARE
    }

    /// Whether this thread's pocket holds `key`.
    pub(crate) fn pocket_holds(&self, p: &Pocket, key: Key) -> bool {
        // Only the owner changes the key (a drain only takes the word): a plain look will do.
        word_key(p.word.load(Ordering::Relaxed)) == key
    }

    /// Whether this thread's pocket's far word holds `key` (a plain look, as above).
    #[cfg_attr(not(memgroup_loom), allow(dead_code))]
    pub(crate) fn pocket_far_holds(&self, p: &Pocket, key: Key) -> bool {
        word_key(p.far.load(Ordering::Relaxed)) == key
    }

    /// The list of pockets, for a new thread to enlist in.
    pub(crate) fn pockets(&self) -> &Pockets {
        &self.pockets
    }

    /// Replaces the first word of this CPU's slots that `step` accepts by `step(word)`. False
    /// if `step` accepts none.
    #[inline(always)]
    fn update(&self, cpu: usize, step: impl Fn(u64) -> Option<u64>) -> bool {
        for slot in &self.stock(cpu).slots {
            let mut w = slot.load(Ordering::Relaxed);
            while let Some(new) = step(w) {
                match slot.compare_exchange_weak(w, new, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => return true,
                    Err(now) => w = now,
                }
            }
        }
        false
    }

    /// Takes the content of this CPU's slot for `key`, leaving the slot claimed but empty.
    /// Returns an empty word if there is no such slot.
    pub(super) fn take(&self, cpu: usize, key: Key) -> u64 {
        let empty = word(key, 0, 0, 0);
        let held = core::cell::Cell::new(empty);
        // The word is ours only if our CAS took it (a drain may take it first).
        let took = self.update(cpu, |w| {
            held.set(w);
            (word_key(w) == key).then_some(empty)
        });
        if took {
            held.get()
        } else {
            empty
        }
    }
}

/// `Stocks::draining`, on a cache line of its own.
#[repr(align(64))]
pub(super) struct Draining(pub(super) AtomicU32);

/// The step of a fast-path charge: takes `bytes` and counts `objects` (0 or 1) allocations
/// from a slot or pocket word of `key`, if it has them.
#[inline(always)]
fn take(key: Key, bytes: usize, objects: u64) -> impl Fn(u64) -> Option<u64> {
    take_checked(checked(key), bytes, objects)
}

/// `take` with the key as `checked(key)`.
#[inline(always)]
fn take_checked(check: u64, bytes: usize, objects: u64) -> impl Fn(u64) -> Option<u64> {
    // The callers check `bytes <= MAX_BATCH`: small enough not to reach past the guards.
    let take = bytes as u64 + (objects << ALLOCS_SHIFT);
    move |w| {
        let new = w.wrapping_sub(take);
        (new & CHECK_MASK == check).then_some(new)
    }
}

/// The step of a fast-path uncharge: gives `bytes` back and counts `objects` frees to a slot
/// or pocket word of `key`, if it stays within `cap` bytes and has counts left.
#[inline(always)]
fn give(key: Key, bytes: usize, objects: u64, cap: usize) -> impl Fn(u64) -> Option<u64> {
    give_checked(checked(key), bytes, objects, cap)
}

/// `give` with the key as `checked(key)`.
#[inline(always)]
fn give_checked(check: u64, bytes: usize, objects: u64, cap: usize) -> impl Fn(u64) -> Option<u64> {
    let give = (bytes as u64).wrapping_sub(objects << FREES_SHIFT);
    move |w| {
        let new = w.wrapping_add(give);
        // `bytes <= cap` (checked first) keeps the addition below the guards' reach.
        (word_bytes(w) + bytes as u64 <= cap as u64 && new & CHECK_MASK == check).then_some(new)
    }
}
