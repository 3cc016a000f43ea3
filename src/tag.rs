//! The tag design (Vladimir Davydov's; see the crate's Design notes): one shared inner
//! allocator, and the owner's key stored with every block, so a free finds its owner without a
//! lookup.
//!
//! The tag is 8 bytes, just before the block: for alignments up to 8 it is the whole header;
//! for 16-aligned blocks the header is 16 bytes (the tag and 8 unused), since a tag after the
//! block (unaligned, often on another cache line) made every such free markedly slower. Above
//! 16, a header would cost a whole alignment unit (2 MiB for a 2 MiB alignment), so the tag
//! goes right after the block instead, unaligned. A block costs `size + 8` bytes of the inner
//! allocator (`size + 16` if 16-aligned), which is what its owner is charged, and all but
//! `size` is reported as `overhead`: `TAG_SIZE` per block by formula, the 16-byte headers'
//! other 8 bytes counted as they come and go (`Counter::adjust_overhead`).

use core::alloc::{GlobalAlloc, Layout};
use std::alloc::System;

use crate::core::stock::{Key, MAX_BATCH};
use crate::group::CORE;
use crate::thread::{self, Thread};
use crate::{platform, scope};

/// Bytes of the tag every block carries in the tag design (a 16-aligned block's header is
/// twice that: the tag and 8 unused bytes, all reported in `overhead`).
pub const TAG_SIZE: usize = 8;

/// The tag design: a [`GlobalAlloc`] that charges every block to the current group and stores
/// the owner with the block.
///
/// ```no_run
/// #[global_allocator]
/// static ALLOC: memgroup::TagAlloc = memgroup::TagAlloc::system();
/// ```
pub struct TagAlloc<A = System> {
    inner: A,
}

impl TagAlloc<System> {
    /// Over the system allocator.
    pub const fn system() -> Self {
        TagAlloc { inner: System }
    }
}

#[cfg(feature = "jemalloc")]
impl TagAlloc<tikv_jemallocator::Jemalloc> {
    /// Over jemalloc (feature `jemalloc`, through `tikv-jemallocator`): the same as
    /// `TagAlloc::new(tikv_jemallocator::Jemalloc)`.
    ///
    /// ```no_run
    /// #[global_allocator]
    /// static ALLOC: memgroup::TagAlloc<memgroup::Jemalloc> = memgroup::TagAlloc::jemalloc();
    /// ```
    pub const fn jemalloc() -> Self {
        TagAlloc {
            inner: tikv_jemallocator::Jemalloc,
        }
    }
}

impl<A> TagAlloc<A> {
    /// Over any inner allocator (mimalloc, jemalloc, ...).
    pub const fn new(inner: A) -> Self {
        TagAlloc { inner }
    }
}

/// Where a block and its tag sit in the inner allocation.
#[derive(Clone, Copy)]
struct Placement {
    inner: Layout,
    /// Offset of the block in the inner allocation.
    block: usize,
    /// Offset of the tag in the inner allocation.
    tag: usize,
    /// Overhead bytes beyond `TAG_SIZE`: the unused half of a 16-byte header.
    pad: usize,
}

/// The largest block: 256 TiB, more than any allocator on a 64-bit platform can return. A
/// larger request is refused before anything is charged, so no counter can ever wrap.
const MAX_BLOCK: usize = 1 << 48;

#[inline(always)]
fn place(layout: Layout) -> Option<Placement> {
    if layout.size() > MAX_BLOCK || layout.align() > MAX_BLOCK {
        return None;
    }
    // SAFETY: just checked.
    Some(unsafe { placed(layout) })
}

/// `place` for a layout that `place` accepts (or accepted when the block was allocated).
///
/// # Safety
/// `layout.size()` and `layout.align()` are at most `MAX_BLOCK`.
#[inline(always)]
unsafe fn placed(layout: Layout) -> Placement {
    let align = layout.align();
    if align <= 2 * TAG_SIZE {
        // SAFETY: forwarded.
        return unsafe { headed(layout.size(), align) };
    }
    // SAFETY: both are powers of two, and size + TAG_SIZE rounded up to an alignment of at
    // most MAX_BLOCK is at most 2 * MAX_BLOCK + TAG_SIZE, far below isize::MAX.
    let inner = unsafe { Layout::from_size_align_unchecked(layout.size() + TAG_SIZE, align) };
    Placement {
        inner,
        block: 0,
        tag: layout.size(),
        pad: 0,
    }
}

/// `placed` for an alignment of at most 16: a header of 8 bytes (16 if 16-aligned) before
/// the block, the tag its last 8.
///
/// # Safety
/// `align` is a power of two of at most `2 * TAG_SIZE`, and `size` at most `MAX_BLOCK`.
#[inline(always)]
unsafe fn headed(size: usize, align: usize) -> Placement {
    let header = align.max(TAG_SIZE);
    // SAFETY: `header` (8 or 16) is a power of two, and `size + header` is far below
    // isize::MAX.
    let inner = unsafe { Layout::from_size_align_unchecked(size + header, header) };
    Placement {
        inner,
        block: header,
        tag: header - TAG_SIZE,
        pad: header - TAG_SIZE,
    }
}

/// The largest block the fast paths take (with its header, a batch at most: no pocket or
/// stock serves more). A larger one, or one aligned to more than 16, takes `alloc_other`.
const SMALL: usize = MAX_BATCH - 2 * TAG_SIZE;

/// Writes the tag of a fresh inner block (`key` sealed, so a stray write or a foreign pointer
/// is seen at the free) and returns the block.
///
/// # Safety
/// `base` is an inner allocation of `at.inner`.
#[inline(always)]
unsafe fn tagged(base: *mut u8, at: Placement, key: Key) -> *mut u8 {
    // SAFETY: forwarded.
    unsafe { tagged_sealed(base, at, scope::sealed(key)) }
}

/// `tagged` with the key already sealed.
///
/// # Safety
/// `base` is an inner allocation of `at.inner`.
#[inline(always)]
unsafe fn tagged_sealed(base: *mut u8, at: Placement, sealed: u64) -> *mut u8 {
    // SAFETY: the tag's 8 bytes and the block lie inside the inner allocation (see `place`).
    unsafe {
        base.add(at.tag).cast::<u64>().write_unaligned(sealed);
        base.add(at.block)
    }
}

impl<A: GlobalAlloc> TagAlloc<A> {
    /// # Safety
    /// As for [`GlobalAlloc::alloc`].
    #[inline(always)]
    unsafe fn alloc_tagged(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        if size > SMALL || align > 2 * TAG_SIZE {
            // SAFETY: forwarded caller contract.
            return unsafe { self.alloc_other(layout, zeroed) };
        }
        // SAFETY: just checked; SMALL is below MAX_BLOCK.
        let at = unsafe { headed(size, align) };
        // SAFETY: forwarded caller contract; `at` is `place(layout)`.
        unsafe { self.alloc_placed(layout, at, zeroed) }
    }

    /// `alloc_tagged` of a block over `SMALL` or aligned to more than 16: out of the fast
    /// path's way.
    ///
    /// # Safety
    /// As for [`GlobalAlloc::alloc`].
    #[cold]
    #[inline(never)]
    unsafe fn alloc_other(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let Some(at) = place(layout) else {
            return core::ptr::null_mut();
        };
        // SAFETY: forwarded caller contract.
        unsafe { self.alloc_placed(layout, at, zeroed) }
    }

    /// # Safety
    /// As for [`GlobalAlloc::alloc`]; `at` is `place(layout)`.
    #[inline(always)]
    unsafe fn alloc_placed(&self, layout: Layout, at: Placement, zeroed: bool) -> *mut u8 {
        let (sealed, check, p) = scope::sealed_key_and_pocket();
        let key = sealed as Key;
        let bytes = at.inner.size();
        if !CORE.charge_block(&Thread, p, key, check, bytes, at.pad) {
            // SAFETY: forwarded caller contract.
            return unsafe { self.alloc_slow(layout, key, zeroed) };
        }
        // SAFETY: `at` came from `place`.
        unsafe { self.alloc_charged(at, sealed, zeroed) }
    }

    /// A charge the thread's pocket could not serve (or a charge of a thread without one),
    /// charged by `Stocks::charge_block_slow`. A large one (over a batch, charged to the
    /// counters directly) asks the inner allocator first, so a request it cannot meet leaves
    /// every counter as it was.
    ///
    /// # Safety
    /// `place(layout)` is `Some`.
    #[cold]
    #[inline(never)]
    unsafe fn alloc_slow(&self, layout: Layout, key: Key, zeroed: bool) -> *mut u8 {
        // SAFETY: forwarded.
        let at = unsafe { placed(layout) };
        let bytes = at.inner.size();
        if bytes <= CORE.batch() {
            return match CORE.charge_block_slow(&Thread, key, bytes, at.pad) {
                // SAFETY: forwarded.
                Some(charged) => unsafe { self.alloc_charged(at, scope::sealed(charged), zeroed) },
                None => core::ptr::null_mut(),
            };
        }
        // SAFETY: forwarded.
        let base = unsafe { self.inner_alloc(at, zeroed) };
        if base.is_null() {
            return base;
        }
        match CORE.charge_block_slow(&Thread, key, bytes, at.pad) {
            // SAFETY: `base` is a fresh inner block placed as `at`.
            Some(key) => unsafe { tagged(base, at, key) },
            None => {
                // SAFETY: `base` was just allocated with `at.inner`.
                unsafe { self.inner.dealloc(base, at.inner) };
                core::ptr::null_mut()
            }
        }
    }

    /// A tagged block for a block another design moves (the arena's realloc): charged to
    /// `key`, the block's owner (even a removed group), counting no new block. Null if refused;
    /// a large block is asked of the inner allocator first, as in `alloc_slow`.
    ///
    /// # Safety
    /// As for [`GlobalAlloc::alloc`].
    #[cfg(feature = "arena")]
    pub(crate) unsafe fn alloc_for(&self, layout: Layout, key: Key) -> *mut u8 {
        let Some(at) = place(layout) else {
            return core::ptr::null_mut();
        };
        let bytes = at.inner.size();
        if bytes <= CORE.batch() {
            let Some(key) = thread::charge(key, bytes, 0) else {
                return core::ptr::null_mut();
            };
            // SAFETY: forwarded caller contract.
            let base = unsafe { self.inner_alloc(at, false) };
            if base.is_null() {
                thread::uncharge(key, bytes, 0);
                return base;
            }
            CORE.pad_overhead(key, at.pad as isize);
            // SAFETY: `base` is a fresh inner block placed as `at`.
            return unsafe { tagged(base, at, key) };
        }
        // SAFETY: forwarded caller contract.
        let base = unsafe { self.inner_alloc(at, false) };
        if base.is_null() {
            return base;
        }
        match thread::charge(key, bytes, 0) {
            Some(key) => {
                CORE.pad_overhead(key, at.pad as isize);
                // SAFETY: `base` is a fresh inner block placed as `at`.
                unsafe { tagged(base, at, key) }
            }
            None => {
                // SAFETY: `base` was just allocated with `at.inner`.
                unsafe { self.inner.dealloc(base, at.inner) };
                core::ptr::null_mut()
            }
        }
    }

    /// # Safety
    /// `at` came from `place`; the key `sealed` seals has been charged for it.
    #[inline(always)]
    unsafe fn alloc_charged(&self, at: Placement, sealed: u64, zeroed: bool) -> *mut u8 {
        // SAFETY: forwarded.
        let base = unsafe { self.inner_alloc(at, zeroed) };
        if base.is_null() {
            // Counted as an allocation and a free, so allocs - frees still counts live blocks.
            CORE.uncharge_block_slow(&Thread, sealed as Key, at.inner.size(), at.pad);
            return base;
        }
        // SAFETY: `base` is a fresh inner block placed as `at`.
        unsafe { tagged_sealed(base, at, sealed) }
    }

    /// # Safety
    /// `at` came from `place`.
    #[inline(always)]
    unsafe fn inner_alloc(&self, at: Placement, zeroed: bool) -> *mut u8 {
        // SAFETY: `at.inner` has a non-zero size (it includes the tag) and a valid alignment.
        unsafe {
            if zeroed {
                self.inner.alloc_zeroed(at.inner)
            } else {
                self.inner.alloc(at.inner)
            }
        }
    }

    /// `dealloc` of a block aligned to more than 16 (its tag after it): out of the fast path's
    /// way.
    ///
    /// # Safety
    /// As for [`GlobalAlloc::dealloc`].
    #[cold]
    #[inline(never)]
    unsafe fn dealloc_aligned(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller passes a live block of ours with its layout, which `alloc` placed.
        unsafe { self.dealloc_placed(ptr, placed(layout)) }
    }

    /// # Safety
    /// `ptr` is a live block of ours, placed as `at`.
    #[inline(always)]
    unsafe fn dealloc_placed(&self, ptr: *mut u8, at: Placement) {
        // SAFETY: forwarded.
        let (base, tag) = unsafe { Self::tag(ptr, at) };
        let bytes = at.inner.size();
        // A tag the pocket takes is its own sealed key: only another one needs its seal checked.
        if !CORE.uncharge_block(scope::pocket(), tag, bytes, at.pad) {
            CORE.uncharge_block_unpocketed(&Thread, checked_tag(tag), bytes, at.pad);
        }
        // SAFETY: `base` is the inner allocation made with `at.inner`.
        unsafe { self.inner.dealloc(base, at.inner) }
    }

    /// Reads a block's tag: where its inner allocation starts, and its owner's key sealed
    /// (unchecked: see `checked_tag`).
    ///
    /// # Safety
    /// `ptr` was returned by this allocator for `layout`, placed as `at`, and is live.
    #[inline(always)]
    unsafe fn tag(ptr: *mut u8, at: Placement) -> (*mut u8, u64) {
        // SAFETY: per the caller, `ptr - at.block` is the inner allocation and its tag is at
        // `at.tag` inside it.
        unsafe {
            let base = ptr.sub(at.block);
            (base, base.add(at.tag).cast::<u64>().read_unaligned())
        }
    }

    /// `realloc` of a block aligned to more than 16, or to a size over `SMALL`: out of the
    /// fast path's way.
    ///
    /// # Safety
    /// As for [`GlobalAlloc::realloc`].
    #[cold]
    #[inline(never)]
    unsafe fn realloc_other(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller passes a live block of ours with its layout, which `alloc` placed.
        let old = unsafe { placed(layout) };
        // SAFETY: the caller guarantees that `new_size` rounded up to `layout.align()` (a
        // power of two) does not overflow `isize`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let Some(new) = place(new_layout) else {
            return core::ptr::null_mut();
        };
        // SAFETY: forwarded caller contract; `old` and `new` are the block's placements.
        unsafe { self.realloc_placed(ptr, old, new) }
    }

    /// `realloc` of the live block `ptr`, placed as `old`, to a block placed as `new` (the
    /// same alignment).
    ///
    /// # Safety
    /// As for [`GlobalAlloc::realloc`]; `old` is the block's placement, `new` that of the new
    /// size (accepted by `place`).
    #[inline(always)]
    unsafe fn realloc_placed(&self, ptr: *mut u8, old: Placement, new: Placement) -> *mut u8 {
        // SAFETY: the caller passes a live block of ours with its layout.
        let (base, tag) = unsafe { Self::tag(ptr, old) };
        let (old_bytes, new_bytes) = (old.inner.size(), new.inner.size());
        // The block keeps its owner, even a removed one: growth is charged to it, through this
        // thread's pocket if the pocket holds the owner's key (which vouches for the tag), else
        // through the stocks (objects = 0 means "an existing block", which the core never
        // redirects). The alignment, so the pad, is unchanged.
        let p = scope::pocket();
        if new_bytes > old_bytes {
            let more = new_bytes - old_bytes;
            if !CORE.pocket_resize(p, tag, more, true)
                && thread::charge(checked_tag(tag), more, 0).is_none()
            {
                return core::ptr::null_mut();
            }
        } else if !CORE.pocket_vouches(p, tag) {
            // A damaged tag is seen before the block is touched.
            checked_tag(tag);
        }
        // SAFETY: `base` is the inner allocation made with `old.inner`, and the new size is
        // non-zero and valid for its alignment (`place` checked it).
        let new_base = unsafe { self.inner.realloc(base, old.inner, new_bytes) };
        // What goes back: the growth, if the inner allocator refused it; else the shrinkage.
        let less = if new_base.is_null() {
            new_bytes.saturating_sub(old_bytes)
        } else {
            old_bytes.saturating_sub(new_bytes)
        };
        if less != 0 && !CORE.pocket_resize(p, tag, less, false) {
            thread::uncharge(checked_tag(tag), less, 0);
        }
        if new_base.is_null() {
            return new_base;
        }
        // SAFETY: `new_base` is an inner allocation of `new.inner`; `tag` is a valid sealed
        // key (the pocket's own, or checked above).
        unsafe { tagged_sealed(new_base, new, tag) }
    }
}

/// The key a block's tag seals; a damaged tag ends the process.
#[inline(always)]
fn checked_tag(tag: u64) -> Key {
    match scope::unseal(tag) {
        Some(key) => key,
        None => platform::corrupted(b"a block's owner tag is damaged (heap corruption, or a pointer this allocator did not return)"),
    }
}

// SAFETY: every block is the inner allocator's block for `place(layout).inner`, offset so
// that it meets `layout`'s alignment (a header of 8 bytes keeps the inner allocation's 8-byte
// alignment, which covers alignments up to 8, and one of 16 bytes its 16-byte alignment; above
// 16 the block starts the inner allocation, aligned as asked), with `layout.size()` usable
// bytes after the header or before the tag. Nothing here panics or unwinds:
// failures return null.
unsafe impl<A: GlobalAlloc> GlobalAlloc for TagAlloc<A> {
    #[inline(always)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded caller contract.
        unsafe { self.alloc_tagged(layout, false) }
    }

    #[inline(always)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded caller contract.
        unsafe { self.alloc_tagged(layout, true) }
    }

    #[inline(always)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.align() > 2 * TAG_SIZE {
            // SAFETY: forwarded caller contract.
            return unsafe { self.dealloc_aligned(ptr, layout) };
        }
        // SAFETY: the caller passes a live block of ours with its layout, which `alloc` placed
        // (with a header: the alignment is at most 16).
        unsafe { self.dealloc_placed(ptr, headed(layout.size(), layout.align())) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        if align > 2 * TAG_SIZE || new_size > SMALL {
            // SAFETY: forwarded caller contract.
            return unsafe { self.realloc_other(ptr, layout, new_size) };
        }
        // SAFETY: the caller passes a live block of ours with its layout, which `alloc` placed
        // (with a header: the alignment is at most 16); the new size is at most SMALL.
        unsafe { self.realloc_placed(ptr, headed(layout.size(), align), headed(new_size, align)) }
    }
}
