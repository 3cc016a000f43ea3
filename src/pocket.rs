//! This thread's pocket (see `core::pocket`): found through a thread local, given to the
//! thread at its first small allocation, emptied and given up at its exit.
//!
//! Pockets need `membarrier(2)` (Linux 4.14) and a thread-exit hook; without them, in exact
//! mode (`MEMGROUP_BATCH=0`), or with `MEMGROUP_POCKETS=0`, threads have none and charge the
//! per-CPU stocks directly.

use core::cell::Cell;
use core::ptr::null;

use crate::core::pocket::Pocket;
use crate::fork::{self, Participant, Rank};
use crate::group::{self, STOCKS};
use crate::lock::SpinLock;
use crate::platform;
use crate::sync::{AtomicBool, AtomicU32, AtomicU8, Ordering};

thread_local! {
    /// This thread's pocket, or `UNSET` (it never had its chance at one: its first slow path
    /// gives it), or `NONE` (it has none: pockets are off, or it is exiting).
    static POCKET: Cell<*const Pocket> = const { Cell::new(UNSET) };
}

const UNSET: *const Pocket = null();
const NONE: *const Pocket = core::ptr::dangling();

/// What charges this thread's small blocks.
pub(crate) enum Mine {
    Pocket(&'static Pocket),
    /// The per-CPU stocks directly.
    Stocks,
    /// Not decided yet: take the slow path, which gives the thread its pocket.
    Unset,
}

static STATE: AtomicU8 = AtomicU8::new(0);
const DECIDING: u8 = 1;
const ON: u8 = 2;
const OFF: u8 = 3;
static EXIT_KEY: AtomicU32 = AtomicU32::new(0);

/// Pockets smaller than this (a small `MEMGROUP_BATCH`) would serve too few blocks to pay.
const MIN_POCKET: usize = 512;
/// Bytes mapped at a time for new pockets.
const CHUNK_BYTES: usize = 64 << 10;

#[inline(always)]
pub(crate) fn mine() -> Mine {
    match POCKET.with(Cell::get) {
        UNSET => Mine::Unset,
        NONE => Mine::Stocks,
        // SAFETY: any other value is this thread's pocket, and pockets are never freed.
        p => Mine::Pocket(unsafe { &*p }),
    }
}

/// This thread's pocket, if it has one.
#[inline(always)]
pub(crate) fn current() -> Option<&'static Pocket> {
    match mine() {
        Mine::Pocket(p) => Some(p),
        _ => None,
    }
}

/// This thread's pocket, given to it now if it never had one.
#[cold]
pub(crate) fn get() -> Option<&'static Pocket> {
    if let Mine::Pocket(p) = mine() {
        return Some(p);
    }
    // Set first: allocations nested in what follows charge the stocks directly.
    if POCKET.with(|c| c.replace(NONE)) != UNSET {
        return None;
    }
    match enabled() {
        Some(true) => {}
        Some(false) => return None,
        None => {
            // Another thread is deciding: try again at a later slow path.
            POCKET.with(|c| c.set(UNSET));
            return None;
        }
    }
    let p = STOCKS.pockets().adopt(fresh)?;
    // The hook is what gives the pocket up at the thread's exit: without it, none.
    let hooked = platform::set_thread_exit_value(
        EXIT_KEY.load(Ordering::Relaxed),
        p as *const Pocket as *mut libc::c_void,
    );
    if !hooked {
        STOCKS.pockets().abandon(p);
        return None;
    }
    POCKET.with(|c| c.set(p));
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
    let wanted = match platform::env(c"MEMGROUP_POCKETS") {
        None | Some(b"1") => true,
        Some(b"0") => false,
        Some(_) => {
            platform::warn(&[b"memgroup: MEMGROUP_POCKETS must be 0 or 1; pockets stay on\n"]);
            true
        }
    };
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

/// What `fresh` carves new pockets from.
struct Chunk {
    next: *mut Pocket,
    end: *mut Pocket,
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

/// A new pocket, carved from memory mapped for pockets (never freed).
fn fresh() -> Option<&'static Pocket> {
    let mut chunk = CHUNK.lock();
    if chunk.next == chunk.end {
        let base = platform::map(CHUNK_BYTES).cast::<Pocket>();
        if base.is_null() {
            return None;
        }
        chunk.next = base;
        // SAFETY: the mapping holds CHUNK_BYTES bytes, a whole number of pockets.
        chunk.end = unsafe { base.add(CHUNK_BYTES / size_of::<Pocket>()) };
    }
    let p = chunk.next;
    // SAFETY: `p` is inside the mapping (checked above), page-aligned mappings keep the
    // pocket's alignment, and nothing else has this slot; it lives as long as the process.
    unsafe {
        chunk.next = p.add(1);
        p.write(Pocket::new());
        Some(&*p)
    }
}

/// The thread-exit hook: empties the thread's pocket and gives it up for reuse. Allocations
/// after it (other exit hooks) charge the stocks directly.
unsafe extern "C" fn thread_exit(arg: *mut libc::c_void) {
    POCKET.with(|c| c.set(NONE));
    // SAFETY: `arg` is the pocket `get` registered for this thread; it is never freed.
    let p = unsafe { &*(arg as *const Pocket) };
    STOCKS.retire_pocket(p);
}

/// Across `fork()`: before it, every thread is kept out of its pocket; in the child, the
/// pockets of the threads it does not have are emptied and given up (which may free a group's
/// record: the group registry takes part too), and the stocks forget what those threads held.
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
        STOCKS.freeze_pockets();
        FROZE.store(true, Ordering::Relaxed);
    }
}

fn fork_parent() {
    if FROZE.swap(false, Ordering::Relaxed) {
        STOCKS.thaw_pockets();
    }
    CHUNK.raw_unlock();
}

/// In the child, after the registry locks are released (emptying a pocket may free a group's
/// record).
fn fork_child() {
    FROZE.store(false, Ordering::Relaxed);
    CHUNK.raw_unlock();
    // A decision another thread was making is made again.
    let _ = STATE.compare_exchange(DECIDING, 0, Ordering::Relaxed, Ordering::Relaxed);
    STOCKS.reset_in_child(POCKET.with(Cell::get));
}
