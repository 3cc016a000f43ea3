//! Freeing a slab object: the owner's fast path, and the remote paths of every other thread
//! (the remote list, the hand-over to an owner whose slab was parked full, frees into an
//! abandoned heap's slabs, frees on the owner's behalf in exact mode).

use core::cell::Cell;

use crate::core::stock::Key;
use crate::sync::{Backoff, Ordering};

use super::heap::{
    counter, enter, leave, lock, pause, release, try_lock, Released, EXACT, FORKING,
};
use super::owner::{
    after_free, collect, detach, holds_nothing, orphan_free, push_local, NOTIFY_PAUSE_US,
};
use super::segment;
use super::slab::{self, FLAGS, FULL, NOTIFYING, ORPHAN};
use super::types::{abandoned, untagged, GroupHeap, Held, Slab, FULL_LIST};

/// Frees a slab object. `counted`: a free to count (false for a realloc's move).
///
/// # Safety
/// `p` is a live object of a slab, allocated for `size` bytes.
#[inline(always)]
pub(crate) unsafe fn free(p: *mut u8, size: usize, counted: bool) {
    // SAFETY: per the caller, `p` is in a slab.
    let s = unsafe { segment::slab_of(p) };
    if let Some(o) = enter() {
        // SAFETY: slab metadata and group heaps are never unmapped.
        let gh = unsafe { (*s).owner.load(Ordering::Relaxed) };
        // SAFETY: as above; a group heap whose `heap` word names our heap is ours, and `s`
        // whose owner it is is one of its slabs: both words change only under an owner of
        // this heap, and we are it.
        if !gh.is_null() && unsafe { (*gh).heap.load(Ordering::Relaxed) } == o.th() {
            // SAFETY: as just said, `gh` is ours, and `s` is one of its slabs.
            let h = unsafe { Held::of(o.mine(gh), s) };
            // SAFETY: `p` is a live object of `s` (per the caller).
            unsafe { push_local(h, p, size, counted) };
            if h.used() == 0 || h.state() == FULL_LIST || h.gh().left() == 0 {
                let r = after_free(h);
                leave(o);
                if !r.is_null() {
                    // SAFETY: `after_free` gave it up: empty, unlinked, claimed.
                    unsafe { release(r) };
                }
                return;
            }
            leave(o);
            return;
        }
        leave(o);
    }
    // SAFETY: forwarded.
    unsafe { free_remote(s, p, size, counted) };
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
    // SAFETY: group heaps are never unmapped.
    let raw = unsafe { (*gh).heap.load(Ordering::Relaxed) };
    if !abandoned(raw) {
        return false;
    }
    // SAFETY: the heap a group heap's word names; this thread holds no heap's lock.
    let Some(l) = (unsafe { try_lock(untagged(raw)) }) else {
        return false;
    };
    // SAFETY: group heaps and slab metadata are never unmapped.
    let still = unsafe {
        (*gh).heap.load(Ordering::Relaxed) == raw
            && (*s).owner.load(Ordering::Relaxed) == gh
            && (*s).remote.load(Ordering::Acquire) & ORPHAN == 0
    };
    if !still {
        l.unlock();
        return false;
    }
    let mut rel = Released::new();
    {
        // SAFETY: locked, with the group heap still marked abandoned: the heap has no thread
        // (adoption unmarks under this lock, before the adopter's first fast path).
        let st = unsafe { l.assume_stopped() };
        // SAFETY: `gh`'s word names the heap stopped, and `s`'s owner is `gh` (both checked
        // under the lock).
        let h = unsafe { Held::of(st.mine(gh), s) };
        let gh = h.gh();
        // SAFETY: `p` is a live object of `s` (per the caller).
        unsafe { push_local(h, p, size, counted) };
        collect(h);
        let done = after_free(h);
        if !done.is_null() {
            // SAFETY: `after_free` gave it up.
            unsafe { rel.push(done) };
            if holds_nothing(gh) {
                detach(&st, gh, &mut rel);
            }
        }
    }
    rel.release_after_unlock(l);
    true
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
    let mut backoff = Backoff::new();
    loop {
        // SAFETY: slab metadata and group heaps are never unmapped; ownership is re-checked
        // below with the owner's heap stopped, when it cannot change.
        let (gh, raw) = unsafe {
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
            (gh, raw)
        };
        // SAFETY: the heap a group heap's word names; this thread holds no heap's lock.
        let l = unsafe { lock(untagged(raw)) };
        let st = l.stop();
        // SAFETY: as above.
        let owned = unsafe {
            (*s).owner.load(Ordering::Relaxed) == gh
                && (*gh).heap.load(Ordering::Relaxed) == raw
                && (*s).remote.load(Ordering::Acquire) & ORPHAN == 0
        };
        let mut rel = Released::new();
        if owned {
            // SAFETY: `gh`'s word names the heap stopped, and `s`'s owner is `gh` (both checked
            // with it stopped).
            let h = unsafe { Held::of(st.mine(gh), s) };
            let gh = h.gh();
            // SAFETY: `p` is a live object of `s` (per the caller).
            unsafe { push_local(h, p, size, counted) };
            let done = after_free(h);
            if !done.is_null() {
                // SAFETY: `after_free` gave it up.
                unsafe { rel.push(done) };
                if abandoned(raw) && holds_nothing(gh) {
                    detach(&st, gh, &mut rel);
                }
            }
        }
        rel.release_after_unlock(l);
        if owned {
            return;
        }
    }
}

/// A realloc that keeps the block in its slot: only the requested size changes.
pub(crate) fn resize(key: Key, old: usize, new: usize) {
    counter(key).adjust_overhead(old as isize - new as isize);
}
