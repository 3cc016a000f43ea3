//! The trial of a group on a thread (issue 12.3's policy, SLUB's lesson on per-cache cost): a
//! thread keeps no group heap for a group until the group has asked it for
//! `MEMGROUP_ARENA_SLAB_AFTER` bytes of small blocks, and a group heap takes no slab of a class
//! until it has asked for a slab's worth of that class. Until then the blocks go the tag way
//! (the inner allocator with an owner tag, charged exactly), so many small tenants cost what
//! the tag design charges and busy ones get the arena's slabs.

use core::cell::Cell;

use crate::core::stock::Key;
use crate::platform;
use crate::sync::{AtomicU32, Ordering};

use super::class::{self, CLASSES};

/// Per class, `class::slab_after` for `MEMGROUP_ARENA_SLAB_AFTER`, set by `read_slab_after` at
/// the arena's setup (before any thread heap exists, so before any slow path reads it).
static SLAB_AFTER: [AtomicU32; CLASSES] = [const { AtomicU32::new(0) }; CLASSES];

/// Reads `MEMGROUP_ARENA_SLAB_AFTER` (once, from the arena's setup). Allocates nothing.
pub(super) fn read_slab_after() {
    let bytes = platform::env_size_in(
        c"MEMGROUP_ARENA_SLAB_AFTER",
        class::SLAB_AFTER_DEFAULT,
        class::SLAB_AFTER_MAX,
    );
    for (c, n) in SLAB_AFTER.iter().enumerate() {
        n.store(class::slab_after(bytes, c) as u32, Ordering::Relaxed);
    }
    TRIAL_BYTES.store(bytes as u32, Ordering::Relaxed);
}

/// `MEMGROUP_ARENA_SLAB_AFTER` in bytes (at most 256 KiB): what a group must have asked this
/// thread for, in small blocks of any class, before the thread makes it a group heap.
static TRIAL_BYTES: AtomicU32 = AtomicU32::new(0);

/// A group key this thread has no group heap for, and the bytes (of its blocks' classes) it
/// has had served the tag way meanwhile. Key 0 is no key (`key()` of a group id is never 0).
#[derive(Clone, Copy)]
struct Trial {
    key: Key,
    asked: u32,
}

const NO_TRIAL: Trial = Trial { key: 0, asked: 0 };

/// The trial table: 16 sets of 4 (512 bytes a thread).
const TRIAL_SETS: usize = 16;
const TRIAL_WAYS: usize = 4;

std::thread_local! {
    /// This thread's groups on trial: a group heap (about 800 bytes, per thread and group) is
    /// made only for a group that asked for `TRIAL_BYTES` here. Plain thread-local cells, no
    /// destructor: usable in any thread state, and only ever touched by their thread.
    static TRIALS: [[Cell<Trial>; TRIAL_WAYS]; TRIAL_SETS] =
        const { [const { [const { Cell::new(NO_TRIAL) }; TRIAL_WAYS] }; TRIAL_SETS] };
}

/// Counts `bytes` more asked of this thread by `key`, which has no group heap here: true while
/// the group is on trial (the block goes the tag way), false once it has asked for
/// `TRIAL_BYTES` (its entry is cleared: the caller makes its group heap). A new key takes the
/// entry of its set that asked least, so a group evicted by others (more than four small
/// groups of one set taking turns on one thread) starts over: it keeps going the tag way,
/// charged exactly, and pays only in speed.
pub(super) fn on_trial(key: Key, bytes: usize) -> bool {
    let limit = TRIAL_BYTES.load(Ordering::Relaxed);
    if limit == 0 {
        return false;
    }
    let bytes = bytes as u32;
    TRIALS.with(|sets| {
        let set = &sets[set_of(key)];
        if let Some(t) = entry(set, key) {
            let asked = t.get().asked + bytes;
            t.set(if asked >= limit {
                NO_TRIAL
            } else {
                Trial { key, asked }
            });
            return asked < limit;
        }
        if bytes >= limit {
            return false;
        }
        let pick = set.iter().fold(&set[0], |least, t| {
            if t.get().asked < least.get().asked {
                t
            } else {
                least
            }
        });
        pick.set(Trial { key, asked: bytes });
        true
    })
}

/// The set of the trial table `key` is in.
#[inline(always)]
fn set_of(key: Key) -> usize {
    (key.wrapping_mul(0x9e37_79b9) >> 28) as usize % TRIAL_SETS
}

/// `key`'s entry in its set (`set_of(key)`), if it has one: the lookup of `on_trial` (which
/// counts, and may make an entry) and `stays_on_trial` (which only counts on an existing one).
#[inline(always)]
fn entry(set: &[Cell<Trial>; TRIAL_WAYS], key: Key) -> Option<&Cell<Trial>> {
    set.iter().find(|t| t.get().key == key)
}

/// The allocation slow path's shortcut for a group on trial: true if `key` has an entry here
/// and still has one after `bytes` more (what `on_trial` would then answer true to), and
/// `online()` (its group not removed: a removed group's blocks count toward its nearest live
/// ancestor's trial); then the bytes are counted, as `on_trial` counts them, and the block goes
/// the tag way. False otherwise, nothing changed: the slow path decides (and `on_trial` counts).
///
/// A key with an entry has no group heap in this thread's heap: an entry is made only for a
/// key the heap's table does not hold, and the group heap is made only after `on_trial` has
/// cleared the entry (a thread has one heap, taken before its first entry; a fork gives the
/// child's thread no other heap's group heaps). So skipping the heap's lock and its key table
/// answers what they would.
#[inline(always)]
pub(super) fn stays_on_trial(key: Key, bytes: usize, online: impl FnOnce() -> bool) -> bool {
    let limit = TRIAL_BYTES.load(Ordering::Relaxed);
    if limit == 0 {
        return false;
    }
    TRIALS.with(|sets| {
        let Some(t) = entry(&sets[set_of(key)], key) else {
            return false;
        };
        let asked = t.get().asked + bytes as u32;
        if asked >= limit || !online() {
            return false;
        }
        t.set(Trial { key, asked });
        true
    })
}

/// Blocks of `class` a group heap has served the tag way before it takes a slab of `class`.
#[inline(always)]
pub(super) fn slab_after(class: usize) -> u16 {
    SLAB_AFTER[class].load(Ordering::Relaxed) as u16
}
