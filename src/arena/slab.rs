//! The word through which other threads free into a slab, and a slab's list links (the
//! metadata itself is `super::types::Slab`).
//!
//! A slab holds objects of one size class, charged as a whole to one group key (a group and a
//! kind, so kernel objects never share a slab with user ones). It has an owner, a per-thread
//! group heap (`super::types::GroupHeap`): only the owner allocates from it, and frees by the
//! owning thread go to the owner's plain free list. Every other thread frees through `remote`,
//! one atomic word:
//!
//! ```text
//! bits 63..48: count (objects on the list; for an orphan: frees since it was orphaned)
//! bits 47..3:  head of the remote free list (an object address), or 0
//! bits 2..0:   FULL, NOTIFYING, ORPHAN
//! ```
//!
//! An object on the remote list (or on a group heap's delayed list) holds one word: the next
//! object's address, its requested size in bits 61..48 (so the owner can account for it) and
//! `UNCOUNTED` for a free that is the second half of a realloc's move (no free to count).
//!
//! A slab's metadata lives in its segment's header, never in the slab itself, so objects can
//! use every byte, and the metadata of any slab ever handed out stays mapped for good: a racing
//! thread may read a slab's fields after it was released, and finds stale values, never
//! unmapped memory.

use super::types::Slab;

/// The owner parked the slab on its full list: the next remote free hands its object to the
/// owner's delayed list instead, so the owner learns the slab has room again.
pub(crate) const FULL: u64 = 1;
/// A remote free is handing an object to the owner (between clearing `FULL` and publishing it
/// on the owner's delayed list): the owner must not be retired meanwhile.
pub(crate) const NOTIFYING: u64 = 2;
/// No owner (its group was removed): frees only count, and the free
/// that makes the count reach `used` releases the slab.
pub(crate) const ORPHAN: u64 = 4;
/// An orphan whose last object was freed: the slab is being released.
pub(crate) const DEAD: u64 = ORPHAN | FULL;
pub(crate) const FLAGS: u64 = 7;
pub(crate) const PTR_MASK: u64 = 0x0000_ffff_ffff_fff8;
pub(crate) const COUNT_ONE: u64 = 1 << 48;
/// In an object's link word: its free is not counted (a realloc's move).
pub(crate) const UNCOUNTED: u64 = 1 << 63;
const SIZE_MASK: u64 = 0x3fff;

pub(crate) use super::types::empty;

#[inline(always)]
pub(crate) const fn count(w: u64) -> u64 {
    w >> 48
}

#[inline(always)]
pub(crate) const fn head(w: u64) -> *mut u8 {
    (w & PTR_MASK) as usize as *mut u8
}

/// The link word of an object put on a remote or delayed list.
#[inline(always)]
pub(crate) fn link(next: *mut u8, size: usize, counted: bool) -> u64 {
    debug_assert!(size <= super::class::MAX_SMALL);
    (next as u64 & PTR_MASK) | (size as u64) << 48 | if counted { 0 } else { UNCOUNTED }
}

/// An object's link word: (next, size, counted).
#[inline(always)]
pub(crate) fn unlink_word(w: u64) -> (*mut u8, usize, bool) {
    (
        head(w),
        ((w >> 48) & SIZE_MASK) as usize,
        w & UNCOUNTED == 0,
    )
}

/// Pushes `s` at the front of the list at `*list`.
///
/// # Safety
/// The caller owns `s` and the list; `s` is on no list.
pub(crate) unsafe fn push(list: *mut *mut Slab, s: *mut Slab) {
    // SAFETY: the caller owns the list and `s`, whose links are free.
    unsafe {
        (*s).prev = core::ptr::null_mut();
        (*s).next = *list;
        if !(*list).is_null() {
            (**list).prev = s;
        }
        *list = s;
    }
}

/// Unlinks `s` from the list at `*list`.
///
/// # Safety
/// The caller owns the list, and `s` is on it.
pub(crate) unsafe fn unlink(list: *mut *mut Slab, s: *mut Slab) {
    // SAFETY: the caller owns the list; `s` and its neighbours are on it.
    unsafe {
        if (*s).prev.is_null() {
            *list = (*s).next;
        } else {
            (*(*s).prev).next = (*s).next;
        }
        if !(*s).next.is_null() {
            (*(*s).next).prev = (*s).prev;
        }
        (*s).prev = core::ptr::null_mut();
        (*s).next = core::ptr::null_mut();
    }
}
