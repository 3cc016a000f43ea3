//! Size classes and slab geometry.
//!
//! Blocks of at most [`MAX_SMALL`] bytes (alignment at most [`MAX_ALIGN`]) live in slabs. The
//! cutoff follows SLUB's: its kmalloc caches stop at two pages, above which the page allocator
//! serves. Above 8 KiB the tag design's 8 bytes cost at most 0.1% of a block, while a slab of
//! such blocks that belongs to one group strands up to three unused blocks (tens of KiB) per
//! group and size: slabs buy nothing there, so large blocks go to the inner allocator with a tag.
//!
//! Classes: 8, 16, 24, then steps of 16 up to 128 (the sizes of most Rust boxes and small
//! collections), then four per doubling, so a block above 16 bytes wastes less than a third of
//! its class (under a fifth above 128). A class's objects start at multiples of its size from a slab start
//! (aligned to at least a page), so a class is aligned to the largest power of two dividing its
//! size.
//!
//! A slab is one to eight pages: the smallest that holds at least [`MIN_OBJECTS`] objects and
//! wastes at most an eighth of itself at its end. Small slabs keep the per-group cost low: a
//! group holding one 24-byte object is charged one page, not a segment.
//!
//! A group is charged slabs of a class only once it has asked for enough of it (issue 12.3).
//! Its first small blocks on a thread go to the inner allocator with the tag design's 8-byte
//! tag (charged exactly): until it has asked the thread for `MEMGROUP_ARENA_SLAB_AFTER` bytes
//! (default [`SLAB_AFTER_DEFAULT`], a page) it has no group heap there (`alloc::on_trial`), and
//! then its group heap takes a slab of a class only once it has asked for [`slab_after`] blocks
//! of it: as many bytes, and never fewer than a slab's. So a small tenant costs what the tag
//! design charges, and a busy one pays the tag path for its first page, then its first slab's
//! worth of each class. The counts are cumulative (frees, which may run on any thread, do not
//! count them down): a tiny group that churns one block long enough ends up with a group heap
//! and one slab of the class per thread, the price of counts that cost the slow path a compare
//! and nothing elsewhere.

/// The largest block served from slabs.
pub(crate) const MAX_SMALL: usize = 8192;

/// The largest alignment served from slabs: slabs start on page boundaries.
pub(crate) const MAX_ALIGN: usize = 4096;

/// Number of size classes.
pub(crate) const CLASSES: usize = 34;

/// The fewest objects a slab holds (SLUB's minimum for its larger caches).
pub(crate) const MIN_OBJECTS: usize = 4;

/// Smallest and largest slab size, as shifts: one page to eight.
pub(crate) const MIN_SLAB_SHIFT: u32 = 12;
pub(crate) const MAX_SLAB_SHIFT: u32 = 15;

/// Slab sizes in use: one kind of segment per slab size.
pub(crate) const KINDS: usize = (MAX_SLAB_SHIFT - MIN_SLAB_SHIFT + 1) as usize;

/// Object size of each class.
pub(crate) static SIZES: [u32; CLASSES] = sizes();

/// Slab size of each class, as a shift.
pub(crate) static SLAB_SHIFTS: [u8; CLASSES] = slab_shifts();

/// Objects per slab of each class.
pub(crate) static CAPACITY: [u16; CLASSES] = capacities();

/// The class of a size of at most `MAX_SMALL` at alignment 8, by `(size + 7) / 8`.
static CLASS_OF: [u8; MAX_SMALL / 8 + 1] = class_table();

const fn sizes() -> [u32; CLASSES] {
    let mut s = [0u32; CLASSES];
    let small = [8, 16, 24, 32, 48, 64, 80, 96, 112, 128];
    let mut i = 0;
    while i < small.len() {
        s[i] = small[i];
        i += 1;
    }
    let mut base = 128u32;
    while i < CLASSES {
        let mut k = 1;
        while k <= 4 {
            s[i] = base + k * (base / 4);
            i += 1;
            k += 1;
        }
        base *= 2;
    }
    assert!(s[CLASSES - 1] as usize == MAX_SMALL);
    s
}

const fn slab_shift(size: u32) -> u8 {
    let mut shift = MIN_SLAB_SHIFT;
    while shift < MAX_SLAB_SHIFT {
        let slab = 1u32 << shift;
        let objects = slab / size;
        if objects as usize >= MIN_OBJECTS && slab - objects * size <= slab / 8 {
            break;
        }
        shift += 1;
    }
    shift as u8
}

const fn slab_shifts() -> [u8; CLASSES] {
    let sizes = sizes();
    let mut out = [0u8; CLASSES];
    let mut i = 0;
    while i < CLASSES {
        out[i] = slab_shift(sizes[i]);
        i += 1;
    }
    out
}

const fn capacities() -> [u16; CLASSES] {
    let sizes = sizes();
    let mut out = [0u16; CLASSES];
    let mut i = 0;
    while i < CLASSES {
        let objects = (1u32 << slab_shift(sizes[i])) / sizes[i];
        assert!(objects as usize >= MIN_OBJECTS && objects < 1 << 14);
        out[i] = objects as u16;
        i += 1;
    }
    out
}

const fn class_table() -> [u8; MAX_SMALL / 8 + 1] {
    let sizes = sizes();
    let mut t = [0u8; MAX_SMALL / 8 + 1];
    let mut i = 0;
    let mut c = 0;
    while i < t.len() {
        while (sizes[c] as usize) < i * 8 {
            c += 1;
        }
        t[i] = c as u8;
        i += 1;
    }
    t
}

/// The class serving `size` bytes at `align`, or `None` for a large block.
#[inline(always)]
pub(crate) fn of(size: usize, align: usize) -> Option<usize> {
    if size <= MAX_SMALL && align <= 8 {
        return Some(CLASS_OF[(size + 7) >> 3] as usize);
    }
    aligned(size, align)
}

/// `of` for alignments above 8: the first class at least `size` whose objects are aligned.
#[inline(always)]
fn aligned(size: usize, align: usize) -> Option<usize> {
    if size > MAX_SMALL || align > MAX_ALIGN {
        return None;
    }
    // Both are at most 8192 here: no overflow.
    let mut c = CLASS_OF[(size.max(align) + 7) >> 3] as usize;
    while SIZES[c] as usize & (align - 1) != 0 {
        c += 1;
        if c == CLASSES {
            return None;
        }
    }
    Some(c)
}

/// `MEMGROUP_ARENA_SLAB_AFTER`: bytes a group asks a thread for, served the tag way, before
/// the thread makes it a group heap; and bytes that group heap asks for in one class before it
/// takes a slab of that class. By default a page, which with the floor of a slab's worth in
/// `slab_after` means a slab's worth in every class: a group heap takes a slab once it has
/// asked for enough blocks to fill one. `0` makes group heaps and slabs from the first block
/// (the arena before issue 12.3).
pub(crate) const SLAB_AFTER_DEFAULT: usize = 4 << 10;

/// The largest `MEMGROUP_ARENA_SLAB_AFTER` (a larger value is taken as this one, with a
/// warning): 32,768 blocks of 8 bytes, so a count fits in 16 bits.
pub(crate) const SLAB_AFTER_MAX: usize = 256 << 10;

/// Blocks of class `c` a group heap allocates the tag way before it takes a slab of `c`, for a
/// threshold of `bytes` (`MEMGROUP_ARENA_SLAB_AFTER`): enough blocks to make `bytes`, and at
/// least a slab's worth (a slab of eight 8 KiB objects is taken after eight of them, not two);
/// 0 if `bytes` is 0. At most `u16::MAX` for `bytes <= SLAB_AFTER_MAX`.
pub(crate) fn slab_after(bytes: usize, c: usize) -> u16 {
    if bytes == 0 {
        return 0;
    }
    let size = SIZES[c] as usize;
    let n = bytes.max(slab_bytes(c)).div_ceil(size);
    n.min(u16::MAX as usize) as u16
}

/// Bytes of a slab of class `c`.
#[inline(always)]
pub(crate) fn slab_bytes(c: usize) -> usize {
    1 << SLAB_SHIFTS[c]
}

/// The segment kind (slab size) of class `c`.
#[inline(always)]
pub(crate) fn kind(c: usize) -> usize {
    (SLAB_SHIFTS[c] as u32 - MIN_SLAB_SHIFT) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_every_small_size_and_alignment() {
        for align in (0..=12).map(|k| 1usize << k) {
            for size in 0..=MAX_SMALL {
                let c = of(size, align).expect("small");
                let s = SIZES[c] as usize;
                assert!(s >= size.max(1), "{size}@{align} in {s}");
                assert_eq!(s % align, 0, "{size}@{align} in {s}");
                if c > 0 && align <= 8 {
                    assert!(
                        (SIZES[c - 1] as usize) < size,
                        "{size} not in the tightest class"
                    );
                }
            }
        }
        assert_eq!(of(MAX_SMALL + 1, 1), None);
        assert_eq!(of(8, 8192), None);
        assert_eq!(of(usize::MAX, 1), None);
    }

    #[test]
    fn slabs_hold_enough_and_waste_little() {
        for c in 0..CLASSES {
            let slab = slab_bytes(c);
            let used = CAPACITY[c] as usize * SIZES[c] as usize;
            assert!(CAPACITY[c] as usize >= MIN_OBJECTS);
            assert!(slab - used <= slab / 8, "class {}", SIZES[c]);
            assert!(kind(c) < KINDS);
        }
    }

    #[test]
    fn slab_after_is_at_least_a_slab_and_fits() {
        for c in 0..CLASSES {
            let size = SIZES[c] as usize;
            assert_eq!(slab_after(0, c), 0);
            let n = slab_after(SLAB_AFTER_DEFAULT, c) as usize;
            assert!(
                n * size >= SLAB_AFTER_DEFAULT.max(slab_bytes(c)),
                "class {size}"
            );
            assert!(
                (n - 1) * size < SLAB_AFTER_DEFAULT.max(slab_bytes(c)),
                "class {size}"
            );
            assert!(n >= CAPACITY[c] as usize);
            let most = slab_after(SLAB_AFTER_MAX, c) as usize;
            assert!(most * size >= SLAB_AFTER_MAX && most < u16::MAX as usize);
        }
        assert_eq!(slab_after(1, 0), CAPACITY[0]);
    }
}
