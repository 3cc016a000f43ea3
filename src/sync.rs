//! The one place the concurrent core takes its atomics from.
//!
//! Under `--cfg memgroup_loom` (set only by `loom-tests/build.rs`, for that crate alone) these are
//! loom's model-checked types; otherwise they are core's. Nothing else in `src/core` may import
//! `core::sync::atomic` directly, so the loom models check the very source the allocator runs;
//! the rest of the crate takes its atomics from here too.

#[cfg(not(memgroup_loom))]
pub(crate) use core::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize,
};

#[cfg(memgroup_loom)]
pub(crate) use loom::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize,
};

#[cfg(not(memgroup_loom))]
pub(crate) use core::sync::atomic::{fence, Ordering};
#[cfg(memgroup_loom)]
pub(crate) use loom::sync::atomic::{fence, Ordering};

// For the arena design's fast path (which loom does not model).
#[cfg(not(memgroup_loom))]
#[allow(unused_imports)]
pub(crate) use core::sync::atomic::compiler_fence;

/// The light side of an asymmetric store-load fence: only the compiler is kept from reordering
/// in the allocator, where the heavy side (`membarrier(2)`) runs the full fence on this thread
/// when it matters; a full `SeqCst` fence under loom, which has no `membarrier` to model it.
#[inline(always)]
pub(crate) fn light_fence() {
    #[cfg(not(memgroup_loom))]
    core::sync::atomic::compiler_fence(Ordering::SeqCst);
    #[cfg(memgroup_loom)]
    loom::sync::atomic::fence(Ordering::SeqCst);
}

/// Spin-wait hint: a real `spin_loop` hint in the allocator, a yield to the scheduler under loom
/// (loom needs to see the waiting thread give way, or the model never terminates).
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(not(memgroup_loom))]
    core::hint::spin_loop();
    #[cfg(memgroup_loom)]
    loom::thread::yield_now();
}
