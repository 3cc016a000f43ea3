//! The charge path, once, below both designs: a thread's pocket, then its CPU's stock, then
//! the counters with their limits, drains and reclaim (memcg's `try_charge`).
//!
//! The tag design charges every block here ([`Stocks::charge_block`], then
//! [`Stocks::charge_block_slow`] when the pocket cannot serve it), the arena design every slab
//! ([`Stocks::charge`]), and the loom models (`loom-tests/`) drive these very functions. What
//! the path needs of the calling thread (its CPU, its scope's limit mode, its pocket's state)
//! it asks through [`Caller`], each only on the branch that needs it: the pocket's fast path
//! reads none of them.
//!
//! Below those entry points, the slow paths: a pocket's refill from the CPU's stock (`refill_pocket`), a slot's
//! refill from the counters in a batch (`charge_slow`, `refill_slot`, `claim`), and the exact
//! charge at a limit (`charge_exact`: drains under the limit, direct reclaim, then the mode
//! and the policies). The fast paths on a slot or a pocket word are `super::stock`'s; the
//! drains are `super::drain`'s.

use super::counter::{Counter, Event, CRITICAL};
use super::pocket::Pocket;
use super::stock::{
    checked, has_content, key, key_id, key_is_kernel, sealed, word, word_allocs, word_bytes,
};
use super::stock::{
    pad_total, word_frees, word_key, CpuStock, Groups, Key, Mode, Stocks, COUNT_MAX, SLOTS,
};
use crate::sync::{Backoff, Ordering};

/// How many times a charge refused at a limit drains the stocks under it and retries before
/// the refusal stands (the kernel retries reclaim up to 16 times; a drain is cheaper to repeat
/// but rarely finds more than a concurrent refill or two).
const DRAINS: u32 = 3;

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
    /// Its pocket, if it is on the pockets' list; with `enlist`, put on the list now if it never
    /// had its chance (`None` if it cannot have one).
    fn listed_pocket(&self, enlist: bool) -> Option<&Pocket>;
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
    /// (its pocket holds nothing), and its slow path gives it its pocket. `check` is the key in the form the pocket's word check needs (`checked(key)`), as
    /// the thread keeps it.
    #[inline(always)]
    pub(crate) fn charge_block(
        &self,
        t: &impl Caller,
        p: &Pocket,
        key: Key,
        check: u64,
        bytes: usize,
        pad: usize,
    ) -> bool {
        debug_assert_eq!(check, checked(key));
        self.pocket_charge(p, check, bytes, pad)
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
        // A switch back to the group the far word holds: a swap, and no stock.
        if self.switch_pocket(t, key, bytes, pad) {
            return Some(key);
        }
        let cpu = t.cpu();
        let charged = if bytes > self.batch() {
            // What `charge_slow` would do with it, one call nearer the counter.
            let c = self.live(key, 1);
            let charged = self::key(c.id, key_is_kernel(key));
            self.charge_exact(c, key_is_kernel(key), bytes, 1, t.mode())
                .then_some(charged)?
        } else if self.consume(cpu, key, bytes, 1) {
            key
        } else {
            self.charge_slow(cpu, key, bytes, 1, t.mode())?
        };
        self.pad_overhead(charged, pad as isize);
        if charged == key && bytes <= self.pocket_size() / 2 {
            if let Some(p) = t.listed_pocket(true) {
                self.refill_pocket(cpu, p, key);
            }
        }
        Some(charged)
    }

    /// A block's charge of `key` that the pocket's own word (another key's, or short) did not
    /// serve: if the far word holds `key` (the thread switched back to a group it had left),
    /// the two words trade places (`Pocket::swap_words`) and the block is charged from the
    /// swapped-in one if it can be, with no locked instruction and no shared line written. So
    /// a thread taking turns between two groups (two tenants, a tenant and the root) pays a
    /// swap a switch, not two trips to the stock. True if served.
    #[inline(always)]
    fn switch_pocket(&self, t: &impl Caller, key: Key, bytes: usize, pad: usize) -> bool {
        let Some(p) = t.listed_pocket(false) else {
            return false;
        };
        self.pocket_far_holds(p, key)
            // Key 0 names no group: an unclaimed far word never matches.
            && p.swap_words(&self.pockets.stop, |far| word_key(far) == key)
            && self.pocket_charge(p, checked(key), bytes, pad)
    }

    /// The fast path of a block's uncharge, as `charge_block` charged it, whose tag is `tag`
    /// (its key, sealed): into the thread's pocket `p`. False when the pocket cannot take it;
    /// then check the tag's seal (`unseal`) and call `uncharge_block_unpocketed`.
    #[inline(always)]
    pub(crate) fn uncharge_block(&self, p: &Pocket, tag: u64, bytes: usize, pad: usize) -> bool {
        self.pocket_uncharge(p, tag, bytes, pad)
    }

    /// A block's uncharge that the thread's pocket did not take: for a thread that has no
    /// pocket, to the CPU's stock (through its slow path if need be), else
    /// `uncharge_block_slow`.
    #[inline(always)]
    pub(crate) fn uncharge_block_unpocketed(
        &self,
        t: &impl Caller,
        key: Key,
        bytes: usize,
        pad: usize,
    ) {
        if t.pocketless() {
            // Before the bytes go: they keep a removed group's record alive.
            self.pad_overhead(key, -(pad as isize));
            self.uncharge(t, key, bytes, 1);
        } else {
            self.uncharge_block_slow(t, key, bytes, pad);
        }
    }

    /// A block's uncharge that the thread's pocket could not take into its own word: into its
    /// far word if that holds the key, else to the CPU's
    /// stock; then a pocket that holds the key (so it was full) is brought back to half, and
    /// for a block of another key the pocket's far word is given that key, if it holds
    /// nothing or that key already (so it was full), for the next frees of that key.
    #[cold]
    #[inline(never)]
    pub(crate) fn uncharge_block_slow(&self, t: &impl Caller, key: Key, bytes: usize, pad: usize) {
        // A block of the key the far word holds: no locked instruction, no shared line.
        if let Some(p) = t.listed_pocket(false) {
            if self.far_uncharge(p, key, bytes, pad) {
                return;
            }
        }
        // Before the bytes go: they keep a removed group's record alive.
        self.pad_overhead(key, -(pad as isize));
        self.uncharge(t, key, bytes, 1);
        if bytes > self.pocket_size() / 2 {
            return;
        }
        // A thread that only frees (a consumer) gets its pocket here, for the far word.
        if let Some(p) = t.listed_pocket(true) {
            if self.pocket_holds(p, key) {
                self.refill_pocket(t.cpu(), p, key);
            } else {
                let far = p.far.load(Ordering::Relaxed);
                if !has_content(far) || word_key(far) == key {
                    self.claim_far(t.cpu(), p, key);
                }
            }
        }
    }

    /// Gives this thread's far pocket word to `key`, claimed and empty: its content goes back
    /// to this CPU's stock. Not for an offline group (whose frees go to the counters); if
    /// `key`'s group goes offline meanwhile, `recheck` drains the pocket again.
    #[cold]
    #[inline(never)]
    pub(crate) fn claim_far(&self, cpu: usize, p: &Pocket, key: Key) {
        let stop = &self.pockets.stop;
        let c = self.groups.counter(key_id(key));
        if !c.is_online() {
            return;
        }
        self.holding(cpu, || {
            let Some((held, extra)) = p.take_own(stop, true) else {
                return;
            };
            self.drain_to_stock(cpu, held, extra);
            p.set_far_key(sealed(key), checked(key), self.pocket_size() as u64);
            // If a drain began meanwhile the word stays unclaimed: nothing to give back.
            p.with(stop, |p| p.far.store(word(key, 0, 0, 0), Ordering::Relaxed));
            // Still in hand, as in `refill_pocket`.
            if held != 0 {
                self.recheck(self.groups.counter(key_id(word_key(held))));
            }
            self.recheck(c);
        });
    }

    /// Adds a block's `pad` to its group's overhead figure, or (negative) takes it off, for a
    /// block charged or uncharged outside a pocket (which counts it itself).
    #[inline(always)]
    pub(crate) fn pad_overhead(&self, key: Key, delta: isize) {
        if delta != 0 {
            self.groups.counter(key_id(key)).adjust_overhead(delta);
        }
    }

    // The slow paths.

    /// Makes this thread's pocket serve `key`, after a fast path on it failed and the stocks
    /// served instead: its content goes back to this CPU's stock (another key's goes to the
    /// far word, whose content goes to the stock instead), and half a pocket's worth for
    /// `key` comes from there, or all the stock has if that is less (a pocket never makes a
    /// charge fail, nor charges the counters). If `key`'s group is offline (removed since),
    /// `recheck` drains the pocket again.
    #[cold]
    #[inline(never)]
    pub(crate) fn refill_pocket(&self, cpu: usize, p: &Pocket, key: Key) {
        let stop = &self.pockets.stop;
        let c = self.groups.counter(key_id(key));
        self.holding(cpu, || {
            let Some((held, extra)) = p.take_own(stop, false) else {
                return;
            };
            let half = self.pocket_size() / 2;
            // Still `key`'s (the thread charges the same group): the word's pad stays in the
            // pocket, so that a refill writes no counter's line, if half a pocket can be had
            // from its bytes and the stock. The new word holds bytes, so it has content for
            // the drains to take its extra with, and keeps the record alive until they do.
            let have = word_bytes(held) as usize;
            if has_content(held)
                && word_key(held) == key
                && c.is_online()
                && (have >= half || self.consume(cpu, key, half - have, 0))
            {
                let carry = pad_total(held, extra);
                // The counts, and the bytes over half, go to the stock.
                let (allocs, frees) = (word_allocs(held), word_frees(held));
                self.refill_slot(cpu, key, c, have.saturating_sub(half), allocs, frees);
                let new = word(key, half as u64, 0, 0);
                p.set_key(sealed(key), checked(key), self.pocket_size() as u64);
                let stored = p.with(stop, |p| {
                    p.word.store(new, Ordering::Relaxed);
                    p.extra.store(carry, Ordering::Relaxed);
                });
                if stored.is_none() {
                    // A drain began meanwhile: the pad, then the bytes, go back.
                    c.adjust_overhead(carry as i64 as isize);
                    self.refill_slot(cpu, key, c, half, 0, 0);
                }
                self.recheck(c);
                return;
            }
            // Another key's content (the thread switched groups) moves to the far word, for
            // that key's frees and the switch back (`switch_pocket`); what the far word held
            // goes to the stock instead.
            let other = word_key(held);
            let stash =
                other != key && has_content(held) && self.groups.counter(key_id(other)).is_online();
            let (out, out_extra) = stash
                .then(|| p.stash_far(stop, held, extra, sealed(other), checked(other)))
                .flatten()
                .unwrap_or((held, extra));
            self.drain_to_stock(cpu, out, out_extra);
            // What the stock has, if less than half: an empty pocket would send every next
            // allocation to the slow path until the stock is empty and refilled.
            let bytes = self.consume_up_to(cpu, key, half);
            let new = word(key, bytes as u64, 0, 0);
            p.set_key(sealed(key), checked(key), self.pocket_size() as u64);
            if p.with(stop, |p| p.word.store(new, Ordering::Relaxed))
                .is_none()
                && bytes != 0
            {
                // A drain began meanwhile: what would have gone in goes back.
                self.refill_slot(cpu, key, c, bytes, 0, 0);
            }
            // Still in hand, so that no record these name can be reused before a drain of a
            // group removed meanwhile sees its words: no block of the pocket's former group
            // keeps that one's record alive.
            if held != 0 {
                self.recheck(self.groups.counter(key_id(word_key(held))));
            }
            if out != held && out != 0 {
                self.recheck(self.groups.counter(key_id(word_key(out))));
            }
            self.recheck(c);
        });
    }

    /// Returns a word and extra taken out of a pocket to this CPU's stock (to the counters if
    /// its group is offline).
    fn drain_to_stock(&self, cpu: usize, w: u64, extra: u64) {
        if w == 0 {
            return;
        }
        let key = word_key(w);
        let c = self.groups.counter(key_id(key));
        // Before the bytes go: they keep an offline group's record alive.
        c.adjust_overhead(pad_total(w, extra) as i64 as isize);
        if !has_content(w) {
            return;
        }
        if c.is_online() {
            let bytes = word_bytes(w) as usize;
            self.refill_slot(cpu, key, c, bytes, word_allocs(w), word_frees(w));
        } else {
            self.drain_word(w);
        }
    }

    /// The counter a charge of `key` goes to: a new block's (`objects != 0`) goes to the nearest
    /// live ancestor of a removed group, growth of an existing block (`objects == 0`) to the
    /// block's owner, removed or not.
    fn live(&self, key: Key, objects: u64) -> &Counter {
        let mut c = self.groups.counter(key_id(key));
        if objects != 0 {
            while !c.is_online() {
                c = c.parent().expect("the root is never removed");
            }
        }
        c
    }

    /// The slow path of a charge: refills the slot from the counters in a batch, or charges
    /// the counters exactly when a batch does not fit. Returns the key charged, or `None` when
    /// the charge is refused (nothing is then changed).
    ///
    /// A new block (`objects != 0`) of a removed group is charged to its nearest live ancestor
    /// instead, and that ancestor's key is returned; growth of an existing block
    /// (`objects == 0`) stays with the block's owner.
    #[cold]
    #[inline(never)]
    pub(crate) fn charge_slow(
        &self,
        cpu: usize,
        key: Key,
        bytes: usize,
        objects: u64,
        mode: Mode,
    ) -> Option<Key> {
        let kernel = key_is_kernel(key);
        let c = self.live(key, objects);
        let key = self::key(c.id, kernel);
        let batch = self.batch();
        if bytes > batch || !c.is_online() {
            return self
                .charge_exact(c, kernel, bytes, objects, mode)
                .then_some(key);
        }
        // Empty our slot into our hands, then put back what is left after this charge, with a
        // batch from the counters if it is short.
        let refilled = self.holding(cpu, || {
            let held = self.take(cpu, key);
            c.count(word_allocs(held), word_frees(held));
            let have = word_bytes(held) as usize;
            let refill = if have >= bytes {
                Ok(false)
            } else {
                c.try_charge(batch, kernel).map(|raised| {
                    self.raised(raised);
                    true
                })
            };
            match refill {
                Ok(batched) => {
                    let have = have + if batched { batch } else { 0 };
                    self.refill_slot(cpu, key, c, have - bytes, objects, 0);
                    true
                }
                Err(_) => {
                    self.uncharge_counters(c, kernel, have);
                    false
                }
            }
        });
        if !refilled {
            return self
                .charge_exact(c, kernel, bytes, objects, mode)
                .then_some(key);
        }
        self.recheck(c);
        Some(key)
    }

    /// The slow path of an uncharge: for an offline group or a large size the counters are
    /// uncharged directly; otherwise the bytes go to this CPU's slot for `key` (claiming one
    /// if there is none), and a slot over `batch` returns half to the counters.
    #[cold]
    #[inline(never)]
    pub(crate) fn uncharge_slow(&self, cpu: usize, key: Key, bytes: usize, objects: u64) {
        let c = self.groups.counter(key_id(key));
        if bytes > self.batch() || !c.is_online() {
            c.count(0, objects);
            self.uncharge_counters(c, key_is_kernel(key), bytes);
        } else {
            self.holding(cpu, || self.refill_slot(cpu, key, c, bytes, 0, objects));
            self.recheck(c);
        }
    }

    /// Charges the counters directly. When a limit on the chain refuses, the stocks under that
    /// limit are drained and the charge retried, so it fails only when real usage plus
    /// `bytes` would pass the limit. Then the mode and the policies decide: refuse, or force.
    #[cold]
    pub(crate) fn charge_exact(
        &self,
        c: &Counter,
        kernel: bool,
        bytes: usize,
        objects: u64,
        mode: Mode,
    ) -> bool {
        // Drains before giving up: stocks refilled elsewhere while this charge drained hold
        // bytes it could use, so it drains (and retries) more than once.
        let mut drains = 0;
        let mut reclaimed = false;
        loop {
            match c.try_charge(bytes, kernel) {
                Ok(raised) => {
                    self.raised(raised);
                    break;
                }
                Err((at, _)) if drains < DRAINS => {
                    drains += 1;
                    self.wait_for_holders();
                    self.drain(|g| g.is_under(at));
                }
                Err((at, limit)) => {
                    if !reclaimed && self.groups.reclaim(at, at.excess(bytes, limit)) {
                        reclaimed = true;
                        drains = DRAINS - 1;
                        continue;
                    }
                    at.event(Event::Max);
                    self.raised(at.signal(CRITICAL));
                    let forced = if refuses(mode, c) {
                        None
                    } else {
                        c.charge_force(bytes, kernel)
                    };
                    match forced {
                        Some(raised) => {
                            self.raised(raised);
                            break;
                        }
                        None => {
                            at.event(Event::Fail);
                            return false;
                        }
                    }
                }
            }
        }
        c.count(objects, 0);
        true
    }

    /// Adds bytes and counts to this CPU's slot for `key`. What does not fit (a slot over
    /// `batch`, a full count) is returned to the counters of `c`, whose key is `key`.
    fn refill_slot(
        &self,
        cpu: usize,
        key: Key,
        c: &Counter,
        bytes: usize,
        allocs: u64,
        frees: u64,
    ) {
        let batch = self.batch() as u64;
        let (bytes, kernel) = (bytes as u64, key_is_kernel(key));
        let stock = self.stock(cpu);
        for slot in &stock.slots {
            let mut w = slot.load(Ordering::Relaxed);
            while word_key(w) == key {
                let b = word_bytes(w) + bytes;
                let (a, f) = (word_allocs(w) + allocs, word_frees(w) + frees);
                let fits = b <= batch && a <= COUNT_MAX && f <= COUNT_MAX;
                // Overflowing bytes: keep half a batch and hand the rest to the counters; only
                // the counts overflowing: they go to the counters, and the bytes stay (so the
                // next refill does not charge back what this one handed over).
                let keep = if b <= batch { b } else { batch / 2 };
                let new = if fits {
                    word(key, b, a, f)
                } else {
                    word(key, keep, 0, 0)
                };
                match slot.compare_exchange_weak(w, new, Ordering::SeqCst, Ordering::Relaxed) {
                    Ok(_) => {
                        if !fits {
                            c.count(a, f);
                            self.uncharge_counters(c, kernel, (b - keep) as usize);
                        }
                        return;
                    }
                    Err(now) => w = now,
                }
            }
        }
        if bytes <= batch {
            self.claim(cpu, stock, word(key, bytes, allocs, frees));
        } else {
            c.count(allocs, frees);
            self.uncharge_counters(c, kernel, bytes as usize);
        }
    }

    /// Puts `new` into a slot of this CPU: an empty one if there is one, else a victim chosen
    /// round-robin, whose content goes back to its group's counters.
    #[cold]
    fn claim(&self, cpu: usize, stock: &CpuStock, new: u64) {
        self.span.fetch_max((cpu & (N - 1)) + 1, Ordering::SeqCst);
        let mut backoff = Backoff::new();
        loop {
            let empty = stock
                .slots
                .iter()
                .position(|s| !has_content(s.load(Ordering::Relaxed)));
            let i = empty
                .unwrap_or_else(|| stock.victim.fetch_add(1, Ordering::Relaxed) as usize % SLOTS);
            let slot = &stock.slots[i];
            let w = slot.load(Ordering::Relaxed);
            if !has_content(w) {
                if slot
                    .compare_exchange(w, new, Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
                {
                    return;
                }
            } else {
                // Counted in (again: the callers hold already) while the victim is in hand.
                let evicted = self.holding(cpu, || {
                    let evicted =
                        slot.compare_exchange(w, new, Ordering::SeqCst, Ordering::Relaxed);
                    if evicted.is_ok() {
                        self.drain_word(w);
                    }
                    evicted.is_ok()
                });
                if evicted {
                    return;
                }
            }
            // Another thread changed the slot between the look and the swap: not a wait for
            // anyone, but it backs off the same way.
            backoff.wait();
        }
    }

    fn raised(&self, raised: bool) {
        if raised {
            self.groups.wake();
        }
    }
}

/// Whether an over-limit charge of `c` fails, whichever level's limit it hit: inside
/// `fallible`, or when `c` or any of its ancestors has `OnLimit::Fail` (a policy holds for the
/// group's whole subtree).
fn refuses(mode: Mode, c: &Counter) -> bool {
    match mode {
        Mode::NoFail => false,
        Mode::Fallible => true,
        Mode::Policy => c.chain().any(Counter::fails),
    }
}
