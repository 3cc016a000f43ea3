//! The calling thread as the charge path (`core::charge`) sees it ([`Thread`]): its CPU, its
//! scope's limit mode, and its pocket (see `core::pocket`), which is kept in the thread's
//! scope block (see `crate::scope`, which keeps it beside the key to charge), put on the
//! pockets' list at the thread's first small allocation, emptied and taken off at its exit.
//!
//! Pockets need `membarrier(2)` (Linux 4.14) and a thread-exit hook; without them, in exact
//! mode (`MEMGROUP_BATCH=0`), or with `MEMGROUP_POCKETS=0`, threads have none and charge the
//! per-CPU stocks directly.

use crate::core::charge::Caller;
use crate::core::pocket::{Place, Pocket};
use crate::core::stock::{Key, Mode};
use crate::fork::{self, Participant, Rank};
use crate::group::{self, CORE};
use crate::lock::SpinLock;
use crate::sync::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use crate::{platform, scope};

// The thread's pocket state (`scope::pocket_state`): `LISTED` (its pocket is on the list), or
// `UNSET` (it never had its chance: its first slow path puts it there), or `POCKETLESS` (it has
// none: pockets are off, or it is exiting). A pocket off the list holds nothing, so the fast
// paths fail on it, and the slow paths charge the per-CPU stocks directly (and give an
// `UNSET` thread its pocket).

const UNSET: u8 = 0;
const LISTED: u8 = 1;
const POCKETLESS: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(0);
const DECIDING: u8 = 1;
const ON: u8 = 2;
const OFF: u8 = 3;
static EXIT_KEY: AtomicU32 = AtomicU32::new(0);

/// Pockets smaller than this (a small `MEMGROUP_BATCH`) would serve too few blocks to pay.
const MIN_POCKET: usize = 1024;
/// Bytes mapped at a time for new places on the pockets' list (1,024 places of 16 bytes).
const CHUNK_BYTES: usize = 16 << 10;

/// The calling thread, for the charge path: what it asks is read from this thread's state
/// when it asks.
pub(crate) struct Thread;

impl Caller for Thread {
    #[inline(always)]
    fn cpu(&self) -> usize {
        platform::cpu()
    }

    #[inline(always)]
    fn mode(&self) -> Mode {
        scope::mode()
    }

    #[inline(always)]
    fn pocketless(&self) -> bool {
        none()
    }

    #[inline(always)]
    fn listed_pocket(&self, enlist: bool) -> Option<&Pocket> {
        if enlist {
            get()
        } else {
            current()
        }
    }
}

/// Charges `bytes` (and `objects` new blocks) to `key` from this thread, through its CPU's
/// stock: see `Stocks::charge`.
#[inline(always)]
pub(crate) fn charge(key: Key, bytes: usize, objects: u64) -> Option<Key> {
    CORE.charge(&Thread, key, bytes, objects)
}

/// Uncharges `bytes` (and `objects` blocks freed) from `key`, through this thread's CPU's
/// stock: see `Stocks::uncharge`.
#[inline(always)]
pub(crate) fn uncharge(key: Key, bytes: usize, objects: u64) {
    CORE.uncharge(&Thread, key, bytes, objects)
}

/// This thread's pocket, if it is on the list.
#[inline(always)]
pub(crate) fn current() -> Option<&'static Pocket> {
    (scope::pocket_state() == LISTED).then(scope::pocket)
}

/// Whether this thread has no pocket and will have none (pockets are off, or it is exiting):
/// it charges the per-CPU stocks directly.
#[inline(always)]
pub(crate) fn none() -> bool {
    scope::pocket_state() == POCKETLESS
}

/// This thread's pocket, given to it now if it never had one.
#[cold]
pub(crate) fn get() -> Option<&'static Pocket> {
    if let Some(p) = current() {
        return Some(p);
    }
    // Set first: allocations nested in what follows charge the stocks directly.
    if scope::replace_pocket_state(POCKETLESS) != UNSET {
        return None;
    }
    match enabled() {
        Some(true) => {}
        Some(false) => return None,
        None => {
            // Another thread is deciding: try again at a later slow path.
            scope::replace_pocket_state(UNSET);
            return None;
        }
    }
    let p = scope::pocket();
    if !CORE.pockets().enlist(p, fresh) {
        return None;
    }
    // The hook is what gives the pocket up at the thread's exit: without it, none.
    let hooked = platform::set_thread_exit_value(
        EXIT_KEY.load(Ordering::Relaxed),
        p as *const Pocket as *mut libc::c_void,
    );
    if !hooked {
        CORE.pockets().delist(p);
        return None;
    }
    scope::replace_pocket_state(LISTED);
    Some(p)
}

/// Whether pockets are on, deciding it at the first call; `None` while another thread
/// decides (never waited for: a fork child could inherit the decision half made).
fn enabled() -> Option<bool> {
    match STATE.compare_exchange(0, DECIDING, Ordering::Acquire, Ordering::Acquire) {
        Ok(_) => {}
        Err(DECIDING) => return None,
        Err(s) => return Some(s == ON),
    }
    let wanted = platform::env_switch(c"MEMGROUP_POCKETS", true);
    let on = wanted
        && group::stock_batch() / crate::core::stock::POCKET_SHARE >= MIN_POCKET
        && platform::membarrier_register()
        && match platform::thread_exit_key(thread_exit) {
            Some(key) => {
                EXIT_KEY.store(key, Ordering::Relaxed);
                true
            }
            None => false,
        };
    if on {
        // A thread caught inside its pocket by a fork would leave it stuck in the child.
        fork_safe();
    }
    STATE.store(if on { ON } else { OFF }, Ordering::Release);
    Some(on)
}

/// What `fresh` carves new places on the pockets' list from.
struct Chunk {
    next: *mut Place,
    end: *mut Place,
}

// SAFETY: the chunk's pointers are only used under its lock.
unsafe impl Send for Chunk {}

/// Held across `fork()` (by the handlers below), so a child never inherits it locked.
static CHUNK: SpinLock<Chunk> = SpinLock::new(Chunk {
    next: core::ptr::null_mut(),
    end: core::ptr::null_mut(),
});

/// Set by `fork_prepare` when it froze the pockets, so that only a freeze is thawed (pockets
/// may be turned on between the prepare and parent handlers).
static FROZE: AtomicBool = AtomicBool::new(false);

/// A new place on the pockets' list, carved from memory mapped for them (never freed).
fn fresh() -> Option<&'static Place> {
    let mut chunk = CHUNK.lock();
    if chunk.next == chunk.end {
        let base = platform::map(CHUNK_BYTES).cast::<Place>();
        if base.is_null() {
            return None;
        }
        chunk.next = base;
        // SAFETY: the mapping holds CHUNK_BYTES bytes, a whole number of places.
        chunk.end = unsafe { base.add(CHUNK_BYTES / size_of::<Place>()) };
    }
    let p = chunk.next;
    // SAFETY: `p` is inside the mapping (checked above), page-aligned mappings keep the
    // place's alignment, and nothing else has this slot; it lives as long as the process.
    unsafe {
        chunk.next = p.add(1);
        p.write(Place::new());
        Some(&*p)
    }
}

/// The thread-exit hook: empties the thread's pocket and takes it off the list (waiting for
/// any walk that may still reach it). Allocations after it (other exit hooks) charge the
/// stocks directly.
unsafe extern "C" fn thread_exit(arg: *mut libc::c_void) {
    scope::replace_pocket_state(POCKETLESS);
    // SAFETY: `arg` is the pocket `get` registered for this thread: its own, in its
    // thread-local block, alive while the thread is.
    let p = unsafe { &*(arg as *const Pocket) };
    CORE.delist_pocket(p);
}

/// Across `fork()`: before it, every thread is kept out of its pocket; in the child, the
/// pockets of the threads it does not have are emptied and given up (which may free a group's
/// record: the group directory takes part too), and the stocks forget what those threads held.
fn fork_safe() {
    static POCKETS: Participant = Participant {
        prepare: fork_prepare,
        parent: fork_parent,
        child: fork_child,
    };
    group::fork_safe();
    fork::join(Rank::Pockets, &POCKETS);
}

fn fork_prepare() {
    CHUNK.raw_lock();
    if STATE.load(Ordering::Acquire) == ON {
        CORE.freeze_pockets();
        FROZE.store(true, Ordering::Relaxed);
    }
}

fn fork_parent() {
    if FROZE.swap(false, Ordering::Relaxed) {
        CORE.thaw_pockets();
    }
    CHUNK.raw_unlock();
}

/// In the child, after the directory and subscriber locks are released (emptying a pocket may free a group's
/// record).
fn fork_child() {
    FROZE.store(false, Ordering::Relaxed);
    CHUNK.raw_unlock();
    // A decision another thread was making is made again.
    let _ = STATE.compare_exchange(DECIDING, 0, Ordering::Relaxed, Ordering::Relaxed);
    let own = match current() {
        Some(p) => p as *const Pocket,
        None => core::ptr::null(),
    };
    CORE.reset_in_child(own);
}
