//! Futures that run in a group: a tenant's work on an async runtime.
//!
//! A request's future is polled by one worker thread, then another, between other tenants'
//! tasks, so a thread scope ([`Group::enter`]) cannot follow it. [`InGroup`] enters its group
//! around every poll and around the inner future's drop, on whatever thread that happens;
//! [`Guarded`] does the same and also cancels the future once its group is over `max`.
//!
//! Works with any executor: nothing here depends on a runtime, and a poll costs the scope
//! switch (two thread-local writes and a reference count), with no allocation and no lock.
//!
//! What the runtime allocates while it polls a tenant's task (a grown run queue, a waker
//! slot, a timer entry) is charged to that tenant, as the kernel charges page cache to the
//! group that touched it. A task spawned from inside a scope or an `InGroup` does not inherit
//! the group (runtimes' task-locals do not inherit): spawn `fut.in_current_group()`, or use
//! `memgroup::tokio::spawn` (feature `tokio`).

use core::future::Future;
use core::mem::ManuallyDrop;
use core::pin::Pin;
use core::task::{Context, Poll};

use crate::{Error, Group};

/// Running a future in a group. Implemented for every [`Future`].
pub trait GroupFutureExt: Future + Sized {
    /// Runs `self` in `group`: the group is entered around every poll and around the drop of
    /// `self` (a cancelled or aborted task frees its state in its own group).
    fn in_group(self, group: &Group) -> InGroup<Self> {
        InGroup {
            group: group.clone(),
            inner: ManuallyDrop::new(self),
        }
    }

    /// Runs `self` in the group current where this is called ([`crate::current`]): the form
    /// for spawning, since a spawned task does not inherit the spawner's scope.
    fn in_current_group(self) -> InGroup<Self> {
        self.in_group(&crate::current())
    }
}

impl<F: Future> GroupFutureExt for F {}

/// A future run in a group; see [`GroupFutureExt::in_group`].
#[must_use = "futures do nothing unless polled"]
pub struct InGroup<F> {
    group: Group,
    /// Pinned whenever `self` is: never moved out, dropped in place by `Drop`.
    inner: ManuallyDrop<F>,
}

impl<F> InGroup<F> {
    /// The group the future runs in.
    pub fn group(&self) -> &Group {
        &self.group
    }
}

impl<F: Future> Future for InGroup<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: `inner` is structurally pinned: it is never moved out of `self` (only
        // dropped in place, in `Drop`), and `InGroup` is `Unpin` only when `F` is.
        let this = unsafe { self.get_unchecked_mut() };
        let _in = this.group.enter();
        // SAFETY: as above, `inner` stays where it is for as long as `self` lives.
        unsafe { Pin::new_unchecked(&mut *this.inner) }.poll(cx)
    }
}

impl<F> Drop for InGroup<F> {
    fn drop(&mut self) {
        let _in = self.group.enter();
        // SAFETY: `inner` is dropped once, here, in place (as pinning requires), and never
        // used after.
        unsafe { ManuallyDrop::drop(&mut self.inner) }
    }
}

/// A future run in a group and cancelled when the group goes over its `max`; see
/// [`Group::guard`].
#[must_use = "futures do nothing unless polled"]
pub struct Guarded<F> {
    group: Group,
    /// `None` once resolved; pinned whenever `self` is, dropped in place.
    inner: Option<F>,
}

impl Group {
    /// Runs `fut` in this group (as [`GroupFutureExt::in_group`]) and cancels it once the
    /// group is over its `max`: the cooperative OOM kill of one tenant's work.
    ///
    /// The group is checked before the first poll and after every poll that returns
    /// `Pending`. Once its usage (exact: read after a [`flush`](Group::flush) when the fast
    /// figure says over) passes `max`, the inner future is dropped inside the group and this
    /// resolves to `Err(Error::OverLimit)`. So it acts at the next poll after the group goes
    /// over: a runaway tenant overshoots by what it allocates between two awaits (and by
    /// more under `OnLimit::Overcharge` if it never awaits). Other futures, of this group or
    /// others, are untouched. A group without `max` is never cancelled.
    pub fn guard<F: Future>(&self, fut: F) -> Guarded<F> {
        Guarded {
            group: self.clone(),
            inner: Some(fut),
        }
    }

    /// Whether the group's exact usage is over its `max`.
    fn is_over_max(&self) -> bool {
        let s = self.stat();
        match s.max {
            Some(max) if s.usage > max => {
                self.flush();
                self.stat().usage > max
            }
            _ => false,
        }
    }
}

impl<F: Future> Future for Guarded<F> {
    type Output = Result<F::Output, Error>;

    /// # Panics
    ///
    /// When polled again after it resolved, as most futures do.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: `inner` is structurally pinned: it is never moved, only dropped in place
        // (by assigning `None`, here or in `Drop`); `Guarded` is `Unpin` only when `F` is.
        let this = unsafe { self.get_unchecked_mut() };
        let _in = this.group.enter();
        let Some(inner) = this.inner.as_mut() else {
            panic!("memgroup::Guarded polled after it resolved");
        };
        if this.group.is_over_max() {
            this.inner = None;
            return Poll::Ready(Err(Error::OverLimit));
        }
        // SAFETY: as above, `inner` stays where it is until dropped in place.
        match unsafe { Pin::new_unchecked(inner) }.poll(cx) {
            Poll::Ready(v) => {
                this.inner = None;
                Poll::Ready(Ok(v))
            }
            Poll::Pending if this.group.is_over_max() => {
                this.inner = None;
                Poll::Ready(Err(Error::OverLimit))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<F> Drop for Guarded<F> {
    fn drop(&mut self) {
        if self.inner.is_some() {
            let _in = self.group.enter();
            // Drops the inner future in place, inside the group.
            self.inner = None;
        }
    }
}
