//! What the owner of a group heap does to it and its slabs, wherever it runs (its fast path,
//! its slow path, or a thread that stopped its heap): frees into its own slabs, collecting
//! remote frees and handed-over objects, counting (harvest), sweeping empty slabs, and taking a
//! group heap apart (`detach`: its slabs released or orphaned, the group heap retired). Also the
//! free into an orphan, which takes the missing owner's place.

use core::ptr::null_mut;

use crate::sync::{AtomicU32, Backoff, Ordering};
use crate::{platform, TAG_SIZE};

use super::class::CLASSES;
use super::heap::{counter, interval, pause, Released, EXACT, RELEASE_PAUSE_US, TAG};
use super::records::GROUP_HEAPS;
use super::segment;
use super::slab::{self, COUNT_ONE, DEAD, FLAGS, FULL, NOTIFYING, ORPHAN, PTR_MASK};
use super::types::{
    abandoned, untagged, Held, Mine, Slab, Stopped, FULL_LIST, LOOSE, ORPHANED, PARTIAL,
};

/// The owner's free: `p` goes on `h`'s free list.
///
/// # Safety
/// `p` is a live object of `h`.
#[inline(always)]
pub(super) unsafe fn push_local(h: Held<'_>, p: *mut u8, size: usize, counted: bool) {
    // SAFETY: per the caller, `p` is an object of `h`, free to hold the link.
    unsafe { *(p as *mut *mut u8) = h.free() };
    h.set_free(p);
    h.set_used(h.used() - 1);
    let gh = h.gh();
    gh.set_frees(gh.frees() + counted as u64);
    gh.set_adj(gh.adj() + (size + TAG_SIZE) as i64);
    gh.set_left(gh.left() - 1);
}

/// After an owner's free that emptied `h`, freed into a full slab, or is due a harvest.
/// Returns the slab if it must be released (unlinked already), else null.
#[cold]
pub(super) fn after_free(h: Held<'_>) -> *mut Slab {
    let (gh, s) = (h.gh(), h.ptr());
    if gh.left() == 0 {
        harvest(gh);
    }
    let c = h.class() as usize;
    if h.state() == FULL_LIST {
        h.remote().fetch_and(!FULL, Ordering::AcqRel);
        // SAFETY: the state says which of `gh`'s lists `s` is on.
        unsafe {
            slab::unlink(gh.full_list(), s);
            slab::push(gh.partial_list(c), s);
        }
        h.set_state(PARTIAL);
    }
    if h.used() != 0 {
        return null_mut();
    }
    // An abandoned heap keeps no spare: no thread would use it.
    if EXACT.load(Ordering::Relaxed) || abandoned(gh.heap().load(Ordering::Relaxed)) {
        if gh.active(c) == s {
            gh.set_active(c, slab::empty());
        } else {
            // SAFETY: not active, it is on the partial list (it has free objects).
            unsafe { slab::unlink(gh.partial_list(c), s) };
        }
        h.set_state(LOOSE);
        return s;
    }
    if h.state() == PARTIAL {
        if gh.empties() & 1 << c != 0 {
            // SAFETY: as the state says.
            unsafe { slab::unlink(gh.partial_list(c), s) };
            h.set_state(LOOSE);
            return s;
        }
        gh.set_empties(gh.empties() | 1 << c);
    }
    null_mut()
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

/// The counts and overhead change of `gh` go to its counter.
///
/// `Stat::overhead` is `TAG_SIZE * (allocs - frees) + adj`, the tag design's figure plus a
/// correction: a slab charged adds its bytes, an object allocated from it subtracts its
/// requested size and the `TAG_SIZE` the formula counts for it, and both go back when freed.
/// So the overhead is the charged bytes that hold no requested byte: slab ends, class rounding,
/// free objects and spare slabs.
pub(super) fn harvest(gh: Mine<'_>) {
    let c = counter(gh.key());
    c.count(gh.allocs(), gh.frees());
    c.adjust_overhead(gh.adj() as isize);
    gh.set_allocs(0);
    gh.set_frees(0);
    gh.set_adj(0);
    gh.set_left(interval());
}

/// Takes `h`'s remote frees onto its free list and accounts for them.
pub(super) fn collect(h: Held<'_>) {
    let r = h.remote();
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
    let gh = h.gh();
    let mut node = slab::head(w);
    let mut n = 0;
    while !node.is_null() {
        // SAFETY: the objects on the remote list were published by the freers' release CAS,
        // acquired above: they are ours, each holding its link word.
        let (next, size, counted) = unsafe { slab::unlink_word(*(node as *const u64)) };
        // SAFETY: as above: the object is ours to relink.
        unsafe { *(node as *mut *mut u8) = h.free() };
        h.set_free(node);
        gh.set_adj(gh.adj() + (size + TAG_SIZE) as i64);
        gh.set_frees(gh.frees() + counted as u64);
        n += 1;
        node = next;
    }
    h.set_used(h.used() - n);
}

/// Frees the objects other threads handed over (see `notify`): locally, or as orphan frees
/// if their slab was orphaned since.
pub(super) fn take_delayed(gh: Mine<'_>, rel: &mut Released) {
    let mut node = gh.delayed().swap(null_mut(), Ordering::Acquire);
    while !node.is_null() {
        // SAFETY: the list was published by the notifiers' release CAS, acquired above. Each
        // object on it is live, of a slab that was `gh`'s when it was handed over (`notify`
        // holds `NOTIFYING` until it is published, so the slab could not leave `gh` before);
        // a slab that left `gh` since is an orphan (it still holds this object, so it was not
        // released; `detach` takes the list in again after orphaning), and one without
        // `ORPHAN` is still `gh`'s.
        unsafe {
            let (next, size, counted) = slab::unlink_word(*(node as *const u64));
            let s = segment::slab_of(node);
            if (*s).remote.load(Ordering::Acquire) & ORPHAN != 0 {
                let done = orphan_free(s, size, counted);
                if !done.is_null() {
                    rel.push(done);
                }
            } else {
                let h = Held::of(gh, s);
                push_local(h, node, size, counted);
                let done = after_free(h);
                if !done.is_null() {
                    rel.push(done);
                }
            }
            node = next;
        }
    }
}

/// Returns a group heap (emptied, out of every table) to the pool.
///
/// # Safety
/// `gh` owns no slab and is in no table nor cache; the caller does not use it afterwards.
pub(super) unsafe fn retire(gh: Mine<'_>) {
    gh.bump_gen();
    gh.heap().store(null_mut(), Ordering::Relaxed);
    GROUP_HEAPS.with(|pool| {
        gh.set_next_free(pool.free);
        pool.free = gh.ptr();
        pool.live -= 1;
    });
}

/// Whether `gh` owns no slab and has no object handed over.
pub(super) fn holds_nothing(gh: Mine<'_>) -> bool {
    gh.full().is_null()
        && gh.delayed().load(Ordering::Acquire).is_null()
        && (0..CLASSES).all(|c| gh.active(c) == slab::empty() && gh.partial(c).is_null())
}

/// Retires a group heap of the stopped heap `st`: frees the objects handed over to it,
/// releases its empty slabs, orphans the others, adds its counts to its counter, takes it out
/// of the table and the cache and returns it to the pool.
pub(super) fn detach(st: &Stopped<'_>, gh: Mine<'_>, rel: &mut Released) {
    if untagged(gh.heap().load(Ordering::Relaxed)) != st.th() {
        // Every caller has `gh` from `st` (its table, or a slab it checked under the lock).
        platform::corrupted(b"arena: detach of another heap's group heap");
    }
    take_delayed(gh, rel);
    for c in 0..CLASSES {
        let active = gh.active_slab(c);
        let partial = gh.partial_slabs(c);
        gh.set_active(c, slab::empty());
        gh.set_partial(c, null_mut());
        for h in active.into_iter().chain(partial) {
            // SAFETY: the class's lists are emptied above; each slab's link was read before.
            unsafe { orphan_or_release(h, rel) };
        }
    }
    let full = gh.full_slabs();
    gh.set_full(null_mut());
    for h in full {
        // SAFETY: as for the classes.
        unsafe { orphan_or_release(h, rel) };
    }
    // Objects handed over by remote frees that raced with the loops above: their slabs
    // are orphans now.
    take_delayed(gh, rel);
    harvest(gh);
    st.table().remove(gh.key());
    st.uncache(Some(gh));
    // SAFETY: every slab of `gh` was released or orphaned above, and it is out of the table
    // and the cache; callers drop `gh` here.
    unsafe { retire(gh) };
}

/// Takes slab `s` (`h`) from its owner: released if empty, else an orphan.
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
/// `h` is on none of its group heap's lists any more (its links are rewritten here), and the
/// caller does not use `h` afterwards (the slab is no longer the owner's).
pub(super) unsafe fn orphan_or_release(h: Held<'_>, rel: &mut Released) {
    let r = h.remote();
    let mut backoff = Backoff::new();
    let mut w = r.load(Ordering::Acquire);
    loop {
        if w & NOTIFYING != 0 {
            // A remote free is handing an object to the group heap: let it finish.
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
    // abandoned heap (whose lock the caller holds). Until the publishing CAS below, the
    // slab's plain fields are still the owner's (`h`).
    h.owner().store(null_mut(), Ordering::Release);
    h.clear_links();
    loop {
        collect(h);
        let w = r.load(Ordering::Acquire);
        if w & PTR_MASK != 0 {
            continue;
        }
        debug_assert_eq!(w & FLAGS, 0, "no flag but the owner's may be set here");
        let empty = h.used() == 0;
        h.set_state(if empty { LOOSE } else { ORPHANED });
        // `used` is final from here: published with the word.
        let new = if empty { DEAD } else { ORPHAN };
        if r.compare_exchange(w, new, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            pause(&ORPHAN_PAUSE_US);
            if empty {
                // SAFETY: dead, so ours alone (no object is left to free it): empty,
                // unlinked, claimed.
                unsafe { rel.push(h.ptr()) };
            }
            return;
        }
    }
}

/// Microseconds `orphan_or_release` pauses right after publishing an orphan, and `notify`
/// right after taking `NOTIFYING` (0: none), for the tests that widen those windows (see
/// `super::pause_after_orphaning`, `super::pause_in_notify`).
pub(super) static ORPHAN_PAUSE_US: AtomicU32 = AtomicU32::new(0);

pub(super) static NOTIFY_PAUSE_US: AtomicU32 = AtomicU32::new(0);

/// Sets the pause after each orphan's publication; returns the previous one.
pub(crate) fn pause_after_orphaning(us: u32) -> u32 {
    ORPHAN_PAUSE_US.swap(us, Ordering::Relaxed)
}

/// Sets the pause of each notifier holding `NOTIFYING`; returns the previous one.
pub(crate) fn pause_in_notify(us: u32) -> u32 {
    NOTIFY_PAUSE_US.swap(us, Ordering::Relaxed)
}

/// Sets the pause before each release of slabs after their heap's unlock; returns the
/// previous one.
pub(crate) fn pause_before_release(us: u32) -> u32 {
    RELEASE_PAUSE_US.swap(us, Ordering::Relaxed)
}

/// Collects remote frees and releases every empty slab of `gh`, spares and active ones
/// included, then harvests: after this (and a drain of the stocks), `gh`'s group's figures
/// are exact and it holds no slab without objects.
pub(super) fn sweep(gh: Mine<'_>, rel: &mut Released) {
    take_delayed(gh, rel);
    for c in 0..CLASSES {
        if let Some(h) = gh.active_slab(c) {
            collect(h);
            if h.used() == 0 {
                gh.set_active(c, slab::empty());
                h.set_state(LOOSE);
                // SAFETY: empty, no longer active: given up.
                unsafe { rel.push(h.ptr()) };
            }
        }
        for h in gh.partial_slabs(c) {
            collect(h);
            if h.used() == 0 {
                // SAFETY: on the partial list, its link already read by the walk.
                unsafe { slab::unlink(gh.partial_list(c), h.ptr()) };
                h.set_state(LOOSE);
                // SAFETY: unlinked, empty, `LOOSE`: given up.
                unsafe { rel.push(h.ptr()) };
            }
        }
    }
    gh.set_empties(0);
    harvest(gh);
}
