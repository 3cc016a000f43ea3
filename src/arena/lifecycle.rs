//! The arena's setup and a thread's life: `init` at the first use, a heap made (or adopted,
//! with an exited thread's slabs) at a thread's first small allocation, and the thread-exit hook
//! that leaves the heap, slabs and all, for the next new thread (mimalloc's abandoned heaps).

use core::ptr::null_mut;

use crate::platform;
use crate::sync::{AtomicBool, AtomicU32, Backoff, Ordering};

use super::fork::join_the_group_table;
use super::heap::{
    lock, ready, Released, ASYM, EXACT, EXIT_KEY, FORK_HANDLERS, HEAP, HEAPS, READY, STATE,
    UNAVAILABLE,
};
use super::owner::{detach, holds_nothing, sweep};
use super::records::THREAD_HEAPS;
use super::segment;
use super::table::KeyTable;
use super::types::{abandoned, Slab, Stopped, ThreadHeap, ABANDONED, DEAD_HEAP};
use crate::lock::Spin;

/// `MEMGROUP_ARENA_POOL`: the resident bytes of empty slabs the pool keeps, by default and at
/// most (a larger value is taken as this one, with a warning).
pub(super) const POOL_DEFAULT: usize = 4 << 20;

pub(super) const POOL_MAX: usize = 1 << 40;

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
    super::trial::read_slab_after();
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

/// Makes this thread's heap: a heap whose thread exited (adopted with its group heaps and
/// their slabs), or a new one. Null if the arena is unavailable or out of memory.
#[cold]
pub(super) fn create_heap() -> *mut ThreadHeap {
    if !ready() && !init() {
        return null_mut();
    }
    let th = THREAD_HEAPS.with(|chunks| {
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
                    table: KeyTable::new(),
                    live: AtomicBool::new(false),
                    releasing: AtomicU32::new(0),
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
    // SAFETY: per the caller, `arg` is this thread's heap; the thread holds no heap's lock.
    let l = unsafe { lock(th) };
    // This thread's own heap: stopped at once.
    let st = l.stop();
    // SAFETY: the thread is exiting, past its last fast path on the heap.
    unsafe { abandon(&st, &mut rel) };
    HEAP.with(|h| h.set(DEAD_HEAP as *mut ThreadHeap));
    rel.release_after_unlock(l);
    // SAFETY: heaps are never unmapped.
    unsafe { (*th).live.store(false, Ordering::Release) };
}

/// Leaves the stopped heap for the next new thread (mimalloc's abandoned heaps): every group
/// heap is swept (objects handed over freed, remote frees collected, empty slabs spares
/// included released, counts harvested); one left with no slab is retired, the others keep
/// their slabs, objects and all, and are marked `ABANDONED`. Frees into their slabs from then
/// on are done under the heap's lock (`free_abandoned`), so a slab emptied by other threads
/// still goes back to the pool, and the next thread `create_heap` gives this heap to allocates
/// from them again.
///
/// # Safety
/// The heap's thread is exiting (or, in a forked child, gone): no fast path runs on it any
/// more, so it may be marked as having no thread.
pub(super) unsafe fn abandon(st: &Stopped<'_>, rel: &mut Released) {
    let marked = st.th().map_addr(|a| a | ABANDONED);
    st.each(|_, gh| {
        sweep(gh, rel);
        if holds_nothing(gh) {
            detach(st, gh, rel);
        } else {
            gh.heap().store(marked, Ordering::Relaxed);
        }
    });
    st.uncache(None);
}

/// Takes over an abandoned heap for this thread: its group heaps, with their slabs, are its
/// own again (a heap fresh or left with no group heap has none to take).
///
/// # Safety
/// `th` was just given to this thread by `create_heap`, before it is set as `HEAP`.
pub(super) unsafe fn adopt(th: *mut ThreadHeap) {
    // SAFETY: per the caller, `th` is a heap and this thread holds no heap's lock.
    let l = unsafe { lock(th) };
    {
        // SAFETY: no fast path runs on the heap: it has no thread but this one, which has
        // not set it as `HEAP` yet.
        let st = unsafe { l.assume_stopped() };
        // Under the lock, racing `free_abandoned`, `flush` and `remove` calls see the group
        // heaps either all abandoned or all this thread's.
        st.each(|_, gh| gh.heap().store(th, Ordering::Relaxed));
    }
    l.unlock();
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
