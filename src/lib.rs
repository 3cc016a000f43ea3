//! Per-tenant memory accounting and limits for one process: the Linux memory cgroup
//! controller, rebuilt as a global allocator.
//!
//! ```no_run
//! #[global_allocator]
//! static ALLOC: memgroup::GroupAlloc = memgroup::GroupAlloc::system();
//!
//! let tenant = memgroup::Group::new("tenant-a").unwrap();
//! tenant.set_max(Some(64 << 20));
//! let buf = tenant.run(|| memgroup::fallible(|| {
//!     let mut v: Vec<u8> = Vec::new();
//!     v.try_reserve(1 << 20).map(|_| v)       // Err once the tenant is at its limit
//! }));
//! tenant.flush();
//! println!("{} bytes, {} refused", tenant.stat().usage, tenant.stat().events.fail);
//! # drop(buf);
//! ```
//!
//! Every allocation is charged to the group the allocating thread is in ([`Group::enter`],
//! [`Group::run`]; the root outside any group). Groups form a tree and every figure is
//! hierarchical. A free uncharges the block's owner, on whatever thread it happens. Charges go
//! through per-CPU stocks (and, in the tag design, a small per-thread pocket in front of them),
//! so the shared counters move once per batch, not per allocation.
//!
//! Two designs: [`TagAlloc`] (the default: an 8-byte owner tag on every block, over any inner
//! allocator) and `ArenaAlloc` (feature `arena`: per-group slab caches). [`GroupAlloc`] is the
//! one the features select. Groups report memory pressure ([`Group::on_pressure`]) and can be
//! asked to give memory back through [`Shrinker`]s.
//!
//! # Design
//!
//! memgroup is the memory cgroup controller of Linux (memcg) in one process, and its design
//! comes from five kernel discussions: Glauber Costa's per-memcg slab caches (Kernel Summit
//! 2012, on LWN: the arena design, kernel memory counted apart, and the question whether a
//! shared counter bounces between CPUs); Greg Thelen and Glauber Costa on per-cgroup TCP buffer
//! limits (LKML, 2011: one limit for kernel and user memory, an optional kernel-only one);
//! Michal Hocko and Johannes Weiner on socket memory in the unified hierarchy (LKML, 2015: fail
//! at the limit or force the charge, and a switch to turn kernel accounting off); Vladimir
//! Davydov on the downsides of per-memcg kmem caches (LKML: the tag design, an owner stored
//! with every object and per-CPU stocks to make per-object charging cheap); and Anton
//! Vorontsov's mempressure control group (LWN, 2013: the low / medium / critical levels and
//! shrinkers that free chunks on request).
//!
//! **Layers**, bottom up; each module imports only modules below it:
//!
//! - `sync`: the atomics facade (std's, or loom's for `loom-tests/`) and the one backoff.
//! - `platform` (libc: CPU number, `mmap`, `membarrier`, thread-exit keys, the environment),
//!   `lock` (spin and call locks), `fork` (the ordered table of `fork()` participants).
//! - `core`, which knows nothing of `GlobalAlloc`, libc or the designs and is what the loom
//!   models compile: `counter` (memcg's `page_counter`), `pocket` (per-thread pockets and their
//!   list), `stock` (per-CPU stock slots and their fast paths), `drain`, and `charge` (the one
//!   charge path, below both designs), and `doorbell` (the notifier's wake-up).
//! - `group`: the group table (records, ids, names, the stocks over it, the hooks the layers
//!   above register) and the `Group` handle; `control`: `Group`'s public API over it.
//! - `scope` (the thread's current group and scopes), `thread` (the calling thread as the
//!   charge path sees it: CPU, limit mode, pocket), `pressure` (notifier, subscriptions,
//!   shrinkers, direct reclaim).
//! - `tag` and `arena`: the two designs' `GlobalAlloc`s; then `future`, `tokio`, `export`.
//!
//! Where a lower layer must reach a higher one (the group table asking a design to flush or
//! drop its caches, the charge path waking the notifier or asking for direct reclaim), the
//! higher one registers its entry points when it starts (the kernel's `cgroup_subsys`
//! callbacks, mimalloc's `mi_register_*`).
//!
//! **The charge path**, from `GlobalAlloc::alloc` to the counter, in the tag design:
//! `TagAlloc::alloc` calls `alloc_tagged`, which calls `Stocks::charge_block` (the thread's
//! pocket: a plain load and store, no counter moves). When the pocket cannot serve the block,
//! `alloc_tagged` calls `alloc_slow`, which calls `Stocks::charge_block_slow` (the CPU's stock
//! slot: one compare-and-swap), which calls `Stocks::charge_slow` (a refill of the slot in a
//! batch), which calls `Counter::try_charge`: the counter, at the fifth call. A block over a
//! batch goes from `charge_block_slow` to `Stocks::charge_exact` (drains under the limit,
//! direct reclaim, then the mode and the policies), and from there to `Counter::try_charge`,
//! also the fifth; a refill refused at a limit goes on from `charge_slow` to `charge_exact`.
//! The arena design charges a slab at a time through `thread::charge`, which calls
//! `Stocks::charge` and from there the same `charge_slow`.
//!
//! **Verbs.** Memory goes back and forth between three levels, the counters, the per-CPU stock
//! slots and the threads' pockets, with the kernel's verbs (memcg's `consume_stock`,
//! `refill_stock`, `drain_stock`):
//!
//! - *charge* / *uncharge*: the counters move, checked against the limits on the way up
//!   (`Counter::try_charge`, `Counter::uncharge`, `Stocks::uncharge_counters`); the only verbs
//!   that touch a counter.
//! - *consume*: a charge served from bytes already charged into a slot or a pocket
//!   (`Stocks::consume`, `Stocks::pocket_charge`); no counter moves.
//! - *refill*: bytes put into a slot or a pocket: a free's (`Stocks::refill`), the rest of a
//!   batch charged from the counters (`Stocks::refill_slot`), half a pocket from the CPU's
//!   stock (`Stocks::refill_pocket`).
//! - *drain*: a slot's or a pocket's content taken out and given back to the level below:
//!   `Stocks::drain` (the slots and pockets of some groups), `drain_group` (every slot naming a
//!   group, empty ones too, when it is removed or its record freed), `drain_to_stock` (a
//!   pocket's content into its CPU's stock), `delist_pocket` (a gone thread's pocket, drained
//!   and taken off the list). [`Group::flush`] is the public name of a drain of a subtree,
//!   after the design's own caches.
//!
//! Pockets are *enlisted* on, and *delisted* from, the list that drains walk.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

#[cfg(feature = "arena")]
mod arena;
mod control;
mod core;
pub mod export;
mod fork;
mod future;
mod group;
mod lock;
mod platform;
mod pressure;
mod scope;
mod sync;
mod tag;
mod thread;
#[cfg(feature = "tokio")]
pub mod tokio;

pub use future::{GroupFutureExt, Guarded, InGroup};
pub use group::{dying_groups, stock_batch, Group, MAX_NAME};
#[doc(hidden)]
pub use platform::fail_next_maps;
pub use pressure::{Level, Shrinker, ShrinkerHandle, Subscription};
pub use scope::{current, fallible, kernel, nofail, Entered};
pub use tag::{TagAlloc, TAG_SIZE};
/// jemalloc, the inner allocator of [`TagAlloc::jemalloc`] (feature `jemalloc`).
#[cfg(feature = "jemalloc")]
pub use tikv_jemallocator::Jemalloc;

#[cfg(feature = "arena")]
pub use arena::ArenaAlloc;
#[cfg(feature = "arena")]
#[doc(hidden)]
pub use arena::{
    footprint as arena_footprint, pause_after_orphaning, pause_before_release, pause_in_notify,
    slab_of, Footprint, SlabInfo,
};

/// The allocator to install: the tag design ([`TagAlloc`]).
#[cfg(not(feature = "arena"))]
pub type GroupAlloc<A = std::alloc::System> = TagAlloc<A>;

/// The allocator to install: the arena design ([`ArenaAlloc`], feature `arena`).
#[cfg(feature = "arena")]
pub type GroupAlloc<A = std::alloc::System> = ArenaAlloc<A>;

/// Whether kernel-memory accounting is on (`MEMGROUP_KMEM=0` turns it off: kernel allocations
/// are then charged as ordinary memory and `kmem` stays 0).
pub fn kmem_accounting() -> bool {
    group::kmem_enabled()
}

/// What an infallible allocation does when it would pass a group's `max`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnLimit {
    /// Charge it above the limit, count it in `events.max`, and carry on: in Rust a failed
    /// infallible allocation aborts the whole process, every tenant with it.
    #[default]
    Overcharge,
    /// Refuse it: the allocator returns null. Fallible APIs (`try_reserve`) get an error; an
    /// infallible allocation aborts the process, so use this only for code that allocates
    /// fallibly.
    Fail,
}

/// A group's figures, its descendants' included, in bytes.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stat {
    /// Bytes charged: user and kernel memory, with the design's overhead.
    pub usage: usize,
    /// The highest `usage` seen.
    pub peak: usize,
    /// The part of `usage` charged as kernel memory (inside [`kernel`]).
    pub kmem: usize,
    /// The part of `usage` that is the design's own cost (tags), not the program's data.
    pub overhead: usize,
    /// The hard limit, if set.
    pub max: Option<usize>,
    /// The pressure threshold, if set.
    pub high: Option<usize>,
    /// The kernel-memory limit, if set.
    pub kmem_max: Option<usize>,
    /// Blocks allocated.
    pub allocs: u64,
    /// Blocks freed.
    pub frees: u64,
    /// Limit events.
    pub events: Events,
}

/// Counts of limit events, on the group whose limit was involved and its ancestors.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Events {
    /// `usage` went above `high`.
    pub high: u64,
    /// A charge would have passed `max` (or `kmem_max`): it was then forced or refused.
    pub max: u64,
    /// A charge was refused.
    pub fail: u64,
}

/// What went wrong with a group operation.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The name cannot name a group.
    InvalidName {
        /// The name given.
        name: String,
        /// Why it cannot.
        reason: &'static str,
    },
    /// A sibling already has this name.
    Exists {
        /// The name given.
        name: String,
    },
    /// The group was removed.
    Removed,
    /// The root cannot be removed.
    Root,
    /// The group has children that are not removed.
    HasChildren,
    /// The new group's record does not fit its parent's limits.
    OverLimit,
    /// The group table is full.
    TooManyGroups,
    /// The new group would be more than 32 levels below the root.
    TooDeep,
    /// The C allocator could not grow the group name table.
    OutOfMemory,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::InvalidName { name, reason } => {
                write!(f, "invalid group name {name:?}: {reason}")
            }
            Error::Exists { name } => write!(f, "a group named {name:?} already exists here"),
            Error::Removed => f.write_str("the group was removed"),
            Error::Root => f.write_str("the root group cannot be removed"),
            Error::HasChildren => f.write_str("the group has children that are not removed"),
            Error::OverLimit => {
                f.write_str("the new group's bookkeeping does not fit the parent's limits")
            }
            Error::TooManyGroups => {
                f.write_str("too many groups (the table holds 2^20 - 2, the root included)")
            }
            Error::TooDeep => f.write_str("groups nest at most 32 levels below the root"),
            Error::OutOfMemory => f.write_str("out of memory for the group name table"),
        }
    }
}

impl std::error::Error for Error {}
