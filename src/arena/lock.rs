//! The arena's spin lock: it must work inside `alloc` and `dealloc` without allocating, and is
//! only held for short, bounded work that never calls user code or the global allocator.

use crate::sync::{AtomicU32, Backoff, Ordering};
use core::cell::UnsafeCell;

pub(crate) struct Spin(AtomicU32);

impl Spin {
    pub(crate) const fn new() -> Spin {
        Spin(AtomicU32::new(0))
    }

    pub(crate) fn lock(&self) {
        let mut backoff = Backoff::new();
        while self.0.swap(1, Ordering::Acquire) != 0 {
            while self.0.load(Ordering::Relaxed) != 0 {
                backoff.wait();
            }
        }
    }

    /// Takes the lock if it is free; never waits.
    pub(crate) fn try_lock(&self) -> bool {
        self.0.load(Ordering::Relaxed) == 0 && self.0.swap(1, Ordering::Acquire) == 0
    }

    pub(crate) fn unlock(&self) {
        self.0.store(0, Ordering::Release);
    }

    /// Sequentially consistent: the allocation fast path pairs it with its `busy` store (see
    /// `super::heap::enter`).
    #[inline(always)]
    pub(crate) fn is_locked(&self) -> bool {
        self.0.load(Ordering::SeqCst) != 0
    }
}

/// A value behind a `Spin`.
pub(crate) struct Locked<T> {
    pub(crate) spin: Spin,
    value: UnsafeCell<T>,
}

// SAFETY: the value is only reached through `with`, which holds the lock.
unsafe impl<T: Send> Sync for Locked<T> {}

impl<T> Locked<T> {
    pub(crate) const fn new(value: T) -> Self {
        Locked {
            spin: Spin::new(),
            value: UnsafeCell::new(value),
        }
    }

    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        self.spin.lock();
        // SAFETY: the lock is held, so this is the only reference to the value.
        let r = f(unsafe { &mut *self.value.get() });
        self.spin.unlock();
        r
    }
}
