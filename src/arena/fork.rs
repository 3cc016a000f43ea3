//! The arena's part in `fork()`: every heap stopped and every arena lock held across it, the
//! other threads' heaps abandoned in the child (and `NOTIFYING` bits their notifiers held
//! cleared), and slabs emptied during the fork released once nothing of it is held.

use core::cell::Cell;
use core::ptr::null_mut;

use crate::fork::{self, Participant, Rank};
use crate::group;
use crate::sync::Ordering;

use super::class::CLASSES;
use super::flush::{flush, remove};
use super::heap::{current, listed_heaps, release, resume, stop, FORKING, PARKED};
use super::records::{GROUP_HEAPS, THREAD_HEAPS};
use super::segment;
use super::slab::NOTIFYING;
use super::types::{Locked, Mine, ABANDONED};

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
    THREAD_HEAPS.raw_lock();
    for th in listed_heaps() {
        // SAFETY: listed heaps are never unmapped; this thread holds no heap's lock.
        unsafe { stop(th) };
    }
    GROUP_HEAPS.raw_lock();
    segment::fork_locks(true);
    FORKING.with(|f| f.set(true));
}

/// In the child: the other threads' heaps have no thread here, so they are abandoned (left for
/// the child's new threads to adopt, their slabs included) before the locks go.
pub(super) fn fork_child() {
    let me = current();
    for th in listed_heaps() {
        // SAFETY: `fork_prepare` locked every listed heap, `fork_release` unlocks them.
        let l = unsafe { Locked::new(th) };
        // SAFETY: `fork_prepare` stopped it, and in the child no thread but this one runs.
        let st = unsafe { l.assume_stopped() };
        // SAFETY: in the child.
        st.each(|_, gh| unsafe { clear_notifying(gh) });
        // A parent thread that was releasing slabs taken out of `th` has no thread here: its
        // slabs are lost to the child (still charged, as a stock slot's content in a thread's
        // hands at the fork is), and no flush may wait for it.
        // SAFETY: heaps are never unmapped.
        unsafe { (*th).releasing.store(0, Ordering::Relaxed) };
    }
    for th in listed_heaps() {
        // SAFETY: as above.
        let l = unsafe { Locked::new(th) };
        // SAFETY: as above: the heaps of the other threads are ours to change. Their slabs are
        // not swept here (releasing takes the pool locks, held until `fork_release`): `flush`
        // sweeps them.
        let st = unsafe { l.assume_stopped() };
        // SAFETY: heaps are never unmapped.
        if th != me && unsafe { (*th).live.load(Ordering::Relaxed) } {
            let marked = th.map_addr(|a| a | ABANDONED);
            st.each(|_, gh| gh.heap().store(marked, Ordering::Relaxed));
            st.uncache(None);
            // SAFETY: as above.
            unsafe { (*th).live.store(false, Ordering::Release) };
        }
        // `l` is dropped still locked: `fork_release` unlocks every heap.
    }
    fork_release();
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
/// In the child, where no notifier runs (clearing a live notifier's bit would let its group
/// heap be retired under it).
pub(super) unsafe fn clear_notifying(gh: Mine<'_>) {
    for c in 0..CLASSES {
        for h in gh.active_slab(c).into_iter().chain(gh.partial_slabs(c)) {
            h.remote().fetch_and(!NOTIFYING, Ordering::Relaxed);
        }
    }
    for h in gh.full_slabs() {
        h.remote().fetch_and(!NOTIFYING, Ordering::Relaxed);
    }
}

pub(super) fn fork_release() {
    FORKING.with(|f| f.set(false));
    segment::fork_locks(false);
    GROUP_HEAPS.raw_unlock();
    for th in listed_heaps() {
        // SAFETY: `fork_prepare` stopped every listed heap.
        unsafe { resume(th) };
    }
    THREAD_HEAPS.raw_unlock();
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
