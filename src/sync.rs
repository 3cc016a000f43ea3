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

/// The one way memgroup waits for another thread (a lock holder, a pocket's owner, a refill in
/// flight): a few rounds of spinning, for the common case of a holder running on another CPU a
/// few instructions from done; then yields of the CPU (`sched_yield`), so that a holder
/// preempted on this CPU runs; then short sleeps, so that it runs even when yielding does not
/// let it (a waiter of higher real-time priority, which `sched_yield` would pick again).
/// Nothing here allocates. Under loom every round is a yield to the model's scheduler.
pub(crate) struct Backoff {
    rounds: u32,
    /// The round from which it sleeps (`u32::MAX`: never).
    sleeps_from: u32,
}

impl Backoff {
    /// Rounds of spinning before the first yield.
    pub(crate) const YIELDS_FROM: u32 = 64;
    /// Rounds (spins and yields) before the first sleep.
    pub(crate) const SLEEPS_FROM: u32 = 128;
    /// Each sleep, in microseconds: long enough for a preempted holder to finish, short next
    /// to a scheduler tick.
    const SLEEP_US: u64 = 20;

    pub(crate) const fn new() -> Backoff {
        Backoff {
            rounds: 0,
            sleeps_from: Self::SLEEPS_FROM,
        }
    }

    /// The rounds waited so far (saturating: the loops it serves may be unbounded).
    pub(crate) fn rounds(&self) -> u32 {
        self.rounds
    }

    /// One round of waiting.
    #[inline]
    pub(crate) fn wait(&mut self) {
        self.rounds = self.rounds.saturating_add(1);
        #[cfg(memgroup_loom)]
        loom::thread::yield_now();
        #[cfg(not(memgroup_loom))]
        if self.rounds <= Self::YIELDS_FROM {
            core::hint::spin_loop();
        } else if self.rounds <= self.sleeps_from {
            // sched_yield(2); allocates nothing.
            std::thread::yield_now();
        } else {
            // nanosleep(2); allocates nothing.
            std::thread::sleep(core::time::Duration::from_micros(Self::SLEEP_US));
        }
    }
}
