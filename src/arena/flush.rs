//! `Group::flush` and `Group::remove` for the arena: every heap, live or abandoned, is locked
//! in turn and its group heaps of the group swept (empty slabs released, counts harvested) or
//! detached (slabs orphaned, group heap retired).

use crate::core::counter::Counter;
use crate::core::stock::{key, Key};
use crate::sync::Ordering;

use super::heap::{counter, each_heap, wait_out, Released};
use super::owner::{detach, holds_nothing, sweep};
use super::table::TOMB;
use super::types::{abandoned, GroupHeap, ThreadHeap};

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
