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
//! holding at most `batch / 8` bytes for one key, which it charges with no locked instruction.
//! Pockets are filled from and emptied into this CPU's slots, and drains take their content as
//! they take the slots'.
//!
//! Every operation that holds bytes or counts outside a slot counts itself in, for as long
//! as it holds them: a refill between charging its batch and depositing it, a pocket fill, an
//! eviction, in the `in_hand` count of the CPU whose slots it works on (a line that CPU's
//! slow paths write anyway); a drain, a retired pocket, in `draining`, one count for the whole
//! process (drains already visit every CPU's line). Two things rest on these counts: the
//! group table reuses a freed record only after seeing every count at 0, so no word naming it
//! is still in someone's hands (see `Stocks::quiescent`); and a charge about to be refused at
//! a limit waits for the counts to drop before it drains, so bytes in flight are back in slots
//! where the drain can take them. A single count for every CPU would be written twice per
//! refill by every CPU, bouncing its line between them: what the stocks exist to avoid.

use super::counter::{Counter, Event, CRITICAL};
use super::pocket::{Pocket, Pockets};
use crate::sync::{fence, AtomicU32, AtomicU64, AtomicUsize, Backoff, Ordering};

/// Slots per CPU. Loom models use two, to stay small.
pub(crate) const SLOTS: usize = if cfg!(memgroup_loom) { 2 } else { 7 };

/// How many times a charge refused at a limit drains the stocks under it and retries before
/// the refusal stands (the kernel retries reclaim up to 16 times; a drain is cheaper to repeat
/// but rarely finds more than a concurrent refill or two).
const DRAINS: u32 = 3;

/// How long `settle_refills` waits, in `Backoff` rounds: through the spins and the yields
/// and a few sleeps, time for a preempted holder to be run again. Loom yields at every round,
/// so a few are enough there and many would only slow it.
const SETTLE_ROUNDS: u32 = if cfg!(memgroup_loom) {
    4
} else {
    Backoff::SLEEPS_FROM + 4
};

/// The largest batch: a slot never holds more bytes than a batch.
pub(crate) const MAX_BATCH: usize = 1 << 23;

/// A pocket holds at most `batch / POCKET_SHARE` bytes, and is filled to half of that.
pub(crate) const POCKET_SHARE: usize = 8;

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
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;
const GUARDS: u64 =
    1 << BYTES_BITS | 1 << (ALLOCS_SHIFT + COUNT_BITS) | 1 << (FREES_SHIFT + COUNT_BITS);
const CONTENT_MASK: u64 = (1 << KEY_SHIFT) - 1;
/// The content of a claimed slot holding nothing.
const EMPTY: u64 = GUARDS | COUNT_MAX << ALLOCS_SHIFT | COUNT_MAX << FREES_SHIFT;
/// The bits a fast path checks after its arithmetic: the key and the guards.
const CHECK_MASK: u64 = !CONTENT_MASK | GUARDS;

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
const fn word(key: Key, bytes: u64, allocs: u64, frees: u64) -> u64 {
    (key as u64) << KEY_SHIFT
        | GUARDS
        | (COUNT_MAX - frees) << FREES_SHIFT
        | (COUNT_MAX - allocs) << ALLOCS_SHIFT
        | bytes
}

/// What `word(key, ..)` has under `CHECK_MASK`.
#[inline(always)]
const fn checked(key: Key) -> u64 {
    (key as u64) << KEY_SHIFT | GUARDS
}

/// Whether a slot word holds bytes or counts (an unclaimed or claimed-empty one does not).
#[inline(always)]
const fn has_content(w: u64) -> bool {
    w != 0 && w & CONTENT_MASK != EMPTY
}

#[inline(always)]
const fn word_key(w: u64) -> Key {
    (w >> KEY_SHIFT) as Key
}

#[inline(always)]
const fn word_bytes(w: u64) -> u64 {
    w & BYTES_MASK
}

#[inline(always)]
const fn word_allocs(w: u64) -> u64 {
    COUNT_MAX - ((w >> ALLOCS_SHIFT) & COUNT_MAX)
}

#[inline(always)]
const fn word_frees(w: u64) -> u64 {
    COUNT_MAX - ((w >> FREES_SHIFT) & COUNT_MAX)
}

/// One CPU's slots, on their own cache line (64 bytes: seven slots and two counts).
#[repr(C, align(64))]
pub(crate) struct CpuStock {
    slots: [AtomicU64; SLOTS],
    /// Round-robin eviction cursor; a hint, so racy updates are fine.
    victim: AtomicU32,
    /// Slow paths working on these slots that hold bytes or counts outside any slot (see
    /// `Stocks::holding`).
    in_hand: AtomicU32,
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
    cpus: [CpuStock; N],
    /// One more than the highest CPU index whose slots or `in_hand` were ever used: drains and
    /// the scans of the counts look no further. Written at most once per CPU.
    span: AtomicUsize,
    batch: AtomicUsize,
    /// Drains (and retired pockets) holding words taken out of slots or pockets, not yet
    /// applied. On a line of its own: the one above is read by every fast path.
    draining: Draining,
    pockets: Pockets,
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
    fn stock(&self, cpu: usize) -> &CpuStock {
        &self.cpus[cpu & (N - 1)]
    }

    /// The fast path of a charge (memcg's `consume_stock`): takes `bytes` from this CPU's slot
    /// for `key` and counts `objects` allocations there. False when the slot cannot serve it;
    /// then call `charge_slow`.
    #[inline(always)]
    pub(crate) fn consume(&self, cpu: usize, key: Key, bytes: usize, objects: u64) -> bool {
        bytes <= MAX_BATCH && self.update(cpu, take(key, bytes, objects))
    }

    /// The fast path of an uncharge (memcg's `refill_stock`): gives `bytes` back to this CPU's
    /// slot for `key` and counts `objects` frees there. The group must be online. False when
    /// the slot cannot take it; then call `uncharge_slow`.
    #[inline(always)]
    pub(crate) fn refill(&self, cpu: usize, key: Key, bytes: usize, objects: u64) -> bool {
        self.update(cpu, give(key, bytes, objects, self.batch()))
    }

    /// `charge` on this thread's pocket, with no locked instruction, of a block (`objects`
    /// is 1) whose overhead is `pad` bytes more than the tag formula counts (see
    /// `Counter::adjust_overhead`). False when the pocket cannot serve it; then charge the
    /// stocks, and `fill` the pocket.
    #[inline(always)]
    pub(crate) fn pocket_charge(&self, p: &Pocket, key: Key, bytes: usize, pad: usize) -> bool {
        bytes <= MAX_BATCH && p.update(&self.pockets.stop, pad as u64, take(key, bytes, 1))
    }

    /// `uncharge` on this thread's pocket of a block, as `pocket_charge` charged it. False
    /// when the pocket cannot take it; then uncharge the stocks, and `fill` the pocket if it
    /// holds `key` (it is full).
    #[inline(always)]
    pub(crate) fn pocket_uncharge(&self, p: &Pocket, key: Key, bytes: usize, pad: usize) -> bool {
        let cap = self.batch() / POCKET_SHARE;
        let pad = (pad as u64).wrapping_neg();
        p.update(&self.pockets.stop, pad, give(key, bytes, 1, cap))
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

    /// The list of pockets, for a new thread to adopt one.
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

    /// Makes this thread's pocket serve `key`, after a fast path on it failed and the stocks
    /// served instead: its content goes back to this CPU's stock, and half a pocket's worth for
    /// `key` comes from there if the stock has it (a pocket never makes a charge fail, nor
    /// charges the counters). If `key`'s group is offline (removed since), `recheck` purges
    /// the pocket again.
    #[cold]
    #[inline(never)]
    pub(crate) fn fill(&self, cpu: usize, p: &Pocket, key: Key) {
        let stop = &self.pockets.stop;
        let c = self.groups.counter(key_id(key));
        self.holding(cpu, || {
            let Some((held, extra)) = p.take_own(stop) else {
                return;
            };
            self.give_back(cpu, held, extra);
            let half = self.pocket_size() / 2;
            let bytes = if half != 0 && self.consume(cpu, key, half, 0) {
                half
            } else {
                0
            };
            let new = word(key, bytes as u64, 0, 0);
            if p.with(stop, |p| p.word.store(new, Ordering::Relaxed))
                .is_none()
                && bytes != 0
            {
                // A drain began meanwhile: what would have gone in goes back.
                self.deposit(cpu, key, c, bytes, 0, 0);
            }
            // Still in hand, so that no record these name can be reused before a purge of a
            // group removed meanwhile sees its words: no block of the pocket's former group
            // keeps that one's record alive.
            if held != 0 {
                self.recheck(self.groups.counter(key_id(word_key(held))));
            }
            self.recheck(c);
        });
    }

    /// Returns a word and extra taken out of a pocket to this CPU's stock (to the counters if
    /// its group is offline).
    fn give_back(&self, cpu: usize, w: u64, extra: u64) {
        if !has_content(w) {
            return;
        }
        let key = word_key(w);
        let c = self.groups.counter(key_id(key));
        // Before the bytes go: they keep an offline group's record alive.
        c.adjust_overhead(extra as i64 as isize);
        if c.is_online() {
            let bytes = word_bytes(w) as usize;
            self.deposit(cpu, key, c, bytes, word_allocs(w), word_frees(w));
        } else {
            self.apply(w);
        }
    }

    /// Empties the pocket of a thread that is gone (at its exit, or in a `fork()` child for
    /// the parent's other threads) into the counters, and frees it for the next new thread.
    /// Its owner must not use it any more.
    pub(crate) fn retire_pocket(&self, p: &Pocket) {
        self.holding_drain(|| {
            let w = p.word.swap(0, Ordering::SeqCst);
            // Whoever takes a word takes its extra (a drain may have taken both first).
            if w != 0 {
                let extra = p.extra.swap(0, Ordering::SeqCst);
                self.apply_pocket(w, extra);
            }
        });
        self.pockets.abandon(p);
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
    /// thread held in its hands at the fork (a slot's content between take and deposit) is
    /// lost to the child, which can be off by that much.
    pub(crate) fn reset_in_child(&self, own: *const Pocket) {
        for stock in &self.cpus {
            stock.in_hand.store(0, Ordering::SeqCst);
        }
        self.draining.0.store(0, Ordering::SeqCst);
        self.pockets.reset_in_child();
        for p in self.pockets.iter() {
            if !core::ptr::eq(p, own) && p.is_live() {
                self.retire_pocket(p);
            }
        }
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
        let mut c = self.groups.counter(key_id(key));
        if objects != 0 {
            while !c.is_online() {
                c = c.parent().expect("the root is never removed");
            }
        }
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
                    self.deposit(cpu, key, c, have - bytes, objects, 0);
                    true
                }
                Err(_) => {
                    self.release(c, kernel, have);
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
            self.release(c, key_is_kernel(key), bytes);
        } else {
            self.holding(cpu, || self.deposit(cpu, key, c, bytes, 0, objects));
            self.recheck(c);
        }
    }

    /// Runs `f`, which may hold bytes or counts taken out of a slot of `cpu` (or a batch
    /// charged to the counters and not yet in a slot), counted in that CPU's `in_hand`
    /// meanwhile: the count of the CPU the operation works on, not necessarily the one it runs
    /// on (it may migrate), so it is raised and lowered on the same line.
    ///
    /// Orderings: `span` is raised (if it must be) before the count, and the scans
    /// (`quiescent`, `settle_refills`) load `span` before the counts, all sequentially
    /// consistent. So a scan that loads `span` after this raise, in that single order, sees
    /// this CPU in its range, and its load of the count, later still, sees the count raised
    /// until `f` is done: a holder that raised its count before a scan began is never missed.
    fn holding<R>(&self, cpu: usize, f: impl FnOnce() -> R) -> R {
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

    /// Runs `f` (a drain, or the retire of a pocket), which may hold words taken out of slots
    /// or pockets of any CPU, counted in `draining` meanwhile.
    fn holding_drain<R>(&self, f: impl FnOnce() -> R) -> R {
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
                        if b.rounds() >= SETTLE_ROUNDS {
                            return true;
                        }
                        b.wait();
                    }
                }
                false
            }
        }
    }

    /// After a slow path filled a slot for `c`, which was online when it looked: if `c` has
    /// gone offline since, its `remove` may have purged the slots before this one was filled,
    /// so purge again. (The fill and this load, and `remove`'s store and purge, are all
    /// sequentially consistent: one of the two purges sees the slot.)
    #[inline(always)]
    fn recheck(&self, c: &Counter) {
        fence(Ordering::SeqCst);
        if !c.is_online() {
            self.purge(c.id);
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
                    self.settle_refills();
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

    /// Waits (briefly: these are a few hundred instructions, unless their thread is not
    /// running) for the slow paths and drains elsewhere that hold bytes outside any slot,
    /// where a drain cannot take them: a refill's batch charged but not yet deposited, a
    /// slot's content taken but not yet released. The wait backs off to yielding and then to
    /// sleeping, so that a holder preempted on this very CPU gets to finish; it is bounded
    /// (`SETTLE_ROUNDS`), as a holder may be stopped (by a signal or a debugger).
    fn settle_refills(&self) {
        self.in_hand(Some(&mut Backoff::new()));
    }

    /// Empties every slot, on every CPU, whose group satisfies `pred`: the bytes go back to the
    /// counters and the pending counts are added to them.
    pub(crate) fn drain(&self, pred: impl Fn(&Counter) -> bool) {
        self.empty_slots(|w| has_content(w) && pred(self.groups.counter(key_id(word_key(w)))));
    }

    /// Empties and releases every slot naming group `id`, empty ones included, so that no
    /// fast path finds a slot for it any more: for a group being removed (whose new charges
    /// then take the slow path, which sends them to a live ancestor) and for a record being
    /// freed.
    pub(crate) fn purge(&self, id: u32) {
        self.empty_slots(|w| w != 0 && key_id(word_key(w)) == id);
    }

    /// Takes every slot word, on every CPU, for which `take(word)` says so, and applies it to
    /// its group's counters. A CAS lost to a concurrent change is retried while `take` still
    /// says so: a charge that fails at a limit must not miss bytes because the slot's owner
    /// was busy with it.
    ///
    /// Pockets too: if any pocket's word looks takeable, every owner is kept out of its pocket
    /// meanwhile (see `super::pocket`).
    fn empty_slots(&self, take: impl Fn(u64) -> bool) {
        self.holding_drain(|| {
            let span = self.span.load(Ordering::SeqCst).min(N);
            for slot in self.cpus[..span].iter().flat_map(|stock| &stock.slots) {
                self.empty_word(slot, &take);
            }
            if self.pockets.any(&take) {
                self.pockets.stop(|| self.groups.barrier());
                for p in self.pockets.iter() {
                    self.empty_pocket(p, &take);
                }
                self.pockets.resume();
            }
        });
    }

    /// Takes a stopped pocket's word (and extra) if `take` says so, and applies them.
    fn empty_pocket(&self, p: &Pocket, take: impl Fn(u64) -> bool) {
        let mut w = p.word.load(Ordering::SeqCst);
        while take(w) {
            match p
                .word
                .compare_exchange(w, 0, Ordering::SeqCst, Ordering::Relaxed)
            {
                Ok(_) => {
                    // The owner is kept out, and other takers only take the extra with a word.
                    let extra = p.extra.swap(0, Ordering::SeqCst);
                    self.apply_pocket(w, extra);
                    break;
                }
                Err(now) => w = now,
            }
        }
    }

    /// Applies a pocket's word and extra to its group's counters.
    fn apply_pocket(&self, w: u64, extra: u64) {
        if !has_content(w) {
            return;
        }
        let c = self.groups.counter(key_id(word_key(w)));
        // Before the bytes go: they keep an offline group's record alive.
        c.adjust_overhead(extra as i64 as isize);
        self.apply(w);
    }

    /// Takes one slot's word if `take` says so, and applies it.
    fn empty_word(&self, slot: &AtomicU64, take: impl Fn(u64) -> bool) {
        let mut w = slot.load(Ordering::SeqCst);
        while take(w) {
            match slot.compare_exchange(w, 0, Ordering::SeqCst, Ordering::Relaxed) {
                Ok(_) => {
                    self.apply(w);
                    break;
                }
                Err(now) => w = now,
            }
        }
    }

    /// Whether no operation holds words outside the slots (every count looked at read 0). A
    /// record freed (and purged) before this call began can no longer be named by a slot
    /// word any thread holds when it returns true, so it may be reused: each operation that
    /// took such a word counted itself in before the purge ended, and was seen done.
    pub(crate) fn quiescent(&self) -> bool {
        !self.in_hand(None)
    }

    /// Takes the content of this CPU's slot for `key`, leaving the slot claimed but empty.
    /// Returns an empty word if there is no such slot.
    fn take(&self, cpu: usize, key: Key) -> u64 {
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

    /// Adds bytes and counts to this CPU's slot for `key`. What does not fit (a slot over
    /// `batch`, a full count) is returned to the counters of `c`, whose key is `key`.
    fn deposit(&self, cpu: usize, key: Key, c: &Counter, bytes: usize, allocs: u64, frees: u64) {
        let batch = self.batch() as u64;
        let (bytes, kernel) = (bytes as u64, key_is_kernel(key));
        let stock = self.stock(cpu);
        for slot in &stock.slots {
            let mut w = slot.load(Ordering::Relaxed);
            while word_key(w) == key {
                let b = word_bytes(w) + bytes;
                let (a, f) = (word_allocs(w) + allocs, word_frees(w) + frees);
                let fits = b <= batch && a <= COUNT_MAX && f <= COUNT_MAX;
                // Overflowing: keep half a batch and hand the rest to the counters.
                let keep = if fits { b } else { b.min(batch / 2) };
                let new = if fits {
                    word(key, b, a, f)
                } else {
                    word(key, keep, 0, 0)
                };
                match slot.compare_exchange_weak(w, new, Ordering::SeqCst, Ordering::Relaxed) {
                    Ok(_) => {
                        if !fits {
                            c.count(a, f);
                            self.release(c, kernel, (b - keep) as usize);
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
            self.release(c, kernel, bytes as usize);
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
                        self.apply(w);
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

    /// Applies a word taken out of a slot to its group's counters.
    fn apply(&self, w: u64) {
        let key = word_key(w);
        let c = self.groups.counter(key_id(key));
        c.count(word_allocs(w), word_frees(w));
        self.release(c, key_is_kernel(key), word_bytes(w) as usize);
    }

    /// Uncharges `bytes` from `c`'s counters, and frees an offline group's record once its
    /// usage reaches 0.
    fn release(&self, c: &Counter, kernel: bool, bytes: usize) {
        if bytes != 0 && c.uncharge(bytes, kernel) && !c.is_online() {
            self.groups.emptied(c);
        }
    }
}

/// `Stocks::draining`, on a cache line of its own.
#[repr(align(64))]
struct Draining(AtomicU32);

/// The step of a fast-path charge: takes `bytes` and counts `objects` (0 or 1) allocations
/// from a slot or pocket word of `key`, if it has them.
#[inline(always)]
fn take(key: Key, bytes: usize, objects: u64) -> impl Fn(u64) -> Option<u64> {
    // The callers check `bytes <= MAX_BATCH`: small enough not to reach past the guards.
    let take = bytes as u64 + (objects << ALLOCS_SHIFT);
    move |w| {
        let new = w.wrapping_sub(take);
        (new & CHECK_MASK == checked(key)).then_some(new)
    }
}

/// The step of a fast-path uncharge: gives `bytes` back and counts `objects` frees to a slot
/// or pocket word of `key`, if it stays within `cap` bytes and has counts left.
#[inline(always)]
fn give(key: Key, bytes: usize, objects: u64, cap: usize) -> impl Fn(u64) -> Option<u64> {
    let give = (bytes as u64).wrapping_sub(objects << FREES_SHIFT);
    move |w| {
        let new = w.wrapping_add(give);
        // `bytes <= cap` (checked first) keeps the addition below the guards' reach.
        (word_bytes(w) + bytes as u64 <= cap as u64 && new & CHECK_MASK == checked(key))
            .then_some(new)
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
