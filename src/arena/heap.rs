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

use core::cell::Cell;
use core::ptr::null_mut;

use crate::core::counter::Counter;
use crate::core::stock::{key, key_id, key_is_kernel, Key};
use crate::fork::{self, Participant, Rank};
use crate::sync::{
    compiler_fence, fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU8, Backoff, Ordering,
};
use crate::{group, platform, thread, TAG_SIZE};

use super::class::{self, CLASSES};
use super::lock::Spin;
use super::records::{GROUP_HEAPS, REGISTRY};
use super::segment;
use super::slab::{self, COUNT_ONE, DEAD, FLAGS, FULL, NOTIFYING, ORPHAN, PTR_MASK};
use super::table::{Table, TOMB};
use super::types::{
    abandoned, untagged, GroupHeap, Queue, Slab, Slow, ThreadHeap, ABANDONED, ACTIVE, DEAD_HEAP,
    FULL_LIST, LOOSE, ORPHANED, PARTIAL,
};

/// `MEMGROUP_ARENA_POOL`: the resident bytes of empty slabs the pool keeps, by default and at
/// most (a larger value is taken as this one, with a warning).
pub(super) const POOL_DEFAULT: usize = 4 << 20;

pub(super) const POOL_MAX: usize = 1 << 40;

/// Operations between two harvests of a group heap's counts into its counter.
pub(super) const HARVEST: u32 = 256;

/// Per-object overhead allowance already counted by `Stat`'s tag formula (see `harvest`).
pub(super) const TAG: i64 = TAG_SIZE as i64;

thread_local! {
    /// This thread's heap: null before its first small allocation, `DEAD_HEAP` after its exit.
    static HEAP: Cell<*mut ThreadHeap> = const { Cell::new(null_mut()) };
    /// Between `fork_prepare` and `fork_release`, on the forking thread: every heap is locked,
    /// its own included, so its allocations go to the inner allocator and its frees are remote.
    static FORKING: Cell<bool> = const { Cell::new(false) };
    /// Slabs emptied on the forking thread while `FORKING`, linked through `next`: releasing
    /// them then would take a lock it holds (a pool's, the group registry's). `drain_parked`
    /// releases them after the fork handlers let those go.
    static PARKED: Cell<*mut Slab> = const { Cell::new(null_mut()) };
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

/// Sets the arena up at its first use: reads the batch (which decides exact mode) and
/// `MEMGROUP_ARENA_POOL`, registers for `membarrier`, reserves the region and creates the
/// thread-exit hook. Allocates nothing. False if the arena cannot work here.
#[cold]
pub(crate) fn init() -> bool {
    let mut backoff = Backoff::new();
    loop {
        match STATE.compare_exchange(0, 1, Ordering::Acquire, Ordering::Acquire) {
            Ok(_) => break,
            Err(1) => backoff.wait(),
            Err(s) => return s == READY,
        }
    }
    EXACT.store(crate::stock_batch() == 0, Ordering::Relaxed);
    ASYM.store(platform::membarrier_register(), Ordering::Relaxed);
    let pool = platform::env_size_in(c"MEMGROUP_ARENA_POOL", POOL_DEFAULT, POOL_MAX);
    let ok = match platform::thread_exit_key(thread_exit) {
        Some(k) if segment::reserve(pool) => {
            EXIT_KEY.store(k, Ordering::Relaxed);
            true
        }
        _ => false,
    };
    STATE.store(if ok { READY } else { UNAVAILABLE }, Ordering::Release);
    ok
}

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

/// Raises `busy` for a fast-path operation on the thread's own heap; false if another thread
/// holds the heap (then take the slow path).
///
/// # Safety
/// `th` is this thread's heap.
#[inline(always)]
pub(super) unsafe fn enter(th: *mut ThreadHeap) -> bool {
    // SAFETY: `th` is a live heap (heaps are never unmapped).
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
        return false;
    }
    true
}

/// # Safety
/// `th` is this thread's heap, entered.
#[inline(always)]
pub(super) unsafe fn leave(th: *mut ThreadHeap) {
    // SAFETY: as for `enter`.
    unsafe { (*th).busy.store(0, Ordering::Release) };
}

/// Takes `th` from its owner: locks it and, unless it is this thread's own, waits until the
/// owner is out of its fast path. Until `resume`, only the caller touches the heap.
///
/// # Safety
/// `th` is a heap from `HEAPS`; the caller holds no other heap's lock.
pub(super) unsafe fn stop(th: *mut ThreadHeap) {
    // SAFETY: heaps are never unmapped.
    unsafe {
        (*th).lock.lock();
        wait_out(th);
    }
}

/// The second half of `stop`, for a heap the caller has locked: after the owner's next check
/// of the lock it stays out of its fast path, and one it is in now ends.
///
/// # Safety
/// The caller holds `th`'s lock.
pub(super) unsafe fn wait_out(th: *mut ThreadHeap) {
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
    // SAFETY: heaps are never unmapped.
    while unsafe { (*th).busy.load(Ordering::SeqCst) } != 0 {
        backoff.wait();
    }
}

/// # Safety
/// The caller stopped `th`.
pub(super) unsafe fn resume(th: *mut ThreadHeap) {
    // SAFETY: as for `stop`.
    unsafe { (*th).lock.unlock() };
}

/// Allocates an object of `class` for `key` from the cached group heap's active slab; null if
/// the slow path must serve. `counted`: a new allocation (false for a realloc's move).
#[inline(always)]
pub(crate) fn alloc_fast(key: Key, class: usize, size: usize, counted: bool) -> *mut u8 {
    let th = current();
    // SAFETY: a usable `HEAP` is this thread's heap.
    if !usable(th) || !unsafe { enter(th) } {
        return null_mut();
    }
    // SAFETY: entered: no other thread touches the heap, its cached group heap or the slabs
    // that group heap owns (other than through their atomics) until `leave`.
    unsafe {
        let mut p = null_mut();
        if (*th).cached_key == key {
            let gh = (*th).cached;
            let s = (*gh).classes[class].active;
            if !(*s).free.is_null() {
                p = pop(gh, s, size, counted);
            }
        }
        leave(th);
        p
    }
}

/// Frees a slab object. `counted`: a free to count (false for a realloc's move).
///
/// # Safety
/// `p` is a live object of a slab, allocated for `size` bytes.
#[inline(always)]
pub(crate) unsafe fn free(p: *mut u8, size: usize, counted: bool) {
    // SAFETY: per the caller, `p` is in a slab.
    let s = unsafe { segment::slab_of(p) };
    let th = current();
    // SAFETY: a usable `HEAP` is this thread's heap; entered, the heap and the slabs its group
    // heaps own are this thread's until `leave` (see `alloc_fast`).
    unsafe {
        if usable(th) && enter(th) {
            let gh = (*s).owner.load(Ordering::Relaxed);
            if !gh.is_null() && (*gh).heap.load(Ordering::Relaxed) == th {
                push_local(gh, s, p, size, counted);
                if (*s).used == 0 || (*s).state == FULL_LIST || (*gh).left == 0 {
                    let r = after_free(gh, s);
                    leave(th);
                    if !r.is_null() {
                        release(r);
                    }
                    return;
                }
                leave(th);
                return;
            }
            leave(th);
        }
        free_remote(s, p, size, counted);
    }
}

/// The owner's free: `p` goes on `s`'s free list.
///
/// # Safety
/// The caller is `gh`'s owner (entered, or holding its heap stopped); `s` is `gh`'s and `p` a
/// live object of it.
#[inline(always)]
pub(super) unsafe fn push_local(
    gh: *mut GroupHeap,
    s: *mut Slab,
    p: *mut u8,
    size: usize,
    counted: bool,
) {
    // SAFETY: per the caller.
    unsafe {
        *(p as *mut *mut u8) = (*s).free;
        (*s).free = p;
        (*s).used -= 1;
        (*gh).frees += counted as u64;
        (*gh).adj += (size + TAG_SIZE) as i64;
        (*gh).left -= 1;
    }
}

/// After an owner's free that emptied `s`, freed into a full slab, or is due a harvest.
/// Returns `s` if it must be released (unlinked already), else null.
///
/// # Safety
/// As for `push_local`.
#[cold]
pub(super) unsafe fn after_free(gh: *mut GroupHeap, s: *mut Slab) -> *mut Slab {
    // SAFETY: per the caller.
    unsafe {
        if (*gh).left == 0 {
            harvest(gh);
        }
        let c = (*s).class as usize;
        let q = &raw mut (*gh).classes[c];
        if (*s).state == FULL_LIST {
            (*s).remote.fetch_and(!FULL, Ordering::AcqRel);
            slab::unlink(&raw mut (*gh).full, s);
            slab::push(&raw mut (*q).partial, s);
            (*s).state = PARTIAL;
        }
        if (*s).used != 0 {
            return null_mut();
        }
        // An abandoned heap keeps no spare: no thread would use it.
        if EXACT.load(Ordering::Relaxed) || abandoned((*gh).heap.load(Ordering::Relaxed)) {
            if (*q).active == s {
                (*q).active = slab::empty();
            } else {
                slab::unlink(&raw mut (*q).partial, s);
            }
            (*s).state = LOOSE;
            return s;
        }
        if (*s).state == PARTIAL {
            if (*gh).empties & 1 << c != 0 {
                slab::unlink(&raw mut (*q).partial, s);
                (*s).state = LOOSE;
                return s;
            }
            (*gh).empties |= 1 << c;
        }
        null_mut()
    }
}

/// A free by a thread that does not own the slab.
///
/// # Safety
/// As for `free`.
#[inline(never)]
pub(super) unsafe fn free_remote(s: *mut Slab, p: *mut u8, size: usize, counted: bool) {
    if EXACT.load(Ordering::Relaxed) && !FORKING.with(Cell::get) {
        // SAFETY: forwarded.
        return unsafe { free_on_behalf(s, p, size, counted) };
    }
    // SAFETY: slab metadata is never unmapped; `p` is ours to write until published.
    unsafe {
        let gh = (*s).owner.load(Ordering::Acquire);
        if !gh.is_null()
            && abandoned((*gh).heap.load(Ordering::Relaxed))
            && free_abandoned(gh, s, p, size, counted)
        {
            return;
        }
        let r = &(*s).remote;
        let mut w = r.load(Ordering::Acquire);
        loop {
            if w & ORPHAN != 0 {
                let done = orphan_free(s, size, counted);
                if !done.is_null() {
                    release(done);
                }
                return;
            }
            if w & FULL != 0 {
                match r.compare_exchange_weak(
                    w,
                    (w & !FULL) | NOTIFYING,
                    Ordering::Acquire,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return notify(s, p, size, counted),
                    Err(now) => w = now,
                }
                continue;
            }
            *(p as *mut u64) = slab::link(slab::head(w), size, counted);
            let new = p as u64 | (w & FLAGS) | ((slab::count(w) + 1) << 48);
            match r.compare_exchange_weak(w, new, Ordering::Release, Ordering::Acquire) {
                Ok(_) => return,
                Err(now) => w = now,
            }
        }
    }
}

/// A free into a slab whose owner's thread exited (its heap abandoned, not adopted yet): done
/// as the owner would, under the heap's lock, with the slab's other remote frees collected, so
/// a slab emptied by other threads goes back to the pool at once, as an orphan's would, and a
/// group heap left with no slab is retired. False (nothing done) if the lock is taken or the
/// heap was adopted meanwhile: then free as to any other owner.
///
/// # Safety
/// As for `free`; `gh` was read from `s`'s owner.
#[cold]
pub(super) unsafe fn free_abandoned(
    gh: *mut GroupHeap,
    s: *mut Slab,
    p: *mut u8,
    size: usize,
    counted: bool,
) -> bool {
    // SAFETY: heaps, group heaps and slab metadata are never unmapped. With the heap's lock
    // held and its group heaps still marked abandoned, no thread owns the heap (adoption and
    // every change of ownership happen under that lock), so it is ours as a stopped heap is.
    unsafe {
        let raw = (*gh).heap.load(Ordering::Relaxed);
        let th = untagged(raw);
        if !abandoned(raw) || !(*th).lock.try_lock() {
            return false;
        }
        if (*gh).heap.load(Ordering::Relaxed) != raw
            || (*s).owner.load(Ordering::Relaxed) != gh
            || (*s).remote.load(Ordering::Acquire) & ORPHAN != 0
        {
            (*th).lock.unlock();
            return false;
        }
        let mut rel = Released::new();
        push_local(gh, s, p, size, counted);
        collect(gh, s);
        let done = after_free(gh, s);
        if !done.is_null() {
            rel.push(done);
            if holds_nothing(gh) {
                detach(th, gh, &mut rel);
            }
        }
        (*th).lock.unlock();
        rel.release_all();
        true
    }
}

/// The first remote free into a slab parked as full: hands the object to the owner's delayed
/// list, so the owner's next slow path frees it locally and takes the slab off its full list.
/// Holding `NOTIFYING` keeps the owner from being retired meanwhile.
///
/// # Safety
/// This thread set `NOTIFYING` on `s`; `p` is a live object of `s`.
pub(super) unsafe fn notify(s: *mut Slab, p: *mut u8, size: usize, counted: bool) {
    pause(&NOTIFY_PAUSE_US);
    // SAFETY: the owner is stable while `NOTIFYING` is set (`orphan_or_release` waits).
    unsafe {
        let gh = (*s).owner.load(Ordering::Acquire);
        let d = &(*gh).delayed;
        let mut h = d.load(Ordering::Relaxed);
        loop {
            *(p as *mut u64) = slab::link(h, size, counted);
            match d.compare_exchange_weak(h, p, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => h = now,
            }
        }
        (*s).remote.fetch_and(!NOTIFYING, Ordering::Release);
    }
}

/// A free into an orphan: counts it, and claims the slab if that was its last object.
/// Returns the slab to release (the caller releases it), else null.
///
/// # Safety
/// `s` is an orphan holding the object freed.
pub(super) unsafe fn orphan_free(s: *mut Slab, size: usize, counted: bool) -> *mut Slab {
    // SAFETY: an orphan's `used` is final (published by the `ORPHAN` word, read after it). The
    // object being freed keeps the slab (and its group's record) alive until our CAS lands.
    unsafe {
        // Before the CAS: once it lands, another thread's last free may release the slab (and
        // free the group's record, and recycle the slab under another key).
        let c = counter((*s).key.load(Ordering::Relaxed));
        c.count(0, counted as u64);
        c.adjust_overhead(size as isize + TAG as isize);
        let r = &(*s).remote;
        let mut w = r.load(Ordering::Acquire);
        let last = loop {
            debug_assert!(w & ORPHAN != 0 && w & FLAGS != DEAD);
            let last = slab::count(w) + 1 == (*s).used as u64;
            let new = if last { DEAD } else { w + COUNT_ONE };
            match r.compare_exchange_weak(w, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break last,
                Err(now) => w = now,
            }
        };
        if last {
            (*s).state = LOOSE;
            s
        } else {
            null_mut()
        }
    }
}

/// A remote free in exact mode: done as the owner would, with its heap stopped, so the group's
/// figures are exact at once and an emptied slab is released at once.
///
/// # Safety
/// As for `free`.
#[cold]
pub(super) unsafe fn free_on_behalf(s: *mut Slab, p: *mut u8, size: usize, counted: bool) {
    // SAFETY: slab metadata, group heaps and heaps are never unmapped; ownership is re-checked
    // with the owner's heap stopped, when it cannot change.
    unsafe {
        let mut backoff = Backoff::new();
        loop {
            if (*s).remote.load(Ordering::Acquire) & ORPHAN != 0 {
                let done = orphan_free(s, size, counted);
                if !done.is_null() {
                    release(done);
                }
                return;
            }
            let gh = (*s).owner.load(Ordering::Acquire);
            if gh.is_null() {
                backoff.wait();
                continue;
            }
            let raw = (*gh).heap.load(Ordering::Relaxed);
            if raw.is_null() {
                backoff.wait();
                continue;
            }
            let th = untagged(raw);
            stop(th);
            let owned = (*s).owner.load(Ordering::Relaxed) == gh
                && (*gh).heap.load(Ordering::Relaxed) == raw
                && (*s).remote.load(Ordering::Acquire) & ORPHAN == 0;
            let mut rel = Released::new();
            if owned {
                push_local(gh, s, p, size, counted);
                let done = after_free(gh, s);
                if !done.is_null() {
                    rel.push(done);
                    if abandoned(raw) && holds_nothing(gh) {
                        detach(th, gh, &mut rel);
                    }
                }
            }
            resume(th);
            if owned {
                rel.release_all();
                return;
            }
        }
    }
}

/// The counts and overhead change of `gh` go to its counter.
///
/// `Stat::overhead` is `TAG_SIZE * (allocs - frees) + adj`, the tag design's figure plus a
/// correction: a slab charged adds its bytes, an object allocated from it subtracts its
/// requested size and the `TAG_SIZE` the formula counts for it, and both go back when freed.
/// So the overhead is the charged bytes that hold no requested byte: slab ends, class rounding,
/// free objects and spare slabs.
///
/// # Safety
/// The caller is `gh`'s owner.
pub(super) unsafe fn harvest(gh: *mut GroupHeap) {
    // SAFETY: per the caller.
    unsafe {
        let c = counter((*gh).key);
        c.count((*gh).allocs, (*gh).frees);
        c.adjust_overhead((*gh).adj as isize);
        (*gh).allocs = 0;
        (*gh).frees = 0;
        (*gh).adj = 0;
        (*gh).left = interval();
    }
}

/// A realloc that keeps the block in its slot: only the requested size changes.
pub(crate) fn resize(key: Key, old: usize, new: usize) {
    counter(key).adjust_overhead(old as isize - new as isize);
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

    pub(super) fn release_all(&mut self) {
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

/// A fresh slab of `class`, charged to `key`: its free list holds every object.
pub(super) fn new_slab(key: Key, class: usize) -> Result<*mut Slab, Slow> {
    let bytes = class::slab_bytes(class);
    if thread::charge(key, bytes, 0).is_none() {
        return Err(Slow::Refused);
    }
    let s = segment::take(class::kind(class));
    if s.is_null() {
        thread::uncharge(key, bytes, 0);
        return Err(Slow::Tag);
    }
    counter(key).adjust_overhead(bytes as isize);
    let size = class::SIZES[class] as usize;
    let objects = class::CAPACITY[class] as usize;
    let start = segment::start(s);
    // SAFETY: `take` gave us the slab alone; its memory is `bytes` long and committed.
    unsafe {
        for i in 0..objects {
            let next = if i + 1 < objects {
                start.add((i + 1) * size)
            } else {
                null_mut()
            };
            *(start.add(i * size) as *mut *mut u8) = next;
        }
        (*s).free = start;
        (*s).used = 0;
        (*s).class = class as u8;
        (*s).state = LOOSE;
        (*s).remote.store(0, Ordering::Relaxed);
        (*s).key.store(key, Ordering::Relaxed);
        (*s).prev = null_mut();
        (*s).next = null_mut();
    }
    Ok(s)
}

/// The slow path of a small allocation for `key`: finds or makes this thread's group heap
/// for it (its nearest live ancestor's, if its group was removed), refills the class's active
/// slab from remote frees, the partial list or a fresh slab, and allocates from it.
#[cold]
#[inline(never)]
pub(crate) fn alloc_slow(key: Key, class: usize, size: usize, counted: bool) -> Slow {
    let mut th = current();
    if th.is_null() {
        th = create_heap();
    }
    if !usable(th) || FORKING.with(Cell::get) {
        return Slow::Tag;
    }
    let mut rel = Released::new();
    // SAFETY: `th` is this thread's heap; under its lock, its group heaps and their slabs are
    // ours (no fast path runs: this thread is here; other threads take the lock first).
    let out = unsafe {
        loop {
            (*th).lock.lock();
            let gh = group_heap(th, key);
            if gh.is_null() {
                (*th).lock.unlock();
                break Slow::Tag;
            }
            let p = refill(gh, class, size, counted, &mut rel);
            if !p.is_null() {
                (*th).lock.unlock();
                break Slow::Done(p);
            }
            let (gkey, gen) = ((*gh).key, (*gh).gen);
            // Charging may reclaim (run shrinkers, which allocate and free): hold nothing.
            (*th).lock.unlock();
            rel.release_all();
            let s = match new_slab(gkey, class) {
                Ok(s) => s,
                Err(e) => break e,
            };
            (*th).lock.lock();
            if (*gh).gen != gen {
                // The group heap was retired meanwhile (its group removed): start over.
                (*th).lock.unlock();
                release(s);
                continue;
            }
            (*s).owner.store(gh, Ordering::Release);
            let q = &raw mut (*gh).classes[class];
            if (*q).active == slab::empty() {
                (*s).state = ACTIVE;
                (*q).active = s;
            } else {
                (*s).state = PARTIAL;
                slab::push(&raw mut (*q).partial, s);
            }
            let p = refill(gh, class, size, counted, &mut rel);
            (*th).lock.unlock();
            break if p.is_null() {
                Slow::Tag
            } else {
                Slow::Done(p)
            };
        }
    };
    rel.release_all();
    out
}

/// Takes the first free object of slab `s` of `gh` for a block of `size` bytes, and counts it
/// (an allocation if `counted`, its overhead correction, and a harvest every 256 operations).
///
/// # Safety
/// The caller owns `gh` (fast path entered, or its heap's lock held), `s` is a slab of `gh`
/// and `s`'s free list is not empty.
#[inline(always)]
pub(super) unsafe fn pop(gh: *mut GroupHeap, s: *mut Slab, size: usize, counted: bool) -> *mut u8 {
    // SAFETY: per the caller: a free object's first word links the next one.
    unsafe {
        let p = (*s).free;
        (*s).free = *(p as *const *mut u8);
        (*s).used += 1;
        (*gh).allocs += counted as u64;
        (*gh).adj -= (size + TAG_SIZE) as i64;
        (*gh).left -= 1;
        if (*gh).left == 0 {
            harvest(gh);
        }
        p
    }
}

/// Allocates from the class's active slab, refilling it first: from its remote frees, then
/// from the partial list (after taking in the objects other threads handed over). Null if no
/// slab of the group heap has a free object.
///
/// # Safety
/// The caller owns `gh` (holds its heap's lock, on its thread).
pub(super) unsafe fn refill(
    gh: *mut GroupHeap,
    class: usize,
    size: usize,
    counted: bool,
    rel: &mut Released,
) -> *mut u8 {
    // SAFETY: per the caller.
    unsafe {
        if !(*gh).delayed.load(Ordering::Relaxed).is_null() {
            take_delayed(gh, rel);
        }
        let q = &raw mut (*gh).classes[class];
        loop {
            let s = (*q).active;
            if s != slab::empty() {
                if (*s).free.is_null() {
                    collect(gh, s);
                }
                if !(*s).free.is_null() {
                    return pop(gh, s, size, counted);
                }
                if !park_full(gh, s) {
                    continue;
                }
                (*q).active = slab::empty();
            }
            let s = (*q).partial;
            if s.is_null() {
                return null_mut();
            }
            slab::unlink(&raw mut (*q).partial, s);
            if (*s).used == 0 {
                (*gh).empties &= !(1 << class);
            }
            (*s).state = ACTIVE;
            (*q).active = s;
        }
    }
}

/// Parks an exhausted active slab on the full list, asking the next remote free to notify.
/// False if remote frees arrived meanwhile: collect them instead.
///
/// A notifier of the slab's previous stay on the full list may still hold `NOTIFYING` (its
/// object already handed over and freed): `FULL` is set only once it is done. Setting it
/// earlier would let a second notifier in while the first one still runs; the first one's
/// clear of `NOTIFYING` would then leave the second unprotected, and a retire or release
/// that waits for `NOTIFYING` could take the owner from under it (an object lost on a
/// retired group heap's delayed list, or a null owner read).
///
/// # Safety
/// The caller owns `gh` and `s`, its active slab.
pub(super) unsafe fn park_full(gh: *mut GroupHeap, s: *mut Slab) -> bool {
    // SAFETY: per the caller.
    unsafe {
        let r = &(*s).remote;
        let mut backoff = Backoff::new();
        let mut w = r.load(Ordering::Acquire);
        // Without `FULL` no new notifier can start: this wait ends with the current one.
        while w & NOTIFYING != 0 {
            backoff.wait();
            w = r.load(Ordering::Acquire);
        }
        if w & PTR_MASK != 0 {
            return false;
        }
        // In exact mode remote frees go through the owner's lock and see the state directly.
        if !EXACT.load(Ordering::Relaxed)
            && r.compare_exchange(w, w | FULL, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return false;
        }
        (*s).state = FULL_LIST;
        slab::push(&raw mut (*gh).full, s);
        true
    }
}

/// Takes `s`'s remote frees onto its free list and accounts for them.
///
/// # Safety
/// The caller owns `gh` and `s`.
pub(super) unsafe fn collect(gh: *mut GroupHeap, s: *mut Slab) {
    // SAFETY: per the caller; objects on the remote list were published by the freers'
    // release CAS, acquired here.
    unsafe {
        let r = &(*s).remote;
        let mut w = r.load(Ordering::Acquire);
        loop {
            if w & PTR_MASK == 0 {
                return;
            }
            match r.compare_exchange_weak(w, w & FLAGS, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => w = now,
            }
        }
        let mut node = slab::head(w);
        let mut n = 0;
        while !node.is_null() {
            let (next, size, counted) = slab::unlink_word(*(node as *const u64));
            *(node as *mut *mut u8) = (*s).free;
            (*s).free = node;
            (*gh).adj += (size + TAG_SIZE) as i64;
            (*gh).frees += counted as u64;
            n += 1;
            node = next;
        }
        (*s).used -= n;
    }
}

/// Frees the objects other threads handed over (see `notify`): locally, or as orphan frees
/// if their slab was orphaned since.
///
/// # Safety
/// The caller owns `gh`.
pub(super) unsafe fn take_delayed(gh: *mut GroupHeap, rel: &mut Released) {
    // SAFETY: per the caller; the list was published by the notifiers' release CAS.
    unsafe {
        let mut node = (*gh).delayed.swap(null_mut(), Ordering::Acquire);
        while !node.is_null() {
            let (next, size, counted) = slab::unlink_word(*(node as *const u64));
            let s = segment::slab_of(node);
            if (*s).remote.load(Ordering::Acquire) & ORPHAN != 0 {
                let done = orphan_free(s, size, counted);
                if !done.is_null() {
                    rel.push(done);
                }
            } else {
                push_local(gh, s, node, size, counted);
                let done = after_free(gh, s);
                if !done.is_null() {
                    rel.push(done);
                }
            }
            node = next;
        }
    }
}

/// This thread's group heap for `key`, made if needed; for a removed group, its nearest live
/// ancestor's. Null if no group heap can be made (out of memory).
///
/// # Safety
/// `th` is this thread's heap, locked.
pub(super) unsafe fn group_heap(th: *mut ThreadHeap, key: Key) -> *mut GroupHeap {
    // SAFETY: per the caller.
    unsafe {
        if (*th).cached_key == key {
            return (*th).cached;
        }
        let kernel = key_is_kernel(key);
        let mut c = counter(key);
        loop {
            while !c.is_online() {
                c = match c.parent() {
                    Some(p) => p,
                    // The root is never removed: an offline root is corruption.
                    None => platform::corrupted(b"arena: the root group is offline"),
                };
            }
            let k = self::key(c.id, kernel);
            let mut gh = (*th).table.find(k);
            if gh.is_null() {
                gh = new_group_heap(th, k);
                if gh.is_null() {
                    return null_mut();
                }
                // A `remove` that took the group offline before our insert may have looked at
                // this heap before it: then we see it offline here (its store came before its
                // lock of this heap, which came before ours).
                if !c.is_online() {
                    (*th).table.remove(k);
                    retire(gh);
                    continue;
                }
            }
            // A removed group's key is not cached: its id may be reused once it is freed.
            if k == key {
                (*th).cached_key = key;
                (*th).cached = gh;
            }
            return gh;
        }
    }
}

/// A fresh group heap for `key` in `th`'s table.
///
/// # Safety
/// `th` is locked by its owner.
pub(super) unsafe fn new_group_heap(th: *mut ThreadHeap, key: Key) -> *mut GroupHeap {
    let gh = GROUP_HEAPS.with(|pool| {
        let gh = pool.free;
        if !gh.is_null() {
            // SAFETY: pooled group heaps are only reached under this lock.
            pool.free = unsafe { (*gh).next_free };
            pool.live += 1;
            return gh;
        }
        let gh = pool.chunks.carve(core::mem::size_of::<GroupHeap>()) as *mut GroupHeap;
        if !gh.is_null() {
            pool.live += 1;
        }
        gh
    });
    if gh.is_null() {
        return gh;
    }
    // SAFETY: the group heap is ours (fresh zeroed memory or retired); per the caller for `th`.
    unsafe {
        (*gh).delayed.store(null_mut(), Ordering::Relaxed);
        (*gh).key = key;
        (*gh).heap.store(th, Ordering::Relaxed);
        (*gh).allocs = 0;
        (*gh).frees = 0;
        (*gh).adj = 0;
        (*gh).left = interval();
        (*gh).empties = 0;
        (*gh).full = null_mut();
        (*gh).next_free = null_mut();
        (*gh).classes = [Queue {
            active: slab::empty(),
            partial: null_mut(),
        }; CLASSES];
        if !(*th).table.insert(key, gh) {
            retire(gh);
            return null_mut();
        }
    }
    gh
}

/// Returns a group heap (emptied, out of every table) to the pool.
///
/// # Safety
/// The caller owns `gh`, which owns no slab.
pub(super) unsafe fn retire(gh: *mut GroupHeap) {
    // SAFETY: per the caller.
    unsafe {
        (*gh).gen = (*gh).gen.wrapping_add(1);
        (*gh).heap.store(null_mut(), Ordering::Relaxed);
    }
    GROUP_HEAPS.with(|pool| {
        // SAFETY: as above.
        unsafe { (*gh).next_free = pool.free };
        pool.free = gh;
        pool.live -= 1;
    });
}

/// Makes this thread's heap: a heap whose thread exited (adopted with its group heaps and
/// their slabs), or a new one. Null if the arena is unavailable or out of memory.
#[cold]
pub(super) fn create_heap() -> *mut ThreadHeap {
    if !ready() && !init() {
        return null_mut();
    }
    let th = REGISTRY.with(|chunks| {
        let mut h = HEAPS.load(Ordering::Acquire);
        // SAFETY: listed heaps are never unmapped; `live` tells whether one is taken, and is
        // only set under this lock.
        unsafe {
            while !h.is_null() && (*h).live.load(Ordering::Acquire) {
                h = (*h).next;
            }
            if h.is_null() {
                h = chunks.carve(core::mem::size_of::<ThreadHeap>()) as *mut ThreadHeap;
                if h.is_null() {
                    return h;
                }
                h.write(ThreadHeap {
                    busy: AtomicU32::new(0),
                    lock: Spin::new(),
                    cached_key: 0,
                    cached: null_mut(),
                    table: Table::new(),
                    live: AtomicBool::new(false),
                    next: HEAPS.load(Ordering::Relaxed),
                });
                HEAPS.store(h, Ordering::Release);
            }
            (*h).live.store(true, Ordering::Relaxed);
        }
        h
    });
    if th.is_null() {
        return th;
    }
    // SAFETY: `th` is ours now (`live`); under its lock its group heaps are too.
    unsafe { adopt(th) };
    HEAP.with(|h| h.set(th));
    // Both may allocate (glibc's key table, fork handler list): the heap is in place by now.
    platform::set_thread_exit_value(EXIT_KEY.load(Ordering::Relaxed), th.cast());
    if !FORK_HANDLERS.swap(true, Ordering::AcqRel) {
        join_the_group_table();
    }
    th
}

/// The thread-exit hook: abandons the exiting thread's heap (see `abandon`), slabs and all,
/// for the next new thread to adopt. Small allocations the thread makes after this (in later
/// destructors) go to the inner allocator.
///
/// # Safety
/// Called once per thread, by the platform's thread-exit mechanism on the exiting thread, with
/// `arg` the heap `create_heap` registered for that thread (non-null, live), after the thread's
/// last use of it through the fast paths.
pub(super) unsafe extern "C" fn thread_exit(arg: *mut core::ffi::c_void) {
    let th = arg as *mut ThreadHeap;
    let mut rel = Released::new();
    // SAFETY: `arg` is this thread's heap (set by `create_heap`); locked, it is ours.
    unsafe {
        (*th).lock.lock();
        abandon(th, &mut rel);
        HEAP.with(|h| h.set(DEAD_HEAP as *mut ThreadHeap));
        (*th).lock.unlock();
        rel.release_all();
        (*th).live.store(false, Ordering::Release);
    }
}

/// Leaves `th` for the next new thread (mimalloc's abandoned heaps): every group heap is swept
/// (objects handed over freed, remote frees collected, empty slabs spares included released,
/// counts harvested); one left with no slab is retired, the others keep their slabs, objects
/// and all, and are marked `ABANDONED`. Frees into their slabs from then on are done under the
/// heap's lock (`free_abandoned`), so a slab emptied by other threads still goes back to the
/// pool, and the next thread `create_heap` gives this heap to allocates from them again.
///
/// # Safety
/// The caller holds `th`'s lock, and `th`'s thread is exiting (or, in a forked child, gone):
/// no fast path runs on it any more.
pub(super) unsafe fn abandon(th: *mut ThreadHeap, rel: &mut Released) {
    // SAFETY: per the caller.
    unsafe {
        let t = &raw mut (*th).table;
        for i in 0..(*t).cap {
            let e = (*t).entries.add(i);
            if (*e).key == 0 || (*e).key == TOMB {
                continue;
            }
            let gh = (*e).value;
            sweep(gh, rel);
            if holds_nothing(gh) {
                detach(th, gh, rel);
            } else {
                (*gh)
                    .heap
                    .store(th.map_addr(|a| a | ABANDONED), Ordering::Relaxed);
            }
        }
        (*th).cached_key = 0;
        (*th).cached = null_mut();
    }
}

/// Takes over an abandoned heap for this thread: its group heaps, with their slabs, are its
/// own again (a heap fresh or left with no group heap has none to take).
///
/// # Safety
/// `th` was just given to this thread by `create_heap`, before it is set as `HEAP`.
pub(super) unsafe fn adopt(th: *mut ThreadHeap) {
    // SAFETY: per the caller; under the lock, racing `free_abandoned`, `flush` and `remove`
    // calls see the group heaps either all abandoned or all this thread's.
    unsafe {
        (*th).lock.lock();
        let t = &raw mut (*th).table;
        for i in 0..(*t).cap {
            let e = (*t).entries.add(i);
            if (*e).key != 0 && (*e).key != TOMB {
                (*(*e).value).heap.store(th, Ordering::Relaxed);
            }
        }
        (*th).lock.unlock();
    }
}

/// Whether `gh` owns no slab and has no object handed over.
///
/// # Safety
/// The caller owns `gh`.
pub(super) unsafe fn holds_nothing(gh: *mut GroupHeap) -> bool {
    // SAFETY: per the caller.
    unsafe {
        (*gh).full.is_null()
            && (*gh).delayed.load(Ordering::Acquire).is_null()
            && (*gh)
                .classes
                .iter()
                .all(|q| q.active == slab::empty() && q.partial.is_null())
    }
}

/// Completes the stop of `th`, locked by the caller and found holding `gh`, unless `th` is
/// abandoned: then it has no thread to wait for (its group heaps are all marked, and a thread
/// adopting it unmarks them under the lock before its first fast path).
///
/// # Safety
/// The caller holds `th`'s lock; `gh` is one of `th`'s group heaps.
pub(super) unsafe fn settle(th: *mut ThreadHeap, gh: *mut GroupHeap) {
    // SAFETY: per the caller.
    unsafe {
        if !abandoned((*gh).heap.load(Ordering::Relaxed)) {
            wait_out(th);
        }
    }
}

/// Retires a group heap: frees the objects handed over to it, releases its empty slabs,
/// orphans the others, adds its counts to its counter and returns it to the pool.
///
/// # Safety
/// The caller stopped `th`, which holds `gh`.
pub(super) unsafe fn detach(th: *mut ThreadHeap, gh: *mut GroupHeap, rel: &mut Released) {
    // SAFETY: per the caller.
    unsafe {
        take_delayed(gh, rel);
        for c in 0..CLASSES {
            let q = &raw mut (*gh).classes[c];
            let s = (*q).active;
            if s != slab::empty() {
                orphan_or_release(gh, s, rel);
            }
            (*q).active = slab::empty();
            let mut s = (*q).partial;
            (*q).partial = null_mut();
            while !s.is_null() {
                let next = (*s).next;
                orphan_or_release(gh, s, rel);
                s = next;
            }
        }
        let mut s = (*gh).full;
        (*gh).full = null_mut();
        while !s.is_null() {
            let next = (*s).next;
            orphan_or_release(gh, s, rel);
            s = next;
        }
        // Objects handed over by remote frees that raced with the loops above: their slabs
        // are orphans now.
        take_delayed(gh, rel);
        harvest(gh);
        (*th).table.remove((*gh).key);
        if (*th).cached == gh {
            (*th).cached_key = 0;
            (*th).cached = null_mut();
        }
        retire(gh);
    }
}

/// Takes `s` from its owner: released if empty, else an orphan.
///
/// The word that makes `s` an orphan (`ORPHAN`, or `DEAD` if empty) is the last thing written:
/// once it is public, `s` is no longer the owner's. Remote frees then count down on it, and the
/// one that frees its last object releases it to the pool, where another thread may take it at
/// once. So the owner's fields (`owner`, the links, `state`) are written before that word,
/// never after: a write after it could land on the slab in its next life (it did: a late
/// `owner = null` on a slab reused and parked full by another thread's group heap, whose next
/// notifier then read a null owner in `notify`). Nulling `owner` first is safe only once no
/// notifier can read it: `FULL` is cleared first (waiting out a notifier that holds
/// `NOTIFYING`), so none runs and none can start (only the owner sets `FULL` again).
///
/// # Safety
/// The caller owns `gh` (its heap stopped) and `s`, one of its slabs.
pub(super) unsafe fn orphan_or_release(gh: *mut GroupHeap, s: *mut Slab, rel: &mut Released) {
    // SAFETY: per the caller: until the publishing CAS below, `s`'s plain fields are ours.
    unsafe {
        let r = &(*s).remote;
        let mut backoff = Backoff::new();
        let mut w = r.load(Ordering::Acquire);
        loop {
            if w & NOTIFYING != 0 {
                // A remote free is handing an object to `gh`: let it finish.
                backoff.wait();
                w = r.load(Ordering::Acquire);
                continue;
            }
            if w & FULL == 0 {
                break;
            }
            match r.compare_exchange(w, w & !FULL, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => w = now,
            }
        }
        // Remote frees now only push to the remote list, and read `owner` only to look for an
        // abandoned heap (whose lock the caller holds).
        (*s).owner.store(null_mut(), Ordering::Release);
        (*s).prev = null_mut();
        (*s).next = null_mut();
        loop {
            collect(gh, s);
            let w = r.load(Ordering::Acquire);
            if w & PTR_MASK != 0 {
                continue;
            }
            debug_assert_eq!(w & FLAGS, 0, "no flag but the owner's may be set here");
            let empty = (*s).used == 0;
            (*s).state = if empty { LOOSE } else { ORPHANED };
            // `used` is final from here: published with the word.
            let new = if empty { DEAD } else { ORPHAN };
            if r.compare_exchange(w, new, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                pause(&ORPHAN_PAUSE_US);
                if empty {
                    // Dead, so ours alone: no object is left to free it.
                    rel.push(s);
                }
                return;
            }
        }
    }
}

/// Microseconds `orphan_or_release` pauses right after publishing an orphan, and `notify`
/// right after taking `NOTIFYING` (0: none), for the tests that widen those windows (see
/// `super::pause_after_orphaning`, `super::pause_in_notify`).
pub(super) static ORPHAN_PAUSE_US: AtomicU32 = AtomicU32::new(0);

pub(super) static NOTIFY_PAUSE_US: AtomicU32 = AtomicU32::new(0);

#[inline(always)]
pub(super) fn pause(us: &AtomicU32) {
    let us = us.load(Ordering::Relaxed);
    if us != 0 {
        // nanosleep(2); allocates nothing.
        std::thread::sleep(core::time::Duration::from_micros(us.into()));
    }
}

/// Sets the pause after each orphan's publication; returns the previous one.
pub(crate) fn pause_after_orphaning(us: u32) -> u32 {
    ORPHAN_PAUSE_US.swap(us, Ordering::Relaxed)
}

/// Sets the pause of each notifier holding `NOTIFYING`; returns the previous one.
pub(crate) fn pause_in_notify(us: u32) -> u32 {
    NOTIFY_PAUSE_US.swap(us, Ordering::Relaxed)
}

/// Collects remote frees and releases every empty slab of `gh`, spares and active ones
/// included, then harvests: after this (and a drain of the stocks), `gh`'s group's figures
/// are exact and it holds no slab without objects.
///
/// # Safety
/// The caller stopped `gh`'s heap.
pub(super) unsafe fn sweep(gh: *mut GroupHeap, rel: &mut Released) {
    // SAFETY: per the caller.
    unsafe {
        take_delayed(gh, rel);
        for c in 0..CLASSES {
            let q = &raw mut (*gh).classes[c];
            let s = (*q).active;
            if s != slab::empty() {
                collect(gh, s);
                if (*s).used == 0 {
                    (*q).active = slab::empty();
                    (*s).state = LOOSE;
                    rel.push(s);
                }
            }
            let mut s = (*q).partial;
            while !s.is_null() {
                let next = (*s).next;
                collect(gh, s);
                if (*s).used == 0 {
                    slab::unlink(&raw mut (*q).partial, s);
                    (*s).state = LOOSE;
                    rel.push(s);
                }
                s = next;
            }
        }
        (*gh).empties = 0;
        harvest(gh);
    }
}

/// Sweeps `gh`; an abandoned one left with no slab is retired.
///
/// # Safety
/// The caller stopped `th` (or holds it abandoned), which holds `gh`.
pub(super) unsafe fn sweep_or_retire(th: *mut ThreadHeap, gh: *mut GroupHeap, rel: &mut Released) {
    // SAFETY: per the caller.
    unsafe {
        sweep(gh, rel);
        if abandoned((*gh).heap.load(Ordering::Relaxed)) && holds_nothing(gh) {
            detach(th, gh, rel);
        }
    }
}

/// `Group::flush` for the arena: every group heap, on every thread, of `g` and (unless it is a
/// `leaf`, with no live child) the groups below it is swept (see `sweep`).
pub(crate) fn flush(g: &Counter, leaf: bool) {
    let own = [key(g.id, false), key(g.id, true)];
    each_heap(|th, rel| {
        // SAFETY: `each_heap` locked `th`; `settle` completes the stop before any change.
        unsafe {
            let t = &raw mut (*th).table;
            if leaf {
                let ghs = own.map(|k| (*t).find(k));
                let Some(&any) = ghs.iter().find(|gh| !gh.is_null()) else {
                    return;
                };
                settle(th, any);
                for gh in ghs.into_iter().filter(|gh| !gh.is_null()) {
                    sweep_or_retire(th, gh, rel);
                }
                return;
            }
            let under = |k: Key| counter(k).is_under(g);
            let any = (*t).first(under);
            if any.is_null() {
                return;
            }
            settle(th, any);
            for i in 0..(*t).cap {
                let e = (*t).entries.add(i);
                if (*e).key != 0 && (*e).key != TOMB && under((*e).key) {
                    sweep_or_retire(th, (*e).value, rel);
                }
            }
        }
    });
}

/// `Group::remove` for the arena: the removed group's group heaps, on every thread, are
/// retired. Called once the group is offline, so no new group heap can appear for it.
pub(crate) fn remove(id: u32) {
    let keys = [key(id, false), key(id, true)];
    each_heap(|th, rel| {
        // SAFETY: as in `flush`.
        unsafe {
            let ghs = keys.map(|k| (*th).table.find(k));
            let Some(&any) = ghs.iter().find(|gh| !gh.is_null()) else {
                return;
            };
            settle(th, any);
            for gh in ghs.into_iter().filter(|gh| !gh.is_null()) {
                detach(th, gh, rel);
            }
        }
    });
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

/// Runs `f` on every heap, live or abandoned, locked (the caller completes the stop with
/// `settle` before touching it), then releases what `f` unlinked.
pub(super) fn each_heap(mut f: impl FnMut(*mut ThreadHeap, &mut Released)) {
    if !ready() {
        return;
    }
    for th in listed_heaps() {
        let mut rel = Released::new();
        // SAFETY: listed heaps are never unmapped.
        unsafe {
            (*th).lock.lock();
            f(th, &mut rel);
            (*th).lock.unlock();
            rel.release_all();
        }
    }
}

/// Registers the arena with the layers below it: its caches for `flush()` and `remove()`, and
/// its part in `fork()` (heaps and locks held across it; parked slabs released after it, once
/// the group registry is free too).
pub(super) fn join_the_group_table() {
    static CACHES: group::Caches = group::Caches { flush, remove };
    static HEAPS: Participant = Participant {
        prepare: fork_prepare,
        parent: fork_release,
        child: fork_child,
    };
    static PARKED: Participant = Participant {
        prepare: || {},
        parent: drain_parked,
        child: drain_parked,
    };
    group::register_caches(&CACHES);
    fork::join(Rank::Arena, &HEAPS);
    fork::join(Rank::ArenaParked, &PARKED);
}

/// Holds every heap stopped and every arena lock across `fork()`, so the child inherits
/// consistent heaps (other threads' heaps simply have no thread there) and no lock held.
pub(super) fn fork_prepare() {
    REGISTRY.spin.lock();
    for th in listed_heaps() {
        // SAFETY: listed heaps are never unmapped; this thread holds no heap's lock.
        unsafe { stop(th) };
    }
    GROUP_HEAPS.spin.lock();
    segment::fork_locks(true);
    FORKING.with(|f| f.set(true));
}

/// In the child: the other threads' heaps have no thread here, so they are abandoned (left for
/// the child's new threads to adopt, their slabs included) before the locks go.
pub(super) fn fork_child() {
    let me = current();
    for th in listed_heaps() {
        // SAFETY: as below; every group heap in a table is the heap's, stopped.
        unsafe { each_group_heap(th, |gh| clear_notifying(gh)) };
    }
    for th in listed_heaps() {
        // SAFETY: `fork_prepare` stopped every listed heap, and in the child no thread but this
        // one runs: the heaps of the others are ours to change. Their slabs are not swept here
        // (releasing takes the pool locks, held until `fork_release`): `flush` sweeps them.
        unsafe {
            if th != me && (*th).live.load(Ordering::Relaxed) {
                let t = &raw mut (*th).table;
                for i in 0..(*t).cap {
                    let e = (*t).entries.add(i);
                    if (*e).key != 0 && (*e).key != TOMB {
                        (*(*e).value)
                            .heap
                            .store(th.map_addr(|a| a | ABANDONED), Ordering::Relaxed);
                    }
                }
                (*th).cached_key = 0;
                (*th).cached = null_mut();
                (*th).live.store(false, Ordering::Release);
            }
        }
    }
    fork_release();
}

/// Runs `f` on every group heap in `th`'s table.
///
/// # Safety
/// The caller stopped `th` (or holds it abandoned).
pub(super) unsafe fn each_group_heap(th: *mut ThreadHeap, mut f: impl FnMut(*mut GroupHeap)) {
    // SAFETY: per the caller, the table is ours to read.
    unsafe {
        let t = &raw mut (*th).table;
        for i in 0..(*t).cap {
            let e = (*t).entries.add(i);
            if (*e).key != 0 && (*e).key != TOMB {
                f((*e).value);
            }
        }
    }
}

/// In a forked child: clears `NOTIFYING` on every slab of `gh`. A parent thread that was
/// inside `notify` at the fork (between taking `NOTIFYING` and clearing it: it holds no lock,
/// so `fork_prepare` cannot wait for it) has no thread in the child, and every wait for the bit
/// (`park_full`, `release`, `orphan_or_release`) would hang the child. Its object is the
/// child's loss, as any free in flight on a thread the child does not have: still counted in
/// its slab's `used` (or, if it was handed over already, on `gh`'s delayed list, freed from
/// there).
///
/// A notifier's slab is still its owner's (nothing waiting for the bit could take it away), so
/// it is on one of `gh`'s lists: its active slabs, partial lists or full list. (One emptied
/// already and waiting in a parent thread's `release` is lost to the child with that thread.)
///
/// # Safety
/// In the child, with `gh`'s heap stopped by `fork_prepare`.
pub(super) unsafe fn clear_notifying(gh: *mut GroupHeap) {
    // SAFETY: per the caller, the lists are ours and consistent.
    unsafe {
        let clear = |mut s: *mut Slab, list: bool| {
            while !s.is_null() && s != slab::empty() {
                (*s).remote.fetch_and(!NOTIFYING, Ordering::Relaxed);
                s = if list { (*s).next } else { null_mut() };
            }
        };
        for q in &(*gh).classes {
            clear(q.active, false);
            clear(q.partial, true);
        }
        clear((*gh).full, true);
    }
}

pub(super) fn fork_release() {
    FORKING.with(|f| f.set(false));
    segment::fork_locks(false);
    GROUP_HEAPS.spin.unlock();
    for th in listed_heaps() {
        // SAFETY: `fork_prepare` stopped every listed heap.
        unsafe { resume(th) };
    }
    REGISTRY.spin.unlock();
}

/// Releases the slabs `release` parked during a `fork()` on this thread, once nothing of the
/// fork is held any more: the arena's locks and the group registry's (the last of the fork
/// table's handlers).
pub(super) fn drain_parked() {
    debug_assert!(!FORKING.with(Cell::get));
    let mut s = PARKED.with(|p| p.replace(null_mut()));
    while !s.is_null() {
        // SAFETY: parked slabs were given up to `release` (empty, unlinked, claimed), and only
        // this thread reaches the list.
        unsafe {
            let next = (*s).next;
            release(s);
            s = next;
        }
    }
}

/// Whether slab `s`'s owner is an abandoned heap, for diagnostics (a racy read).
///
/// # Safety
/// `s` is the metadata of a slab handed out by the segment code.
pub(crate) unsafe fn owner_abandoned(s: *const Slab) -> bool {
    // SAFETY: slab metadata and group heaps are never unmapped.
    unsafe {
        let gh = (*s).owner.load(Ordering::Acquire);
        !gh.is_null() && abandoned((*gh).heap.load(Ordering::Relaxed))
    }
}
