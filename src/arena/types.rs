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
//!
//! That ownership is a value, not a comment. `Locked` proves the caller holds a heap's lock
//! (which guards its key table); an `Owner` proves it owns the heap as above (`enter` on the
//! fast path; `Locked::stop`, which waits the owner out, for a `Stopped`: lock and owner
//! together); a `Mine` is a group heap of the owned heap, and a `Held` a slab of a `Mine`, each
//! reached through the proof before it and living no longer. The owner-only fields of a group
//! heap and the owner-side fields of its slabs are read and written through those two. What is
//! left unsafe is where such a proof is first made from a pointer: "this group heap's `heap`
//! word names our heap", "this slab's owner is this group heap"; and the fresh records (a new
//! slab, a new group heap), written before they are anyone's.
//! - A `ThreadHeap` is live (owned by a running thread) or free for the next new thread; heaps,
//!   group heaps and their tables are never unmapped, only reused.

use core::marker::PhantomData;
use core::ptr::NonNull;

use crate::core::stock::Key;
use crate::sync::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};

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

/// The active slab of a class that has none: its free list is empty, so the allocation fast
/// path needs no null check. Never written (no `Held` is ever made of it).
static EMPTY: Slab = Slab::empty();

/// `EMPTY`, as the pointer the queues hold (also `super::slab::empty`).
#[inline(always)]
pub(crate) fn empty() -> *mut Slab {
    &EMPTY as *const Slab as *mut Slab
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
    /// tell its group heap is gone. Atomic (relaxed, written only by the owner under its heap's
    /// lock): that slow path reads it under its own heap's lock, after which the group heap may
    /// have been reused by another heap, whose owner may be retiring it.
    pub(super) gen: AtomicU32,
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

/// Proof that this thread owns a thread heap for `'a`: its group heaps, their owner-only
/// fields and slabs, and its cached group heap are this thread's alone. The thread is inside
/// the heap's fast path (`super::heap::enter`: its own heap, `busy` raised and the lock seen
/// free), or holds the heap's lock with no fast path running on it (`Locked::stop`).
///
/// A pointer, neither `Copy` nor `Send`, made only by `super::heap::enter` and by `Stopped::new`
/// (through `Locked::stop` or `Locked::assume_stopped`); it ends with `super::heap::leave` or
/// with the borrow of the lock.
/// It does not give the heap's key table, which the lock alone guards (a thread holding it
/// reads the table while the owner may still be in its fast path): that is `Locked`'s.
pub(crate) struct Owner<'a>(HeapRef<'a>);

/// A heap named by a proof type (`Owner`, `Locked`): a pointer bound to the proof's lifetime,
/// on this thread only.
struct HeapRef<'a> {
    th: NonNull<ThreadHeap>,
    _p: PhantomData<(&'a ThreadHeap, *mut ())>,
}

impl HeapRef<'_> {
    /// # Safety
    /// `th` names a heap.
    #[inline(always)]
    unsafe fn new(th: *mut ThreadHeap) -> Self {
        HeapRef {
            // SAFETY: per the caller.
            th: unsafe { NonNull::new_unchecked(th) },
            _p: PhantomData,
        }
    }
}

impl<'a> Owner<'a> {
    /// # Safety
    /// This thread owns `th` for `'a`, as the type says (see `Owner`), and no other `Owner`
    /// of `th` is in use meanwhile on another thread.
    #[inline(always)]
    pub(super) unsafe fn new(th: *mut ThreadHeap) -> Owner<'a> {
        // SAFETY: per the caller, `th` names a heap.
        Owner(unsafe { HeapRef::new(th) })
    }

    /// The heap owned.
    #[inline(always)]
    pub(super) fn th(&self) -> *mut ThreadHeap {
        self.0.th.as_ptr()
    }

    /// The group heap the fast path serves `key` from without a lookup, if `key` is cached.
    #[inline(always)]
    pub(super) fn cached(&self, key: Key) -> Option<Mine<'_>> {
        let th = self.th();
        // SAFETY: heaps are never unmapped; the cached pair is the owner's to read and write.
        // A cached group heap is one of this heap's (set by `super::alloc::group_heap` from
        // the table, cleared when it goes).
        unsafe {
            if (*th).cached_key != key {
                return None;
            }
            Some(Mine::new((*th).cached))
        }
    }

    /// Forgets the cached group heap (if it is `gh`, or any if `None`).
    #[inline(always)]
    pub(super) fn uncache(&self, gh: Option<Mine<'_>>) {
        let th = self.th();
        // SAFETY: as in `cached`.
        unsafe {
            if gh.is_none_or(|gh| (*th).cached == gh.ptr()) {
                (*th).cached_key = 0;
                (*th).cached = core::ptr::null_mut();
            }
        }
    }

    /// `gh` as one of the owned heap's group heaps.
    ///
    /// # Safety
    /// `gh` is one of this heap's group heaps: its `heap` word names the heap (abandoned or
    /// not), which only a thread owning the heap can change.
    #[inline(always)]
    pub(super) unsafe fn mine(&self, gh: *mut GroupHeap) -> Mine<'_> {
        // SAFETY: per the caller, `gh` is a group heap (never unmapped).
        debug_assert!(unsafe { untagged((*gh).heap.load(Ordering::Relaxed)) } == self.th());
        Mine::new(gh)
    }

    /// Makes `gh`, one of the owned heap's group heaps, the one the fast path serves `key` from.
    #[inline(always)]
    pub(super) fn cache(&self, key: Key, gh: Mine<'_>) {
        let th = self.th();
        debug_assert!(untagged(gh.heap().load(Ordering::Relaxed)) == th);
        // SAFETY: as in `cached`.
        unsafe {
            (*th).cached_key = key;
            (*th).cached = gh.ptr();
        }
    }
}

/// A thread heap whose lock this thread holds, for `'a`: its key table is this thread's to
/// read and change (the owner's fast path never touches it). Made by `super::heap::lock`,
/// ended by `Locked::unlock`. To touch its group heaps, complete the stop (`stop`).
#[must_use = "a heap stays locked until `unlock`"]
pub(crate) struct Locked<'a>(HeapRef<'a>);

impl<'a> Locked<'a> {
    /// # Safety
    /// This thread holds `th`'s lock for `'a` and gives it up only through `unlock`.
    #[inline(always)]
    pub(super) unsafe fn new(th: *mut ThreadHeap) -> Locked<'a> {
        // SAFETY: per the caller, `th` names a heap.
        Locked(unsafe { HeapRef::new(th) })
    }

    /// The heap locked.
    #[inline(always)]
    pub(super) fn th(&self) -> *mut ThreadHeap {
        self.0.th.as_ptr()
    }

    /// The heap's key table.
    #[inline(always)]
    pub(super) fn table(&self) -> &KeyTable<GroupHeap> {
        // SAFETY: heaps are never unmapped, and the table is only reached under the lock,
        // through a `Locked` (this one, until `unlock`): no other thread reads or writes it.
        // Its changes go through its cells, so shared references are all there are.
        unsafe { &(*self.th()).table }
    }

    /// Lets the lock go.
    #[inline(always)]
    pub(super) fn unlock(self) {
        // SAFETY: heaps are never unmapped; this thread holds the lock (see `new`).
        unsafe { (*self.th()).lock.unlock() };
    }
}

/// A locked heap with no fast path running on it: `Owner` and `Locked` at once, as the slow
/// paths and every thread that works on another's heap (flush, remove, an abandoned heap's
/// frees) need both: a group heap goes from the table and from the owner's cache together.
pub(crate) struct Stopped<'l> {
    locked: &'l Locked<'l>,
    owner: Owner<'l>,
}

impl<'l> Stopped<'l> {
    /// # Safety
    /// No fast path runs on `locked`'s heap until the borrow ends: its owner was waited out,
    /// or its thread is this one or gone (see `super::heap::Locked::stop`, `assume_stopped`).
    #[inline(always)]
    pub(super) unsafe fn new(locked: &'l Locked<'l>) -> Stopped<'l> {
        Stopped {
            locked,
            // SAFETY: per the caller, with the lock held: the heap is ours until the borrow
            // of the lock ends.
            owner: unsafe { Owner::new(locked.th()) },
        }
    }

    /// The heap's key table.
    #[inline(always)]
    pub(super) fn table(&self) -> &KeyTable<GroupHeap> {
        self.locked.table()
    }

    /// The group heap of `key` in the table, if any.
    #[inline(always)]
    pub(super) fn find(&self, key: Key) -> Option<Mine<'_>> {
        let gh = self.locked.table().find(key);
        // The table holds this heap's group heaps only (`insert` in a new group heap whose
        // `heap` word names it; `remove` before the group heap goes).
        (!gh.is_null()).then(|| Mine::new(gh))
    }

    /// Every group heap in the table, with its key, in turn. `f` may take group heaps out of
    /// the table (`detach`: a removal leaves a tombstone, so the walk goes on), not add any.
    pub(super) fn each(&self, mut f: impl FnMut(Key, Mine<'_>)) {
        for (k, gh) in self.locked.table().entries() {
            f(k, Mine::new(gh));
        }
    }
}

impl<'l> core::ops::Deref for Stopped<'l> {
    type Target = Owner<'l>;

    #[inline(always)]
    fn deref(&self) -> &Owner<'l> {
        &self.owner
    }
}

/// A group heap of a heap this thread owns, for as long as the `Owner` it came from: the only
/// way to its owner-only fields. Reached from the owner (its cached group heap, its table, or
/// `Owner::mine`). A pointer: copies are fine, since no reference to a field is ever handed
/// out, only copies of values (as `Cell` does).
#[derive(Clone, Copy)]
pub(crate) struct Mine<'a> {
    gh: NonNull<GroupHeap>,
    _p: PhantomData<&'a Owner<'a>>,
}

/// Accessors by value for the plain fields of the record `self.$ptr` points to (see the
/// SAFETY comment where it is used).
macro_rules! by_value {
    ($ptr:ident; $($get:ident $(/ $set:ident)?: $t:ty;)*) => {
        $(
            #[inline(always)]
            pub(super) fn $get(self) -> $t {
                // SAFETY: see the comment on the accessors' list.
                unsafe { (*self.$ptr.as_ptr()).$get }
            }

            $(
                #[inline(always)]
                pub(super) fn $set(self, v: $t) {
                    // SAFETY: see the comment on the accessors' list.
                    unsafe { (*self.$ptr.as_ptr()).$get = v }
                }
            )?
        )*
    };
}

impl<'a> Mine<'a> {
    /// Only `Owner` and `Stopped` make one: from a group heap they know is the owned heap's.
    #[inline(always)]
    fn new(gh: *mut GroupHeap) -> Mine<'a> {
        debug_assert!(!gh.is_null());
        Mine {
            // SAFETY: every caller passes a group heap.
            gh: unsafe { NonNull::new_unchecked(gh) },
            _p: PhantomData,
        }
    }

    #[inline(always)]
    pub(super) fn ptr(self) -> *mut GroupHeap {
        self.gh.as_ptr()
    }

    // The owner-only fields, read and written by value. SAFETY (for every accessor): group
    // heaps are never unmapped; a `Mine` lives no longer than the `Owner` it came from, and
    // while that `Owner` lives no other thread reads or writes these fields. No reference to a
    // field escapes, so two copies of a `Mine` on this thread cannot alias one.
    by_value! {
        gh;
        key: Key;
        allocs / set_allocs: u64;
        frees / set_frees: u64;
        adj / set_adj: i64;
        left / set_left: u32;
        empties / set_empties: u64;
        full / set_full: *mut Slab;
    }

    #[inline(always)]
    pub(super) fn gen(self) -> u32 {
        // SAFETY: group heaps are never unmapped.
        unsafe { (*self.gh.as_ptr()).gen.load(Ordering::Relaxed) }
    }

    /// Marks the group heap retired for a slow path that let go of the lock (see `gen`).
    #[inline(always)]
    pub(super) fn bump_gen(self) {
        // SAFETY: group heaps are never unmapped; only the owner writes `gen`.
        let gen = unsafe { &(*self.gh.as_ptr()).gen };
        gen.store(
            gen.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
    }

    /// Links the group heap into the pool of retired ones.
    #[inline(always)]
    pub(super) fn set_next_free(self, next: *mut GroupHeap) {
        // SAFETY: as for the fields above.
        unsafe { (*self.gh.as_ptr()).next_free = next }
    }

    /// Class `c`'s active slab.
    #[inline(always)]
    pub(super) fn active(self, c: usize) -> *mut Slab {
        // SAFETY: as for the fields above.
        unsafe { (*self.gh.as_ptr()).classes[c].active }
    }

    #[inline(always)]
    pub(super) fn set_active(self, c: usize, s: *mut Slab) {
        // SAFETY: as for the fields above.
        unsafe { (*self.gh.as_ptr()).classes[c].active = s }
    }

    /// Class `c`'s partial list.
    #[inline(always)]
    pub(super) fn partial(self, c: usize) -> *mut Slab {
        // SAFETY: as for the fields above.
        unsafe { (*self.gh.as_ptr()).classes[c].partial }
    }

    #[inline(always)]
    pub(super) fn set_partial(self, c: usize, s: *mut Slab) {
        // SAFETY: as for the fields above.
        unsafe { (*self.gh.as_ptr()).classes[c].partial = s }
    }

    /// Blocks of class `c` served the tag way (`GroupHeap::asked`).
    #[inline(always)]
    pub(super) fn asked(self, c: usize) -> u16 {
        // SAFETY: as for the fields above.
        unsafe { (*self.gh.as_ptr()).asked[c] }
    }

    #[inline(always)]
    pub(super) fn set_asked(self, c: usize, n: u16) {
        // SAFETY: as for the fields above.
        unsafe { (*self.gh.as_ptr()).asked[c] = n }
    }

    /// The head of class `c`'s partial list, for `super::slab::push` and `unlink`.
    #[inline(always)]
    pub(super) fn partial_list(self, c: usize) -> *mut *mut Slab {
        // SAFETY: a place in a group heap, which is never unmapped (no reference is made).
        unsafe { &raw mut (*self.gh.as_ptr()).classes[c].partial }
    }

    /// The head of the full list, for `super::slab::push` and `unlink`.
    #[inline(always)]
    pub(super) fn full_list(self) -> *mut *mut Slab {
        // SAFETY: as in `partial_list`.
        unsafe { &raw mut (*self.gh.as_ptr()).full }
    }

    /// The objects other threads handed over (written by them: atomic).
    #[inline(always)]
    pub(super) fn delayed(self) -> &'a AtomicPtr<u8> {
        // SAFETY: group heaps are never unmapped; an atomic is shared by design.
        unsafe { &(*self.gh.as_ptr()).delayed }
    }

    /// The owning heap's word (read by other threads: atomic).
    #[inline(always)]
    pub(super) fn heap(self) -> &'a AtomicPtr<ThreadHeap> {
        // SAFETY: as in `delayed`.
        unsafe { &(*self.gh.as_ptr()).heap }
    }

    /// Class `c`'s active slab, unless it has none (`EMPTY`).
    #[inline(always)]
    pub(super) fn active_slab(self, c: usize) -> Option<Held<'a>> {
        let s = self.active(c);
        // An active slab other than `EMPTY` is the group heap's.
        (s != empty()).then(|| Held::new(self, s))
    }

    /// Class `c`'s active slab if its free list is not empty (`EMPTY`'s always is): the
    /// allocation fast path's one test.
    #[inline(always)]
    pub(super) fn ready_slab(self, c: usize) -> Option<Held<'a>> {
        let s = self.active(c);
        // SAFETY: slab metadata (and `EMPTY`) is never unmapped; an active slab's free list is
        // the owner's, which the `Mine` proves this thread is.
        (!unsafe { (*s).free.is_null() }).then(|| Held::new(self, s))
    }

    /// The slabs on class `c`'s partial list, each one's link read before it is yielded (so
    /// the caller may unlink or relink it).
    #[inline(always)]
    pub(super) fn partial_slabs(self, c: usize) -> Slabs<'a> {
        Slabs {
            gh: self,
            next: self.partial(c),
        }
    }

    /// The slabs on the full list, as in `partial_slabs`.
    #[inline(always)]
    pub(super) fn full_slabs(self) -> Slabs<'a> {
        Slabs {
            gh: self,
            next: self.full(),
        }
    }
}

/// A walk along one of a group heap's slab lists (see `Mine::partial_slabs`).
pub(crate) struct Slabs<'a> {
    gh: Mine<'a>,
    next: *mut Slab,
}

impl<'a> Iterator for Slabs<'a> {
    type Item = Held<'a>;

    #[inline(always)]
    fn next(&mut self) -> Option<Held<'a>> {
        if self.next.is_null() {
            return None;
        }
        // A slab on one of the group heap's lists is the group heap's.
        let h = Held::new(self.gh, self.next);
        self.next = h.next();
        Some(h)
    }
}

/// A slab of a group heap this thread owns, with that group heap, for as long as its `Mine`:
/// the only way to the slab's owner-side fields (its free list, `used`, `state`, its links).
/// Made from the group heap's lists and active slabs (`Mine::active_slab`, `partial_slabs`,
/// `full_slabs`), or by `Held::new` from a slab whose owner it is. Never `EMPTY`.
#[derive(Clone, Copy)]
pub(crate) struct Held<'a> {
    gh: Mine<'a>,
    s: NonNull<Slab>,
}

impl<'a> Held<'a> {
    #[inline(always)]
    fn new(gh: Mine<'a>, s: *mut Slab) -> Held<'a> {
        debug_assert!(!s.is_null() && s != empty());
        Held {
            gh,
            // SAFETY: every caller passes a slab.
            s: unsafe { NonNull::new_unchecked(s) },
        }
    }

    /// `s` as a slab of `gh`.
    ///
    /// # Safety
    /// `s` is one of `gh`'s slabs (its `owner` is `gh`, which only `gh`'s owner changes), and
    /// not `EMPTY`.
    #[inline(always)]
    pub(super) unsafe fn of(gh: Mine<'a>, s: *mut Slab) -> Held<'a> {
        // SAFETY: per the caller, `s` is slab metadata (never unmapped).
        debug_assert!(unsafe { (*s).owner.load(Ordering::Relaxed) } == gh.ptr());
        Held::new(gh, s)
    }

    /// The group heap the slab is of.
    #[inline(always)]
    pub(super) fn gh(self) -> Mine<'a> {
        self.gh
    }

    #[inline(always)]
    pub(super) fn ptr(self) -> *mut Slab {
        self.s.as_ptr()
    }

    // The slab's owner-side fields, by value. SAFETY (for every accessor): slab metadata is
    // never unmapped, and a slab of a group heap is written by no one but that group heap's
    // owner (other threads go through its atomics), which the `Mine` proves this thread is;
    // `Held` is never `EMPTY`, which is never written. No reference to a field escapes.
    by_value! {
        s;
        free / set_free: *mut u8;
        used / set_used: u32;
        class: u8;
        state / set_state: u8;
        next: *mut Slab;
    }

    /// Clears the slab's list links (it is on no list).
    #[inline(always)]
    pub(super) fn clear_links(self) {
        // SAFETY: as for the fields above.
        unsafe {
            (*self.s.as_ptr()).prev = core::ptr::null_mut();
            (*self.s.as_ptr()).next = core::ptr::null_mut();
        }
    }

    /// The word other threads free through (atomic).
    #[inline(always)]
    pub(super) fn remote(self) -> &'a AtomicU64 {
        // SAFETY: slab metadata is never unmapped; an atomic is shared by design.
        unsafe { &(*self.s.as_ptr()).remote }
    }

    /// The owning group heap's word (atomic: remote frees read it).
    #[inline(always)]
    pub(super) fn owner(self) -> &'a AtomicPtr<GroupHeap> {
        // SAFETY: as in `remote`.
        unsafe { &(*self.s.as_ptr()).owner }
    }
}

/// The allocator's verdict when the fast path could not serve.
pub(crate) enum Slow {
    Done(*mut u8),
    /// A limit refused the slab's charge.
    Refused,
    /// The arena cannot serve this thread or has no memory: use the inner allocator.
    Inner,
}
