//! Memory for the arena's own records: thread heaps and group heaps are cut out of mapped
//! chunks and never given back, only reused; retired group heaps wait in a pool.

use core::ptr::null_mut;

use crate::platform;
use crate::sync::Ordering;

use super::table::TABLE_BYTES;
use super::types::GroupHeap;
use crate::lock::SpinLock;

/// Bytes mapped at a time for heaps and group heaps.
pub(super) const CHUNK: usize = 256 << 10;

/// The chunks thread heaps are cut from.
pub(super) static THREAD_HEAPS: SpinLock<Chunks> = SpinLock::new(Chunks::new());

pub(super) static GROUP_HEAPS: SpinLock<GroupHeapPool> = SpinLock::new(GroupHeapPool {
    free: null_mut(),
    chunks: Chunks::new(),
    live: 0,
});

/// Cuts small records out of mapped chunks; records are never given back, only reused.
pub(super) struct Chunks {
    pub(super) next: usize,
    pub(super) end: usize,
    pub(super) mapped: usize,
}

impl Chunks {
    pub(super) const fn new() -> Chunks {
        Chunks {
            next: 0,
            end: 0,
            mapped: 0,
        }
    }

    /// `bytes` (a multiple of 64) of zeroed memory aligned to 64, or null.
    pub(super) fn carve(&mut self, bytes: usize) -> *mut u8 {
        if self.end - self.next < bytes {
            let p = platform::map(CHUNK);
            if p.is_null() {
                return p;
            }
            self.next = p as usize;
            self.end = p as usize + CHUNK;
            self.mapped += CHUNK;
        }
        let p = self.next;
        self.next += bytes;
        p as *mut u8
    }
}

pub(super) struct GroupHeapPool {
    pub(super) free: *mut GroupHeap,
    pub(super) chunks: Chunks,
    pub(super) live: usize,
}

// SAFETY: the pool's pointers name records that live for the whole program, reached under its
// lock only.
unsafe impl Send for GroupHeapPool {}

/// Bytes mapped for heaps, their key tables and group heaps, and group heaps in use.
pub(crate) fn metadata() -> (usize, usize) {
    let heaps = THREAD_HEAPS.with(|c| c.mapped);
    let (ghs, live) = GROUP_HEAPS.with(|p| (p.chunks.mapped, p.live));
    (heaps + TABLE_BYTES.load(Ordering::Relaxed) + ghs, live)
}
