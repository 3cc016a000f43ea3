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
    counter, current, enter, interval, leave, release, usable, Released, EXACT, FORKING,
};
use super::lifecycle::create_heap;
use super::owner::{collect, harvest, retire, take_delayed};
use super::records::GROUP_HEAPS;
use super::segment;
use super::slab::{self, FULL, NOTIFYING, PTR_MASK};
use super::trial::{on_trial, slab_after};
use super::types::{
    GroupHeap, Held, Mine, Queue, Slab, Slow, ThreadHeap, ACTIVE, FULL_LIST, LOOSE, PARTIAL,
};

/// Allocates an object of `class` for `key` from the cached group heap's active slab; null if
/// the slow path must serve. `counted`: a new allocation (false for a realloc's move).
#[inline(always)]
pub(crate) fn alloc_fast(key: Key, class: usize, size: usize, counted: bool) -> *mut u8 {
    let Some(o) = enter() else {
        return null_mut();
    };
    let mut p = null_mut();
    if let Some(gh) = o.cached(key) {
        let s = gh.active(class);
        // SAFETY: entered: `gh` and the slabs it owns are ours (other than their atomics)
        // until `leave`; its active slab is one of them (or `EMPTY`, whose list is empty).
        unsafe {
            if !(*s).free.is_null() {
                p = pop(gh.ptr(), s, size, counted);
            }
        }
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
/// slab (charged here), and allocates from it. A group heap that has not yet asked for
/// `slab_after(class)` blocks of the class takes no slab: the block goes the tag way,
/// `inner()` (and counts toward the slab), as when the arena cannot serve this thread or has
/// no memory. Null if a limit refused the slab's charge.
///
/// Not generic (`inner` is a trait object), so it is compiled, with what it inlines, once in
/// this crate.
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
    let mut rel = Released::new();
    // SAFETY: `th` is this thread's heap; under its lock, its group heaps and their slabs are
    // ours (no fast path runs: this thread is here; other threads take the lock first).
    let out = unsafe {
        loop {
            (*th).lock.lock();
            let gh = group_heap(th, key, class::SIZES[class] as usize);
            if gh.is_null() {
                rel.release_after(th, || (*th).lock.unlock());
                break Slow::Inner;
            }
            let p = refill(gh, class, size, counted, &mut rel);
            if !p.is_null() {
                rel.release_after(th, || (*th).lock.unlock());
                break Slow::Done(p);
            }
            // Not asked for enough of the class yet: the tag way, charged exactly.
            let asked = &raw mut (*gh).asked[class];
            if *asked < slab_after(class) {
                *asked += 1;
                rel.release_after(th, || (*th).lock.unlock());
                break Slow::Inner;
            }
            let (gkey, gen) = ((*gh).key, (*gh).gen);
            // Charging may reclaim (run shrinkers, which allocate and free): hold nothing.
            rel.release_after(th, || (*th).lock.unlock());
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
            (*th).lock.lock();
            if (*gh).gen != gen {
                // The group heap was retired meanwhile (its group removed): start over.
                rel.release_after(th, || (*th).lock.unlock());
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
            rel.release_after(th, || (*th).lock.unlock());
            break if p.is_null() {
                Slow::Inner
            } else {
                Slow::Done(p)
            };
        }
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
            harvest(Mine::assume(gh));
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
            take_delayed(Mine::assume(gh), rel);
        }
        let q = &raw mut (*gh).classes[class];
        loop {
            let s = (*q).active;
            if s != slab::empty() {
                if (*s).free.is_null() {
                    collect(Held::of(Mine::assume(gh), s));
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

/// This thread's group heap for `key`, made if needed, for a block of `bytes`; for a removed
/// group, its nearest live ancestor's. Null if the group is on trial here (`on_trial`: the
/// block goes the tag way) or no group heap can be made (out of memory).
///
/// # Safety
/// `th` is this thread's heap, locked.
pub(super) unsafe fn group_heap(th: *mut ThreadHeap, key: Key, bytes: usize) -> *mut GroupHeap {
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
                if on_trial(k, bytes) {
                    return null_mut();
                }
                gh = new_group_heap(th, k);
                if gh.is_null() {
                    return null_mut();
                }
                // A `remove` that took the group offline before our insert may have looked at
                // this heap before it: then we see it offline here (its store came before its
                // lock of this heap, which came before ours).
                if !c.is_online() {
                    (*th).table.remove(k);
                    retire(Mine::assume(gh));
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
        (*gh).asked = [0; CLASSES];
        if !(*th).table.insert(key, gh) {
            retire(Mine::assume(gh));
            return null_mut();
        }
    }
    gh
}
