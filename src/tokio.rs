//! Spawning tokio tasks in the current group (feature `tokio`).
//!
//! **A plain `tokio::spawn` from inside a scope does not inherit the group**: the task runs in
//! whatever group the worker thread polling it is in (usually the root), since tokio's
//! task-locals do not pass to spawned tasks. [`spawn`] and [`spawn_blocking`] capture the
//! group current at the call, as [`GroupFutureExt::in_current_group`] does.

use ::tokio::task::JoinHandle;
use core::future::Future;

use crate::GroupFutureExt;

/// `tokio::spawn` of `fut` in the group current here: every poll, and the drop of the task's
/// state (on completion, abort or runtime shutdown), happen in that group.
///
/// # Panics
///
/// Outside a tokio runtime, as `tokio::spawn` does.
pub fn spawn<F>(fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    ::tokio::spawn(fut.in_current_group())
}

/// `tokio::task::spawn_blocking` of `f`, run in the group current here.
///
/// # Panics
///
/// Outside a tokio runtime, as `tokio::task::spawn_blocking` does.
pub fn spawn_blocking<F, R>(f: F) -> JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let group = crate::current();
    ::tokio::task::spawn_blocking(move || group.run(f))
}
