//! Freeing a slab object: the owner's fast path, and the remote paths of every other thread
//! (the remote list, the hand-over to an owner whose slab was parked full, frees into an
//! abandoned heap's slabs, frees on the owner's behalf in exact mode).

use core::cell::Cell;

use crate::core::stock::Key;
use crate::sync::{Backoff, Ordering};

use super::heap::{
    counter, current, enter, leave, release, resume, stop, usable, Released, EXACT, FORKING,
};
use super::owner::{
    after_free, collect, detach, holds_nothing, orphan_free, pause, push_local, NOTIFY_PAUSE_US,
};
use super::segment;
use super::slab::{self, FLAGS, FULL, NOTIFYING, ORPHAN};
use super::types::{abandoned, untagged, GroupHeap, Slab, FULL_LIST};

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
        rel.release_after(th, || (*th).lock.unlock());
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
            rel.release_after(th, || resume(th));
            if owned {
                return;
            }
        }
    }
}

/// A realloc that keeps the block in its slot: only the requested size changes.
pub(crate) fn resize(key: Key, old: usize, new: usize) {
    counter(key).adjust_overhead(old as isize - new as isize);
}
