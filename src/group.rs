//! The group table: the records of the groups, their names, ids and lifetime, the stocks and
//! the charge path over them, the hooks the layers above register, and the `Group` handle
//! (a counted reference to a record; its public API is `crate::control`'s).
//!
//! Records live in one lazily backed `mmap` region, indexed by id, and are never unmapped:
//! a stock slot names a group by id, and a drain may look a record up while the group is being
//! removed. A record is freed (for reuse) when its group is removed, no handle or child holds
//! it and all its memory has been uncharged; it is reused only once no drain can still hold a
//! word naming it (`Stocks::quiescent`).
//!
//! A removed group keeps its record while it has live charges: frees of its memory uncharge
//! it and, through the hierarchy, its parent, so the parent stays exact. This record is the
//! kernel's `obj_cgroup`: small, and the only thing a removed group leaves behind.

use crate::sync::{AtomicBool, AtomicPtr, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use core::cell::UnsafeCell;
use core::mem::size_of;
use core::ptr::NonNull;

use crate::core::counter::Counter;
use crate::core::stock::{Groups, Mode, Stocks, MAX_BATCH, MAX_ID};
use crate::fork::{self, Participant, Rank};
use crate::lock::SpinLock;
use crate::platform;
use crate::Error;

/// The root's id. Id 0 is never used, so that key 0 names no group.
pub(crate) const ROOT_ID: u32 = 1;

/// The longest group name, in bytes.
pub const MAX_NAME: usize = 64;

/// What a group's record costs its parent, charged as kernel memory while the record lives.
const BOOKKEEPING: usize = size_of::<Node>();

/// CPU slots in the stock array; CPU numbers are masked into it (a power of two).
const MAX_CPUS: usize = 1024;

/// The concurrent core (`crate::core`) over the group table: the per-CPU stocks, the
/// pockets' list, and the charge path through them, for both designs.
pub(crate) static CORE: Stocks<Records, MAX_CPUS> = Stocks::new(0, Records);

static POOL: AtomicPtr<Node> = AtomicPtr::new(core::ptr::null_mut());
static INIT: AtomicU8 = AtomicU8::new(0);
static KMEM: AtomicBool = AtomicBool::new(true);
static DYING: AtomicUsize = AtomicUsize::new(0);
/// One past the highest id ever used (`Directory::next`, readable without the lock).
static NEXT_ID: AtomicU32 = AtomicU32::new(ROOT_ID + 1);
static DIRECTORY: SpinLock<Directory> = SpinLock::new(Directory {
    names: None,
    free: 0,
    quarantine: 0,
    next: ROOT_ID + 1,
});

/// One group's record.
#[repr(C, align(64))]
pub(crate) struct Node {
    /// First, so that a `&Counter` from the stocks converts back to its `Node`.
    pub(crate) counter: Counter,
    /// Handles, entered threads and child records holding this one.
    refs: AtomicUsize,
    /// Only touched under the directory lock.
    meta: UnsafeCell<Meta>,
}

// SAFETY: `meta` is only accessed under the directory lock; everything else is atomic.
unsafe impl Sync for Node {}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum State {
    /// Never used, or freed: all-zero memory is this state.
    Free = 0,
    Online,
    /// Removed, with live charges, handles or children.
    Dying,
}

struct Meta {
    state: State,
    name_len: u8,
    name: [u8; MAX_NAME],
    /// Children not removed.
    children: usize,
    /// Next record on the free or quarantine list.
    next: u32,
}

/// The groups' directory, as cgroupfs's: the names of online groups under their parents, and
/// the ids to give new ones. Behind `DIRECTORY`, the one lock of the group table.
struct Directory {
    /// Ids of online groups other than the root, by (parent id, name).
    names: Option<hashbrown::HashTable<u32, Malloc>>,
    /// Freed records ready for reuse.
    free: u32,
    /// Freed records that a drain may still name; moved to `free` once the stocks are quiescent.
    quarantine: u32,
    /// The next never-used id.
    next: u32,
}

/// The group table as the core sees it.
pub(crate) struct Records;

impl Groups for Records {
    #[inline]
    fn counter(&self, id: u32) -> &Counter {
        &node(id).counter
    }

    fn emptied(&self, c: &Counter) {
        free_if_unused(node_of(c));
    }

    fn wake(&self) {
        if let Some(n) = notifier() {
            (n.wake)();
        }
    }

    fn reclaim(&self, at: &Counter, bytes: usize) -> bool {
        notifier().is_some_and(|n| (n.direct)(at, bytes))
    }

    fn barrier(&self) {
        // Pockets are on only if the process registered for membarrier.
        if !platform::membarrier() {
            platform::corrupted(b"membarrier failed after registration");
        }
    }
}

/// The notifier's entry points, which the charge path reaches through the table: registered by
/// the pressure module when it starts a notifier (until then a raised level waits for one).
pub(crate) struct Notifier {
    /// Rings the notifier's doorbell (no allocation, no lock).
    pub(crate) wake: fn(),
    /// Direct reclaim before a charge at `at`'s limit fails or is forced: whether it waited.
    pub(crate) direct: fn(at: &Counter, bytes: usize) -> bool,
}

/// A design's per-group caches, which `flush()` and `remove()` must reach (the kernel's
/// `cgroup_subsys` callbacks): registered by the design when it makes its first cache.
pub(crate) struct Caches {
    /// Drains what the caches of `under`'s groups hold; `leaf`: `under` has no child.
    pub(crate) flush: fn(under: &Counter, leaf: bool),
    /// Drains and drops the caches of a group just taken offline (its slabs are orphaned).
    pub(crate) remove: fn(id: u32),
}

static NOTIFIER: AtomicPtr<Notifier> = AtomicPtr::new(core::ptr::null_mut());
static CACHES: AtomicPtr<Caches> = AtomicPtr::new(core::ptr::null_mut());

pub(crate) fn register_notifier(n: &'static Notifier) {
    NOTIFIER.store(n as *const Notifier as *mut Notifier, Ordering::Release);
}

#[cfg_attr(not(feature = "arena"), allow(dead_code))]
pub(crate) fn register_caches(c: &'static Caches) {
    CACHES.store(c as *const Caches as *mut Caches, Ordering::Release);
}

fn notifier() -> Option<&'static Notifier> {
    // SAFETY: null or a `&'static Notifier` stored by `register_notifier`.
    unsafe { NOTIFIER.load(Ordering::Acquire).as_ref() }
}

fn caches() -> Option<&'static Caches> {
    // SAFETY: null or a `&'static Caches` stored by `register_caches`.
    unsafe { CACHES.load(Ordering::Acquire).as_ref() }
}

/// Calls `f` on the counter of every group record ever used (free ones included: their
/// counters are idle).
pub(crate) fn for_each_counter(mut f: impl FnMut(&Counter)) {
    let end = NEXT_ID.load(Ordering::Acquire);
    for id in ROOT_ID..end {
        f(&node(id).counter);
    }
}

/// `Group::flush` for a bare counter.
pub(crate) fn flush_counter(c: &Counter) {
    CORE.drain(|g| g.is_under(c));
}

/// The record with this id.
#[inline]
pub(crate) fn node(id: u32) -> &'static Node {
    let mut pool = POOL.load(Ordering::Acquire);
    if pool.is_null() {
        pool = init();
    }
    debug_assert!(id <= MAX_ID);
    // SAFETY: the pool holds MAX_ID + 1 records, is never unmapped, and zeroed memory is a
    // valid (free) record.
    unsafe { &*pool.add(id as usize) }
}

pub(crate) fn node_of(c: &Counter) -> &'static Node {
    // SAFETY: every Counter the stocks see is the first field of a `#[repr(C)]` Node in the
    // pool, which lives for the whole program.
    unsafe { &*(c as *const Counter).cast::<Node>() }
}

impl Node {
    /// # Safety
    /// The caller holds the directory lock.
    #[allow(clippy::mut_from_ref)]
    unsafe fn meta(&self) -> &mut Meta {
        // SAFETY: the caller holds the directory lock, which serializes every access to `meta`.
        unsafe { &mut *self.meta.get() }
    }

    fn acquire(&'static self) -> Group {
        self.refs.fetch_add(1, Ordering::Relaxed);
        Group {
            node: NonNull::from(self),
        }
    }
}

/// Sets up the group table and reads the environment: once, at the first charge that misses
/// the stocks, which is before `main` in most programs. Allocates nothing.
#[cold]
fn init() -> *mut Node {
    if INIT
        .compare_exchange(0, 1, Ordering::Acquire, Ordering::Acquire)
        .is_err()
    {
        let mut backoff = crate::sync::Backoff::new();
        while INIT.load(Ordering::Acquire) != 2 {
            backoff.wait();
        }
        return POOL.load(Ordering::Acquire);
    }
    let pool = platform::map((MAX_ID as usize + 1) * size_of::<Node>()).cast::<Node>();
    if pool.is_null() {
        platform::corrupted(b"cannot map the group table");
    }
    CORE.set_batch(platform::env_size_in(
        c"MEMGROUP_BATCH",
        64 << 10,
        MAX_BATCH,
    ));
    if !platform::env_switch(c"MEMGROUP_KMEM", true) {
        KMEM.store(false, Ordering::Relaxed);
    }
    // SAFETY: the pool was just mapped, nothing else can see it yet, and ROOT_ID is in range.
    unsafe {
        let root = pool.add(ROOT_ID as usize);
        root.write(Node {
            counter: Counter::new(ROOT_ID, None),
            refs: AtomicUsize::new(0),
            meta: UnsafeCell::new(Meta {
                state: State::Online,
                name_len: 0,
                name: [0; MAX_NAME],
                children: 0,
                next: 0,
            }),
        });
    }
    POOL.store(pool, Ordering::Release);
    INIT.store(2, Ordering::Release);
    pool
}

pub(crate) fn kmem_enabled() -> bool {
    node(ROOT_ID);
    KMEM.load(Ordering::Relaxed)
}

/// Frees the record of a removed group once nothing holds it, then looks at its parent, which
/// loses a child reference and a bookkeeping charge.
fn free_if_unused(mut node: &'static Node) {
    loop {
        {
            let _reg = DIRECTORY.lock();
            // SAFETY: under the directory lock.
            let meta = unsafe { node.meta() };
            if meta.state != State::Dying
                || node.refs.load(Ordering::Acquire) != 0
                || node.counter.usage() != 0
            {
                return;
            }
            meta.state = State::Free;
        }
        DYING.fetch_sub(1, Ordering::Relaxed);
        let parent = node_of(node.counter.parent().expect("only the root has no parent"));
        // Counts still pending in stock slots go to this record's chain before it goes.
        CORE.drain_group(node.counter.id);
        {
            let mut reg = DIRECTORY.lock();
            // SAFETY: under the directory lock.
            unsafe { node.meta().next = reg.quarantine };
            reg.quarantine = node.counter.id;
        }
        parent.counter.uncharge(BOOKKEEPING, kmem_enabled());
        parent.refs.fetch_sub(1, Ordering::AcqRel);
        if parent.counter.is_online() {
            return;
        }
        // A removed parent may have been waiting for this child only.
        node = parent;
    }
}

/// A group of allocations with its own counters and limits: a tenant, or a part of one.
///
/// A cheap handle (one reference count); clones name the same group. Groups form a tree under
/// [`Group::root`]; a group lives until [`Group::remove`], whether or not handles to it exist.
pub struct Group {
    node: NonNull<Node>,
}

// SAFETY: a Group is a counted reference to a record whose shared state is atomic or behind
// the directory lock.
unsafe impl Send for Group {}
// SAFETY: as above; `&Group` only reads atomics or takes the directory lock.
unsafe impl Sync for Group {}

impl Clone for Group {
    fn clone(&self) -> Group {
        self.node().acquire()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let node = self.node();
        if node.refs.fetch_sub(1, Ordering::AcqRel) == 1 && !node.counter.is_online() {
            free_if_unused(node);
        }
    }
}

impl PartialEq for Group {
    fn eq(&self, other: &Group) -> bool {
        self.node == other.node
    }
}

impl Eq for Group {}

impl core::fmt::Debug for Group {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("Group").field(&self.name()).finish()
    }
}

/// The handle's mechanics, for the layers above (its public API is `crate::control`'s).
impl Group {
    pub(crate) fn node(&self) -> &'static Node {
        // SAFETY: the handle holds a reference, so the record is alive; records are never
        // unmapped.
        unsafe { &*self.node.as_ptr() }
    }

    pub(crate) fn id(&self) -> u32 {
        self.node().counter.id
    }

    /// Gives up the handle without releasing its reference.
    pub(crate) fn into_raw(self) -> *const Node {
        let node = self.node.as_ptr();
        core::mem::forget(self);
        node
    }

    /// # Safety
    /// `node` comes from `into_raw`, and its reference is handed back exactly once.
    pub(crate) unsafe fn from_raw(node: *const Node) -> Group {
        Group {
            // SAFETY: `into_raw` returned a non-null record pointer.
            node: unsafe { NonNull::new_unchecked(node as *mut Node) },
        }
    }

    /// A new handle to a record that the caller holds a reference on.
    pub(crate) fn from_held(node: &'static Node) -> Group {
        node.acquire()
    }
}

/// Creates `parent`'s child `name` (a valid name): its record is charged to `parent` as kernel
/// memory (refused over `parent`'s limits, whatever the policies say), then entered in the
/// table under a new id.
pub(crate) fn create(parent: &'static Node, name: &str) -> Result<Group, Error> {
    fork_safe();
    if parent.counter.chain().count() > crate::core::counter::MAX_DEPTH {
        return Err(Error::TooDeep);
    }
    let kmem = kmem_enabled();
    if !parent.counter.is_online() {
        return Err(Error::Removed);
    }
    if !CORE.charge_exact(&parent.counter, kmem, BOOKKEEPING, 0, Mode::Fallible) {
        return Err(Error::OverLimit);
    }
    let created = insert(parent, name);
    if created.is_err() && parent.counter.uncharge(BOOKKEEPING, kmem) {
        free_if_unused(parent);
    }
    created
}

fn insert(parent: &'static Node, name: &str) -> Result<Group, Error> {
    let hash = name_hash(parent.counter.id, name.as_bytes());
    let mut reg = DIRECTORY.lock();
    // SAFETY: under the directory lock.
    let parent_meta = unsafe { parent.meta() };
    if parent_meta.state != State::Online {
        return Err(Error::Removed);
    }
    let names = reg
        .names
        .get_or_insert_with(|| hashbrown::HashTable::new_in(Malloc));
    if names.find(hash, |&id| is_named(id, parent, name)).is_some() {
        return Err(Error::Exists { name: name.into() });
    }
    names
        .try_reserve(1, rehash)
        .map_err(|_| Error::OutOfMemory)?;
    let id = reg.take_id().ok_or(Error::TooManyGroups)?;
    let pool = POOL.load(Ordering::Acquire);
    let mut meta = Meta {
        state: State::Online,
        name_len: name.len() as u8,
        name: [0; MAX_NAME],
        children: 0,
        next: 0,
    };
    meta.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `id` came off the free list or is fresh: no stock word, handle or child
    // names it, so this thread has the record to itself.
    let child = unsafe {
        let slot = pool.add(id as usize);
        if (*slot).counter.id == id {
            (*slot).counter.reset(Some(&parent.counter));
            (*slot).refs.store(0, Ordering::Relaxed);
            *(*slot).meta.get() = meta;
        } else {
            slot.write(Node {
                counter: Counter::new(id, Some(&parent.counter)),
                refs: AtomicUsize::new(0),
                meta: UnsafeCell::new(meta),
            });
        }
        &*slot
    };
    parent_meta.children += 1;
    parent.refs.fetch_add(1, Ordering::Relaxed);
    reg.names
        .as_mut()
        .expect("created above")
        .insert_unique(hash, id, rehash);
    Ok(child.acquire())
}

/// The names of `node` and of its ancestors below the root, from `node` up, pushed onto
/// `parts`, which has room for them (nothing is allocated under the directory lock: an
/// allocation there could end up freeing a removed group's record, which takes the lock).
pub(crate) fn names_up(node: &Node, parts: &mut Vec<([u8; MAX_NAME], usize)>) {
    let _reg = DIRECTORY.lock();
    let mut c = &node.counter;
    while let Some(parent) = c.parent() {
        // SAFETY: under the directory lock.
        let meta = unsafe { node_of(c).meta() };
        parts.push((meta.name, meta.name_len as usize));
        c = parent;
    }
}

/// How many children of `node` are not removed.
pub(crate) fn child_count(node: &Node) -> usize {
    let _reg = DIRECTORY.lock();
    // SAFETY: under the directory lock.
    unsafe { node.meta().children }
}

/// Pushes handles to `me`'s live children onto `out` if it has room for them all (nothing is
/// allocated under the directory lock); else returns how many there are.
pub(crate) fn live_children(me: &Node, out: &mut Vec<Group>) -> Result<(), usize> {
    let reg = DIRECTORY.lock();
    // SAFETY: under the directory lock.
    let count = unsafe { me.meta().children };
    if count > out.capacity() {
        return Err(count);
    }
    // The walk visits every online group: skipped for a leaf.
    if count == 0 {
        return Ok(());
    }
    if let Some(names) = reg.names.as_ref() {
        for &id in names.iter() {
            let child = node(id);
            let mine = child
                .counter
                .parent()
                .is_some_and(|p| p.id == me.counter.id);
            // SAFETY: under the directory lock.
            if mine && unsafe { child.meta().state } == State::Online {
                // Within the capacity: no allocation.
                out.push(child.acquire());
            }
        }
    }
    Ok(())
}

/// `Group::flush`: a design's caches of `node`'s subtree, then the stocks and pockets.
pub(crate) fn flush(node: &Node) {
    let me = &node.counter;
    // A design's caches first (the arena's): they hold counts and may release slabs.
    if let Some(caches) = caches() {
        // With no child (removed ones have no cache left), only the group's own caches.
        let leaf = {
            let _reg = DIRECTORY.lock();
            // SAFETY: under the directory lock.
            unsafe { node.meta().children == 0 }
        };
        (caches.flush)(me, leaf);
    }
    CORE.drain(|c| c.is_under(me));
}

/// `Group::remove` of `node`'s group, but for its handle: offline (it takes no new charges;
/// threads still inside it charge its nearest live ancestor), its name free, its stock slots
/// drained and its design caches dropped.
pub(crate) fn take_offline(node: &'static Node) -> Result<(), Error> {
    let parent = match node.counter.parent() {
        Some(parent) => node_of(parent),
        None => return Err(Error::Root),
    };
    {
        let mut reg = DIRECTORY.lock();
        // SAFETY: under the directory lock.
        let meta = unsafe { node.meta() };
        if meta.state != State::Online {
            return Err(Error::Removed);
        }
        if meta.children != 0 {
            return Err(Error::HasChildren);
        }
        meta.state = State::Dying;
        node.counter.set_offline();
        // SAFETY: under the directory lock.
        unsafe { parent.meta().children -= 1 };
        let name = &meta.name[..meta.name_len as usize];
        let hash = name_hash(parent.counter.id, name);
        if let Some(names) = reg.names.as_mut() {
            if let Ok(entry) = names.find_entry(hash, |&id| id == node.counter.id) {
                entry.remove();
            }
        }
    }
    DYING.fetch_add(1, Ordering::Relaxed);
    // From here no slot can be claimed for the group; empty the ones it has.
    CORE.drain_group(node.counter.id);
    // And no design's cache made for it: drop the ones it has, orphaning its slabs.
    if let Some(caches) = caches() {
        (caches.remove)(node.counter.id);
    }
    Ok(())
}

impl Directory {
    fn take_id(&mut self) -> Option<u32> {
        if self.quarantine != 0 && CORE.quiescent() {
            // Every record on the quarantine list was drained before this moment, and no drain
            // is running: none can still hold a word naming one of them.
            let mut last = self.quarantine;
            // SAFETY: under the directory lock (the caller holds it: `self` is its content).
            unsafe {
                while node(last).meta().next != 0 {
                    last = node(last).meta().next;
                }
                node(last).meta().next = self.free;
            }
            self.free = core::mem::take(&mut self.quarantine);
        }
        if self.free != 0 {
            let id = self.free;
            // SAFETY: under the directory lock, as above.
            self.free = unsafe { node(id).meta().next };
            return Some(id);
        }
        if self.next > MAX_ID {
            return None;
        }
        self.next += 1;
        NEXT_ID.store(self.next, Ordering::Release);
        Some(self.next - 1)
    }
}

/// FNV-1a over the parent's id and the name.
fn name_hash(parent: u32, name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in parent.to_le_bytes().iter().chain(name) {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The hash of an online group's entry, for the table's resizing. Called under the lock.
fn rehash(&id: &u32) -> u64 {
    let n = node(id);
    // SAFETY: the table is only touched under the directory lock.
    let meta = unsafe { n.meta() };
    let parent = n.counter.parent().expect("the root is not in the table");
    name_hash(parent.id, &meta.name[..meta.name_len as usize])
}

/// Whether online group `id` is `parent`'s child called `name`. Called under the lock.
fn is_named(id: u32, parent: &Node, name: &str) -> bool {
    let n = node(id);
    // SAFETY: the table is only touched under the directory lock.
    let meta = unsafe { n.meta() };
    n.counter
        .parent()
        .is_some_and(|p| core::ptr::eq(p, &parent.counter))
        && &meta.name[..meta.name_len as usize] == name.as_bytes()
}

/// Groups removed whose records are not yet freed: they still have live charges (or handles).
pub fn dying_groups() -> usize {
    DYING.load(Ordering::Relaxed)
}

/// The stock batch in bytes (`MEMGROUP_BATCH`, default 64 KiB; 0 when stocks are off).
pub fn stock_batch() -> usize {
    node(ROOT_ID);
    CORE.batch()
}

/// The directory's own memory comes from the C allocator, never from the global allocator it
/// serves.
#[derive(Clone, Copy)]
struct Malloc;

// SAFETY: memory comes from posix_memalign with the requested alignment and at least the
// requested size, and is returned with free.
unsafe impl allocator_api2::alloc::Allocator for Malloc {
    fn allocate(
        &self,
        layout: core::alloc::Layout,
    ) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        let mut p = core::ptr::null_mut();
        let align = layout.align().max(size_of::<usize>());
        // SAFETY: align is a power of two and a multiple of the pointer size.
        let rc = unsafe { libc::posix_memalign(&mut p, align, layout.size().max(1)) };
        match NonNull::new(p.cast::<u8>()) {
            Some(p) if rc == 0 => Ok(NonNull::slice_from_raw_parts(p, layout.size())),
            _ => Err(allocator_api2::alloc::AllocError),
        }
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, _layout: core::alloc::Layout) {
        // SAFETY: `ptr` came from posix_memalign in `allocate`.
        unsafe { libc::free(ptr.as_ptr().cast()) }
    }
}

/// Holds the directory lock across `fork()`, so that the child never inherits it locked by a
/// thread it does not have: joined by group creation and by every module whose fork handling
/// takes the directory lock (emptying a gone thread's pocket may free a record).
pub(crate) fn fork_safe() {
    static GROUPS: Participant = Participant {
        prepare: || DIRECTORY.raw_lock(),
        parent: || DIRECTORY.raw_unlock(),
        child: || DIRECTORY.raw_unlock(),
    };
    fork::join(Rank::Groups, &GROUPS);
}
