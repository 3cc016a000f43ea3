//! `Group::flush` and `Group::remove` for the arena: every heap, live or abandoned, is locked
//! in turn and its group heaps of the group swept (empty slabs released, counts harvested) or
//! detached (slabs orphaned, group heap retired).

use crate::core::counter::Counter;
use crate::core::stock::{key, Key};
use crate::sync::Ordering;

use super::heap::{counter, each_heap, Released};
use super::owner::{detach, holds_nothing, sweep};
use super::types::{abandoned, Locked, Mine, Stopped};

/// Completes the stop of `l`'s heap if it holds a group heap for one of `keys` (`None` if it
/// holds none), unless the heap is abandoned: then it has no thread to wait for (its group
/// heaps are all marked, and a thread adopting it unmarks them under the lock before its first
/// fast path).
fn settle<'l>(l: &'l Locked<'_>, keys: &[Key]) -> Option<Stopped<'l>> {
    let any = keys
        .iter()
        .map(|&k| l.table().find(k))
        .find(|gh| !gh.is_null())?;
    // SAFETY: a group heap from the table (never unmapped); its word changes only under the
    // lock we hold.
    if abandoned(unsafe { (*any).heap.load(Ordering::Relaxed) }) {
        // SAFETY: abandoned, as just read: no fast path runs on the heap.
        Some(unsafe { l.assume_stopped() })
    } else {
        Some(l.stop())
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
        if leaf {
            let Some(st) = settle(l, &own) else {
                return;
            };
            for k in own {
                if let Some(gh) = st.find(k) {
                    sweep_or_retire(&st, gh, rel);
                }
            }
            return;
        }
        let under = |k: Key| counter(k).is_under(g);
        let Some(any) = l.table().first(under) else {
            return;
        };
        let Some(st) = settle(l, &[any]) else {
            return;
        };
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
        let Some(st) = settle(l, &keys) else {
            return;
        };
        for k in keys {
            if let Some(gh) = st.find(k) {
                detach(&st, gh, rel);
            }
        }
    });
}
