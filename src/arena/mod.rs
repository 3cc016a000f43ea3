//! The arena design (Glauber Costa's per-memcg slab caches, Kernel Summit 2012): small blocks come from
//! slabs that belong to one group key only, in memory the arena maps itself, so no page ever
//! holds two groups' objects and a group is charged per slab, not per object. Large blocks go
//! to the inner allocator with the tag design's 8-byte tag.
//!
//! - `class`: size classes (up to 8 KiB) and slab sizes (one page to eight).
//! - `segment`: the reserved region, its 4 MiB segments, finding a pointer's slab from its
//!   address, the pool of empty slabs (given back to the OS past a threshold), and segments
//!   given back whole once all their slabs are empty.
//! - `types`: the records (a slab's metadata, thread heaps, group heaps) and who owns what.
//! - `slab`: a slab's atomic remote-free word and its list links.
//! - `table`, `records`: a heap's key table; the memory heaps and group heaps are cut from.
//! - `heap`: the per-thread heaps (with a group heap per group key), their state and the
//!   protocol by which another thread stops one; releasing slabs to the pool.
//! - `owner`: what a group heap's owner does to it and its slabs (local frees, collecting remote
//!   frees, sweeping, taking a group heap apart into orphans).
//! - `alloc`, `free`: the fast and slow paths.
//! - `flush`: `flush()` and `remove()` support.
//! - `lifecycle`: setup, a thread's heap made or adopted, thread exit (the heap left, slabs and
//!   all, for the next thread to adopt).
//! - `fork`: `fork()` support.
//!
//! Its locks are `crate::lock`'s `Spin` and `SpinLock`, as everywhere in memgroup.
//!
//! Charging goes through the same core as the tag design (`Stocks::charge`): a slab
//! is one charge, so limits, `OnLimit`, `fallible`, `nofail` and kmem all behave as there, in
//! slab-sized steps. A group's first small blocks on a thread go to the inner allocator with a
//! tag, charged exactly, as in the tag design: until it has asked the thread for a page it has
//! no group heap there, and then a class of its group heap takes slabs only once it has asked
//! for a slab's worth of it (`MEMGROUP_ARENA_SLAB_AFTER`, see `class`).

mod alloc;
mod class;
mod flush;
mod fork;
mod free;
mod heap;
mod lifecycle;
mod owner;
mod records;
mod segment;
mod slab;
mod table;
mod trial;
mod types;

use core::alloc::{GlobalAlloc, Layout};
use std::alloc::System;

use crate::core::stock::{key_id, key_is_kernel, Key};
use crate::{group, scope, Group, TagAlloc};
use alloc::Ask;

/// The arena design: a [`GlobalAlloc`] that serves small blocks (up to 8 KiB, aligned up to
/// 4 KiB) from per-group slabs it maps itself, charged a slab at a time, and large blocks
/// from the inner allocator with a tag, as [`TagAlloc`] does. A group's first small blocks on
/// a thread (a page, then a slab's worth of each size class, `MEMGROUP_ARENA_SLAB_AFTER`) go
/// the tag way too, so a group holding a few small blocks is charged what the tag design
/// charges, and has no cache on the thread.
///
/// ```no_run
/// #[global_allocator]
/// static ALLOC: memgroup::ArenaAlloc = memgroup::ArenaAlloc::system();
/// ```
pub struct ArenaAlloc<A = System> {
    tag: TagAlloc<A>,
}

impl ArenaAlloc<System> {
    /// Large blocks from the system allocator.
    pub const fn system() -> Self {
        ArenaAlloc {
            tag: TagAlloc::system(),
        }
    }
}

impl<A> ArenaAlloc<A> {
    /// Large blocks from any inner allocator (mimalloc, jemalloc, ...).
    pub const fn new(inner: A) -> Self {
        ArenaAlloc {
            tag: TagAlloc::new(inner),
        }
    }
}

impl<A: GlobalAlloc> ArenaAlloc<A> {
    /// # Safety
    /// As for [`GlobalAlloc::alloc`].
    #[inline(always)]
    unsafe fn alloc_any(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let Some(class) = class::of(layout.size(), layout.align()) else {
            // SAFETY: forwarded caller contract.
            return unsafe { self.alloc_large(layout, zeroed) };
        };
        let key = scope::current_key();
        let p = alloc::alloc_fast(key, class, layout.size(), true);
        if p.is_null() {
            let ask = if zeroed { Ask::Zeroed } else { Ask::New };
            // SAFETY: forwarded caller contract.
            let inner = move || unsafe { self.alloc_large(layout, zeroed) };
            return alloc::alloc_slow(layout, class, key, ask, &inner);
        }
        if zeroed {
            // SAFETY: `p` is a fresh object of at least `layout.size()` bytes.
            unsafe { core::ptr::write_bytes(p, 0, layout.size()) };
        }
        p
    }

    /// # Safety
    /// As for [`GlobalAlloc::alloc`].
    #[inline(always)]
    unsafe fn alloc_large(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        // SAFETY: forwarded caller contract.
        unsafe {
            if zeroed {
                self.tag.alloc_zeroed(layout)
            } else {
                self.tag.alloc(layout)
            }
        }
    }

    /// A new home for a block of `key` that a realloc moves: its owner stays `key` (even a
    /// removed group's), and no allocation is counted. Null if refused.
    ///
    /// # Safety
    /// `layout` has a non-zero size or is served from slabs.
    unsafe fn alloc_moved(&self, layout: Layout, key: Key) -> *mut u8 {
        if let Some(class) = class::of(layout.size(), layout.align()) {
            // A removed group takes no new slab: its moved block goes to the inner allocator.
            if group::node(key_id(key)).counter.is_online() {
                let p = alloc::alloc_fast(key, class, layout.size(), false);
                if !p.is_null() {
                    return p;
                }
                // SAFETY: forwarded caller contract.
                let inner = move || unsafe { self.tag.alloc_for(layout, key) };
                return alloc::alloc_slow(layout, class, key, Ask::Moved, &inner);
            }
        }
        // SAFETY: forwarded caller contract.
        unsafe { self.tag.alloc_for(layout, key) }
    }
}

// SAFETY: a small block is an object of a slab of the class `class::of` picks for its layout:
// at least `layout.size()` bytes, at an offset from a page-aligned slab start that is a multiple
// of the class size, itself a multiple of the alignment; no two live blocks share an object.
// Large blocks are `TagAlloc`'s. `dealloc` and `realloc` tell the two apart by address (slab
// objects are in the arena's region, nothing else is), never by layout, so a block the arena
// had to give to the inner allocator is still freed there. Nothing here panics or unwinds:
// failures return null.
unsafe impl<A: GlobalAlloc> GlobalAlloc for ArenaAlloc<A> {
    #[inline(always)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded caller contract.
        unsafe { self.alloc_any(layout, false) }
    }

    #[inline(always)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded caller contract.
        unsafe { self.alloc_any(layout, true) }
    }

    #[inline(always)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if segment::contains(ptr) {
            // SAFETY: the caller passes a live block of ours; in the region, it is a slab
            // object allocated for `layout.size()` bytes.
            unsafe { free::free(ptr, layout.size(), true) }
        } else {
            // SAFETY: outside the region, the block is `TagAlloc`'s.
            unsafe { self.tag.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !segment::contains(ptr) {
            // SAFETY: outside the region, the block is `TagAlloc`'s; the caller's contract is
            // passed on.
            return unsafe { self.tag.realloc(ptr, layout, new_size) };
        }
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return core::ptr::null_mut();
        };
        // SAFETY: `ptr` is a live slab object: its slab's class and key are fixed while it is.
        let (class, key) = unsafe {
            let s = segment::slab_of(ptr);
            (
                (*s).class as usize,
                (*s).key.load(crate::sync::Ordering::Relaxed),
            )
        };
        if class::of(new_size, layout.align()) == Some(class) {
            free::resize(key, layout.size(), new_size);
            return ptr;
        }
        // SAFETY: `new_layout` is valid; a null result leaves the old block as it was.
        let new = unsafe { self.alloc_moved(new_layout, key) };
        if !new.is_null() {
            // SAFETY: both blocks are live and distinct, each at least as long as the copy;
            // the old one is a slab object allocated for `layout.size()` bytes.
            unsafe {
                core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                free::free(ptr, layout.size(), false);
            }
        }
        new
    }
}

/// Where a small block lives, for tests and diagnostics.
#[doc(hidden)]
#[derive(Debug)]
pub struct SlabInfo {
    /// The slab's first byte and its length.
    pub start: usize,
    /// The slab's length in bytes.
    pub len: usize,
    /// The size of the slab's objects.
    pub object_size: usize,
    /// The group the slab is charged to.
    pub group: Group,
    /// Whether the slab holds kernel memory.
    pub kernel: bool,
    /// Whether the slab has no owner any more (its group was removed).
    pub orphan: bool,
    /// Whether the slab's owner is the heap of a thread that exited, waiting for a new thread
    /// to adopt it (with its slabs).
    pub abandoned: bool,
}

/// The slab holding `ptr`; `None` for a block of the inner allocator.
///
/// # Safety
/// `ptr` is a live block allocated by [`ArenaAlloc`].
#[doc(hidden)]
pub unsafe fn slab_of(ptr: *const u8) -> Option<SlabInfo> {
    if !segment::contains(ptr) {
        return None;
    }
    // SAFETY: per the caller, `ptr` is a live slab object: its slab is charged to a group
    // whose record is alive, and its metadata is stable.
    unsafe {
        let s = segment::slab_of(ptr);
        let key = (*s).key.load(crate::sync::Ordering::Relaxed);
        let c = (*s).class as usize;
        Some(SlabInfo {
            start: segment::start(s) as usize,
            len: class::slab_bytes(c),
            object_size: class::SIZES[c] as usize,
            group: Group::from_held(group::node(key_id(key))),
            kernel: key_is_kernel(key),
            orphan: (*s).remote.load(crate::sync::Ordering::Acquire) & slab::ORPHAN != 0,
            abandoned: lifecycle::owner_abandoned(s),
        })
    }
}

/// For tests: makes each removal of a group heap pause `us` microseconds right after each of
/// its slabs becomes an orphan (0, the default: no pause), which widens the window in which
/// other threads free an orphan's last object and reuse its slab; returns the previous value.
#[doc(hidden)]
pub fn pause_after_orphaning(us: u32) -> u32 {
    owner::pause_after_orphaning(us)
}

/// For tests: makes each remote free that hands its object to a slab's owner (the first free
/// into a slab parked full) pause `us` microseconds while it holds the slab's `NOTIFYING` bit
/// (0, the default: no pause); returns the previous value.
#[doc(hidden)]
pub fn pause_in_notify(us: u32) -> u32 {
    owner::pause_in_notify(us)
}

/// For tests: makes each thread that releases slabs after letting their heap's lock go (a
/// flush's sweep, a thread's exit, a slow path) pause `us` microseconds first (0, the default:
/// no pause), which widens the window in which another flush finds the heap without those
/// slabs while they are still charged; returns the previous value.
#[doc(hidden)]
pub fn pause_before_release(us: u32) -> u32 {
    owner::pause_before_release(us)
}

/// What the arena holds, in bytes (none of it is charged to a group as such: slabs are
/// charged to their groups while out of the pool).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Footprint {
    /// Address space cut into segments (backed only where touched).
    pub segments: usize,
    /// The part of `segments` given back whole (every slab of theirs was empty: their memory
    /// returned to the OS but for a header page each), waiting to be cut again for any slab
    /// size.
    pub free_segments: usize,
    /// Empty slabs in the pool.
    pub pooled: usize,
    /// The part of `pooled` still resident (not yet given back with `madvise`).
    pub pooled_resident: usize,
    /// Memory mapped for thread heaps, their key tables and group heaps (the per-group caches).
    pub metadata: usize,
    /// Group heaps in use (one per thread and group key allocated for).
    pub group_heaps: usize,
}

/// The arena's own memory.
#[doc(hidden)]
pub fn footprint() -> Footprint {
    let (segments, pooled, pooled_resident) = segment::footprint();
    let (metadata, group_heaps) = records::metadata();
    Footprint {
        segments,
        free_segments: segment::free_segments(),
        pooled,
        pooled_resident,
        metadata,
        group_heaps,
    }
}
