//! `Group`'s public API: the group's control files, as cgroupfs has them (`mkdir` and
//! `rmdir`, the path, `memory.max` / `memory.high` / `memory.kmem.limit_in_bytes`,
//! `memory.stat`), over the group table (`crate::group`), which does the work under its lock.

use crate::core::counter::{Counter, Snapshot, MEDIUM, UNLIMITED};
use crate::core::stock::Groups;
use crate::group::{self, node, node_of, Group, Records, MAX_NAME, ROOT_ID};
use crate::{Error, OnLimit, Stat};

impl Group {
    /// The root group: every allocation made outside any group's scope is charged to it, and
    /// it counts every allocation in the process. It may have a `max` too.
    pub fn root() -> Group {
        Group::from_held(node(ROOT_ID))
    }

    /// Creates a group under the root. See [`Group::child`].
    pub fn new(name: &str) -> Result<Group, Error> {
        Group::root().child(name)
    }

    /// Creates a group under this one.
    ///
    /// Names are 1 to 64 bytes, without `/` or NUL, not `.` or `..`, and unique among
    /// siblings. The new group's record is charged to this group as kernel memory for as long
    /// as it lives; if that charge does not fit this group's limits the call fails with
    /// [`Error::OverLimit`], whatever the policies say.
    pub fn child(&self, name: &str) -> Result<Group, Error> {
        validate(name)?;
        group::create(self.node(), name)
    }

    /// The group's path below the root, such as `"tenant-a/batch"`; the root's is `"/"`.
    pub fn name(&self) -> String {
        // Allocated before the directory lock is taken (see `group::names_up`). A group's chain
        // of ancestors never changes, so its length is known.
        let depth = self.node().counter.chain().count() - 1;
        let mut parts: Vec<([u8; MAX_NAME], usize)> = Vec::with_capacity(depth);
        group::names_up(self.node(), &mut parts);
        if parts.is_empty() {
            return "/".into();
        }
        let names: Vec<&str> = parts
            .iter()
            .rev()
            .map(|(name, len)| core::str::from_utf8(&name[..*len]).expect("names are UTF-8"))
            .collect();
        names.join("/")
    }

    /// The group's live (not removed) children, in no particular order.
    pub fn children(&self) -> Vec<Group> {
        let me = self.node();
        // Room for the children is made outside the directory lock (see `group::live_children`);
        // if children were added in between, the room is too small and the walk starts again.
        let mut want = group::child_count(me);
        loop {
            let mut out: Vec<Group> = Vec::with_capacity(want);
            match group::live_children(me, &mut out) {
                Ok(()) => return out,
                Err(count) => want = count,
            }
            // `out` (empty) is dropped here, outside the lock.
        }
    }

    /// The parent group; `None` for the root.
    pub fn parent(&self) -> Option<Group> {
        self.node()
            .counter
            .parent()
            .map(|c| Group::from_held(node_of(c)))
    }

    /// Sets the hard limit (`memory.max`); `None` removes it. Set below the group's usage, it
    /// acts at once, as writing `memory.max` does: the notifier reclaims toward it from the
    /// group's shrinkers without waiting for the next charge.
    pub fn set_max(&self, bytes: Option<usize>) {
        self.node().counter.set_max(bytes);
        limit_set(&self.node().counter);
    }

    /// Sets the pressure threshold (`memory.high`); `None` removes it. Set below the group's
    /// usage, it acts at once, as writing `memory.high` does: the group goes to
    /// [`Level::Medium`](crate::Level::Medium) and the notifier reclaims toward it.
    pub fn set_high(&self, bytes: Option<usize>) {
        self.node().counter.set_high(bytes);
        limit_set(&self.node().counter);
    }

    /// Sets the kernel-memory limit (`memory.kmem.limit_in_bytes`); `None` removes it.
    pub fn set_kmem_max(&self, bytes: Option<usize>) {
        self.node().counter.set_kmem_max(bytes);
    }

    /// Chooses what an infallible over-limit charge does in this group and its descendants.
    pub fn set_on_limit(&self, policy: OnLimit) {
        self.node().counter.set_fail(policy == OnLimit::Fail);
    }

    /// The group's figures, its descendants' included. Fast: may over-report by the bytes
    /// held in per-CPU stocks (at most the batch per CPU per group) and threads' pockets (at
    /// most half the batch per thread: a pocket and its far word, a quarter each); see
    /// [`Group::flush`].
    pub fn stat(&self) -> Stat {
        let s = self.node().counter.snapshot();
        let limit = |v: usize| (v != UNLIMITED).then_some(v);
        Stat {
            usage: s.usage,
            peak: s.peak,
            kmem: s.kmem,
            overhead: overhead(&s),
            max: limit(s.max),
            high: limit(s.high),
            kmem_max: limit(s.kmem_max),
            allocs: s.allocs,
            frees: s.frees,
            events: crate::Events {
                high: s.events[0],
                max: s.events[1],
                fail: s.events[2],
            },
        }
    }

    /// Returns the per-CPU stocks and threads' pockets holding this group's or its
    /// descendants' bytes to the counters, so that `stat()` is exact for memory that is not
    /// being charged concurrently.
    pub fn flush(&self) {
        group::flush(self.node());
    }

    /// Removes the group: it goes offline (it can no longer be charged; threads still inside
    /// it charge its nearest live ancestor) and its name is free again. Its live charges stay
    /// counted in its ancestors, and freeing that memory later uncharges them; the record goes
    /// when its last byte does ([`crate::dying_groups`] counts those waiting).
    pub fn remove(self) -> Result<(), Error> {
        group::take_offline(self.node())?;
        drop(self);
        Ok(())
    }

    /// Whether [`Group::remove`] was called on this group.
    pub fn is_removed(&self) -> bool {
        !self.node().counter.is_online()
    }
}

/// A limit was lowered: reclaim toward it starts at once if the group is above it (as writing
/// `memory.high` or `memory.max` does), without waiting for the next charge.
fn limit_set(c: &Counter) {
    let stat = c.snapshot();
    let target = stat.high.min(stat.max);
    if stat.usage <= target {
        return;
    }
    // The fast figure includes stock slack: decide on the exact one.
    group::flush_counter(c);
    if c.snapshot().usage > target && c.signal(MEDIUM) {
        Records.wake();
    }
}

/// The rules of a group name (those of a cgroup directory, at most `MAX_NAME` bytes).
fn validate(name: &str) -> Result<(), Error> {
    let reason = if name.is_empty() {
        "a name must not be empty"
    } else if name.len() > MAX_NAME {
        "a name must be at most 64 bytes"
    } else if name.contains('/') {
        "a name must not contain '/', the path separator"
    } else if name.contains('\0') {
        "a name must not contain NUL"
    } else if name == "." || name == ".." {
        "a name must not be \".\" or \"..\""
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        name: name.into(),
        reason,
    })
}

/// The overhead of a counter's snapshot: `TAG_SIZE` per live block (the tag design's tag) plus
/// the arena design's correction (see `Counter::adjust_overhead`). Between flushes the parts
/// may be out of step; the figure is kept within `0..=usage`.
fn overhead(s: &Snapshot) -> usize {
    let tags = s.allocs.saturating_sub(s.frees) as usize * crate::TAG_SIZE;
    (tags as isize)
        .saturating_add(s.overhead)
        .clamp(0, s.usage.min(isize::MAX as usize) as isize) as usize
}
