//! The arena's types and their invariants: a slab's metadata, a thread's heap and its group
//! heaps (one per group key), and who may touch what.
//!
//! Ownership, which every function of the arena relies on:
//!
//! - A `Slab` belongs to one group heap (its `owner`), to the pool (`segment`), or to no one
//!   (an orphan: its group heap went while it held objects; remote frees count down on it, and
//!   the one that frees its last object releases it). Its plain fields are written by whoever
//!   holds it: its owner, the pool under its lock, or a thread that claimed it (taken from the
//!   pool, or `DEAD`). Other threads reach it only through its atomic `remote` word (see
//!   `super::slab`). The metadata of a slab ever handed out stays mapped for good.
//! - A `GroupHeap` and its slab lists belong to its `ThreadHeap`'s owner: the thread using it
//!   (inside its fast path, between `enter` and `leave`, or holding the heap's lock), or a thread
//!   that stopped the heap (`super::heap::stop`), or, while the heap is `ABANDONED` (its thread
//!   exited), a thread holding its lock. Only `delayed` is written by other threads.
//! - A `ThreadHeap` is live (owned by a running thread) or free for the next new thread; heaps,
//!   group heaps and their tables are never unmapped, only reused.

use crate::core::stock::Key;
use crate::sync::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64};

use super::class::CLASSES;
use super::table::KeyTable;
use crate::lock::Spin;

/// Where a slab is, as its owner (or the pool) sees it. In the pool: resident (`POOLED`),
/// given back to the OS (`COLD`), or waiting in a batch to be given back (`DOOMED`).
pub(crate) const POOLED: u8 = 0;
pub(crate) const COLD: u8 = 6;
pub(crate) const DOOMED: u8 = 7;
pub(crate) const ACTIVE: u8 = 1;
pub(crate) const PARTIAL: u8 = 2;
pub(crate) const FULL_LIST: u8 = 3;
pub(crate) const ORPHANED: u8 = 4;
/// Unlinked from every list, on its way back to the pool.
pub(crate) const LOOSE: u8 = 5;

/// The metadata of one slab: one cache line in its segment's header.
///
/// Fields other than the atomics are written by the slab's owner (its thread, or a thread that
/// stopped that thread, see `super::heap`), or by whoever holds the slab exclusively (taken from
/// the pool, or claimed for release). `used` is also read by remote freers of an orphan, after
/// the `ORPHAN` word that published its final value.
#[repr(C, align(64))]
pub(crate) struct Slab {
    pub(crate) remote: AtomicU64,
    /// The owner's free list.
    pub(crate) free: *mut u8,
    /// The owning group heap; null while pooled or orphaned.
    pub(crate) owner: AtomicPtr<GroupHeap>,
    /// The group key charged for the slab.
    pub(crate) key: AtomicU32,
    /// Objects not on the owner's free list (allocated, or freed remotely and not collected).
    pub(crate) used: u32,
    pub(crate) class: u8,
    pub(crate) state: u8,
    pub(crate) prev: *mut Slab,
    pub(crate) next: *mut Slab,
}

// SAFETY: a `Slab` is shared between threads only through raw pointers, under the ownership
// rules above; the one static instance (`EMPTY`) is never written.
unsafe impl Sync for Slab {}

impl Slab {
    pub(crate) const fn empty() -> Slab {
        Slab {
            remote: AtomicU64::new(0),
            free: core::ptr::null_mut(),
            owner: AtomicPtr::new(core::ptr::null_mut()),
            key: AtomicU32::new(0),
            used: 0,
            class: 0,
            state: POOLED,
            prev: core::ptr::null_mut(),
            next: core::ptr::null_mut(),
        }
    }
}

/// `HEAP` of a thread whose exit hook ran: its small blocks go to the inner allocator.
pub(super) const DEAD_HEAP: usize = 1;

/// The low bit of a group heap's `heap`: its thread exited and the heap waits to be adopted
/// (see `abandon`). Heaps are 64-aligned, so the bit is free.
pub(super) const ABANDONED: usize = 1;

/// Whether a group heap's `heap` word names an abandoned heap.
#[inline(always)]
pub(super) fn abandoned(raw: *mut ThreadHeap) -> bool {
    raw as usize & ABANDONED != 0
}

/// The heap a group heap's `heap` word names, abandoned or not.
#[inline(always)]
pub(super) fn untagged(raw: *mut ThreadHeap) -> *mut ThreadHeap {
    raw.map_addr(|a| a & !ABANDONED)
}

/// One thread's heap.
#[repr(C, align(64))]
pub(crate) struct ThreadHeap {
    /// Raised by the owning thread around each fast-path operation.
    pub(super) busy: AtomicU32,
    /// Held by the owner's slow paths and by any other thread working on this heap (`stop`).
    pub(super) lock: Spin,
    /// The key the fast path serves without a lookup, and its group heap.
    pub(super) cached_key: Key,
    pub(super) cached: *mut GroupHeap,
    pub(super) table: KeyTable<GroupHeap>,
    /// Owned by a running thread (false: free for the next new thread).
    pub(super) live: AtomicBool,
    /// Threads releasing slabs they took out of this heap under its lock, after letting it go
    /// (see `Released::release_after`): a flush that finds the heap waits for them.
    pub(super) releasing: AtomicU32,
    /// The next heap on `HEAPS`; fixed once published.
    pub(super) next: *mut ThreadHeap,
}

/// One thread's cache for one group key.
#[repr(C, align(64))]
pub(crate) struct GroupHeap {
    /// Objects freed by other threads into slabs this group heap parked as full, linked
    /// through their first words (see `notify`). Alone on its cache line: other threads write it.
    pub(super) delayed: AtomicPtr<u8>,
    pub(super) _line: [u64; 7],
    pub(super) key: Key,
    /// Bumped each time the group heap is retired, so a slow path that let go of the lock can
    /// tell its group heap is gone.
    pub(super) gen: u32,
    /// The owning heap, with `ABANDONED` set while that heap has no thread. Atomic: a freeing
    /// thread reads it to tell whether it is the owner, possibly while the group heap is being
    /// retired or reused (it then finds another heap). Changed only under the heap's lock.
    pub(super) heap: AtomicPtr<ThreadHeap>,
    /// Not yet added to the counter: allocations, frees, and the overhead change (see `harvest`).
    pub(super) allocs: u64,
    pub(super) frees: u64,
    pub(super) adj: i64,
    /// Operations left until the next harvest.
    pub(super) left: u32,
    /// Classes that keep an empty slab as a spare on their partial list.
    pub(super) empties: u64,
    /// Slabs with no free object, parked until a free gives one back.
    pub(super) full: *mut Slab,
    pub(super) next_free: *mut GroupHeap,
    pub(super) classes: [Queue; CLASSES],
    /// Blocks of each class this group heap has had served the tag way, counted up to the
    /// class's `super::alloc::slab_after` (then it takes slabs of the class; see `class`).
    /// Cumulative: frees do not count it down (they may run on any thread).
    pub(super) asked: [u16; CLASSES],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct Queue {
    /// The slab allocations come from (`slab::EMPTY` if none).
    pub(super) active: *mut Slab,
    /// Slabs with free objects, the active one excepted.
    pub(super) partial: *mut Slab,
}

/// The allocator's verdict when the fast path could not serve.
pub(crate) enum Slow {
    Done(*mut u8),
    /// A limit refused the slab's charge.
    Refused,
    /// The arena cannot serve this thread or has no memory: use the inner allocator.
    Inner,
}
