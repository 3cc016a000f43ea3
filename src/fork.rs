//! `fork()`: one ordered table of the modules that must hold or reset something across it, and
//! one `pthread_atfork` registration for them all.
//!
//! A module joins the table (once, when it first has something to protect) at its [`Rank`]. Before
//! a fork the participants prepare in rank order; after it, in the parent and in the child, they
//! release in the reverse order, so a participant's locks are taken after, and given back
//! before, those of every participant ranked below it. Only participants that prepared release:
//! one that joins while a fork is under way waits for the next.

use crate::platform;
use crate::sync::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

/// What one participant does around `fork()`.
pub(crate) struct Participant {
    /// In the forking thread, before the fork.
    pub(crate) prepare: fn(),
    /// In the parent, after the fork.
    pub(crate) parent: fn(),
    /// In the child (one thread: the one that forked), after the fork.
    pub(crate) child: fn(),
}

/// The participants, in the order they prepare.
#[derive(Clone, Copy)]
pub(crate) enum Rank {
    /// The arena's slabs parked during the fork: released last, once every lock is free.
    #[cfg_attr(not(feature = "arena"), allow(dead_code))]
    ArenaParked,
    /// The pressure subscribers' lock; in the child, the notifier and the call locks reset.
    Pressure,
    /// Every thread kept out of its pocket.
    Pockets,
    /// The group directory's lock.
    Groups,
    /// The arena's heaps stopped and its locks held.
    #[cfg_attr(not(feature = "arena"), allow(dead_code))]
    Arena,
}

const RANKS: usize = Rank::Arena as usize + 1;

#[allow(clippy::declare_interior_mutable_const)] // only to initialize TABLE
const EMPTY: AtomicPtr<Participant> = AtomicPtr::new(core::ptr::null_mut());
static TABLE: [AtomicPtr<Participant>; RANKS] = [EMPTY; RANKS];

/// The ranks that prepared for the fork in progress (forks that run handlers are serialized by
/// the C library, which holds its handler list across them).
static PREPARED: AtomicU32 = AtomicU32::new(0);

/// Adds `p` to the table at `rank` (again is a no-op) and makes sure the table's handlers are
/// registered with the C library.
pub(crate) fn join(rank: Rank, p: &'static Participant) {
    let slot = &TABLE[rank as usize];
    if slot.load(Ordering::Acquire).is_null() {
        slot.store(
            p as *const Participant as *mut Participant,
            Ordering::Release,
        );
    }
    register();
}

fn participant(rank: usize) -> Option<&'static Participant> {
    // SAFETY: the table holds null or a `&'static Participant` stored by `join`.
    unsafe { TABLE[rank].load(Ordering::Acquire).as_ref() }
}

extern "C" fn prepare() {
    let mut prepared = 0;
    for rank in 0..RANKS {
        if let Some(p) = participant(rank) {
            (p.prepare)();
            prepared |= 1 << rank;
        }
    }
    PREPARED.store(prepared, Ordering::Relaxed);
}

/// Runs the `pick`ed handler of every participant that prepared, in reverse rank order.
fn release(pick: fn(&Participant) -> fn()) {
    let prepared = PREPARED.swap(0, Ordering::Relaxed);
    for rank in (0..RANKS).rev() {
        if prepared & (1 << rank) != 0 {
            if let Some(p) = participant(rank) {
                pick(p)();
            }
        }
    }
}

extern "C" fn parent() {
    release(|p| p.parent);
}

extern "C" fn child() {
    release(|p| p.child);
}

/// Registers `prepare`, `parent` and `child` with `pthread_atfork`, once per process image.
fn register() {
    /// 0, `DONE`, or the id of the process registering them (a child that inherited that from
    /// a fork made while its parent was registering has no handlers: it registers).
    static REGISTERED: AtomicU64 = AtomicU64::new(0);
    const DONE: u64 = u64::MAX;
    let mut seen = REGISTERED.load(Ordering::Acquire);
    while seen != DONE {
        let me = platform::process_id();
        if seen == me {
            // Another thread of this process is registering them.
            return;
        }
        match REGISTERED.compare_exchange(seen, me, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                // The C library records the handlers with its own malloc, never through
                // memgroup, so no tenant is charged for it.
                platform::at_fork(prepare, parent, child);
                REGISTERED.store(DONE, Ordering::Release);
                return;
            }
            Err(now) => seen = now,
        }
    }
}
