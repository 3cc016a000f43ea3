//! The tag design (Vladimir Davydov's, seeds/003): one shared inner allocator, and the owner's
//! key stored with every block, so a free finds its owner without a lookup.
//!
//! The tag is 8 bytes. For alignments up to 8 it is a header just before the block; above 8,
//! a header would cost a whole alignment unit (2 MiB for a 2 MiB alignment), so the tag goes
//! right after the block instead, unaligned. Either way a block costs exactly `size + 8`
//! bytes of the inner allocator, which is what its owner is charged: `TAG_SIZE` of it is
//! reported as `overhead`.

use core::alloc::{GlobalAlloc, Layout};
use std::alloc::System;

use crate::core::stock::Key;
use crate::group::STOCKS;
use crate::{platform, scope};

/// Bytes of the tag every block carries in the tag design.
pub const TAG_SIZE: usize = 8;

/// Guards the tag against stray writes and foreign pointers: its upper half repeats the key.
const CHECK: u32 = 0x9e37_79b9;

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
    let size = layout.size() + TAG_SIZE;
    let header = layout.align() <= TAG_SIZE;
    // SAFETY: both are powers of two, and size + TAG_SIZE rounded up to an alignment of at
    // most MAX_BLOCK is at most 2 * MAX_BLOCK + TAG_SIZE, far below isize::MAX.
    let inner = unsafe { Layout::from_size_align_unchecked(size, layout.align().max(TAG_SIZE)) };
    Placement {
        inner,
        block: if header { TAG_SIZE } else { 0 },
        tag: if header { 0 } else { layout.size() },
    }
}

#[inline(always)]
fn tag_word(key: Key) -> u64 {
    key as u64 | ((key ^ CHECK) as u64) << 32
}

/// Writes the tag of a fresh inner block and returns the block.
///
/// # Safety
/// `base` is an inner allocation of `at.inner`.
#[inline(always)]
unsafe fn tagged(base: *mut u8, at: Placement, key: Key) -> *mut u8 {
    // SAFETY: the tag's 8 bytes and the block lie inside the inner allocation (see `place`).
    unsafe {
        base.add(at.tag)
            .cast::<u64>()
            .write_unaligned(tag_word(key));
        base.add(at.block)
    }
}

/// Charges `bytes` (and `objects` new blocks) to `key`; returns the key actually charged,
/// which differs when the group was removed and a new block goes to its nearest live ancestor.
#[inline(always)]
pub(crate) fn charge(key: Key, bytes: usize, objects: u64) -> Option<Key> {
    let cpu = platform::cpu();
    if STOCKS.charge(cpu, key, bytes, objects) {
        return Some(key);
    }
    STOCKS.charge_slow(cpu, key, bytes, objects, scope::mode())
}

#[inline(always)]
pub(crate) fn uncharge(key: Key, bytes: usize, objects: u64) {
    let cpu = platform::cpu();
    if !STOCKS.uncharge(cpu, key, bytes, objects) {
        STOCKS.uncharge_slow(cpu, key, bytes, objects);
    }
}

impl<A: GlobalAlloc> TagAlloc<A> {
    /// # Safety
    /// As for [`GlobalAlloc::alloc`].
    #[inline(always)]
    unsafe fn alloc_tagged(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let Some(at) = place(layout) else {
            return core::ptr::null_mut();
        };
        let key = scope::current_key();
        let bytes = at.inner.size();
        if !STOCKS.charge(platform::cpu(), key, bytes, 1) {
            // SAFETY: forwarded caller contract.
            return unsafe { self.alloc_slow(layout, key, zeroed) };
        }
        // SAFETY: `at` came from `place`.
        unsafe { self.alloc_charged(at, key, zeroed) }
    }

    /// A charge the stock could not serve: a small one refills it and goes on; a large one
    /// (over a batch, charged to the counters directly) asks the inner allocator first, so a
    /// request it cannot meet leaves every counter as it was.
    ///
    /// # Safety
    /// `place(layout)` is `Some`.
    #[cold]
    #[inline(never)]
    unsafe fn alloc_slow(&self, layout: Layout, key: Key, zeroed: bool) -> *mut u8 {
        // SAFETY: forwarded.
        let at = unsafe { placed(layout) };
        let (cpu, bytes, mode) = (platform::cpu(), at.inner.size(), scope::mode());
        if bytes <= STOCKS.batch() {
            return match STOCKS.charge_slow(cpu, key, bytes, 1, mode) {
                // SAFETY: forwarded.
                Some(key) => unsafe { self.alloc_charged(at, key, zeroed) },
                None => core::ptr::null_mut(),
            };
        }
        // SAFETY: forwarded.
        let base = unsafe { self.inner_alloc(at, zeroed) };
        if base.is_null() {
            return base;
        }
        match STOCKS.charge_slow(cpu, key, bytes, 1, mode) {
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
        if bytes <= STOCKS.batch() {
            let Some(key) = charge(key, bytes, 0) else {
                return core::ptr::null_mut();
            };
            // SAFETY: forwarded caller contract.
            let base = unsafe { self.inner_alloc(at, false) };
            if base.is_null() {
                uncharge(key, bytes, 0);
                return base;
            }
            // SAFETY: `base` is a fresh inner block placed as `at`.
            return unsafe { tagged(base, at, key) };
        }
        // SAFETY: forwarded caller contract.
        let base = unsafe { self.inner_alloc(at, false) };
        if base.is_null() {
            return base;
        }
        match charge(key, bytes, 0) {
            // SAFETY: `base` is a fresh inner block placed as `at`.
            Some(key) => unsafe { tagged(base, at, key) },
            None => {
                // SAFETY: `base` was just allocated with `at.inner`.
                unsafe { self.inner.dealloc(base, at.inner) };
                core::ptr::null_mut()
            }
        }
    }

    /// # Safety
    /// `at` came from `place`; `key` has been charged for it.
    #[inline(always)]
    unsafe fn alloc_charged(&self, at: Placement, key: Key, zeroed: bool) -> *mut u8 {
        // SAFETY: forwarded.
        let base = unsafe { self.inner_alloc(at, zeroed) };
        if base.is_null() {
            // Counted as an allocation and a free, so allocs - frees still counts live blocks.
            uncharge(key, at.inner.size(), 1);
            return base;
        }
        // SAFETY: `base` is a fresh inner block placed as `at`.
        unsafe { tagged(base, at, key) }
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

    /// Reads the owner's key of a block.
    ///
    /// # Safety
    /// `ptr` was returned by this allocator for `layout`, placed as `at`, and is live.
    #[inline(always)]
    unsafe fn owner(ptr: *mut u8, at: Placement) -> (*mut u8, Key) {
        // SAFETY: per the caller, `ptr - at.block` is the inner allocation and its tag is at
        // `at.tag` inside it.
        let (base, tag) = unsafe {
            let base = ptr.sub(at.block);
            (base, base.add(at.tag).cast::<u64>().read_unaligned())
        };
        let key = tag as Key;
        if (tag >> 32) as u32 != key ^ CHECK {
            platform::corrupted(b"a block's owner tag is damaged (heap corruption, or a pointer this allocator did not return)");
        }
        (base, key)
    }
}

// SAFETY: every block is the inner allocator's block for `place(layout).inner`, offset so
// that it meets `layout`'s alignment (a header of 8 bytes keeps 8-byte alignment, which covers
// alignments up to 8; above that the block starts the inner allocation, aligned as asked),
// with `layout.size()` usable bytes before or after the tag. Nothing here panics or unwinds:
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
        // SAFETY: the caller passes a live block of ours with its layout, which `alloc` placed.
        let (base, key, at) = unsafe {
            let at = placed(layout);
            let (base, key) = Self::owner(ptr, at);
            (base, key, at)
        };
        uncharge(key, at.inner.size(), 1);
        // SAFETY: `base` is the inner allocation made with `at.inner`.
        unsafe { self.inner.dealloc(base, at.inner) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller passes a live block of ours with its layout, which `alloc` placed.
        let old = unsafe { placed(layout) };
        let Some(new) = Layout::from_size_align(new_size, layout.align())
            .ok()
            .and_then(place)
        else {
            return core::ptr::null_mut();
        };
        // SAFETY: the caller passes a live block of ours with its layout.
        let (base, key) = unsafe { Self::owner(ptr, old) };
        let (old_bytes, new_bytes) = (old.inner.size(), new.inner.size());
        // The block keeps its owner, even a removed one: growth is charged to it (objects = 0
        // means "an existing block", which the core never redirects).
        if new_bytes > old_bytes && charge(key, new_bytes - old_bytes, 0).is_none() {
            return core::ptr::null_mut();
        }
        // SAFETY: `base` is the inner allocation made with `old.inner`, and the new size is
        // non-zero and valid for its alignment (`place` checked it).
        let new_base = unsafe { self.inner.realloc(base, old.inner, new_bytes) };
        if new_base.is_null() {
            if new_bytes > old_bytes {
                uncharge(key, new_bytes - old_bytes, 0);
            }
            return new_base;
        }
        if new_bytes < old_bytes {
            uncharge(key, old_bytes - new_bytes, 0);
        }
        // SAFETY: `new_base` is an inner allocation of `new.inner`.
        unsafe { tagged(new_base, new, key) }
    }
}
