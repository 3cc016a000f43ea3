//! What every bench shares: the reference allocators that are not memgroup (`cap`, one global
//! counter with a limit; `pad8`, the tag's header with no accounting) and the small statistics
//! and configuration helpers. Included by each bench with `#[path = "common/mod.rs"] mod
//! common;` (this directory is not a bench target).

#![allow(dead_code)] // each bench uses part of it

use std::alloc::{GlobalAlloc, Layout};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicUsize, Ordering};

// `resident()`: the process's resident memory (one copy with the tests').
include!("../../tests/suite/resident.rs");

/// A single global counter with a limit, as the `cap` crate does it: charge with one
/// `fetch_add`, undo on failure, uncharge with one `fetch_sub`.
pub struct Cap<A> {
    inner: A,
    allocated: AtomicUsize,
    limit: usize,
}

impl<A> Cap<A> {
    pub const fn new(inner: A, limit: usize) -> Self {
        Cap {
            inner,
            allocated: AtomicUsize::new(0),
            limit,
        }
    }

    /// The bytes it counts now.
    pub fn allocated(&self) -> &AtomicUsize {
        &self.allocated
    }

    #[inline(always)]
    fn charge(&self, size: usize) -> bool {
        if self.allocated.fetch_add(size, Ordering::Relaxed) + size <= self.limit {
            true
        } else {
            self.allocated.fetch_sub(size, Ordering::Relaxed);
            false
        }
    }
}

impl<A> Cap<A> {
    /// Charges `layout`'s size, then allocates with `alloc`; undoes the charge if it fails.
    #[inline(always)]
    fn charged(&self, layout: Layout, alloc: impl FnOnce() -> *mut u8) -> *mut u8 {
        if !self.charge(layout.size()) {
            return null_mut();
        }
        let ptr = alloc();
        if ptr.is_null() {
            self.allocated.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        ptr
    }
}

// SAFETY: forwards every call to `inner` with the caller's layout unchanged; only counts.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Cap<A> {
    #[inline(always)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        self.charged(layout, || unsafe { self.inner.alloc(layout) })
    }

    #[inline(always)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc_zeroed` is passed on unchanged.
        self.charged(layout, || unsafe { self.inner.alloc_zeroed(layout) })
    }

    #[inline(always)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `self.inner` with `layout` (the caller's contract).
        unsafe { self.inner.dealloc(ptr, layout) };
        self.allocated.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    #[inline(always)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old && !self.charge(new_size - old) {
            return null_mut();
        }
        // SAFETY: the caller's contract for `realloc` is passed on unchanged.
        let new = unsafe { self.inner.realloc(ptr, layout, new_size) };
        if new.is_null() {
            if new_size > old {
                self.allocated.fetch_sub(new_size - old, Ordering::Relaxed);
            }
        } else if new_size < old {
            self.allocated.fetch_sub(old - new_size, Ordering::Relaxed);
        }
        new
    }
}

/// An 8-byte word stored with every block exactly where `TagAlloc` puts its tag (a header of
/// 8 bytes for alignments up to 8, 16 for 16-aligned blocks, right after the block above),
/// written on allocation and checked on free, with no accounting: the floor of the inline-tag
/// design .
pub struct Pad8<A> {
    inner: A,
}

const PAD: usize = 8;
const PAD_WORD: u64 = 0x6d65_6d67_726f_7570;

/// The largest block `padded` places without a check (as `TagAlloc`'s fast path: a block of at
/// most this size aligned to at most 16 takes the header with no overflow check).
const SMALL: usize = 1 << 40;

/// The inner layout of a block, its offset in it, and the offset of the word.
#[inline(always)]
fn padded(layout: Layout) -> Option<(Layout, usize, usize)> {
    let align = layout.align();
    if layout.size() <= SMALL && align <= 2 * PAD {
        let header = align.max(PAD);
        // SAFETY: `header` (8 or 16) is a power of two and `size + header` is far below
        // isize::MAX.
        let inner = unsafe { Layout::from_size_align_unchecked(layout.size() + header, header) };
        return Some((inner, header, header - PAD));
    }
    padded_other(layout)
}

/// `padded` of a block over `SMALL` or aligned to more than 16.
#[cold]
#[inline(never)]
fn padded_other(layout: Layout) -> Option<(Layout, usize, usize)> {
    let align = layout.align();
    let (block, word, extra) = if align <= 2 * PAD {
        let header = align.max(PAD);
        (header, header - PAD, header - PAD)
    } else {
        (0, layout.size(), 0)
    };
    let size = layout.size().checked_add(PAD + extra)?;
    Some((
        Layout::from_size_align(size, align.max(PAD)).ok()?,
        block,
        word,
    ))
}

impl<A> Pad8<A> {
    pub const fn new(inner: A) -> Self {
        Pad8 { inner }
    }
}

impl<A: GlobalAlloc> Pad8<A> {
    /// # Safety
    ///
    /// `zeroed` or not, the caller's contract for `GlobalAlloc::alloc`.
    #[inline(always)]
    unsafe fn alloc_padded(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let Some((inner, block, word)) = padded(layout) else {
            return null_mut();
        };
        // SAFETY: `inner` has a non-zero size.
        let base = unsafe {
            if zeroed {
                self.inner.alloc_zeroed(inner)
            } else {
                self.inner.alloc(inner)
            }
        };
        if base.is_null() {
            return base;
        }
        // SAFETY: the word and the block lie inside the inner block.
        unsafe {
            base.add(word).cast::<u64>().write_unaligned(PAD_WORD);
            base.add(block)
        }
    }
}

// SAFETY: every block is the inner allocator's block for `padded(layout).0`, offset by a header
// of 8 or 16 bytes (which keeps alignments up to 8 or 16) or not at all (larger alignments),
// with `layout.size()` usable bytes beside the word.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Pad8<A> {
    #[inline(always)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.alloc_padded(layout, false) }
    }

    #[inline(always)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.alloc_padded(layout, true) }
    }

    #[inline(always)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some((inner, block, word)) = padded(layout) else {
            die(b"pad8: a layout it could not have allocated\n")
        };
        // SAFETY: `ptr` came from `alloc(layout)`, so `ptr - block` is the inner block.
        unsafe {
            let base = ptr.sub(block);
            if base.add(word).cast::<u64>().read_unaligned() != PAD_WORD {
                die(b"pad8: damaged word\n");
            }
            self.inner.dealloc(base, inner);
        }
    }

    #[inline(always)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Some((old, block, _)) = padded(layout) else {
            die(b"pad8: a layout it could not have allocated\n")
        };
        let Some((new, _, word)) = Layout::from_size_align(new_size, layout.align())
            .ok()
            .and_then(padded)
        else {
            return null_mut();
        };
        // SAFETY: `ptr - block` is the inner block of `old` (the caller's contract); the new
        // size is non-zero and valid for the alignment (`padded` checked it). The header keeps
        // its offset; a word after the block is written again at its new place.
        unsafe {
            let base = self.inner.realloc(ptr.sub(block), old, new.size());
            if base.is_null() {
                return base;
            }
            base.add(word).cast::<u64>().write_unaligned(PAD_WORD);
            base.add(block)
        }
    }
}

/// Allocation must not panic: say why on stderr and abort.
pub fn die(msg: &[u8]) -> ! {
    // SAFETY: writes `msg.len()` bytes of a live slice to fd 2; abort never returns.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::abort()
    }
}

/// A variable's value as a number, `None` when unset; a bench given garbage stops and says so.
pub fn env_usize(name: &str) -> Option<usize> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
    )
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// The 1-minute load average (Linux), to tell a quiet run from a disturbed one.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".to_string())
}
