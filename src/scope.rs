//! The thread's current group and its scopes (`kernel`, `fallible`, `nofail`).
//!
//! One `const`-initialized thread local with no destructor, so it is usable from the first
//! allocation of a thread to its last, thread-local destructors included. It also holds the
//! thread's pocket itself (for `crate::pocket`), beside the key, so the allocation fast path
//! touches one thread-local block, on one cache line, with no pointer to load: the key to
//! charge (its kernel bit already set by the scope, sealed as the tag stores it) and the
//! pocket.

use core::cell::Cell;
use core::marker::PhantomData;

use crate::core::pocket::Pocket;
use crate::core::stock::{checked, key, Key, Mode};
use crate::group::{kmem_enabled, Group, Node, ROOT_ID};

const KERNEL: u8 = 1;
const FALLIBLE: u8 = 2;
const NOFAIL: u8 = 4;
/// Running shrinkers or pressure callbacks: charges never wait for reclaim.
const RECLAIMING: u8 = 8;

const ROOT_KEY: Key = key(ROOT_ID, false);

// The sealed form of a key (what the tag design stores with every block) is the core's, since
// a pocket keeps its key in that form too (see `crate::core::stock::sealed`).
pub(crate) use crate::core::stock::{sealed, unseal};

// The key and the pocket's fields the fast paths use share the block's first cache line (the
// pocket's far word, for frees of other groups' blocks, is on the second).
#[repr(C, align(64))]
struct Local {
    /// The key a new allocation is charged to, sealed: the entered group's, of the kind the
    /// scope bits say (the kernel bit is kept equal to `ctx & KERNEL` by every change of
    /// either).
    key: Cell<u64>,
    /// The same key as the pocket's word check needs it (`checked`), so a pocket charge does
    /// not recompute it. Set with `key`, always (`set_key`).
    check: Cell<u64>,
    /// The thread's pocket (on the pockets' list only while `pocket_state` says so).
    pocket: Pocket,
    /// What `crate::pocket` says of `pocket`.
    pocket_state: Cell<u8>,
    /// The entered group's record, holding a reference; null for the root.
    node: Cell<*const Node>,
    /// Scope bits.
    ctx: Cell<u8>,
    /// Guards alive on this thread: they must be dropped in reverse order.
    depth: Cell<u32>,
}

thread_local! {
    static LOCAL: Local = const {
        Local {
            key: Cell::new(sealed(ROOT_KEY)),
            check: Cell::new(checked(ROOT_KEY)),
            pocket: Pocket::new(),
            pocket_state: Cell::new(0),
            node: Cell::new(core::ptr::null()),
            ctx: Cell::new(0),
            depth: Cell::new(0),
        }
    };
}

/// The key to charge a new allocation to.
#[cfg_attr(not(feature = "arena"), allow(dead_code))]
#[inline(always)]
pub(crate) fn current_key() -> Key {
    LOCAL.with(|l| l.key.get() as Key)
}

/// The key to charge a new allocation to, sealed and as the pocket's check needs it
/// (`checked`), and the thread's pocket: one thread-local block.
#[inline(always)]
pub(crate) fn sealed_key_and_pocket() -> (u64, u64, &'static Pocket) {
    LOCAL.with(|l| (l.key.get(), l.check.get(), own(&l.pocket)))
}

impl Local {
    /// Sets the key (sealed) and its checked form together; returns the previous sealed key.
    #[inline(always)]
    fn set_key(&self, sealed_key: u64) -> u64 {
        self.check.set(checked(sealed_key as Key));
        self.key.replace(sealed_key)
    }
}

/// The thread's pocket (whether it is on the list: `pocket_state`).
#[inline(always)]
pub(crate) fn pocket() -> &'static Pocket {
    LOCAL.with(|l| own(&l.pocket))
}

/// The thread's pocket as a reference that outlives the `with` closure.
#[inline(always)]
fn own(p: &Pocket) -> &'static Pocket {
    // SAFETY: the thread-local block lives as long as the thread, and it has no destructor.
    // The reference is used by this thread, and by other threads only through the pockets'
    // list, whose protocol (`Pockets::delist`, run by the thread's exit hook) ends every
    // such use before the thread goes.
    unsafe { &*(p as *const Pocket) }
}

/// What `crate::pocket` says of the thread's pocket.
#[inline(always)]
pub(crate) fn pocket_state() -> u8 {
    LOCAL.with(|l| l.pocket_state.get())
}

/// Replaces `pocket_state`, returning the previous one.
pub(crate) fn replace_pocket_state(state: u8) -> u8 {
    LOCAL.with(|l| l.pocket_state.replace(state))
}

/// `k` (a key of either kind) of the kind that scope bits `ctx` say, sealed.
#[inline(always)]
fn of_kind(k: Key, ctx: u8) -> u64 {
    sealed(k & !1 | (ctx & KERNEL) as Key)
}

/// The limit mode of this thread's current scope.
pub(crate) fn mode() -> Mode {
    let ctx = LOCAL.with(|l| l.ctx.get());
    if ctx & FALLIBLE != 0 {
        Mode::Fallible
    } else if ctx & NOFAIL != 0 {
        Mode::NoFail
    } else {
        Mode::Policy
    }
}

/// While alive, this thread charges the group it was made from. Returned by
/// [`Group::enter`]; not `Send`, since it restores this thread's previous group when dropped.
#[must_use = "the group is left as soon as the guard is dropped"]
///
/// Guards are meant to be dropped in the reverse order of their creation, as scopes nest.
/// Dropping one early returns the thread to the group it was in before that guard, and the
/// guards created after it then restore nothing when they go (only their references are
/// released), so the thread is back where it started once all are gone.
pub struct Entered {
    prev_node: *const Node,
    prev_key: Key,
    depth: u32,
    _not_send: PhantomData<*const ()>,
}

/// A thread's place in a group.
impl Group {
    /// Makes this thread charge this group until the returned guard is dropped.
    pub fn enter(&self) -> Entered {
        enter(self)
    }

    /// Runs `f` with this thread charging this group.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        let _entered = self.enter();
        f()
    }
}

fn enter(group: &Group) -> Entered {
    let (node, key) = if group.id() == ROOT_ID {
        (core::ptr::null(), ROOT_KEY)
    } else {
        (group.clone().into_raw(), key(group.id(), false))
    };
    LOCAL.with(|l| {
        let depth = l.depth.get() + 1;
        l.depth.set(depth);
        Entered {
            prev_node: l.node.replace(node),
            prev_key: l.set_key(of_kind(key, l.ctx.get())) as Key,
            depth,
            _not_send: PhantomData,
        }
    })
}

impl Drop for Entered {
    fn drop(&mut self) {
        let depth = LOCAL.with(|l| l.depth.get());
        let left = if self.depth > depth {
            // An outer guard went first and took the thread back past this one.
            self.prev_node
        } else {
            LOCAL.with(|l| {
                l.depth.set(self.depth - 1);
                // Of the kind the scope is of now (a guard may outlive a `kernel` scope).
                l.set_key(of_kind(self.prev_key, l.ctx.get()));
                l.node.replace(self.prev_node)
            })
        };
        if !left.is_null() {
            // SAFETY: every record pointer held by the thread local or a guard owns one
            // reference from `into_raw`; `left` is no longer held by either.
            drop(unsafe { Group::from_raw(left) });
        }
    }
}

impl core::fmt::Debug for Entered {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Entered")
    }
}

/// The group this thread charges: the innermost entered one, or the root.
pub fn current() -> Group {
    LOCAL.with(|l| match l.node.get() {
        node if node.is_null() => Group::root(),
        // SAFETY: the thread local holds a reference on a non-null record.
        node => Group::from_held(unsafe { &*node }),
    })
}

/// Runs `f` with this thread's scope bits changed by `set`, restoring them after, even if
/// `f` unwinds.
fn with_ctx<R>(set: impl FnOnce(u8) -> u8, f: impl FnOnce() -> R) -> R {
    struct Restore(u8);
    impl Drop for Restore {
        fn drop(&mut self) {
            LOCAL.with(|l| {
                l.ctx.set(self.0);
                l.set_key(of_kind(l.key.get() as Key, self.0));
            });
        }
    }
    let _restore = LOCAL.with(|l| {
        let prev = l.ctx.get();
        let ctx = set(prev);
        l.ctx.set(ctx);
        l.set_key(of_kind(l.key.get() as Key, ctx));
        Restore(prev)
    });
    f()
}

/// Runs `f` with its allocations charged as kernel memory: memory the server allocates on the
/// group's behalf rather than at its request (connection buffers, caches, parsed plans). It
/// counts in `usage` and in `kmem`, and is checked against `kmem_max` as well as `max`. With
/// `MEMGROUP_KMEM=0` it is charged as ordinary memory.
pub fn kernel<R>(f: impl FnOnce() -> R) -> R {
    let kernel = if kmem_enabled() { KERNEL } else { 0 };
    with_ctx(|ctx| ctx | kernel, f)
}

/// Runs `f` with over-limit allocations refused: the allocator returns null, so
/// `Vec::try_reserve` and friends return `Err` (and an infallible allocation aborts, as
/// always when memory runs out: use only fallible APIs inside).
pub fn fallible<R>(f: impl FnOnce() -> R) -> R {
    with_ctx(|ctx| ctx & !NOFAIL | FALLIBLE, f)
}

/// Runs `f` with over-limit allocations forced above the limit, even in a group whose
/// policy is [`crate::OnLimit::Fail`].
pub fn nofail<R>(f: impl FnOnce() -> R) -> R {
    with_ctx(|ctx| ctx & !FALLIBLE | NOFAIL, f)
}

/// Runs `f` charging the root, outside any scope: for memgroup's own calls into code that may
/// allocate on its behalf (registering fork handlers), which must not land on a tenant.
pub(crate) fn as_root<R>(f: impl FnOnce() -> R) -> R {
    let (prev_node, prev_key) = LOCAL.with(|l| {
        (
            l.node.replace(core::ptr::null()),
            l.set_key(sealed(ROOT_KEY)),
        )
    });
    let r = with_ctx(|ctx| ctx & RECLAIMING, f);
    LOCAL.with(|l| {
        l.node.set(prev_node);
        // `with_ctx` has restored the scope bits `prev_key`'s kind was set from.
        l.set_key(prev_key);
    });
    r
}

/// Runs `f` as memory reclaim: allocations inside are charged as usual but never wait for
/// (or start) a direct reclaim, so a shrinker that allocates cannot recurse.
pub(crate) fn reclaiming<R>(f: impl FnOnce() -> R) -> R {
    with_ctx(|ctx| ctx | RECLAIMING, f)
}

/// Whether this thread is inside `reclaiming`.
pub(crate) fn is_reclaiming() -> bool {
    LOCAL.with(|l| l.ctx.get() & RECLAIMING != 0)
}
