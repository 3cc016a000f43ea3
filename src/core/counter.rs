//! The hierarchical counter behind every group: memcg's `page_counter`, in bytes.
//!
//! A charge walks from a group to the root and either succeeds on every level or changes
//! nothing. Each level's `usage` moves with a compare-and-swap against `max`, so two charges
//! racing at a limit can never both pass it (unlike `page_counter_try_charge`, which adds first
//! and backs out, a charge here never makes `usage` go over `max` even for a moment, so it
//! never makes a racing charge fail spuriously). Kernel charges move `kmem` too, against
//! `kmem_max`. Counters are only touched by the stocks' slow paths (`super::stock`), once per
//! batch, never per allocation.

use crate::sync::{
    fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

/// The most levels below the root (cgroup's `max.depth`): charges remember each level's new
/// usage on the stack, in an array this long.
pub(crate) const MAX_DEPTH: usize = 32;

/// A `max`, `high` or `kmem_max` that is not set.
pub(crate) const UNLIMITED: usize = usize::MAX;

/// What a limit on the chain said no to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Limit {
    Max,
    KmemMax,
}

/// Pressure levels, as bits of `Counter::pending` (mempressure's low / medium / critical).
pub(crate) const LOW: u8 = 1;
pub(crate) const MEDIUM: u8 = 2;
pub(crate) const CRITICAL: u8 = 4;
/// Not a level: a charge asks for memory to be reclaimed under this counter (direct reclaim).
pub(crate) const RECLAIM: u8 = 8;

/// The counter of one group.
///
/// Fields are grouped by who writes them: the first cache line is read on every allocation and
/// written only when the group is created, reconfigured or removed; `hot` is written by every
/// stock refill and drain; `events` rarely.
#[repr(C, align(64))]
pub(crate) struct Counter {
    /// The parent's counter, null for the root. Fixed while the group is alive.
    parent: AtomicPtr<Counter>,
    max: AtomicUsize,
    high: AtomicUsize,
    kmem_max: AtomicUsize,
    /// The group's index in the group table; stock slots name a group by it.
    pub(crate) id: u32,
    /// Cleared by `Group::remove`: the group takes no new charges and keeps no stock.
    online: AtomicBool,
    /// `OnLimit::Fail`: over-limit charges of this group and its descendants are refused.
    fail: AtomicBool,
    hot: Hot,
    events: [AtomicU64; 3],
    /// Pressure levels raised and not yet delivered.
    pending: AtomicU8,
    /// Bytes a direct reclaim asks for (with `RECLAIM` pending).
    wanted: AtomicUsize,
    /// Direct reclaim passes done for this counter; requesters wait for it to move.
    pub(crate) served: AtomicU32,
    /// Shrinkers registered on this group and its descendants: direct reclaim is only worth
    /// a wait where some exist.
    shrinkers: AtomicU32,
}

#[repr(C, align(64))]
struct Hot {
    usage: AtomicUsize,
    kmem: AtomicUsize,
    peak: AtomicUsize,
    allocs: AtomicU64,
    frees: AtomicU64,
    /// A design's overhead beyond `TAG_SIZE` per live block, signed, two's complement: see
    /// `adjust_overhead`.
    overhead: AtomicUsize,
}

/// Event kinds, as indices into `Counter::events`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    High = 0,
    Max = 1,
    Fail = 2,
}

/// A snapshot of one counter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) usage: usize,
    pub(crate) kmem: usize,
    pub(crate) peak: usize,
    pub(crate) allocs: u64,
    pub(crate) frees: u64,
    pub(crate) overhead: isize,
    pub(crate) max: usize,
    pub(crate) high: usize,
    pub(crate) kmem_max: usize,
    pub(crate) events: [u64; 3],
}

impl Counter {
    /// A counter in its initial state.
    pub(crate) fn new(id: u32, parent: Option<&Counter>) -> Counter {
        let c = Counter {
            parent: AtomicPtr::new(core::ptr::null_mut()),
            max: AtomicUsize::new(UNLIMITED),
            high: AtomicUsize::new(UNLIMITED),
            kmem_max: AtomicUsize::new(UNLIMITED),
            id,
            online: AtomicBool::new(true),
            fail: AtomicBool::new(false),
            hot: Hot {
                usage: AtomicUsize::new(0),
                kmem: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
                allocs: AtomicU64::new(0),
                frees: AtomicU64::new(0),
                overhead: AtomicUsize::new(0),
            },
            events: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            pending: AtomicU8::new(0),
            wanted: AtomicUsize::new(0),
            served: AtomicU32::new(0),
            shrinkers: AtomicU32::new(0),
        };
        c.parent.store(parent_ptr(parent), Ordering::Relaxed);
        c
    }

    /// Puts a recycled counter back in its initial state under a new parent.
    ///
    /// The caller owns the counter exclusively: it is not reachable from any group, stock
    /// or allocation (the group table's free list guarantees this).
    pub(crate) fn reset(&self, parent: Option<&Counter>) {
        self.parent.store(parent_ptr(parent), Ordering::Relaxed);
        for limit in [&self.max, &self.high, &self.kmem_max] {
            limit.store(UNLIMITED, Ordering::Relaxed);
        }
        self.fail.store(false, Ordering::Relaxed);
        for field in [
            &self.hot.usage,
            &self.hot.kmem,
            &self.hot.peak,
            &self.hot.overhead,
        ] {
            field.store(0, Ordering::Relaxed);
        }
        for field in [&self.hot.allocs, &self.hot.frees] {
            field.store(0, Ordering::Relaxed);
        }
        for event in &self.events {
            event.store(0, Ordering::Relaxed);
        }
        self.pending.store(0, Ordering::Relaxed);
        self.wanted.store(0, Ordering::Relaxed);
        self.shrinkers.store(0, Ordering::Relaxed);
        self.online.store(true, Ordering::Release);
    }

    pub(crate) fn parent(&self) -> Option<&Counter> {
        // SAFETY: a parent outlives its children: a child holds a reference on its parent's
        // group until the child's record is freed, and records are never unmapped.
        unsafe { self.parent.load(Ordering::Acquire).as_ref() }
    }

    /// This counter and its ancestors, nearest first.
    pub(crate) fn chain(&self) -> impl Iterator<Item = &Counter> {
        core::iter::successors(Some(self), |c| c.parent())
    }

    /// Whether `self` is `ancestor` or below it.
    pub(crate) fn is_under(&self, ancestor: &Counter) -> bool {
        self.chain().any(|c| core::ptr::eq(c, ancestor))
    }

    /// Sequentially consistent, so that a stock slot filled by a slow path that then sees the
    /// group online is seen by the drain of a `remove` that took it offline (see
    /// `Stocks::recheck`).
    #[inline]
    pub(crate) fn is_online(&self) -> bool {
        self.online.load(Ordering::SeqCst)
    }

    /// Takes the group offline. Returns false if it already was.
    pub(crate) fn set_offline(&self) -> bool {
        let was = self.online.swap(false, Ordering::SeqCst);
        // Pairs with the fence in `Stocks::recheck` (loom models SeqCst accesses as AcqRel,
        // so the pairing is spelled out with fences, which it checks).
        fence(Ordering::SeqCst);
        was
    }

    pub(crate) fn set_max(&self, bytes: Option<usize>) {
        self.max
            .store(bytes.unwrap_or(UNLIMITED), Ordering::Relaxed);
    }

    pub(crate) fn set_high(&self, bytes: Option<usize>) {
        self.high
            .store(bytes.unwrap_or(UNLIMITED), Ordering::Relaxed);
    }

    pub(crate) fn set_kmem_max(&self, bytes: Option<usize>) {
        self.kmem_max
            .store(bytes.unwrap_or(UNLIMITED), Ordering::Relaxed);
    }

    pub(crate) fn set_fail(&self, fail: bool) {
        self.fail.store(fail, Ordering::Relaxed);
    }

    pub(crate) fn fails(&self) -> bool {
        self.fail.load(Ordering::Relaxed)
    }

    pub(crate) fn usage(&self) -> usize {
        self.hot.usage.load(Ordering::Acquire)
    }

    /// Charges `bytes` to every level from `self` to the root, if no level's `max` (and, for a
    /// kernel charge, no level's `kmem_max`) would be passed. On failure nothing is changed and
    /// the level that refused is returned.
    /// On success, says whether a pressure level was newly raised on the way (see `signal`).
    pub(crate) fn try_charge(&self, bytes: usize, kernel: bool) -> Result<bool, (&Counter, Limit)> {
        self.charge_chain(bytes, kernel, true)
    }

    /// Charges `bytes` to every level whatever the limits say (an overcharge). Refuses only
    /// when a counter would wrap, which no real allocation can make it do.
    /// Returns `None` when refused, else whether a pressure level was newly raised.
    pub(crate) fn charge_force(&self, bytes: usize, kernel: bool) -> Option<bool> {
        self.charge_chain(bytes, kernel, false).ok()
    }

    fn charge_chain(
        &self,
        bytes: usize,
        kernel: bool,
        limited: bool,
    ) -> Result<bool, (&Counter, Limit)> {
        let limit = |l: &AtomicUsize| {
            if limited {
                l.load(Ordering::Relaxed)
            } else {
                usize::MAX
            }
        };
        // Each level's usage right after this charge, for its own crossings: reading it again
        // later could see other charges and miss a crossing or count one twice.
        let mut after = [0usize; MAX_DEPTH + 1];
        for (level, c) in self.chain().enumerate() {
            let added = add_within(&c.hot.usage, bytes, limit(&c.max));
            if let (Some(new), Some(slot)) = (added, after.get_mut(level)) {
                *slot = new;
            }
            let refused = if added.is_none() {
                Some(Limit::Max)
            } else if kernel && add_within(&c.hot.kmem, bytes, limit(&c.kmem_max)).is_none() {
                c.hot.usage.fetch_sub(bytes, Ordering::Relaxed);
                Some(Limit::KmemMax)
            } else {
                None
            };
            if let Some(refused) = refused {
                for done in self.chain().take_while(|d| !core::ptr::eq(*d, c)) {
                    done.sub(bytes, kernel);
                }
                return Err((c, refused));
            }
        }
        // Only a charge that went through moves peaks and counts crossings of `high`.
        let mut raised = false;
        for (c, &usage) in self.chain().zip(&after) {
            raised |= c.after_charge(bytes, usage);
        }
        Ok(raised)
    }

    /// Uncharges `bytes` from every level. Returns true when `self`'s own usage reached 0,
    /// which for an offline group means its record can be freed. (An ancestor cannot reach 0
    /// here: its usage also holds the bookkeeping charge of `self`.)
    pub(crate) fn uncharge(&self, bytes: usize, kernel: bool) -> bool {
        let mut emptied = false;
        for c in self.chain() {
            let before = c.sub(bytes, kernel);
            if core::ptr::eq(c, self) {
                emptied = before == bytes;
            }
        }
        emptied
    }

    /// Adds allocation and free counts to every level.
    pub(crate) fn count(&self, allocs: u64, frees: u64) {
        if allocs == 0 && frees == 0 {
            return;
        }
        for c in self.chain() {
            c.hot.allocs.fetch_add(allocs, Ordering::Relaxed);
            c.hot.frees.fetch_add(frees, Ordering::Relaxed);
        }
    }

    /// Adds `delta` to the overhead figure of every level. The tag design reports
    /// `TAG_SIZE * (allocs - frees)` as its overhead, and adds the 8 bytes more of each
    /// 16-aligned block's 16-byte header here (through the pockets, or directly); the arena
    /// design adds a slab's bytes when it charges one and subtracts each object's requested
    /// size and `TAG_SIZE` while it lives, so that the sum is exactly the charged bytes holding
    /// no requested byte (from its slow paths, its frees into orphan slabs and its in-place
    /// reallocs).
    pub(crate) fn adjust_overhead(&self, delta: isize) {
        if delta == 0 {
            return;
        }
        for c in self.chain() {
            c.hot.overhead.fetch_add(delta as usize, Ordering::Relaxed);
        }
    }

    /// Counts `event` on `self` and every ancestor (cgroup v2's hierarchical `memory.events`).
    pub(crate) fn event(&self, event: Event) {
        for c in self.chain() {
            c.events[event as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let load = |f: &AtomicUsize| f.load(Ordering::Relaxed);
        let load64 = |f: &AtomicU64| f.load(Ordering::Relaxed);
        Snapshot {
            usage: load(&self.hot.usage),
            kmem: load(&self.hot.kmem),
            peak: load(&self.hot.peak),
            allocs: load64(&self.hot.allocs),
            frees: load64(&self.hot.frees),
            overhead: load(&self.hot.overhead) as isize,
            max: load(&self.max),
            high: load(&self.high),
            kmem_max: load(&self.kmem_max),
            events: [0, 1, 2].map(|i| load64(&self.events[i])),
        }
    }

    /// After `bytes` were added to `usage`: raises `peak`, counts a crossing of `high` (here
    /// and in the ancestors, as every event), and raises the pressure levels whose thresholds
    /// were crossed: `MEDIUM` at `high`, `LOW` at 3/4 of the lower of `high` and `max`.
    /// `usage` is the value this charge left, so each crossing is seen by exactly one charge.
    /// Returns whether a level was newly raised.
    fn after_charge(&self, bytes: usize, usage: usize) -> bool {
        if usage > self.hot.peak.load(Ordering::Relaxed) {
            self.hot.peak.fetch_max(usage, Ordering::Relaxed);
        }
        let before = usage.saturating_sub(bytes);
        let crossed = |mark: usize| usage > mark && before <= mark;
        let high = self.high.load(Ordering::Relaxed);
        let lowest = high.min(self.max.load(Ordering::Relaxed));
        let mut levels = 0;
        if crossed(high) {
            self.event(Event::High);
            levels |= MEDIUM;
        }
        if lowest != UNLIMITED && crossed(lowest - lowest / 4) {
            levels |= LOW;
        }
        levels != 0 && self.signal(levels)
    }

    /// Marks pressure `levels` pending delivery. Returns whether any was not pending already,
    /// in which case the caller must ring the notifier's doorbell (after this call, so that a
    /// notifier that read the doorbell before its scan either sees these bits or wakes again).
    pub(crate) fn signal(&self, levels: u8) -> bool {
        self.pending.fetch_or(levels, Ordering::SeqCst) & levels != levels
    }

    /// Takes the pending levels, for delivery.
    pub(crate) fn take_pending(&self) -> u8 {
        if self.pending.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.pending.swap(0, Ordering::SeqCst)
    }

    /// Counts a shrinker registered (`true`) or unregistered on this group, here and in every
    /// ancestor.
    pub(crate) fn count_shrinker(&self, registered: bool) {
        for c in self.chain() {
            if registered {
                c.shrinkers.fetch_add(1, Ordering::Relaxed);
            } else {
                c.shrinkers.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Whether a shrinker is registered on this group or below it.
    pub(crate) fn has_shrinkers(&self) -> bool {
        self.shrinkers.load(Ordering::Relaxed) != 0
    }

    /// Asks for `bytes` to be reclaimed under this counter; see `RECLAIM`.
    pub(crate) fn want(&self, bytes: usize) -> bool {
        self.wanted.fetch_max(bytes, Ordering::Relaxed);
        self.signal(RECLAIM)
    }

    /// The bytes a direct reclaim asked for, taken.
    pub(crate) fn take_wanted(&self) -> usize {
        self.wanted.swap(0, Ordering::Relaxed)
    }

    /// How far `usage` (or `kmem`) plus `bytes` is over the limit that refused it.
    pub(crate) fn excess(&self, bytes: usize, limit: Limit) -> usize {
        let (used, max) = match limit {
            Limit::Max => (&self.hot.usage, &self.max),
            Limit::KmemMax => (&self.hot.kmem, &self.kmem_max),
        };
        (used.load(Ordering::Relaxed) + bytes).saturating_sub(max.load(Ordering::Relaxed))
    }

    /// Subtracts from this level only; returns `usage` before.
    fn sub(&self, bytes: usize, kernel: bool) -> usize {
        if kernel {
            let kmem = self.hot.kmem.fetch_sub(bytes, Ordering::Relaxed);
            debug_assert!(kmem >= bytes, "kmem underflow");
        }
        let before = self.hot.usage.fetch_sub(bytes, Ordering::AcqRel);
        debug_assert!(before >= bytes, "usage underflow");
        before
    }
}

fn parent_ptr(parent: Option<&Counter>) -> *mut Counter {
    parent.map_or(core::ptr::null_mut(), |p| {
        p as *const Counter as *mut Counter
    })
}

/// Adds `bytes` to `field` unless the result would pass `limit`; returns the new value.
fn add_within(field: &AtomicUsize, bytes: usize, limit: usize) -> Option<usize> {
    // Acquire, also when the limit refuses: the refusing thread then happens after every charge
    // whose bytes it saw, and so after the count that a refill raised before charging its
    // batch (`Stocks::holding`): the wait of a refused charge for refills in flight
    // (`Stocks::wait_for_holders`) sees each one whose batch is in the usage that refused it.
    let mut cur = field.load(Ordering::Acquire);
    loop {
        let new = cur.checked_add(bytes).filter(|&n| n <= limit)?;
        match field.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Some(new),
            Err(now) => cur = now,
        }
    }
}
