// Model-based stress test (issue 14, item 2): random sequences of group operations, limits,
// policies and allocations on several threads, checked after every step against a plain
// reference model of the documented semantics (README "Reading the counters" and "At a limit",
// DESIGN.md sections 3 to 5).
//
// Each step runs on the test thread or on one of a few long-lived worker threads (driven by
// channels, so a block allocated on one thread is often reallocated or freed on another), and
// is followed by a flush of the case's top group and a comparison of every live group's
// figures with the model's:
//
// - allocs and frees, exactly, in both designs; the tree (`parent()`, `children()`);
// - usage - overhead = the live requested bytes + the records of the group's sub-groups, exactly,
//   in both designs (a record is charged to its parent as kernel memory while it lives);
// - the tag design, whose cost per block is documented (`size + 8`, `size + 16` if 16-aligned):
//   usage, kmem, overhead, `events.max` and `events.fail` exactly; the arena design, whose
//   slabs the model does not place: every step moves each live level's usage by a delta the
//   documented slab geometry allows (a new slab of the block's class or none; an emptied slab
//   given back; a large block's tagged cost exactly), kmem by as much for kernel blocks and not
//   at all for others, exactly the records when a subtree holds no block, and `events.fail`
//   at most the model's (equal on the top group);
// - a parent at least the sum of its live children (usage, kmem, allocs, frees); peak >= usage;
// - `dying_groups()` equal to the removed groups whose subtree still holds memory, so back to
//   the start once it is freed.
//
// At a limit (tag design, exact): a charge the model says fits always succeeds, and one it
// says does not never succeeds where it is refused (inside `fallible`, or under `OnLimit::Fail`
// as `Model::refused` says); elsewhere it is forced. Arena design: the same with the cost of
// the block's new slab, where the verdict does not depend on whether a slab had room; under a
// mode that refuses, no level ends above a limit it was under. A group's record (child()) is
// predicted exactly in both.
//
// Short by default: 64 cases of up to 200 steps per design, and 16 in child processes for
// each of MEMGROUP_KMEM=0, MEMGROUP_BATCH=0, MEMGROUP_POCKETS=0, MEMGROUP_BATCH=4096. Longer
// runs and replays (same seed, same cases):
//   PROPTEST_CASES=10000 MODEL_STEPS=400 PROPTEST_RNG_SEED=2 \
//     cargo test --release --test model model_matches -- --nocapture
// (`--features arena --test arena_model` for the arena). A failing case is shrunk and saved in
// tests/<binary>.proptest-regressions, which later runs replay first. `OnLimit::Fail`
// is checked as documented: the policy of the charged group or any ancestor.

include!("common.rs");

use common::{fresh, unique_name, Block};
use memgroup::{dying_groups, fallible, kernel, nofail, Error, Group, OnLimit};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use std::sync::mpsc;
use std::sync::OnceLock;

/// Worker threads besides the test thread.
const WORKERS: usize = 3;
/// Most live groups in a case (the top group included), and deepest level below the top.
const MAX_GROUPS: usize = 24;
const MAX_DEPTH: usize = 5;
/// Most live blocks in a case.
const MAX_BLOCKS: usize = 256;
/// The arena design's slab geometry, as src/arena/class.rs documents it: blocks of at most
/// 8 KiB at alignments up to 4 KiB live in slabs of size classes (8, 16, 24, steps of 16 up to
/// 128, then four per doubling up to 8 KiB); a block takes the first class at least its size
/// (and its alignment) that is a multiple of its alignment; a class's slab is the smallest of
/// one to eight pages holding at least 4 objects and wasting at most an eighth of itself.
/// Returns the slab size charged when a block of this layout needs a new slab; None for a
/// large block (the tag design's cost).
fn arena_slab(size: usize, align: usize) -> Option<usize> {
    arena_class(size, align).map(|(_, slab)| slab)
}

/// The class (its object size) and slab size of a small block, as `arena_slab` says.
fn arena_class(size: usize, align: usize) -> Option<(usize, usize)> {
    if size > 8192 || align > 4096 {
        return None;
    }
    let mut classes = vec![8, 16, 24, 32, 48, 64, 80, 96, 112, 128];
    let mut base = 128;
    while base < 8192 {
        classes.extend((1..=4).map(|k| base + k * base / 4));
        base *= 2;
    }
    let class = *classes
        .iter()
        .find(|&&c| c >= size.max(align) && c % align == 0)?;
    let slab = (12..=15)
        .map(|shift| 1usize << shift)
        .find(|&slab| slab / class >= 4 && slab - slab / class * class <= slab / 8)
        .unwrap_or(1 << 15);
    Some((class, slab))
}

type Job = Box<dyn FnOnce() + Send>;

/// What the cases exercised, summed over the run (printed at the end, so a run that never
/// reaches a limit or never leaves a dying group shows it).
mod tally {
    use std::sync::atomic::{AtomicU64, Ordering};
    pub static STEPS: AtomicU64 = AtomicU64::new(0);
    pub static BLOCKS: AtomicU64 = AtomicU64::new(0);
    pub static REFUSED: AtomicU64 = AtomicU64::new(0);
    pub static FORCED: AtomicU64 = AtomicU64::new(0);
    pub static REALLOC_REFUSED: AtomicU64 = AtomicU64::new(0);
    pub static CHILD_REFUSED: AtomicU64 = AtomicU64::new(0);
    pub static REMOTE_FREES: AtomicU64 = AtomicU64::new(0);
    pub static DYING_SEEN: AtomicU64 = AtomicU64::new(0);
    pub fn add(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub fn report() -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "{} steps, {} blocks allocated, {} refused and {} forced over a limit, {} reallocs \
             refused, {} child() refused, {} frees on another thread, {} steps with dying groups",
            g(&STEPS),
            g(&BLOCKS),
            g(&REFUSED),
            g(&FORCED),
            g(&REALLOC_REFUSED),
            g(&CHILD_REFUSED),
            g(&REMOTE_FREES),
            g(&DYING_SEEN)
        )
    }
}

/// The worker threads, started once for the whole binary and warmed up (their thread-locals
/// made) so that a step charges only what it allocates.
fn workers() -> &'static [mpsc::Sender<Job>] {
    static WORKERS_TX: OnceLock<Vec<mpsc::Sender<Job>>> = OnceLock::new();
    WORKERS_TX.get_or_init(|| {
        let warm = fresh("model-warm");
        let txs = (0..WORKERS)
            .map(|_| {
                let (tx, rx) = mpsc::channel::<Job>();
                std::thread::spawn(move || {
                    for job in rx {
                        job();
                    }
                });
                tx
            })
            .collect::<Vec<_>>();
        let txs_ref = &txs;
        for t in 0..=WORKERS {
            let w = warm.clone();
            on(txs_ref, t, move || warm_up(&w));
        }
        warm.flush();
        warm.remove().expect("removing the warm-up group");
        txs
    })
}

fn warm_up(g: &Group) {
    g.run(|| {
        for kind in [false, true] {
            for mode in [Mode::Policy, Mode::Fallible, Mode::NoFail] {
                let b = scoped(None, kind, mode, || Block::new(100, 8));
                drop(std::hint::black_box(b));
            }
        }
    });
}

/// Runs `f` on thread `t` (0 is the calling thread) and returns its result. The closure (and
/// what it captures) is dropped there, before the result comes back.
fn on<R: Send + 'static>(
    txs: &[mpsc::Sender<Job>],
    t: usize,
    f: impl FnOnce() -> R + Send + 'static,
) -> R {
    if t == 0 {
        return f();
    }
    let (tx, rx) = mpsc::channel();
    txs[t - 1]
        .send(Box::new(move || {
            let r = f();
            let _ = tx.send(r);
        }))
        .expect("worker alive");
    rx.recv().expect("worker answered")
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// No scope: the groups' policies decide.
    Policy,
    Fallible,
    NoFail,
}

/// Runs `f` in group `g` (or the thread's own scope when None), as kernel memory if `kind`,
/// in `mode`.
fn scoped<R>(g: Option<&Group>, kind: bool, mode: Mode, f: impl FnOnce() -> R) -> R {
    let _entered = g.map(|g| g.enter());
    let moded = || match mode {
        Mode::Policy => f(),
        Mode::Fallible => fallible(f),
        Mode::NoFail => nofail(f),
    };
    if kind {
        kernel(moded)
    } else {
        moded()
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        parent: Index,
    },
    Remove {
        group: Index,
    },
    /// `which`: 0 max, 1 high, 2 kmem_max; `value` an offset from the group's usage (None:
    /// unlimited).
    Limit {
        group: Index,
        which: u8,
        value: Option<i64>,
    },
    Policy {
        group: Index,
        fail: bool,
    },
    /// Allocates the blocks one after another on one thread, with no flush between them (so
    /// stocks and pockets serve them).
    Alloc {
        thread: usize,
        group: Index,
        blocks: Vec<(usize, usize)>,
        kind: bool,
        mode: Mode,
    },
    /// In a scope of any group and kind: the block keeps its owner and kind.
    Realloc {
        thread: usize,
        block: Index,
        size: usize,
        scope: Option<Index>,
        kind: bool,
        mode: Mode,
    },
    Free {
        thread: usize,
        block: Index,
        scope: Option<Index>,
    },
    /// Flushes one group only: its figures and its descendants' must then be exact.
    Flush {
        group: Index,
    },
}

fn size_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 1usize..=128,
        4 => 1usize..=4096,
        2 => 1usize..=65536,
        1 => 65537usize..=(1 << 20),
    ]
}

fn align_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => (0u32..=4).prop_map(|s| 1usize << s),
        1 => (5u32..=12).prop_map(|s| 1usize << s),
    ]
}

fn mode_strategy() -> impl Strategy<Value = Mode> {
    prop_oneof![
        3 => Just(Mode::Policy),
        2 => Just(Mode::Fallible),
        1 => Just(Mode::NoFail),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let thread = 0..=WORKERS;
    prop_oneof![
        3 => any::<Index>().prop_map(|parent| Op::Create { parent }),
        1 => any::<Index>().prop_map(|group| Op::Remove { group }),
        3 => (
            any::<Index>(),
            0u8..3,
            proptest::option::weighted(0.8, -32768i64..262144)
        )
            .prop_map(|(group, which, value)| Op::Limit { group, which, value }),
        1 => (any::<Index>(), any::<bool>()).prop_map(|(group, fail)| Op::Policy { group, fail }),
        8 => (
            thread.clone(),
            any::<Index>(),
            proptest::collection::vec((size_strategy(), align_strategy()), 1..=4),
            proptest::bool::weighted(0.3),
            mode_strategy()
        )
            .prop_map(|(thread, group, blocks, kind, mode)| Op::Alloc {
                thread,
                group,
                blocks,
                kind,
                mode
            }),
        3 => (
            thread.clone(),
            any::<Index>(),
            size_strategy(),
            proptest::option::of(any::<Index>()),
            any::<bool>(),
            mode_strategy()
        )
            .prop_map(|(thread, block, size, scope, kind, mode)| Op::Realloc {
                thread,
                block,
                size,
                scope,
                kind,
                mode
            }),
        5 => (thread, any::<Index>(), proptest::option::of(any::<Index>()))
            .prop_map(|(thread, block, scope)| Op::Free { thread, block, scope }),
        1 => any::<Index>().prop_map(|group| Op::Flush { group }),
    ]
}

/// What the test learnt of the installed design before the first case.
#[derive(Clone, Copy, Debug)]
struct Design {
    /// Whether each block costs its documented tag-design figure (else: arena slabs).
    exact: bool,
    /// What a group's record costs its parent (kernel memory).
    record: usize,
    /// Whether kernel memory is accounted (`MEMGROUP_KMEM`): else `kernel(..)` is user memory,
    /// and so are records.
    kmem: bool,
}

fn design() -> Design {
    let probe = fresh("model-probe");
    let b = probe.run(|| Block::new(24, 1));
    probe.flush();
    let usage = probe.stat().usage;
    drop(b);
    let exact = usage == tag_cost(24, 1);
    probe.flush();
    let before = probe.stat();
    let child = probe.child("c").expect("probe child");
    probe.flush();
    let after = probe.stat();
    let record = after.usage - before.usage;
    let kmem = memgroup::kmem_accounting();
    assert_eq!(
        after.kmem - before.kmem,
        if kmem { record } else { 0 },
        "a record is kernel memory"
    );
    assert!(record > 0, "a record costs its parent");
    child.remove().expect("removing the probe child");
    probe.flush();
    assert_eq!(probe.stat().usage, 0, "the probe holds nothing");
    probe.remove().expect("removing the probe");
    Design {
        exact,
        record,
        kmem,
    }
}

/// The tag design's documented cost of a block: the size and an 8-byte tag, 16 bytes of
/// header for a 16-aligned block.
fn tag_cost(size: usize, align: usize) -> usize {
    size + 8 + if align == 16 { 8 } else { 0 }
}

/// What a new block costs in the installed design when it needs a charge (in the arena, a
/// small block that finds room in a slab costs nothing).
fn new_cost(d: Design, size: usize, align: usize) -> usize {
    match (d.exact, arena_slab(size, align)) {
        (false, Some(slab)) => slab,
        _ => tag_cost(size, align),
    }
}


struct MGroup {
    parent: Option<usize>,
    /// None once removed.
    handle: Option<Group>,
    max: Option<usize>,
    high: Option<usize>,
    kmem_max: Option<usize>,
    fail: bool,
    /// Blocks allocated and freed by this group itself.
    allocs: u64,
    frees: u64,
    /// Charges that passed a limit of this group (`events.max`) and, of those, the refused
    /// (`events.fail`). In the arena design, whose charges the model cannot place on a level,
    /// refusals count on the charged group and the real figure is at most the model's (equal
    /// on the top group).
    over: u64,
    refused: u64,
}

struct MBlock {
    owner: usize,
    /// Arena: the block's class and slab size, None for a block of the inner allocator (tagged).
    /// A realloc keeps a block in its class when the new size fits it, and keeps a tagged block
    /// tagged; a block of a removed group that must move is tagged.
    class: Option<(usize, usize)>,
    /// The thread that allocated (or last moved) it.
    thread: usize,
    align: usize,
    kind: bool,
    block: Block,
}

/// Model figures of one group, its subtree included.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Fig {
    requested: usize,
    cost: usize,
    kernel_requested: usize,
    kernel_cost: usize,
    blocks: usize,
    kernel_blocks: usize,
    records: usize,
    allocs: u64,
    frees: u64,
    over: u64,
    refused: u64,
}

struct Model {
    d: Design,
    txs: &'static [mpsc::Sender<Job>],
    groups: Vec<MGroup>,
    blocks: Vec<MBlock>,
    dying_base: usize,
    steps: usize,
    /// Each group's flushed usage and `events.high` at the last check.
    last: std::cell::RefCell<Vec<(usize, u64)>>,
}

macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(TestCaseError::fail(format!($($arg)+)));
        }
    };
}

impl Model {
    fn new(d: Design) -> Model {
        let txs = workers();
        let top = fresh("model");
        Model {
            d,
            txs,
            groups: vec![MGroup {
                parent: None,
                handle: Some(top),
                max: None,
                high: None,
                kmem_max: None,
                fail: false,
                allocs: 0,
                frees: 0,
                over: 0,
                refused: 0,
            }],
            blocks: Vec::new(),
            dying_base: dying_groups(),
            steps: 0,
            last: std::cell::RefCell::new(Vec::new()),
        }
    }

    fn live(&self) -> Vec<usize> {
        (0..self.groups.len())
            .filter(|&g| self.groups[g].handle.is_some())
            .collect()
    }

    fn handle(&self, g: usize) -> &Group {
        self.groups[g].handle.as_ref().expect("a live group")
    }

    fn pick_group(&self, i: &Index) -> usize {
        let live = self.live();
        live[i.index(live.len())]
    }

    fn depth(&self, mut g: usize) -> usize {
        let mut d = 0;
        while let Some(p) = self.groups[g].parent {
            d += 1;
            g = p;
        }
        d
    }

    /// `g` and its ancestors up to the top group.
    fn chain(&self, g: usize) -> Vec<usize> {
        let mut out = vec![g];
        let mut c = g;
        while let Some(p) = self.groups[c].parent {
            out.push(p);
            c = p;
        }
        out
    }

    fn is_under(&self, g: usize, top: usize) -> bool {
        self.chain(g).contains(&top)
    }

    /// The model's figures of every group (removed ones included), each with its subtree's.
    fn figs(&self) -> Vec<Fig> {
        let mut f = vec![Fig::default(); self.groups.len()];
        let mut holds = vec![false; self.groups.len()];
        for b in &self.blocks {
            let size = b.block.size();
            let cost = tag_cost(size, b.align);
            for g in self.chain(b.owner) {
                holds[g] = true;
                let f = &mut f[g];
                f.requested += size;
                f.cost += cost;
                f.blocks += 1;
                if b.kind {
                    f.kernel_requested += size;
                    f.kernel_cost += cost;
                    f.kernel_blocks += 1;
                }
            }
        }
        for (c, mg) in self.groups.iter().enumerate() {
            // A record lives while its group is online, or removed with memory below it.
            let record = mg.handle.is_some() || holds[c];
            for (level, g) in self.chain(c).into_iter().enumerate() {
                f[g].allocs += mg.allocs;
                f[g].frees += mg.frees;
                f[g].over += mg.over;
                f[g].refused += mg.refused;
                if level > 0 && record {
                    f[g].records += 1;
                }
            }
        }
        f
    }

    fn fig(&self, g: usize) -> Fig {
        self.figs()[g]
    }

    /// Removed groups whose record still lives (memory below them).
    fn dying(&self) -> usize {
        let f = self.figs();
        (1..self.groups.len())
            .filter(|&g| self.groups[g].handle.is_none() && f[g].blocks != 0)
            .count()
    }

    /// Checks every live group's exact figures against the model (after a flush of `flushed`,
    /// for the groups under it).
    fn check(&self, flushed: usize, what: &str) -> Result<(), TestCaseError> {
        let rec = self.d.record;
        // The records' part of kmem.
        let rec_k = if self.d.kmem { rec } else { 0 };
        let mut stats = Vec::new();
        let figs = self.figs();
        for g in self.live() {
            if !self.is_under(g, flushed) {
                continue;
            }
            let s = self.handle(g).stat();
            let f = figs[g];
            let ctx = || {
                format!(
                    "{what}: group #{g} (depth {}): stat {s:?}, model {f:?}",
                    self.depth(g)
                )
            };
            ensure!(
                (s.allocs, s.frees) == (f.allocs, f.frees),
                "allocs/frees differ; {}",
                ctx()
            );
            ensure!(s.peak >= s.usage, "peak below usage; {}", ctx());
            if self.d.exact {
                ensure!(
                    (s.events.max, s.events.fail) == (f.over, f.refused),
                    "events.max/fail differ; {}",
                    ctx()
                );
            } else {
                ensure!(
                    s.events.fail <= f.refused && (g != 0 || s.events.fail == f.refused),
                    "events.fail differs; {}",
                    ctx()
                );
            }
            ensure!(
                s.usage >= s.overhead && s.usage - s.overhead == f.requested + f.records * rec,
                "usage - overhead != requested + records; {}",
                ctx()
            );
            if self.d.exact {
                ensure!(
                    (s.usage, s.kmem, s.overhead)
                        == (
                            f.cost + f.records * rec,
                            f.kernel_cost + f.records * rec_k,
                            f.cost - f.requested
                        ),
                    "usage/kmem/overhead differ; {}",
                    ctx()
                );
            } else {
                ensure!(
                    s.kmem >= f.kernel_requested + f.records * rec_k && s.kmem <= s.usage,
                    "kmem out of bounds; {}",
                    ctx()
                );
                ensure!(
                    s.usage - s.kmem >= f.requested - f.kernel_requested,
                    "user part below the user bytes; {}",
                    ctx()
                );
                if f.blocks == 0 {
                    ensure!(
                        (s.usage, s.kmem, s.overhead) == (f.records * rec, f.records * rec_k, 0),
                        "a subtree without blocks holds only records; {}",
                        ctx()
                    );
                }
                if f.kernel_blocks == 0 {
                    ensure!(
                        s.kmem == f.records * rec_k,
                        "no kernel block: kmem is the records; {}",
                        ctx()
                    );
                }
            }
            // A step that took the flushed usage from at most `high` to above it crossed
            // `high` (the counter, which the stocks' slack only raises, did too): counted.
            let mut last = self.last.borrow_mut();
            if last.len() < self.groups.len() {
                last.resize(self.groups.len(), (0, 0));
            }
            if flushed == 0 {
                let (u0, h0) = last[g];
                ensure!(
                    self.groups[g]
                        .high
                        .is_none_or(|high| u0 > high || s.usage <= high || s.events.high > h0),
                    "events.high did not count a crossing of high {:?}: {u0} -> {}; {}",
                    self.groups[g].high,
                    s.usage,
                    ctx()
                );
                last[g] = (s.usage, s.events.high);
            }
            drop(last);
            stats.push((g, s));
        }
        for &(g, ref s) in &stats {
            let kids: Vec<_> = stats
                .iter()
                .filter(|(c, _)| self.groups[*c].parent == Some(g))
                .map(|(_, s)| s)
                .collect();
            let sum = |f: &dyn Fn(&memgroup::Stat) -> u64| kids.iter().map(|s| f(s)).sum::<u64>();
            ensure!(
                s.usage as u64 >= sum(&|s| s.usage as u64)
                    && s.kmem as u64 >= sum(&|s| s.kmem as u64)
                    && s.allocs >= sum(&|s| s.allocs)
                    && s.frees >= sum(&|s| s.frees),
                "{what}: group #{g} below the sum of its children: {s:?}"
            );
        }
        Ok(())
    }

    fn check_all(&self, what: &str) -> Result<(), TestCaseError> {
        self.handle(0).flush();
        self.check(0, what)?;
        // The tree: each live group's parent and live children are the model's.
        for g in self.live() {
            let h = self.handle(g);
            if let Some(p) = self.groups[g].parent {
                ensure!(
                    h.parent().as_ref() == Some(self.handle(p)),
                    "{what}: group #{g}'s parent is not #{p}"
                );
            }
            let mut kids: Vec<usize> = h
                .children()
                .iter()
                .map(|c| {
                    self.live()
                        .into_iter()
                        .find(|&m| self.handle(m) == c)
                        .unwrap_or(usize::MAX)
                })
                .collect();
            kids.sort_unstable();
            let model: Vec<usize> = self
                .live()
                .into_iter()
                .filter(|&c| self.groups[c].parent == Some(g))
                .collect();
            ensure!(
                kids == model,
                "{what}: group #{g}'s children are {kids:?}, the model says {model:?}"
            );
        }
        let dying = dying_groups();
        ensure!(
            dying == self.dying_base + self.dying(),
            "{what}: dying_groups() is {dying}, the model says {} + {}",
            self.dying_base,
            self.dying()
        );
        Ok(())
    }

    /// The flushed usage and kmem of each group of `chain` (live ones from their stat, removed
    /// ones from the model, which the check keeps exact only in the tag design).
    fn usage_of(&self, g: usize) -> (usize, usize) {
        match &self.groups[g].handle {
            Some(h) => {
                let s = h.stat();
                (s.usage, s.kmem)
            }
            // The arena's slabs are not modelled: as good as over any limit.
            None if !self.d.exact => (usize::MAX / 4, usize::MAX / 4),
            None => {
                let f = self.fig(g);
                let rec = f.records * self.d.record;
                let rec_k = if self.d.kmem { rec } else { 0 };
                (f.cost + rec, f.kernel_cost + rec_k)
            }
        }
    }

    /// The first level of `owner`'s chain (lowest first) that a charge of `bytes` would pass,
    /// given each level's usage and kmem.
    fn first_over(&self, chain: &[(usize, usize, usize)], bytes: usize, kind: bool) -> Option<usize> {
        chain.iter().position(|&(g, usage, kmem)| {
            let mg = &self.groups[g];
            mg.max.is_some_and(|m| usage + bytes > m)
                || (kind && mg.kmem_max.is_some_and(|m| kmem + bytes > m))
        })
    }

    /// Whether an over-limit charge of `owner` fails in `mode`, whichever level of its chain
    /// refused it: inside `fallible`, or under `OnLimit::Fail` on the charged group or any
    /// ancestor (the policy holds for a group's whole subtree, README and `set_on_limit`).
    fn refused(&self, owner: usize, _at: usize, mode: Mode) -> bool {
        match mode {
            Mode::NoFail => false,
            Mode::Fallible => true,
            Mode::Policy => self.chain(owner).iter().any(|&g| self.groups[g].fail),
        }
    }

    /// Whether every over-limit charge of `owner` fails in `mode`, whichever level refuses.
    fn always_refused(&self, owner: usize, mode: Mode) -> bool {
        self.refused(owner, 0, mode)
    }

    /// Whether no over-limit charge of `owner` fails in `mode`.
    fn never_refused(&self, owner: usize, mode: Mode) -> bool {
        !self.refused(owner, 0, mode)
    }

    fn levels(&self, owner: usize) -> Vec<(usize, usize, usize)> {
        self.chain(owner)
            .into_iter()
            .map(|g| {
                let (u, k) = self.usage_of(g);
                (g, u, k)
            })
            .collect()
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        self.steps += 1;
        tally::add(&tally::STEPS);
        if self.dying() != 0 {
            tally::add(&tally::DYING_SEEN);
        }
        let what = format!("step {} {op:?}", self.steps);
        let mut flushed = 0;
        match op {
            Op::Create { parent } => {
                let live = self.live();
                if live.len() >= MAX_GROUPS {
                    return self.check_all(&what);
                }
                let shallow: Vec<_> = live
                    .into_iter()
                    .filter(|&g| self.depth(g) < MAX_DEPTH)
                    .collect();
                let p = shallow[parent.index(shallow.len())];
                let levels = self.levels(p);
                // A record is charged as kernel memory, in the fallible mode, whatever the
                // policies.
                let over = self.first_over(&levels, self.d.record, self.d.kmem);
                let fits = over.is_none();
                let r = self.handle(p).child(&unique_name("m"));
                match r {
                    Ok(h) => {
                        ensure!(fits, "{what}: child() succeeded over a limit: {levels:?}");
                        self.groups.push(MGroup {
                            parent: Some(p),
                            handle: Some(h),
                            max: None,
                            high: None,
                            kmem_max: None,
                            fail: false,
                            allocs: 0,
                            frees: 0,
                            over: 0,
                            refused: 0,
                        });
                    }
                    Err(Error::OverLimit) => {
                        ensure!(!fits, "{what}: child() refused, yet it fits: {levels:?}");
                        let at = self.chain(p)[over.expect("over a limit")];
                        self.groups[at].over += 1;
                        self.groups[at].refused += 1;
                        tally::add(&tally::CHILD_REFUSED);
                    }
                    Err(e) => ensure!(false, "{what}: child() failed: {e}"),
                }
            }
            Op::Remove { group } => {
                let live: Vec<_> = self.live().into_iter().filter(|&g| g != 0).collect();
                if live.is_empty() {
                    return self.check_all(&what);
                }
                let g = live[group.index(live.len())];
                let has_children = self
                    .live()
                    .iter()
                    .any(|&c| self.groups[c].parent == Some(g));
                if has_children {
                    let r = self.handle(g).clone().remove();
                    ensure!(
                        r == Err(Error::HasChildren),
                        "{what}: removing a group with children gave {r:?}"
                    );
                } else {
                    let h = self.groups[g].handle.take().expect("live");
                    let r = h.remove();
                    ensure!(r.is_ok(), "{what}: remove gave {r:?}");
                }
            }
            Op::Limit {
                group,
                which,
                value,
            } => {
                let g = self.pick_group(group);
                let (usage, kmem) = self.usage_of(g);
                let base = if *which == 2 { kmem } else { usage };
                let v = value.map(|off| (base as i64 + off).max(0) as usize);
                let (h, mg) = (
                    self.groups[g].handle.clone().expect("live"),
                    &mut self.groups[g],
                );
                match which {
                    0 => {
                        mg.max = v;
                        h.set_max(v);
                    }
                    1 => {
                        mg.high = v;
                        h.set_high(v);
                    }
                    _ => {
                        mg.kmem_max = v;
                        h.set_kmem_max(v);
                    }
                }
                let s = h.stat();
                ensure!(
                    (s.max, s.high, s.kmem_max) == (mg.max, mg.high, mg.kmem_max),
                    "{what}: limits read back differ: {s:?}"
                );
            }
            Op::Policy { group, fail } => {
                let g = self.pick_group(group);
                self.groups[g].fail = *fail;
                self.handle(g).set_on_limit(if *fail {
                    OnLimit::Fail
                } else {
                    OnLimit::Overcharge
                });
            }
            Op::Alloc {
                thread,
                group,
                blocks,
                kind,
                mode,
            } => {
                if self.blocks.len() >= MAX_BLOCKS {
                    return self.check_all(&what);
                }
                let g = self.pick_group(group);
                let (kind, mode) = (*kind, *mode);
                let before = self.levels(g);
                let h = self.handle(g).clone();
                let layouts = blocks.clone();
                let got: Vec<Option<Block>> = on(self.txs, *thread, move || {
                    // Made outside the scope: the group is charged the blocks only.
                    let mut got = Vec::with_capacity(layouts.len());
                    scoped(Some(&h), kind, mode, || {
                        for &(size, align) in &layouts {
                            got.push(Block::try_new(size, align));
                        }
                    });
                    got
                });
                self.handle(0).flush();
                let after = self.levels(g);
                // Without kernel accounting, kernel(..) is user memory.
                let kind = kind && self.d.kmem;
                // Replays the burst on the model, charge by charge.
                let mut levels = before.clone();
                let mut upper: Vec<_> = before.clone();
                // What each allocated block may have charged (arena): nothing or its slab.
                let mut charges: Vec<Vec<usize>> = Vec::new();
                for (i, (got, &(size, align))) in got.into_iter().zip(blocks).enumerate() {
                    let lo = new_cost(self.d, size, align);
                    let hi = lo;
                    let ctx = || {
                        format!(
                            "{what}: block {i} ({size} at {align}), mode {mode:?}, levels \
                             before {before:?}, modelled {levels:?}, after {after:?}, {:?}",
                            self.chain(g)
                                .iter()
                                .map(|&c| {
                                    let m = &self.groups[c];
                                    (m.max, m.kmem_max, m.fail)
                                })
                                .collect::<Vec<_>>()
                        )
                    };
                    if self.d.exact {
                        let over = self.first_over(&levels, lo, kind);
                        let refused = over.is_some_and(|at| self.refused(g, at, mode));
                        ensure!(
                            got.is_some() != refused,
                            "{} at level {over:?}; {}",
                            if refused {
                                "allocated over a refusing limit"
                            } else {
                                "refused, yet the model says it fits or is forced"
                            },
                            ctx()
                        );
                        if let Some(at) = over {
                            let at = self.chain(g)[at];
                            self.groups[at].over += 1;
                            self.groups[at].refused += refused as u64;
                            tally::add(if refused {
                                &tally::REFUSED
                            } else {
                                &tally::FORCED
                            });
                        }
                        if got.is_some() {
                            for l in &mut levels {
                                l.1 += lo;
                                if kind {
                                    l.2 += lo;
                                }
                            }
                        }
                    } else {
                        for l in &mut upper {
                            l.1 += hi;
                            if kind {
                                l.2 += hi;
                            }
                        }
                        let sure_fit = self.first_over(&upper, 0, kind).is_none();
                        if got.is_none() {
                            tally::add(&tally::REFUSED);
                            ensure!(
                                !self.never_refused(g, mode) && !sure_fit,
                                "refused, yet it fits or is forced; {}",
                                ctx()
                            );
                            if self.always_refused(g, mode) {
                                ensure!(
                                    self.first_over(&after, lo, kind).is_some(),
                                    "refused, yet a fresh slab fits; {}",
                                    ctx()
                                );
                            }
                        }
                    }
                    if got.is_none() && !self.d.exact {
                        self.groups[g].refused += 1;
                    }
                    if got.is_some() {
                        charges.push(match arena_slab(size, align) {
                            Some(slab) => vec![0, slab],
                            None => vec![tag_cost(size, align)],
                        });
                    }
                    if let Some(block) = got {
                        tally::add(&tally::BLOCKS);
                        self.groups[g].allocs += 1;
                        self.blocks.push(MBlock {
                            owner: g,
                            class: arena_class(size, align),
                            thread: *thread,
                            align,
                            kind,
                            block,
                        });
                    }
                }
                if !self.d.exact {
                    if self.always_refused(g, mode) {
                        self.no_overshoot(&what, &before, &after)?;
                    }
                    let sums = charges.iter().fold(vec![0usize], |sums, c| {
                        sums.iter()
                            .flat_map(|s| c.iter().map(move |c| s + c))
                            .collect()
                    });
                    let records = self.records_of(&before);
                    let records = (records.clone(), records);
                    self.charged_as(&what, &before, &after, records, kind, |d| {
                        d >= 0 && sums.contains(&(d as usize))
                    })?;
                }
            }
            Op::Realloc {
                thread,
                block,
                size,
                scope,
                kind: scope_kind,
                mode,
            } => {
                if self.blocks.is_empty() {
                    return self.check_all(&what);
                }
                let i = block.index(self.blocks.len());
                // Before the block leaves the model: a removed owner's usage is the model's.
                let before = self.levels(self.blocks[i].owner);
                let b = self.blocks.swap_remove(i);
                let (owner, mode, size) = (b.owner, *mode, *size);
                let scope = scope.as_ref().map(|s| self.handle(self.pick_group(s)).clone());
                let old = b.block.size();
                let (old_cost, new_tag_cost) = (tag_cost(old, b.align), tag_cost(size, b.align));
                let (kind, scope_kind) = (b.kind, *scope_kind);
                // Arena: where the block goes. A tagged block stays with the inner allocator; a
                // slab block stays in its class if it fits, else moves (to a slab or tagged).
                // A removed owner takes no new slab: a moved block goes tagged.
                let new_class = match b.class {
                    None => None,
                    Some(c) if arena_class(size, b.align).is_some_and(|n| n.0 == c.0) => Some(c),
                    Some(_) if self.groups[owner].handle.is_none() => None,
                    Some(_) => arena_class(size, b.align),
                };
                let old_class = b.class;
                let records = self.records_of(&before);
                let r = on(self.txs, *thread, move || {
                    scoped(scope.as_ref(), scope_kind, mode, || b.block.realloc(size))
                });
                self.handle(0).flush();
                let after = self.levels(owner);
                let ctx = || {
                    format!(
                        "{what}: {old} -> {size}, owner #{owner}, levels before {before:?}, \
                         after {after:?}"
                    )
                };
                if self.d.exact {
                    let grow = new_tag_cost.saturating_sub(old_cost);
                    let over = (grow > 0)
                        .then(|| self.first_over(&before, grow, kind))
                        .flatten();
                    let refused = over.is_some_and(|at| self.refused(owner, at, mode));
                    if let Some(at) = over {
                        let at = self.chain(owner)[at];
                        self.groups[at].over += 1;
                        self.groups[at].refused += refused as u64;
                    }
                    ensure!(
                        r.is_ok() != refused,
                        "realloc {} at level {over:?}; {}",
                        if refused { "grew over a refusing limit" } else { "refused, yet it fits" },
                        ctx()
                    );
                } else {
                    // The charge it needs, if any (a new slab may also be found with room),
                    // and the usage deltas it may leave (the old slab may empty).
                    let moved = new_class != old_class || old_class.is_none();
                    let need = match (old_class, new_class) {
                        (None, _) => new_tag_cost.saturating_sub(old_cost),
                        (Some(_), _) if !moved => 0,
                        (Some(_), Some((_, slab))) => slab,
                        (Some(_), None) => new_tag_cost,
                    };
                    let ups: Vec<i64> = match (old_class, new_class) {
                        (None, _) => vec![new_tag_cost as i64 - old_cost as i64],
                        (Some(_), _) if !moved => vec![0],
                        (Some((_, old)), Some((_, new))) => vec![0, new as i64]
                            .into_iter()
                            .flat_map(|u| [u, u - old as i64])
                            .collect(),
                        (Some((_, old)), None) => {
                            vec![new_tag_cost as i64, new_tag_cost as i64 - old as i64]
                        }
                    };
                    let exact_need = old_class.is_none() || !moved || new_class.is_none();
                    let upper: Vec<_> = before
                        .iter()
                        .map(|&(g, u, k)| (g, u + need, k + if kind { need } else { 0 }))
                        .collect();
                    let fits = need == 0 || self.first_over(&upper, 0, kind).is_none();
                    if r.is_err() {
                        ensure!(
                            !self.never_refused(owner, mode) && !fits,
                            "realloc refused, yet it fits or is forced (needs {need}); {}",
                            ctx()
                        );
                    } else if self.always_refused(owner, mode) {
                        // (A removed level's arena usage is unknown to the model.)
                        let known = before.iter().all(|l| self.groups[l.0].handle.is_some());
                        ensure!(
                            !exact_need || !known || fits,
                            "realloc over a refusing limit (needs {need}); {}",
                            ctx()
                        );
                        self.no_overshoot(&what, &before, &after)?;
                    }
                    let ok = r.is_ok();
                    let records = (records, self.records_of(&after));
                    self.charged_as(&what, &before, &after, records, kind, |d| {
                        if ok {
                            ups.contains(&d)
                        } else {
                            d == 0
                        }
                    })?;
                }
                let r_ok = r.is_ok();
                if !r_ok && !self.d.exact {
                    self.groups[owner].refused += 1;
                }
                if !r_ok {
                    tally::add(&tally::REALLOC_REFUSED);
                }
                let block = match r {
                    Ok(block) | Err(block) => block,
                };
                self.blocks.push(MBlock {
                    owner: b.owner,
                    class: if r_ok { new_class } else { b.class },
                    thread: if r_ok { *thread } else { b.thread },
                    align: b.align,
                    kind,
                    block,
                });
            }
            Op::Free {
                thread,
                block,
                scope,
            } => {
                if self.blocks.is_empty() {
                    return self.check_all(&what);
                }
                let i = block.index(self.blocks.len());
                let before = self.levels(self.blocks[i].owner);
                let records = self.records_of(&before);
                let b = self.blocks.swap_remove(i);
                let scope = scope.as_ref().map(|s| self.handle(self.pick_group(s)).clone());
                let (size, align, class) = (b.block.size(), b.align, b.class);
                let blk = b.block;
                if *thread != b.thread {
                    tally::add(&tally::REMOTE_FREES);
                }
                on(self.txs, *thread, move || {
                    scoped(scope.as_ref(), false, Mode::Policy, || drop(blk))
                });
                // The free counts on the owner, removed or not (so on its ancestors).
                self.groups[b.owner].frees += 1;
                if !self.d.exact {
                    // A small block gives back its slab or nothing, a large one its cost.
                    self.handle(0).flush();
                    let after = self.levels(b.owner);
                    let slab = class.map(|(_, slab)| slab);
                    let records = (records, self.records_of(&after));
                    self.charged_as(&what, &before, &after, records, b.kind, |d| match slab {
                        Some(slab) => d == 0 || d == -(slab as i64),
                        None => d == -(tag_cost(size, align) as i64),
                    })?;
                }
            }
            Op::Flush { group } => {
                let g = self.pick_group(group);
                self.handle(g).flush();
                flushed = g;
            }
        }
        if flushed != 0 {
            self.check(flushed, &what)?;
        }
        self.check_all(&what)
    }

    /// The model's live records under each level of a chain.
    fn records_of(&self, levels: &[(usize, usize, usize)]) -> Vec<usize> {
        let figs = self.figs();
        levels.iter().map(|&(g, _, _)| figs[g].records).collect()
    }

    /// Arena: every live level of a chain moved by the same usage delta, which `ok` accepts,
    /// and its kmem by as much (a kernel block) or not at all.
    fn charged_as(
        &self,
        what: &str,
        before: &[(usize, usize, usize)],
        after: &[(usize, usize, usize)],
        records: (Vec<usize>, Vec<usize>),
        kind: bool,
        ok: impl Fn(i64) -> bool,
    ) -> Result<(), TestCaseError> {
        let rec = self.d.record as i64;
        let rec_k = if self.d.kmem { rec } else { 0 };
        for (level, (&(g, u0, k0), &(_, u1, k1))) in before.iter().zip(after).enumerate() {
            if self.groups[g].handle.is_none() {
                continue;
            }
            // Records freed with a removed group's last block are not the block's.
            let gone = records.0[level] as i64 - records.1[level] as i64;
            let (du, dk) = (
                u1 as i64 - u0 as i64 + gone * rec,
                k1 as i64 - k0 as i64 + gone * rec_k,
            );
            ensure!(
                ok(du) && dk == if kind { du } else { 0 },
                "{what}: group #{g} charged {du} (kmem {dk}), kernel {kind}: levels before \
                 {before:?}, after {after:?}"
            );
        }
        Ok(())
    }

    /// Under a mode that refuses every over-limit charge, no level ends above its limit unless
    /// it was already there.
    fn no_overshoot(
        &self,
        what: &str,
        before: &[(usize, usize, usize)],
        after: &[(usize, usize, usize)],
    ) -> Result<(), TestCaseError> {
        for (&(g, u0, k0), &(_, u1, k1)) in before.iter().zip(after) {
            let mg = &self.groups[g];
            ensure!(
                mg.max.is_none_or(|m| u1 <= m || u1 <= u0),
                "{what}: group #{g} went over its max {:?}: {u0} -> {u1}",
                mg.max
            );
            ensure!(
                mg.kmem_max.is_none_or(|m| k1 <= m || k1 <= k0),
                "{what}: group #{g} went over its kmem_max {:?}: {k0} -> {k1}",
                mg.kmem_max
            );
        }
        Ok(())
    }

    /// Frees everything, checks the groups back to their records and `dying_groups()` back to
    /// where it was, then removes every group and checks the top back to zero.
    fn finish(mut self) -> Result<(), TestCaseError> {
        for b in std::mem::take(&mut self.blocks) {
            self.groups[b.owner].frees += 1;
            drop(b.block);
        }
        self.check_all("after freeing everything")?;
        ensure!(
            dying_groups() == self.dying_base,
            "dying_groups() not back to {} once everything is freed: {}",
            self.dying_base,
            dying_groups()
        );
        self.remove_all(1);
        let top = self.handle(0).clone();
        top.flush();
        let s = top.stat();
        drop(top);
        self.remove_all(0);
        ensure!(
            (s.usage, s.kmem, s.overhead, s.allocs - s.frees) == (0, 0, 0, 0),
            "the top group after removing the others: {s:?}"
        );
        ensure!(
            dying_groups() == self.dying_base,
            "dying_groups() after removing every group: {} (was {})",
            dying_groups(),
            self.dying_base
        );
        Ok(())
    }

    /// Removes the groups, children first (the top group last).
    fn remove_all(&mut self, from: usize) {
        for g in (from..self.groups.len()).rev() {
            if let Some(h) = self.groups[g].handle.take() {
                let _ = h.remove();
            }
        }
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // After a failed case: give everything back so the next cases start clean.
        self.blocks.clear();
        self.remove_all(0);
    }
}

fn steps() -> usize {
    std::env::var("MODEL_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// Runs the model for `PROPTEST_CASES` cases (default `cases`) of up to `MODEL_STEPS` steps
/// (default 200).
fn run_model(cases: u32) {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_DISABLE_FAILURE_PERSISTENCE").is_none() {
        config.failure_persistence = Some(Box::new(FileFailurePersistence::Direct(concat!(
            "tests/",
            module_path!(),
            ".proptest-regressions"
        ))));
    } else {
        config.failure_persistence = None;
    }
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    let d = design();
    let steps = steps();
    eprintln!(
        "model: {} cases of up to {steps} steps, design {d:?}, seed {:?}",
        config.cases, config.rng_seed
    );
    let mut runner = TestRunner::new(config);
    let strategy = proptest::collection::vec(op_strategy(), 1..=steps);
    let result = runner.run(&strategy, |ops| {
        let mut m = Model::new(d);
        m.check_all("start")?;
        for op in &ops {
            m.step(op)?;
        }
        m.finish()
    });
    eprintln!("model: {}", tally::report());
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The default configuration: 64 cases.
#[test]
fn model_matches_random_operations() {
    run_model(64);
}

/// The same model in child processes, under the configurations the environment selects at
/// start-up: kernel accounting off, stocks off (every charge on the counters), pockets off
/// (every charge on the CPU stocks), a small batch. 16 cases each by default.
#[test]
fn model_under_other_configurations() {
    for env in [
        [("MEMGROUP_KMEM", "0")],
        [("MEMGROUP_BATCH", "0")],
        [("MEMGROUP_POCKETS", "0")],
        [("MEMGROUP_BATCH", "4096")],
    ] {
        common::run_in_child_process("model_in_child", &env);
    }
}

#[test]
#[ignore = "run by model_under_other_configurations in a child process"]
fn model_in_child() {
    if common::in_child_process() {
        run_model(16);
    }
}
