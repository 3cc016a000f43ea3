//! Allocating a slab object: the fast path (the cached group heap's active slab), and the slow
//! path, which finds or makes the thread's group heap, refills the active slab (remote frees,
//! the partial list, a fresh slab charged to the group) and parks exhausted slabs as full.
//! A group's first small blocks on a thread are served the tag way (`Slow::Inner`): while it
//! is on trial there (`on_trial`: no group heap yet), then, per class, until its group heap has
//! asked for `slab_after` of them (see `class`).

use core::alloc::Layout;
use core::cell::Cell;
use core::ptr::null_mut;

use crate::core::stock::{key, key_is_kernel, Key};
use crate::group::CORE;
use crate::sync::{Backoff, Ordering};
use crate::thread::Thread;
use crate::{platform, TAG_SIZE};

use super::class::{self, CLASSES};
use super::heap::{
    counter, current, enter, interval, leave, lock, release, usable, Released, EXACT, FORKING,
};
use super::lifecycle::create_heap;
use super::owner::{collect, harvest, retire, take_delayed};
use super::records::GROUP_HEAPS;
use super::segment;
use super::slab::{self, FULL, NOTIFYING, PTR_MASK};
use super::trial::{on_trial, slab_after, stays_on_trial};
use super::types::{
    GroupHeap, Held, Mine, Queue, Slab, Slow, Stopped, ACTIVE, FULL_LIST, LOOSE, PARTIAL,
};

/// Allocates an object of `class` for `key` from the cached group heap's active slab; null if
/// the slow path must serve. `counted`: a new allocation (false for a realloc's move).
#[inline(always)]
pub(crate) fn alloc_fast(key: Key, class: usize, size: usize, counted: bool) -> *mut u8 {
    let Some(o) = enter() else {
        return null_mut();
    };
    let mut p = null_mut();
    if let Some(h) = o.cached(key).and_then(|gh| gh.ready_slab(class)) {
        // SAFETY: `ready_slab` gives a slab whose free list is not empty.
        p = unsafe { pop(h, size, counted) };
    }
    leave(o);
    p
}

/// A fresh slab of `class` for `key`, whose charge (`class::slab_bytes(class)`) the caller
/// made: its free list holds every object. Null if there is no memory, the charge given back.
pub(super) fn new_slab(key: Key, class: usize) -> *mut Slab {
    let bytes = class::slab_bytes(class);
    let s = segment::take(class::kind(class));
    if s.is_null() {
        CORE.uncharge(&Thread, key, bytes, 0);
        return s;
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
    s
}

/// What a slow path is asked for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ask {
    /// A new block (`GlobalAlloc::alloc`).
    New,
    /// A new block, zeroed (`GlobalAlloc::alloc_zeroed`).
    Zeroed,
    /// A new home for a block a realloc moves: not counted as an allocation (and, the tag
    /// way, still owned by `key`: `TagAlloc::alloc_for`).
    Moved,
}

/// The slow path of a small allocation of `layout` (served by `class`) for `key`: finds or
/// makes this thread's group heap for it (its nearest live ancestor's, if its group was
/// removed), refills the class's active slab from remote frees, the partial list or a fresh
/// slab (charged here), and allocates from it. A group on trial here that stays on trial
/// after this block (`stays_on_trial`) goes the tag way first thing, `inner()`, counted as
/// `group_heap` would count it, without this heap's lock and key table (`stays_on_trial`
/// says why they would find no group heap). A group heap that has not yet asked for
/// `slab_after(class)` blocks of the class takes no slab: the block goes the tag way,
/// `inner()` (and counts toward the slab), as when the arena cannot serve this thread or has
/// no memory. Null if a limit refused the slab's charge.
///
/// Not generic (`inner` is a trait object), so it is compiled, with what it inlines, once in
/// this crate. (Splitting off the locked part as its own function, to spare the trial's
/// shortcut this frame, cost more than it saved: 40 instructions more per pair for groups
/// taking turns with `MEMGROUP_ARENA_SLAB_AFTER=0`, 9 fewer on trial.)
#[cold]
#[inline(never)]
pub(crate) fn alloc_slow(
    layout: Layout,
    class: usize,
    key: Key,
    ask: Ask,
    inner: &dyn Fn() -> *mut u8,
) -> *mut u8 {
    let (size, counted) = (layout.size(), ask != Ask::Moved);
    let mut th = current();
    if th.is_null() {
        th = create_heap();
    }
    if !usable(th) || FORKING.with(Cell::get) {
        return inner();
    }
    // On trial, and still after this block: the tag way, no lock, no key table.
    if stays_on_trial(key, class::SIZES[class] as usize, || {
        counter(key).is_online()
    }) {
        return inner();
    }
    let mut rel = Released::new();
    let out = loop {
        // SAFETY: `th` is this thread's heap (`HEAP`, or made just now), and this thread holds
        // no heap's lock (it is in an allocation, which takes none across calls).
        let l = unsafe { lock(th) };
        // SAFETY: the heap is this thread's own, and this thread is here: no fast path runs
        // on it while it is locked (other threads take the lock first).
        let st = unsafe { l.assume_stopped() };
        let Some(gh) = group_heap(&st, key, class::SIZES[class] as usize) else {
            rel.release_after_unlock(l);
            break Slow::Inner;
        };
        let p = refill(gh, class, size, counted, &mut rel);
        if !p.is_null() {
            rel.release_after_unlock(l);
            break Slow::Done(p);
        }
        // Not asked for enough of the class yet: the tag way, charged exactly.
        let asked = gh.asked(class);
        if asked < slab_after(class) {
            gh.set_asked(class, asked + 1);
            rel.release_after_unlock(l);
            break Slow::Inner;
        }
        let (gkey, gen, ghp) = (gh.key(), gh.gen(), gh.ptr());
        // Charging may reclaim (run shrinkers, which allocate and free): hold nothing.
        rel.release_after_unlock(l);
        // The slab's charge: the one call from here to the stocks and the counters.
        if CORE
            .charge(&Thread, gkey, class::slab_bytes(class), 0)
            .is_none()
        {
            break Slow::Refused;
        }
        let s = new_slab(gkey, class);
        if s.is_null() {
            break Slow::Inner;
        }
        // SAFETY: as above.
        let l = unsafe { lock(th) };
        // SAFETY: as above.
        let st = unsafe { l.assume_stopped() };
        // SAFETY: group heaps are never unmapped. `gen` is bumped when the group heap is
        // retired, under the lock of the heap it was in (ours, held); once retired it may be
        // another heap's, whose owner bumps it again only when retiring it: either way it
        // differs from the `gen` read above (an atomic: that other owner may be writing it).
        if unsafe { (*ghp).gen.load(Ordering::Relaxed) } != gen {
            // The group heap was retired meanwhile (its group removed): start over.
            rel.release_after_unlock(l);
            // SAFETY: `s` is fresh from `new_slab`: ours alone, empty, on no list.
            unsafe { release(s) };
            continue;
        }
        // SAFETY: not retired since (same `gen`), so still in this heap: its `heap` word
        // names it.
        let gh = unsafe { st.mine(ghp) };
        // SAFETY: `s` is fresh from `new_slab`, ours alone until it is `gh`'s, here.
        unsafe { (*s).owner.store(ghp, Ordering::Release) };
        // SAFETY: `s`'s owner is `gh` (just stored), and it is not `EMPTY`.
        let h = unsafe { Held::of(gh, s) };
        if gh.active(class) == slab::empty() {
            h.set_state(ACTIVE);
            gh.set_active(class, s);
        } else {
            h.set_state(PARTIAL);
            // SAFETY: `s` is on no list (fresh); the partial list is `gh`'s, which we own.
            unsafe { slab::push(gh.partial_list(class), s) };
        }
        let p = refill(gh, class, size, counted, &mut rel);
        rel.release_after_unlock(l);
        break if p.is_null() {
            Slow::Inner
        } else {
            Slow::Done(p)
        };
    };
    match out {
        Slow::Done(p) => {
            if ask == Ask::Zeroed {
                // SAFETY: `p` is a fresh object of at least `size` bytes.
                unsafe { core::ptr::write_bytes(p, 0, size) };
            }
            p
        }
        Slow::Refused => null_mut(),
        Slow::Inner => inner(),
    }
}

/// Takes the first free object of slab `h` for a block of `size` bytes, and counts it in its
/// group heap (an allocation if `counted`, its overhead correction, and a harvest every 256
/// operations).
///
/// # Safety
/// `h`'s free list is not empty.
#[inline(always)]
pub(super) unsafe fn pop(h: Held<'_>, size: usize, counted: bool) -> *mut u8 {
    let p = h.free();
    // SAFETY: per the caller `p` is a free object of the slab (the owner's free list holds
    // nothing else), whose first word links the next one.
    h.set_free(unsafe { *(p as *const *mut u8) });
    h.set_used(h.used() + 1);
    let gh = h.gh();
    gh.set_allocs(gh.allocs() + counted as u64);
    gh.set_adj(gh.adj() - (size + TAG_SIZE) as i64);
    let left = gh.left() - 1;
    gh.set_left(left);
    if left == 0 {
        harvest(gh);
    }
    p
}

/// Allocates from the class's active slab, refilling it first: from its remote frees, then
/// from the partial list (after taking in the objects other threads handed over). Null if no
/// slab of the group heap has a free object.
pub(super) fn refill(
    gh: Mine<'_>,
    class: usize,
    size: usize,
    counted: bool,
    rel: &mut Released,
) -> *mut u8 {
    if !gh.delayed().load(Ordering::Relaxed).is_null() {
        take_delayed(gh, rel);
    }
    loop {
        if let Some(h) = gh.active_slab(class) {
            if h.free().is_null() {
                collect(h);
            }
            if !h.free().is_null() {
                // SAFETY: its free list is not empty (just checked).
                return unsafe { pop(h, size, counted) };
            }
            // SAFETY: `h` is the class's active slab.
            if !unsafe { park_full(h) } {
                continue;
            }
            gh.set_active(class, slab::empty());
        }
        let Some(h) = gh.partial_slabs(class).next() else {
            return null_mut();
        };
        // SAFETY: `h` heads the class's partial list, `gh`'s.
        unsafe { slab::unlink(gh.partial_list(class), h.ptr()) };
        if h.used() == 0 {
            gh.set_empties(gh.empties() & !(1 << class));
        }
        h.set_state(ACTIVE);
        gh.set_active(class, h.ptr());
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
/// `h` is its group heap's active slab of its class (so on no list).
pub(super) unsafe fn park_full(h: Held<'_>) -> bool {
    let r = h.remote();
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
    h.set_state(FULL_LIST);
    // SAFETY: per the caller `h` is on no list; the full list is its group heap's, ours.
    unsafe { slab::push(h.gh().full_list(), h.ptr()) };
    true
}

/// This thread's group heap for `key`, made if needed, for a block of `bytes`; for a removed
/// group, its nearest live ancestor's. `None` if the group is on trial here (`on_trial`: the
/// block goes the tag way) or no group heap can be made (out of memory).
pub(super) fn group_heap<'s>(st: &'s Stopped<'_>, key: Key, bytes: usize) -> Option<Mine<'s>> {
    if let Some(gh) = st.cached(key) {
        return Some(gh);
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
        let gh = match st.find(k) {
            Some(gh) => gh,
            None => {
                if on_trial(k, bytes) {
                    return None;
                }
                let gh = new_group_heap(st, k)?;
                // A `remove` that took the group offline before our insert may have looked at
                // this heap before it: then we see it offline here (its store came before its
                // lock of this heap, which came before ours).
                if !c.is_online() {
                    st.table().remove(k);
                    // SAFETY: made just now: it owns no slab, and it is out of the table
                    // (removed above) and not cached.
                    unsafe { retire(gh) };
                    continue;
                }
                gh
            }
        };
        // A removed group's key is not cached: its id may be reused once it is freed.
        if k == key {
            st.cache(key, gh);
        }
        return Some(gh);
    }
}

/// A fresh group heap for `key` in `st`'s table. `None` if there is no memory for it (or its
/// table cannot grow).
pub(super) fn new_group_heap<'s>(st: &'s Stopped<'_>, key: Key) -> Option<Mine<'s>> {
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
        return None;
    }
    // SAFETY: the group heap is ours alone (fresh zeroed memory, or retired: in no heap and
    // out of the pool now) until its `heap` word names `st`'s heap, below.
    unsafe {
        (*gh).delayed.store(null_mut(), Ordering::Relaxed);
        (*gh).key = key;
        (*gh).heap.store(st.th(), Ordering::Relaxed);
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
        (*gh).asked = [0; CLASSES];
    }
    // SAFETY: its `heap` word names `st`'s heap (stored above, under the lock).
    let gh = unsafe { st.mine(gh) };
    if !st.table().insert(key, gh.ptr()) {
        // SAFETY: made just now: it owns no slab, is in no table (the insert failed) and not
        // cached.
        unsafe { retire(gh) };
        return None;
    }
    Some(gh)
}
