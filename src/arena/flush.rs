//! `Group::flush` and `Group::remove` for the arena: every heap, live or abandoned, is locked
//! in turn and its group heaps of the group swept (empty slabs released, counts harvested) or
//! detached (slabs orphaned, group heap retired).

use crate::core::counter::Counter;
use crate::core::stock::{key, Key};
use crate::sync::Ordering;

use super::heap::{counter, each_heap, Released};
use super::owner::{detach, holds_nothing, sweep};
use super::types::{abandoned, GroupHeap, Locked, Mine, Stopped};

/// Completes the stop of `l`'s heap, found holding `any`, unless the heap is abandoned: then it
/// has no thread to wait for (its group heaps are all marked, and a thread adopting it unmarks
/// them under the lock before its first fast path).
///
/// # Safety
/// `any` is a group heap in `l`'s table.
unsafe fn settle<'l>(l: &'l Locked<'_>, any: *mut GroupHeap) -> Stopped<'l> {
    // SAFETY: per the caller, a group heap (never unmapped); its word changes only under
    // the lock we hold.
    if abandoned(unsafe { (*any).heap.load(Ordering::Relaxed) }) {
        // SAFETY: abandoned, as just read: no fast path runs on the heap.
        unsafe { l.assume_stopped() }
    } else {
        l.stop()
    }
}

/// Sweeps `gh`; an abandoned one left with no slab is retired.
fn sweep_or_retire(st: &Stopped<'_>, gh: Mine<'_>, rel: &mut Released) {
    sweep(gh, rel);
    if abandoned(gh.heap().load(Ordering::Relaxed)) && holds_nothing(gh) {
        detach(st, gh, rel);
    }
}

/// `Group::flush` for the arena: every group heap, on every thread, of `g` and (unless it is a
/// `leaf`, with no live child) the groups below it is swept (see `sweep`).
pub(crate) fn flush(g: &Counter, leaf: bool) {
    let own = [key(g.id, false), key(g.id, true)];
    each_heap(|l, rel| {
        let t = l.table();
        if leaf {
            let ghs = own.map(|k| t.find(k));
            let Some(&any) = ghs.iter().find(|gh| !gh.is_null()) else {
                return;
            };
            // SAFETY: `any` is in the table.
            let st = unsafe { settle(l, any) };
            for k in own {
                if let Some(gh) = st.find(k) {
                    sweep_or_retire(&st, gh, rel);
                }
            }
            return;
        }
        let under = |k: Key| counter(k).is_under(g);
        let any = t.first(under);
        if any.is_null() {
            return;
        }
        // SAFETY: `any` is in the table.
        let st = unsafe { settle(l, any) };
        st.each(|k, gh| {
            if under(k) {
                sweep_or_retire(&st, gh, rel);
            }
        });
    });
}

/// `Group::remove` for the arena: the removed group's group heaps, on every thread, are
/// retired. Called once the group is offline, so no new group heap can appear for it.
pub(crate) fn remove(id: u32) {
    let keys = [key(id, false), key(id, true)];
    each_heap(|l, rel| {
        let ghs = keys.map(|k| l.table().find(k));
        let Some(&any) = ghs.iter().find(|gh| !gh.is_null()) else {
            return;
        };
        // SAFETY: `any` is in the table.
        let st = unsafe { settle(l, any) };
        for k in keys {
            if let Some(gh) = st.find(k) {
                detach(&st, gh, rel);
            }
        }
    });
}
