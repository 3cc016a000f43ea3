//! memgroup's own locks: a spin lock for the registries and a fork-proof lock for calls
//! into user code.

use core::cell::UnsafeCell;

use crate::platform;
use crate::sync::{AtomicU32, Backoff, Ordering};

/// The one spin lock word (waiting with `Backoff`: spinning, then yielding, then sleeping):
/// usable inside `alloc` and `dealloc` without allocating, and lockable in a `fork()` prepare
/// handler and unlockable in the child, which std's `Mutex` is not. For short, bounded
/// critical sections that never call user code or the global allocator.
pub(crate) struct Spin(AtomicU32);

impl Spin {
    pub(crate) const fn new() -> Spin {
        Spin(AtomicU32::new(0))
    }

    pub(crate) fn lock(&self) {
        let mut backoff = Backoff::new();
        while self.0.swap(1, Ordering::Acquire) != 0 {
            // Wait for it to look free before swapping again (no line bouncing meanwhile).
            while self.0.load(Ordering::Relaxed) != 0 {
                backoff.wait();
            }
        }
    }

    /// Takes the lock if it is free; never waits.
    #[cfg_attr(not(feature = "arena"), allow(dead_code))] // the arena's
    pub(crate) fn try_lock(&self) -> bool {
        self.0.load(Ordering::Relaxed) == 0 && self.0.swap(1, Ordering::Acquire) == 0
    }

    pub(crate) fn unlock(&self) {
        self.0.store(0, Ordering::Release);
    }

    /// Sequentially consistent: the arena's allocation fast path pairs it with its `busy`
    /// store (see `arena::heap::enter`).
    #[inline(always)]
    #[cfg_attr(not(feature = "arena"), allow(dead_code))] // the arena's
    pub(crate) fn is_locked(&self) -> bool {
        self.0.load(Ordering::SeqCst) != 0
    }
}

/// A value behind a [`Spin`].
pub(crate) struct SpinLock<T> {
    spin: Spin,
    value: UnsafeCell<T>,
}

// SAFETY: the value is only reached through a guard, which the lock makes exclusive.
unsafe impl<T: Send> Sync for SpinLock<T> {}

pub(crate) struct SpinGuard<'a, T>(&'a SpinLock<T>);

impl<T> SpinLock<T> {
    pub(crate) const fn new(value: T) -> Self {
        SpinLock {
            spin: Spin::new(),
            value: UnsafeCell::new(value),
        }
    }

    pub(crate) fn lock(&self) -> SpinGuard<'_, T> {
        self.raw_lock();
        SpinGuard(self)
    }

    /// Runs `f` on the value with the lock held.
    #[cfg_attr(not(feature = "arena"), allow(dead_code))] // the arena's
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut guard = self.lock();
        f(&mut guard)
    }

    pub(crate) fn raw_lock(&self) {
        self.spin.lock();
    }

    pub(crate) fn raw_unlock(&self) {
        self.spin.unlock();
    }
}

impl<T> core::ops::Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.0.value.get() }
    }
}

impl<T> core::ops::DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock.
        unsafe { &mut *self.0.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.0.raw_unlock();
    }
}

/// A lock held across a call into user code (a pressure callback or shrinker): waiters sleep
/// on a futex. It survives `fork()`: the word holds the fork generation of its holder, and the
/// child starts a new generation, so a lock that a parent's thread held at the fork (its call
/// cut short in the child, where that thread does not exist) is free in the child.
pub(crate) struct CallLock<T> {
    /// 0: free; otherwise the generation of the holder.
    word: AtomicU32,
    value: UnsafeCell<T>,
}

// SAFETY: the value is only reached through a guard, which the lock makes exclusive.
unsafe impl<T: Send> Sync for CallLock<T> {}

pub(crate) struct CallGuard<'a, T>(&'a CallLock<T>);

/// This process's fork generation: never 0, changed in each child.
static GENERATION: AtomicU32 = AtomicU32::new(1);

impl<T> CallLock<T> {
    pub(crate) const fn new(value: T) -> Self {
        CallLock {
            word: AtomicU32::new(0),
            value: UnsafeCell::new(value),
        }
    }

    pub(crate) fn lock(&self) -> CallGuard<'_, T> {
        let me = GENERATION.load(Ordering::Relaxed);
        loop {
            let w = self.word.load(Ordering::Acquire);
            if w != me {
                // Free, or held by a thread of the parent process before a fork.
                if self
                    .word
                    .compare_exchange(w, me, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return CallGuard(self);
                }
            } else {
                platform::futex_wait(&self.word, w, None);
            }
        }
    }
}

impl<T> core::ops::Deref for CallGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.0.value.get() }
    }
}

impl<T> core::ops::DerefMut for CallGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock.
        unsafe { &mut *self.0.value.get() }
    }
}

impl<T> Drop for CallGuard<'_, T> {
    fn drop(&mut self) {
        self.0.word.store(0, Ordering::Release);
        platform::futex_wake(&self.0.word, i32::MAX);
    }
}

/// In a child just after `fork()` (one thread): starts a new generation, which frees every
/// `CallLock` the parent's threads held.
pub(crate) fn after_fork_in_child() {
    let next = GENERATION.load(Ordering::Relaxed).wrapping_add(1);
    GENERATION.store(if next == 0 { 1 } else { next }, Ordering::Relaxed);
}
