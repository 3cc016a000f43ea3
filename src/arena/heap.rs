//! The arena's caches: a heap per thread, holding one group heap per group key it allocates
//! for, each with a slab queue per size class.
//!
//! A group's per-size-class cache (Glauber Costa's per-memcg `kmem_cache` copy) is the set of
//! its group heaps, one per thread that allocates for it, as SLUB's per-CPU slabs of one
//! cache: a thread allocates from and frees to the slabs its group heap owns with plain loads
//! and stores, and other threads free into those slabs through each slab's atomic `remote`
//! word (see `super::slab`), which the owner collects when it runs dry. So a cross-thread free
//! costs the freeing thread one compare-and-swap and never touches the owner's lists.
//!
//! The fast paths bracket their plain accesses with the heap's `busy` flag. Any other thread
//! that must work on a heap (to make `flush()` exact, to take a removed group's slabs away, to
//! prepare a `fork()`) takes the heap's lock, then waits for `busy` to drop (`stop`). The fast
//! path checks the lock after raising `busy`: the asymmetric Dekker pattern, with the store-load
//! fence on the rare side (`membarrier(2)`, which runs a full barrier on every thread of the
//! process), so the fast path has no atomic read-modify-write and no fence. Without
//! `membarrier` the fast path raises `busy` with a swap instead.
//!
//! Counts (allocations, frees) and the overhead figure go to the group heap first and to the
//! group's counter every `HARVEST` operations and on `flush()`, so no allocation writes a
//! shared cache line. With stocks off (`MEMGROUP_BATCH=0`, "exact" mode) every operation is
//! harvested, a slab is released the moment it is empty and remote frees are done on the
//! owner's behalf under its lock, so `stat()` is exact at every moment, as the tag design's is.
//!
//! Slabs and their charges: a slab is charged in full (through the stocks, as any charge) to
//! its group key when it is taken from the pool, and uncharged when it goes back, which happens
//! when it is empty and not its class's active slab (one empty slab per class is kept as a spare,
//! charged), at `flush()` (every empty slab of the group), and when its group heap goes.
//!
//! A thread that exits leaves its heap for the next new thread (mimalloc's abandoned heaps):
//! the exit hook sweeps every group heap (objects handed over freed, remote frees collected,
//! empty slabs released, spares included, counts harvested), retires those left with no slab
//! and marks the others `ABANDONED` in their `heap` word, slabs still holding objects and
//! all. The next thread `create_heap` makes takes such a heap first and `adopt`s it: it
//! allocates from the exited thread's partial slabs instead of new ones. Until then, frees into
//! an abandoned heap's slabs are done as its owner would, under its lock (`free_abandoned`), so
//! a slab emptied by other threads goes back to the pool at once; `flush()` and `remove()` work
//! on abandoned heaps as on live ones, without waiting for an owner. In a forked child, the
//! heaps of the parent's other threads are abandoned the same way.
//!
//! A group heap goes when its group is removed (or, abandoned, when it holds no slab). Its
//! slabs that still hold objects become orphans: no owner, their `used` frozen, and every later
//! free counts down in the `remote` word; the free that brings it to zero releases the slab. So
//! a removed group's caches are gone at `remove()`, its slabs go with their last object, and
//! its record (and with it `dying_groups()`) goes with its last byte. Orphans are not reused
//! for allocation.

//!
//! The code: `types` (the records and their invariants), `heap` (this module: the arena's
//! state, the stop protocol, releasing slabs), `owner` (a group heap's owner at work), `alloc`,
//! `free`, `flush` (flush and remove), `lifecycle` (setup, thread start and exit), `fork`,
//! `table` (the key table), `records` (memory for heaps and group heaps).

use core::cell::Cell;
use core::ptr::null_mut;

use crate::core::counter::Counter;
use crate::core::stock::{key_id, Key};
use crate::sync::{
    compiler_fence, fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU8, Backoff, Ordering,
};
use crate::{group, platform, thread, TAG_SIZE};

use super::class;
use super::segment;
use super::slab::NOTIFYING;
use super::types::{Locked, Owner, Slab, Stopped, ThreadHeap, DEAD_HEAP};

/// Operations between two harvests of a group heap's counts into its counter.
pub(super) const HARVEST: u32 = 256;

/// Per-object overhead allowance already counted by `Stat`'s tag formula (see `harvest`).
pub(super) const TAG: i64 = TAG_SIZE as i64;

thread_local! {
    /// This thread's heap: null before its first small allocation, `DEAD_HEAP` after its exit.
    pub(super) static HEAP: Cell<*mut ThreadHeap> = const { Cell::new(null_mut()) };
    /// Between `fork_prepare` and `fork_release`, on the forking thread: every heap is locked,
    /// its own included, so its allocations go to the inner allocator and its frees are remote.
    pub(super) static FORKING: Cell<bool> = const { Cell::new(false) };
    /// Slabs emptied on the forking thread while `FORKING`, linked through `next`: releasing
    /// them then would take a lock it holds (a pool's, the group registry's). `drain_parked`
    /// releases them after the fork handlers let those go.
    pub(super) static PARKED: Cell<*mut Slab> = const { Cell::new(null_mut()) };
}

pub(super) static STATE: AtomicU8 = AtomicU8::new(0);

pub(super) const READY: u8 = 2;

pub(super) const UNAVAILABLE: u8 = 3;

/// Stocks are off: exact mode (see the module documentation).
pub(super) static EXACT: AtomicBool = AtomicBool::new(false);

/// `membarrier` works: the fast path needs no fence.
pub(super) static ASYM: AtomicBool = AtomicBool::new(false);

pub(super) static EXIT_KEY: AtomicU32 = AtomicU32::new(0);

/// Every heap ever made, newest first; the list only grows (heaps are reused, never freed).
pub(super) static HEAPS: AtomicPtr<ThreadHeap> = AtomicPtr::new(null_mut());

pub(super) static FORK_HANDLERS: AtomicBool = AtomicBool::new(false);

pub(crate) fn ready() -> bool {
    STATE.load(Ordering::Acquire) == READY
}

#[inline(always)]
pub(super) fn counter(key: Key) -> &'static Counter {
    &group::node(key_id(key)).counter
}

#[inline(always)]
pub(super) fn current() -> *mut ThreadHeap {
    HEAP.with(Cell::get)
}

#[inline(always)]
pub(super) fn usable(th: *mut ThreadHeap) -> bool {
    th as usize > DEAD_HEAP
}

#[inline(always)]
pub(super) fn interval() -> u32 {
    if EXACT.load(Ordering::Relaxed) {
        1
    } else {
        HARVEST
    }
}

/// Enters this thread's heap for a fast-path operation: raises `busy`, and gives the proof
/// that the heap is this thread's until `leave`. `None` if the thread has no usable heap or
/// another thread holds it (then take the slow path).
#[inline(always)]
pub(super) fn enter<'a>() -> Option<Owner<'a>> {
    let th = current();
    if !usable(th) {
        return None;
    }
    // SAFETY: a usable `HEAP` is a heap (heaps are never unmapped).
    let (busy, lock) = unsafe { (&(*th).busy, &(*th).lock) };
    if ASYM.load(Ordering::Relaxed) {
        busy.store(1, Ordering::Relaxed);
        // The store-load fence is `stop`'s membarrier; only the compiler must keep the order.
        compiler_fence(Ordering::SeqCst);
    } else {
        busy.swap(1, Ordering::SeqCst);
    }
    if lock.is_locked() {
        busy.store(0, Ordering::Release);
        return None;
    }
    // SAFETY: `busy` is raised and the lock was free after it: a thread that takes the lock
    // now waits for `busy` to drop before it touches the heap (`wait_out`), and no other
    // thread touches it without the lock. So the heap is ours until `leave` drops `busy`.
    Some(unsafe { Owner::new(th) })
}

/// Ends a fast-path operation: the heap is open to a thread that holds its lock again.
#[inline(always)]
pub(super) fn leave(o: Owner<'_>) {
    // SAFETY: heaps are never unmapped.
    unsafe { (*o.th()).busy.store(0, Ordering::Release) };
}

/// Locks `th`. Its owner may still be in its fast path: `Locked::stop` waits it out.
///
/// # Safety
/// `th` names a heap (from `HEAPS`, `HEAP`, or a group heap's `heap` word, untagged); the
/// caller holds no other heap's lock, and gives this one up only through `Locked::unlock`.
pub(super) unsafe fn lock<'a>(th: *mut ThreadHeap) -> Locked<'a> {
    // SAFETY: per the caller (heaps are never unmapped).
    unsafe {
        (*th).lock.lock();
        Locked::new(th)
    }
}

/// `lock`, unless the lock is taken.
///
/// # Safety
/// As for `lock`.
pub(super) unsafe fn try_lock<'a>(th: *mut ThreadHeap) -> Option<Locked<'a>> {
    // SAFETY: per the caller.
    unsafe { (*th).lock.try_lock().then(|| Locked::new(th)) }
}

impl<'a> Locked<'a> {
    /// Completes the stop of the heap: after the owner's next check of the lock it stays out
    /// of its fast path, and one it is in now ends. At once for this thread's own heap.
    pub(super) fn stop(&self) -> Stopped<'_> {
        wait_out(self.th());
        // SAFETY: locked, with no fast path running (just waited out, or this thread's own).
        unsafe { self.assume_stopped() }
    }

    /// The locked heap as stopped, without waiting.
    ///
    /// # Safety
    /// No fast path runs on the heap while it is locked: its thread is this one, or gone (the
    /// heap abandoned: its group heaps marked `ABANDONED`, unmarked only by an adopting thread
    /// under this lock, before its first fast path).
    pub(super) unsafe fn assume_stopped(&self) -> Stopped<'_> {
        // SAFETY: per the caller.
        unsafe { Stopped::new(self) }
    }
}

/// Locks `th` and, unless it is this thread's own, waits until the owner is out of its fast
/// path, for a stop that outlives one function (`fork`): ended by `resume`. Until then, only
/// the caller touches the heap.
///
/// # Safety
/// `th` is a heap from `HEAPS`; the caller holds no other heap's lock.
pub(super) unsafe fn stop(th: *mut ThreadHeap) {
    // SAFETY: heaps are never unmapped.
    unsafe { (*th).lock.lock() };
    wait_out(th);
}

/// The second half of a stop, for a heap the caller has locked: after the owner's next check
/// of the lock it stays out of its fast path, and one it is in now ends.
fn wait_out(th: *mut ThreadHeap) {
    if th == current() {
        return;
    }
    // Orders our lock store before the `busy` load, and (with membarrier) the owner's `busy`
    // store before its lock load, on every thread.
    fence(Ordering::SeqCst);
    if ASYM.load(Ordering::Relaxed) && !platform::membarrier() {
        platform::corrupted(b"membarrier failed after registration");
    }
    let mut backoff = Backoff::new();
    // SAFETY: heaps are never unmapped (every caller has a heap from a `Locked` or `stop`).
    while unsafe { (*th).busy.load(Ordering::SeqCst) } != 0 {
        backoff.wait();
    }
}

/// Waits for the threads releasing slabs taken out of `th` (see `Released::release_after`)
/// that the caller's lock of `th` came after: their slabs are uncharged when this returns.
/// Unbounded, as a wait for `th`'s lock is: a release is a few hundred instructions and takes
/// no lock the caller may hold (the caller holds none).
pub(super) fn wait_released(th: *mut ThreadHeap) {
    let mut backoff = Backoff::new();
    // SAFETY: heaps are never unmapped.
    while unsafe { (*th).releasing.load(Ordering::Acquire) } != 0 {
        backoff.wait();
    }
}

/// # Safety
/// The caller stopped `th` with `stop`.
pub(super) unsafe fn resume(th: *mut ThreadHeap) {
    // SAFETY: as for `stop`.
    unsafe { (*th).lock.unlock() };
}

/// Microseconds a thread releasing slabs after letting their heap go pauses first (0: none),
/// for the test that widens that window (see `super::pause_before_release`).
pub(super) static RELEASE_PAUSE_US: AtomicU32 = AtomicU32::new(0);

/// Sleeps `us` microseconds if set (the tests' pauses, see `super::owner`).
#[inline(always)]
pub(super) fn pause(us: &AtomicU32) {
    let us = us.load(Ordering::Relaxed);
    if us != 0 {
        // nanosleep(2); allocates nothing.
        std::thread::sleep(core::time::Duration::from_micros(us.into()));
    }
}

/// Slabs unlinked under a heap's lock, released after it is let go (a release uncharges,
/// which may free a group's record).
pub(super) struct Released(*mut Slab);

impl Released {
    pub(super) fn new() -> Released {
        Released(null_mut())
    }

    /// # Safety
    /// `s` is unlinked, `LOOSE` and empty; the caller gives it up.
    pub(super) unsafe fn push(&mut self, s: *mut Slab) {
        // SAFETY: per the caller, `s`'s links are free.
        unsafe { (*s).next = self.0 };
        self.0 = s;
    }

    /// Lets `th` go (`unlock`), then releases the slabs, counted in `th`'s `releasing`
    /// meanwhile: the count is raised before the unlock, so whoever takes `th`'s lock next sees
    /// it, and a flush that did waits for it (`wait_released`) rather than finding the slabs
    /// neither in the heap nor uncharged yet.
    ///
    /// # Safety
    /// The caller holds `th` (locked or stopped); `unlock` lets it go.
    pub(super) unsafe fn release_after(&mut self, th: *mut ThreadHeap, unlock: impl FnOnce()) {
        if self.0.is_null() {
            unlock();
            return;
        }
        // SAFETY: heaps are never unmapped.
        let releasing = unsafe { &(*th).releasing };
        releasing.fetch_add(1, Ordering::Relaxed);
        unlock();
        pause(&RELEASE_PAUSE_US);
        self.release_all();
        releasing.fetch_sub(1, Ordering::Release);
    }

    /// `release_after` for a heap locked through a `Locked`, which it lets go.
    pub(super) fn release_after_unlock(&mut self, l: Locked<'_>) {
        let th = l.th();
        // SAFETY: `l` proves this thread holds `th`'s lock; `unlock` lets it go.
        unsafe { self.release_after(th, || l.unlock()) }
    }

    fn release_all(&mut self) {
        while !self.0.is_null() {
            let s = self.0;
            // SAFETY: the list holds slabs given up by `push`.
            unsafe {
                self.0 = (*s).next;
                release(s);
            }
        }
    }
}

/// Returns an empty slab to the pool and uncharges it. On the forking thread between
/// `fork_prepare` and `fork_release`, which holds the pool locks, the slab is parked instead
/// and released by `drain_parked` after the fork.
///
/// # Safety
/// The caller holds `s` exclusively: empty, unlinked, claimed.
pub(super) unsafe fn release(s: *mut Slab) {
    if FORKING.with(Cell::get) {
        // SAFETY: per the caller, `s` is ours and its links are free.
        unsafe { (*s).next = PARKED.with(Cell::get) };
        PARKED.with(|p| p.set(s));
        return;
    }
    // SAFETY: per the caller.
    unsafe {
        // A notifier (see `notify`) may still hold `NOTIFYING` after its object was freed
        // (through the delayed list) and the slab emptied: let it clear the bit before the slab
        // can be reused, or its late clear would clear a later notifier's.
        let mut backoff = Backoff::new();
        while (*s).remote.load(Ordering::Acquire) & NOTIFYING != 0 {
            backoff.wait();
        }
        let key = (*s).key.load(Ordering::Relaxed);
        let c = (*s).class as usize;
        let bytes = class::slab_bytes(c);
        // Before the uncharge, which may free the group's record.
        counter(key).adjust_overhead(-(bytes as isize));
        (*s).owner.store(null_mut(), Ordering::Relaxed);
        (*s).remote.store(0, Ordering::Relaxed);
        (*s).free = null_mut();
        (*s).used = 0;
        segment::put(s, class::kind(c));
        thread::uncharge(key, bytes, 0);
    }
}

/// Every thread heap ever listed, live or not. Listed heaps are never unmapped, and `next`
/// is read before the caller touches the heap (a heap is never unlisted either).
pub(super) fn listed_heaps() -> impl Iterator<Item = *mut ThreadHeap> {
    let first = HEAPS.load(Ordering::Acquire);
    core::iter::successors((!first.is_null()).then_some(first), |&th| {
        // SAFETY: listed heaps are never unmapped; `next` is set before a heap is listed.
        let next = unsafe { (*th).next };
        (!next.is_null()).then_some(next)
    })
}

/// Runs `f` on every heap, live or abandoned, locked (`f` completes the stop before it
/// touches a group heap), then releases what `f` unlinked.
pub(super) fn each_heap(mut f: impl FnMut(&Locked<'_>, &mut Released)) {
    if !ready() {
        return;
    }
    for th in listed_heaps() {
        let mut rel = Released::new();
        // SAFETY: a listed heap; this thread holds no other heap's lock.
        let l = unsafe { lock(th) };
        f(&l, &mut rel);
        rel.release_after_unlock(l);
        wait_released(th);
    }
}
