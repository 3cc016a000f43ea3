//! Memory pressure, after the mempressure control group (see the crate's Design notes): levels,
//! notifications, shrinkers, and background and direct reclaim.
//!
//! The charge path never calls user code. When a charge crosses a threshold it sets a bit on
//! the group's counter and rings a doorbell (one atomic add, and a futex wake if the notifier
//! sleeps). A notifier thread, started by the first subscription or shrinker, takes the bits
//! and runs the callbacks and shrinkers, holding none of memgroup's locks while it does.
//!
//! **Direct reclaim.** A charge about to be refused or forced at a `max` posts a request and
//! waits for the notifier to run the shrinkers under that limit, at most `DIRECT_WAIT`. The
//! shrinkers never run on the allocating thread, so a shrinker may take any lock, including
//! one the allocating thread holds: then the wait times out, the charge is refused or forced,
//! and the shrinker goes on once the lock is free (until it does, further charges do not wait:
//! a stuck shrinker costs one wait, not one per allocation). Allocations made by shrinkers and callbacks
//! (on the notifier, or in `Group::reclaim`) never wait for reclaim, so reclaim never recurses.

use core::time::Duration;
use std::sync::Arc;

use crate::core::counter::{Counter, CRITICAL, LOW, MEDIUM, RECLAIM};
use crate::core::doorbell::Doorbell;
use crate::fork::{self, Participant, Rank};
use crate::group::{self, Group};
use crate::lock::{self, CallLock, SpinGuard, SpinLock};
use crate::sync::{AtomicU32, AtomicU8, Ordering};
use crate::{platform, scope};

/// How long an allocation waits for direct reclaim before it is refused or forced.
const DIRECT_WAIT: Duration = Duration::from_millis(10);

/// A group's memory pressure, from the lowest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Usage reached 3/4 of the lower of the group's `high` and `max`.
    Low,
    /// Usage went above the group's `high`; background reclaim starts.
    Medium,
    /// A charge hit the group's `max` (it was refused, or forced above it).
    Critical,
}

/// Memory that can be given back on request: a cache, a pool, a buffer of deferred work.
///
/// Shrinkers are called on memgroup's notifier thread (or by [`Group::reclaim`] on the
/// caller's), never inside an allocation. Allocations a shrinker makes are charged as usual
/// but never wait for reclaim.
pub trait Shrinker: Send + Sync + 'static {
    /// Bytes one chunk frees.
    fn chunk_size(&self) -> usize;
    /// Chunks that could be freed now.
    fn count(&self) -> usize;
    /// Frees up to `chunks` chunks; returns how many it freed.
    fn shrink(&self, chunks: usize) -> usize;
}

/// A registered pressure callback; dropping it unsubscribes (waiting for a call in progress,
/// unless dropped from inside that very call).
#[must_use = "dropping the subscription unsubscribes"]
pub struct Subscription {
    sub: Arc<Slot<Callback>>,
}

/// A registered shrinker; dropping it unregisters (waiting for a call in progress, unless
/// dropped from inside it). The shrinker is never called after the handle is dropped.
#[must_use = "dropping the handle unregisters the shrinker"]
pub struct ShrinkerHandle {
    entry: Arc<Slot<dyn Shrinker>>,
}

/// A callback or shrinker of one group. `inner` is `None` once unregistered; calls hold the
/// lock, so unregistering waits for a call in progress.
struct Slot<T: ?Sized> {
    group: Group,
    inner: CallLock<Option<Box<T>>>,
}

/// A pressure callback.
type Callback = dyn Fn(Level) + Send + Sync;

struct Subscribers {
    subs: Vec<Arc<Slot<Callback>>>,
    shrinkers: Vec<Arc<Slot<dyn Shrinker>>>,
}

/// Held only to push, remove or clone entries (which may allocate: no allocation path takes
/// this lock), never across a callback; held across `fork()` (see `fork_safe`), taken before
/// the group directory's.
static SUBSCRIBERS: SpinLock<Subscribers> = SpinLock::new(Subscribers {
    subs: Vec::new(),
    shrinkers: Vec::new(),
});
/// Rung (incremented) when a level or request is pending; the notifier sleeps on it.
static BELL: Doorbell = Doorbell::new();
/// Incremented after each of the notifier's rounds: a direct reclaim that timed out waits no
/// more until this moves (see `STALLED`).
static DONE: AtomicU32 = AtomicU32::new(0);
/// `DONE + 1` when a direct reclaim timed out waiting for that pass: until the notifier gets
/// past it (it may be waiting for a lock the allocating thread holds), charges do not wait.
static STALLED: AtomicU32 = AtomicU32::new(0);
/// 0: no notifier, 1: starting, 2: running.
static NOTIFIER: AtomicU8 = AtomicU8::new(0);

thread_local! {
    /// The slot whose callback or shrinker this thread is running, so that dropping its own
    /// handle from inside it does not wait for itself.
    static CALLING: core::cell::Cell<*const ()> = const { core::cell::Cell::new(core::ptr::null()) };
}

fn subscribers() -> SpinGuard<'static, Subscribers> {
    SUBSCRIBERS.lock()
}

/// Holds the subscriber list across `fork()`, so that the child never inherits it locked by a thread
/// it does not have; in the child, frees the call locks the parent's threads held and forgets
/// the notifier, which does not survive the fork.
fn fork_safe() {
    static PRESSURE: Participant = Participant {
        prepare: || SUBSCRIBERS.raw_lock(),
        parent: || SUBSCRIBERS.raw_unlock(),
        child: || {
            SUBSCRIBERS.raw_unlock();
            lock::after_fork_in_child();
            after_fork_in_child();
        },
    };
    group::fork_safe();
    fork::join(Rank::Pressure, &PRESSURE);
}

impl<T: ?Sized> Slot<T> {
    fn unregister(&self) {
        if CALLING.with(|c| c.get()) == self as *const Self as *const () {
            // Dropped from inside its own call, which holds the lock: `call_slot` drops it
            // when the call returns.
            DEAD_ON_RETURN.with(|d| d.set(true));
            return;
        }
        let taken = self.inner.lock().take();
        drop(taken);
    }
}

thread_local! {
    static DEAD_ON_RETURN: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
}

/// Calls the callback or shrinker of `slot` and, if it unregistered itself meanwhile, drops it.
fn call_slot<T: ?Sized, R>(slot: &Slot<T>, f: impl FnOnce(&T) -> R) -> Option<R> {
    let mut inner = slot.inner.lock();
    let it = inner.as_deref()?;
    let prev = CALLING.with(|c| c.replace(slot as *const Slot<T> as *const ()));
    let prev_dead = DEAD_ON_RETURN.with(|d| d.replace(false));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(it)));
    CALLING.with(|c| c.set(prev));
    let dead = DEAD_ON_RETURN.with(|d| d.replace(prev_dead));
    if dead || r.is_err() {
        // A callback or shrinker that panicked is dropped: the notifier carries on.
        drop(inner.take());
    }
    r.ok()
}

impl Drop for Subscription {
    fn drop(&mut self) {
        scope::as_root(|| subscribers().subs.retain(|s| !Arc::ptr_eq(s, &self.sub)));
        self.sub.unregister();
    }
}

impl Drop for ShrinkerHandle {
    fn drop(&mut self) {
        scope::as_root(|| {
            subscribers()
                .shrinkers
                .retain(|s| !Arc::ptr_eq(s, &self.entry))
        });
        self.entry.group.node().counter.count_shrinker(false);
        self.entry.unregister();
    }
}

impl core::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("Subscription")
            .field(&self.sub.group)
            .finish()
    }
}

impl core::fmt::Debug for ShrinkerHandle {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("ShrinkerHandle")
            .field(&self.entry.group)
            .finish()
    }
}

fn subscribe(group: &Group, f: Box<dyn Fn(Level) + Send + Sync>) -> Subscription {
    fork_safe();
    let sub = scope::as_root(|| {
        let sub: Arc<Slot<Callback>> = Arc::new(Slot {
            group: group.clone(),
            inner: CallLock::new(Some(f)),
        });
        subscribers().subs.push(sub.clone());
        sub
    });
    start_notifier();
    Subscription { sub }
}

fn register(group: &Group, s: Box<dyn Shrinker>) -> ShrinkerHandle {
    fork_safe();
    let entry = scope::as_root(|| {
        let entry: Arc<Slot<dyn Shrinker>> = Arc::new(Slot {
            group: group.clone(),
            inner: CallLock::new(Some(s)),
        });
        subscribers().shrinkers.push(entry.clone());
        entry
    });
    group.node().counter.count_shrinker(true);
    start_notifier();
    ShrinkerHandle { entry }
}

/// Asks the shrinkers of `under`'s group and its descendants for at least `bytes`, each in
/// proportion to what it holds (`count` x `chunk_size`). Returns the bytes they freed.
fn reclaim(under: &Counter, bytes: usize) -> usize {
    if bytes == 0 {
        return 0;
    }
    let entries: Vec<_> = scope::as_root(|| {
        subscribers()
            .shrinkers
            .iter()
            .filter(|e| e.group.node().counter.is_under(under))
            .cloned()
            .collect()
    });
    scope::reclaiming(|| {
        let held: Vec<(usize, usize)> = entries
            .iter()
            .map(|e| call_slot(e, |s| (s.chunk_size(), s.count())).unwrap_or((0, 0)))
            .collect();
        let total: u128 = held.iter().map(|&(size, n)| size as u128 * n as u128).sum();
        if total == 0 {
            return 0;
        }
        let mut freed = 0usize;
        for (e, &(size, n)) in entries.iter().zip(&held) {
            if size == 0 || n == 0 {
                continue;
            }
            let share = (bytes as u128 * size as u128 * n as u128).div_ceil(total);
            let chunks = share.div_ceil(size as u128).min(n as u128) as usize;
            let done = call_slot(e, |s| s.shrink(chunks)).unwrap_or(0).min(chunks);
            freed = freed.saturating_add(done.saturating_mul(size));
        }
        freed
    })
}

/// The core's `Groups::wake`: rings the doorbell. No allocation, no lock.
fn wake() {
    if NOTIFIER.load(Ordering::Acquire) == 0 {
        return;
    }
    if BELL.ring() {
        platform::futex_wake(BELL.word(), 1);
    }
}

/// The core's `Groups::reclaim`: direct reclaim before a charge at `at`'s limit fails or is
/// forced. Waits at most `DIRECT_WAIT`; no allocation, no lock.
fn direct(at: &Counter, bytes: usize) -> bool {
    if !at.has_shrinkers() || NOTIFIER.load(Ordering::Acquire) != 2 || scope::is_reclaiming() {
        return false;
    }
    let done = DONE.load(Ordering::SeqCst);
    let served = at.served.load(Ordering::SeqCst);
    at.want(bytes);
    if BELL.ring() {
        platform::futex_wake(BELL.word(), 1);
    }
    if STALLED.load(Ordering::Relaxed) == done.wrapping_add(1) {
        return false;
    }
    let start = std::time::Instant::now();
    while at.served.load(Ordering::SeqCst) == served {
        let Some(left) = DIRECT_WAIT.checked_sub(start.elapsed()) else {
            STALLED.store(done.wrapping_add(1), Ordering::Relaxed);
            break;
        };
        platform::futex_wait(&at.served, served, Some(left));
    }
    true
}

/// The notifier thread does not survive `fork()`: in the child, the next subscription or
/// shrinker starts a new one (for every subscription and shrinker, inherited ones included),
/// and until then charges neither ring nor wait for it.
fn after_fork_in_child() {
    NOTIFIER.store(0, Ordering::Release);
    BELL.awake();
}

fn start_notifier() {
    static ENTRY: group::Notifier = group::Notifier { wake, direct };
    group::register_notifier(&ENTRY);
    if NOTIFIER
        .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    scope::as_root(|| {
        // Levels raised before anyone listened are stale: drop them.
        group::for_each_counter(|c| {
            c.take_pending();
        });
        std::thread::Builder::new()
            .name("memgroup-notifier".into())
            .spawn(|| scope::reclaiming(notifier))
            .expect("memgroup: cannot start the pressure notifier thread");
    });
    NOTIFIER.store(2, Ordering::Release);
}

fn notifier() {
    loop {
        let mark = BELL.mark();
        group::for_each_counter(deliver);
        DONE.fetch_add(1, Ordering::SeqCst);
        if BELL.may_sleep(mark) {
            platform::futex_wait(BELL.word(), mark, None);
        }
        BELL.awake();
    }
}

/// Delivers what is pending on one counter: direct reclaim first (a charge is waiting), then
/// the levels to the subscribers of the group and its ancestors, then background reclaim.
fn deliver(c: &Counter) {
    let levels = c.take_pending();
    if levels == 0 {
        return;
    }
    if levels & RECLAIM != 0 {
        reclaim(c, c.take_wanted());
        c.served.fetch_add(1, Ordering::SeqCst);
        platform::futex_wake(&c.served, i32::MAX);
    }
    let subs: Vec<_> = subscribers()
        .subs
        .iter()
        .filter(|s| c.is_under(&s.group.node().counter))
        .cloned()
        .collect();
    for (bit, level) in [
        (LOW, Level::Low),
        (MEDIUM, Level::Medium),
        (CRITICAL, Level::Critical),
    ] {
        if levels & bit != 0 {
            for s in &subs {
                call_slot(s, |f| f(level));
            }
        }
    }
    if levels & MEDIUM != 0 {
        background(c);
    }
}

/// Reclaims toward the lower of `high` and `max` after a group crossed `high`, or after one
/// of them was set below its usage.
fn background(c: &Counter) {
    let stat = c.snapshot();
    let target = stat.high.min(stat.max);
    if stat.usage > target && c.has_shrinkers() {
        group::flush_counter(c);
        let usage = c.snapshot().usage;
        reclaim(c, usage.saturating_sub(target));
    }
}

/// The kernel's `memory.high` throttling curve: a delay growing with the square of the
/// overage (as a fraction of `high`), capped at 2 s.
fn throttle_delay(usage: usize, high: Option<usize>) -> Duration {
    let Some(high) = high.filter(|&h| usage > h && h > 0) else {
        return Duration::ZERO;
    };
    let over = (usage - high) as f64 / high as f64;
    Duration::from_secs_f64((over * over).min(2.0))
}

/// Pressure and reclaim of a group.
impl Group {
    /// Calls `f` on a notifier thread when this group, or one below it, reaches a pressure
    /// level: `Low` at 3/4 of the lower of its `high` and `max`, `Medium` above `high`,
    /// `Critical` when a charge hits `max`. Edge-triggered (once per crossing) and coalesced
    /// (crossings of one level before delivery are delivered once); none is lost. Dropping the
    /// subscription unsubscribes.
    pub fn on_pressure(&self, f: impl Fn(Level) + Send + Sync + 'static) -> Subscription {
        subscribe(self, Box::new(f))
    }

    /// Registers a shrinker: memory of this group that can be given back on request. It is
    /// asked (on the notifier thread) when the group goes above `high` (background reclaim,
    /// toward `high`) and before a charge at a `max` above it is refused or forced (direct
    /// reclaim). Dropping the handle unregisters it.
    pub fn register_shrinker(&self, s: impl Shrinker) -> ShrinkerHandle {
        register(self, Box::new(s))
    }

    /// Asks the shrinkers of this group and its descendants to free at least `bytes`, each in
    /// proportion to what it holds, on this thread. Returns the bytes they freed.
    pub fn reclaim(&self, bytes: usize) -> usize {
        reclaim(&self.node().counter, bytes)
    }

    /// How long a task of this group should pause at a safe point, by the kernel's
    /// `memory.high` curve: zero at or below `high`, growing with the square of the overage
    /// (as a fraction of `high`), capped at 2 s. memgroup never sleeps inside an allocation;
    /// throttling is the application's choice, see [`Group::throttle`].
    pub fn throttle_delay(&self) -> core::time::Duration {
        let stat = self.stat();
        throttle_delay(stat.usage, stat.high)
    }

    /// Sleeps for [`Group::throttle_delay`]: call it where a task of this group may wait
    /// (between requests, not while holding locks).
    pub fn throttle(&self) {
        let delay = self.throttle_delay();
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
    }
}
