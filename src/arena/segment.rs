//! The memory the arena maps itself: one reserved stretch of address space, cut into aligned
//! segments of slabs, and the pool of empty slabs.
//!
//! The arena reserves one region at its first use (1 TiB of address space, less where that is
//! refused, for example under valgrind), never backed until used. A segment is 4 MiB of it,
//! aligned to 4 MiB, holding slabs of one size (one page to eight); its header holds the
//! metadata of all its slabs. So from any pointer: in the region or not (two loads and a
//! compare), its segment (a mask), its slab (a shift by the size in the segment's header) and
//! the slab's metadata, with no lock and no lookup. Segments are never unmapped, so a racing
//! reader of a slab's metadata always reads mapped memory.
//!
//! Empty slabs go back to a pool, one per slab size, shared by all groups (a slab is charged to
//! a group only while it is out of the pool). The pool keeps up to `MEMGROUP_ARENA_POOL` bytes
//! (default 4 MiB) resident for quick reuse; slabs pooled beyond that give their memory back to
//! the operating system (`madvise(MADV_DONTNEED)`, in batches of 128 slabs, so at most a batch
//! per slab size stays resident on top) and read as zeros when reused.
//!
//! A segment whose slabs are all in the pool (every one cut from it, none in use) leaves the
//! pool whole: its memory past the first page is given back (`madvise`), and it goes on a list
//! of free segments that the next segment cut, for any slab size, takes first. So memory freed
//! in slabs of one size serves slabs of another, and the region is not used up by a workload
//! whose sizes move. A free segment stays mapped (readers of stale metadata read zeros or old
//! values, never unmapped memory): nothing reads a slab's metadata without holding one of its
//! objects or the slab itself, and no slab of a free segment is held.

use core::mem::size_of;

use crate::platform;
use crate::sync::{AtomicUsize, Ordering};

use super::class::{KINDS, MIN_SLAB_SHIFT};
use super::slab;
use super::types::{self, Slab};
use crate::lock::SpinLock;

pub(crate) const SEGMENT_SHIFT: u32 = 22;
const SEGMENT: usize = 1 << SEGMENT_SHIFT;
/// The segment header before the slab metadata.
const HEADER: usize = 64;
/// The page holding a segment's header, kept resident while the segment is free.
const PAGE: usize = 1 << MIN_SLAB_SHIFT;

/// Slabs given back to the OS in one go.
const BATCH: usize = 128;

/// The region sizes tried, largest first.
const REGIONS: [usize; 6] = [1 << 40, 1 << 38, 1 << 36, 1 << 34, 1 << 32, 1 << 30];

static BASE: AtomicUsize = AtomicUsize::new(0);
/// 0 until the region is reserved: then no pointer is in it.
static SIZE: AtomicUsize = AtomicUsize::new(0);
/// Bytes of the region cut into segments.
static CUT: AtomicUsize = AtomicUsize::new(0);
/// Bytes of empty slabs pooled with their memory resident, and the most that may be.
static WARM: AtomicUsize = AtomicUsize::new(0);
static WARM_MAX: AtomicUsize = AtomicUsize::new(4 << 20);

#[repr(C, align(64))]
struct Header {
    /// Slab size of this segment, as a shift.
    shift: u32,
    slabs: u32,
    /// The first slab after the header (slabs before it hold the metadata).
    first: u32,
    /// Slabs of this segment in the pool (warm, cold or in a batch), under the kind's lock.
    pooled: u32,
    /// The next free segment, while this one is free (see `FREE`).
    next_free: usize,
}

/// Free segments (every slab of theirs was pooled, their memory given back), linked through
/// their headers' `next_free`; 0 if none. And the bytes they span.
static FREE: SpinLock<usize> = SpinLock::new(0);
static FREE_BYTES: AtomicUsize = AtomicUsize::new(0);

/// The pool and the segment being cut, for one slab size.
struct Kind {
    /// Empty slabs with resident memory, and without.
    warm: *mut Slab,
    cold: *mut Slab,
    pooled: usize,
    /// Pooled slabs waiting to be given back to the OS, in a batch (see `put`).
    doomed: [*mut Slab; BATCH],
    ndoomed: usize,
    /// The segment being cut into slabs, and its next fresh slab.
    segment: usize,
    fresh: usize,
}

// SAFETY: the raw pointers name slab metadata, which lives for the whole program; `Kind` is
// only reached under its lock.
unsafe impl Send for Kind {}

static KIND: [SpinLock<Kind>; KINDS] = [const {
    SpinLock::new(Kind {
        warm: core::ptr::null_mut(),
        cold: core::ptr::null_mut(),
        pooled: 0,
        doomed: [core::ptr::null_mut(); BATCH],
        ndoomed: 0,
        segment: 0,
        fresh: 0,
    })
}; KINDS];

/// Reserves the region. False if no size could be reserved: the arena is then unavailable and
/// every block goes to the inner allocator.
pub(crate) fn reserve(pool: usize) -> bool {
    WARM_MAX.store(pool, Ordering::Relaxed);
    for size in REGIONS {
        // Room to align the start to a segment.
        let p = platform::reserve(size + SEGMENT);
        if !p.is_null() {
            let base = (p as usize + SEGMENT - 1) & !(SEGMENT - 1);
            // BASE before SIZE, which publishes it (see `contains`).
            BASE.store(base, Ordering::Relaxed);
            SIZE.store(size, Ordering::Release);
            return true;
        }
    }
    false
}

/// Whether `p` is in the region: a slab object. Everything else came from the inner allocator.
#[inline(always)]
pub(crate) fn contains(p: *const u8) -> bool {
    // SIZE first (Acquire, paired with `reserve`'s Release store): a non-zero size means BASE
    // is published too. A zero size (not reserved yet) contains nothing whatever BASE reads.
    let size = SIZE.load(Ordering::Acquire);
    (p as usize).wrapping_sub(BASE.load(Ordering::Relaxed)) < size
}

/// The metadata of the slab holding `p`.
///
/// # Safety
/// `p` is in the region, in a slab handed out by `take`.
#[inline(always)]
pub(crate) unsafe fn slab_of(p: *const u8) -> *mut Slab {
    let base = BASE.load(Ordering::Relaxed);
    let seg = base + ((p as usize - base) & !(SEGMENT - 1));
    // SAFETY: `p` lies in a segment that was cut, whose header was written before any of its
    // slabs was handed out, and segments are never unmapped.
    let shift = unsafe { (*(seg as *const Header)).shift };
    let index = (p as usize - seg) >> shift;
    (seg + HEADER + index * size_of::<Slab>()) as *mut Slab
}

/// The first byte of slab `s`.
#[inline(always)]
pub(crate) fn start(s: *const Slab) -> *mut u8 {
    let seg = s as usize & !(SEGMENT - 1);
    let index = (s as usize - seg - HEADER) / size_of::<Slab>();
    // SAFETY: `seg` is the header of the segment holding the metadata `s` (headers come
    // first in a segment, and metadata never spans segments).
    let shift = unsafe { (*(seg as *const Header)).shift };
    (seg + (index << shift)) as *mut u8
}

/// An empty slab of kind `kind` (slab size `1 << (12 + kind)`), taken from the pool or cut from
/// a segment; null when the region is exhausted or its memory cannot be committed. The caller
/// holds it exclusively; its memory is zero or left over from a previous use.
pub(crate) fn take(kind: usize) -> *mut Slab {
    let shift = MIN_SLAB_SHIFT as usize + kind;
    KIND[kind].with(|k| {
        // Resident slabs first: warm ones, then those waiting to be given back, then cold.
        let s = k.warm;
        if !s.is_null() {
            // SAFETY: pooled slabs are only reached under this lock.
            unsafe {
                slab::unlink(&raw mut k.warm, s);
                unpool(s);
            }
            WARM.fetch_sub(1 << shift, Ordering::Relaxed);
            k.pooled -= 1;
            return s;
        }
        if k.ndoomed > 0 {
            k.ndoomed -= 1;
            k.pooled -= 1;
            let s = k.doomed[k.ndoomed];
            // SAFETY: as above.
            unsafe { unpool(s) };
            return s;
        }
        let s = k.cold;
        if !s.is_null() {
            // SAFETY: as above.
            unsafe {
                slab::unlink(&raw mut k.cold, s);
                unpool(s);
            }
            k.pooled -= 1;
            return s;
        }
        if k.segment == 0 || k.fresh == SEGMENT >> shift {
            let Some((seg, first)) = new_segment(shift) else {
                return core::ptr::null_mut();
            };
            k.segment = seg;
            k.fresh = first;
        }
        let s = (k.segment + HEADER + k.fresh * size_of::<Slab>()) as *mut Slab;
        k.fresh += 1;
        // SAFETY: the metadata of a slab never handed out since its segment was cut: fresh
        // zeros, or whatever a previous cut of a free segment left there.
        unsafe { s.write(Slab::empty()) };
        s
    })
}

/// A slab leaves the pool: one fewer pooled slab in its segment.
///
/// # Safety
/// The caller holds the kind's lock and took `s` from its pool.
unsafe fn unpool(s: *mut Slab) {
    // SAFETY: per the caller; the header is the segment's first bytes.
    unsafe { (*header(s)).pooled -= 1 };
}

/// The header of the segment holding slab metadata `s`.
fn header(s: *const Slab) -> *mut Header {
    (s as usize & !(SEGMENT - 1)) as *mut Header
}

/// Cuts a new segment of slabs of `1 << shift` bytes: returns it and its first slab index
/// after the header.
fn new_segment(shift: usize) -> Option<(usize, usize)> {
    let seg = match FREE.with(|head| {
        let seg = *head;
        if seg != 0 {
            // SAFETY: a free segment's header holds the link; only reached under this lock.
            *head = unsafe { (*(seg as *const Header)).next_free };
        }
        seg
    }) {
        0 => {
            let size = SIZE.load(Ordering::Acquire);
            let offset = CUT.fetch_add(SEGMENT, Ordering::Relaxed);
            if offset.checked_add(SEGMENT)? > size {
                CUT.fetch_sub(SEGMENT, Ordering::Relaxed);
                return None;
            }
            let seg = BASE.load(Ordering::Relaxed) + offset;
            if !platform::commit(seg as *mut u8, SEGMENT) {
                // Give the range back, unless another slab size cut a segment after it
                // meanwhile: then leave the hole (it is only address space, never touched).
                let _ = CUT.compare_exchange(
                    offset + SEGMENT,
                    offset,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                return None;
            }
            seg
        }
        // Still committed: its memory was only given back, and reads as zeros.
        seg => {
            FREE_BYTES.fetch_sub(SEGMENT, Ordering::Relaxed);
            seg
        }
    };
    let slabs = SEGMENT >> shift;
    let first = (HEADER + slabs * size_of::<Slab>()).div_ceil(1 << shift);
    // SAFETY: the segment is committed and no one else knows it (fresh, or free: none of its
    // slabs is held).
    unsafe {
        (seg as *mut Header).write(Header {
            shift: shift as u32,
            slabs: slabs as u32,
            first: first as u32,
            pooled: 0,
            next_free: 0,
        })
    };
    Some((seg, first))
}

/// Called under the kind's lock after a slab of `seg` entered the pool: if every slab of
/// `seg` is pooled now (and `seg` is not the segment being cut), takes them all out of the
/// pool and returns true; the caller then gives the segment back with `free_segment`, outside
/// the lock.
///
/// # Safety
/// The caller holds `k`'s lock; `seg` is a segment of `k`'s slab size.
unsafe fn drain_if_empty(k: &mut Kind, seg: usize, shift: usize) -> bool {
    // SAFETY: per the caller; the pool's lists and the header's count are under the lock.
    unsafe {
        let h = seg as *mut Header;
        if seg == k.segment || (*h).pooled != (*h).slabs - (*h).first {
            return false;
        }
        let mut i = 0;
        while i < k.ndoomed {
            if k.doomed[i] as usize & !(SEGMENT - 1) == seg {
                k.ndoomed -= 1;
                k.doomed[i] = k.doomed[k.ndoomed];
            } else {
                i += 1;
            }
        }
        let mut warm = 0;
        for index in (*h).first..(*h).slabs {
            let s = (seg + HEADER + index as usize * size_of::<Slab>()) as *mut Slab;
            match (*s).state {
                types::POOLED => {
                    slab::unlink(&raw mut k.warm, s);
                    warm += 1usize << shift;
                }
                types::COLD => slab::unlink(&raw mut k.cold, s),
                _ => {}
            }
        }
        WARM.fetch_sub(warm, Ordering::Relaxed);
        k.pooled -= (*h).pooled as usize;
        (*h).pooled = 0;
        true
    }
}

/// Gives a segment drained by `drain_if_empty` back: its memory past the header's first page
/// to the OS, itself to the free list.
fn free_segment(seg: usize) {
    platform::decommit((seg + PAGE) as *mut u8, SEGMENT - PAGE);
    FREE_BYTES.fetch_add(SEGMENT, Ordering::Relaxed);
    FREE.with(|head| {
        // SAFETY: the segment is ours (drained, no slab of it held); its header's first page
        // stays resident.
        unsafe { (*(seg as *mut Header)).next_free = *head };
        *head = seg;
    });
}

/// Returns an empty slab to the pool: with its memory resident if the pool holds less than its
/// limit of resident bytes, else to be given back to the operating system. Those are given
/// back in batches of `BATCH`, sorted so that neighbouring slabs (often freed together) go in
/// one `madvise` call: one call per slab would cost more than the frees that emptied it.
///
/// # Safety
/// The caller holds `s` exclusively, no object of it is live, and it came from `take`.
pub(crate) unsafe fn put(s: *mut Slab, kind: usize) {
    let bytes = 1usize << (MIN_SLAB_SHIFT as usize + kind);
    let warm = WARM.fetch_add(bytes, Ordering::Relaxed) + bytes <= WARM_MAX.load(Ordering::Relaxed);
    if !warm {
        WARM.fetch_sub(bytes, Ordering::Relaxed);
    }
    let shift = MIN_SLAB_SHIFT as usize + kind;
    let seg = s as usize & !(SEGMENT - 1);
    let (batch, empty) = KIND[kind].with(|k| {
        k.pooled += 1;
        // SAFETY: the caller gave us `s`; the lists and the segment's count are only reached
        // under this lock.
        unsafe {
            (*header(s)).pooled += 1;
            if warm {
                (*s).state = types::POOLED;
                slab::push(&raw mut k.warm, s);
                return (None, drain_if_empty(k, seg, shift));
            }
            (*s).state = types::DOOMED;
        }
        k.doomed[k.ndoomed] = s;
        k.ndoomed += 1;
        if k.ndoomed < BATCH {
            // SAFETY: as above.
            return (None, unsafe { drain_if_empty(k, seg, shift) });
        }
        // The batch leaves the pool until it is given back (its slabs count as not pooled:
        // their segments stay until they are back).
        k.ndoomed = 0;
        for &d in &k.doomed {
            // SAFETY: as above.
            unsafe { unpool(d) };
        }
        k.pooled -= BATCH;
        (Some(k.doomed), false)
    });
    if empty {
        free_segment(seg);
    }
    if let Some(mut batch) = batch {
        // Outside the lock: the batch's slabs are in no list, ours alone.
        batch.sort_unstable();
        let mut i = 0;
        while i < BATCH {
            let first = start(batch[i]);
            let mut j = i + 1;
            // Slabs of one segment are contiguous: a neighbour starts at `first + n * bytes`.
            // Wrapping: past the segment's end that address is only compared, never used.
            while j < BATCH && start(batch[j]) == first.wrapping_add((j - i) * bytes) {
                j += 1;
            }
            platform::decommit(first, (j - i) * bytes);
            i = j;
        }
        let mut empty = [0usize; BATCH];
        let mut nempty = 0;
        KIND[kind].with(|k| {
            for s in batch {
                // SAFETY: as above; back under the lock.
                unsafe {
                    (*s).state = types::COLD;
                    slab::push(&raw mut k.cold, s);
                    (*header(s)).pooled += 1;
                    k.pooled += 1;
                    let seg = s as usize & !(SEGMENT - 1);
                    if drain_if_empty(k, seg, shift) {
                        empty[nempty] = seg;
                        nempty += 1;
                    }
                }
            }
        });
        for &seg in &empty[..nempty] {
            free_segment(seg);
        }
    }
}

/// Bytes of the segments cut that are free (given back, waiting to be cut again).
pub(crate) fn free_segments() -> usize {
    FREE_BYTES.load(Ordering::Relaxed)
}

/// What the arena holds, in bytes: segments cut, slabs pooled, and pooled slabs still resident
/// (the warm ones, and those waiting in a batch to be given back).
pub(crate) fn footprint() -> (usize, usize, usize) {
    let (mut pooled, mut doomed) = (0, 0);
    for (kind, k) in KIND.iter().enumerate() {
        k.with(|k| {
            pooled += k.pooled << (MIN_SLAB_SHIFT as usize + kind);
            doomed += k.ndoomed << (MIN_SLAB_SHIFT as usize + kind);
        });
    }
    (
        CUT.load(Ordering::Relaxed),
        pooled,
        WARM.load(Ordering::Relaxed) + doomed,
    )
}

/// Takes (`lock`) or releases every pool lock, around `fork()`.
pub(crate) fn fork_locks(lock: bool) {
    for k in &KIND {
        if lock {
            k.raw_lock();
        } else {
            k.raw_unlock();
        }
    }
    if lock {
        FREE.raw_lock();
    } else {
        FREE.raw_unlock();
    }
}
