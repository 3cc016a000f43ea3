// Fault injection (issue 14.3): an inner allocator that fails on a schedule (every Nth call, at
// random from a seed, only large requests), under the tag design (tests/fault_tag.rs) and the
// arena design (tests/fault_arena.rs, whose inner allocator serves its large blocks), and
// memgroup's own mappings failing (`memgroup::fail_next_maps`).
//
// What must hold: every injected failure comes out as null (or `Err` from `try_reserve`);
// counters do not move (usage, kmem, overhead, events, checked exactly around each attempt,
// flushed); nothing is lost or freed twice (the inner allocator's live blocks and bytes are
// back to where they started once everything is freed, and the contents of a block whose
// realloc failed are intact); and after the workload every group is exactly back to 0, with
// `allocs` equal to what a plain model counted.
//
// One documented exception (README, Limitations): a small block (at most a batch) is charged
// before the inner allocator is asked, so its failed attempt counts as one allocation and one
// free (`allocs - frees` is unchanged). The checks below expect exactly that, and nothing more.
//
// Each workload runs in a child process of its own, so that no other test's allocations move
// the inner allocator's live counts.

include!("common.rs");

use common::{
    churn_threads, exact, fresh, fresh_child, live, Block,
    Rng, Tenants,
};
use faulty::Schedule;
use memgroup::{kernel, stock_batch, Events, Group, OnLimit, TAG_SIZE};
use std::alloc::Layout;
use std::sync::atomic::{AtomicU64, Ordering};

/// The failing inner allocator.
pub mod faulty {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

    /// When an armed call fails.
    #[derive(Clone, Copy, Debug)]
    pub enum Schedule {
        /// Every `n`th armed call of the thread fails.
        Every(u64),
        /// Each armed call fails with probability `1/one_in`, from a generator seeded per thread.
        Random { one_in: u64, seed: u64 },
        /// Every armed call for at least `min` bytes fails, no other.
        Large { min: usize },
    }

    thread_local! {
        // Const-initialized, without destructors: usable inside the allocator at any time.
        static SCHEDULE: Cell<Option<Schedule>> = const { Cell::new(None) };
        static ON: Cell<bool> = const { Cell::new(false) };
        static CALLS: Cell<u64> = const { Cell::new(0) };
        static FAILED: Cell<u64> = const { Cell::new(0) };
        static STATE: Cell<u64> = const { Cell::new(0) };
    }

    /// The inner blocks allocated by threads with a schedule (see `arm`) and not freed yet, by
    /// address (0: never used, 1: freed), and their sizes: an open-addressing set, lock-free,
    /// which any thread's free updates. Other threads' blocks (the harness's) are not counted.
    const SLOTS: usize = 1 << 16;
    static TRACKED: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
    static SIZES: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
    static LIVE: AtomicIsize = AtomicIsize::new(0);
    static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

    /// `System`, failing the calls its schedule picks while the calling thread is inside
    /// `during`; everywhere else (the test harness, the channels) it never fails.
    pub struct Faulty;

    /// Sets this thread's schedule (its call count starts again); from now on its inner blocks
    /// are tracked.
    pub fn arm(schedule: Schedule) {
        SCHEDULE.with(|s| s.set(Some(schedule)));
        CALLS.with(|c| c.set(0));
        FAILED.with(|c| c.set(0));
        if let Schedule::Random { seed, .. } = schedule {
            STATE.with(|s| s.set(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1));
        }
    }

    /// Takes this thread's schedule away: no more failures, no more tracking.
    pub fn disarm() {
        SCHEDULE.with(|s| s.set(None));
    }

    /// Runs `f` with this thread's schedule in force; returns its result and the failures
    /// injected meanwhile.
    pub fn during<R>(f: impl FnOnce() -> R) -> (R, u64) {
        let before = FAILED.with(Cell::get);
        ON.with(|on| on.set(true));
        let r = f();
        ON.with(|on| on.set(false));
        (r, FAILED.with(Cell::get) - before)
    }

    /// Tracked inner blocks live and their bytes.
    pub fn live() -> (isize, isize) {
        (LIVE.load(Ordering::SeqCst), LIVE_BYTES.load(Ordering::SeqCst))
    }

    fn slot(p: *mut u8) -> usize {
        ((p as usize >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48) % SLOTS
    }

    /// Records a fresh block of an armed thread.
    fn track(p: *mut u8, size: usize) -> *mut u8 {
        if p.is_null() || SCHEDULE.with(Cell::get).is_none() {
            return p;
        }
        let mut i = slot(p);
        loop {
            let old = TRACKED[i].load(Ordering::SeqCst);
            if old <= 1
                && TRACKED[i]
                    .compare_exchange(old, p as usize, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                SIZES[i].store(size, Ordering::SeqCst);
                LIVE.fetch_add(1, Ordering::SeqCst);
                LIVE_BYTES.fetch_add(size as isize, Ordering::SeqCst);
                return p;
            }
            i = (i + 1) % SLOTS;
        }
    }

    /// Forgets a block about to be freed (or moved by realloc); its size, if it was tracked.
    fn untrack(p: *mut u8) -> Option<usize> {
        let mut i = slot(p);
        for _ in 0..SLOTS {
            match TRACKED[i].load(Ordering::SeqCst) {
                0 => return None,
                v if v == p as usize => {
                    let size = SIZES[i].load(Ordering::SeqCst);
                    TRACKED[i].store(1, Ordering::SeqCst);
                    LIVE.fetch_sub(1, Ordering::SeqCst);
                    LIVE_BYTES.fetch_sub(size as isize, Ordering::SeqCst);
                    return Some(size);
                }
                _ => i = (i + 1) % SLOTS,
            }
        }
        None
    }

    fn fails(size: usize) -> bool {
        if !ON.with(Cell::get) {
            return false;
        }
        let Some(schedule) = SCHEDULE.with(Cell::get) else {
            return false;
        };
        let n = CALLS.with(|c| {
            c.set(c.get() + 1);
            c.get()
        });
        let fail = match schedule {
            Schedule::Every(k) => n % k == 0,
            Schedule::Random { one_in, .. } => STATE.with(|s| {
                let mut x = s.get();
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                s.set(x);
                x.wrapping_mul(0x2545_F491_4F6C_DD1D) % one_in == 0
            }),
            Schedule::Large { min } => size >= min,
        };
        if fail {
            FAILED.with(|c| c.set(c.get() + 1));
        }
        fail
    }

    // SAFETY: every call that does not fail on purpose is System's, with the caller's
    // arguments; a failure returns null, as an out-of-memory System would.
    unsafe impl GlobalAlloc for Faulty {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if fails(layout.size()) {
                return std::ptr::null_mut();
            }
            // SAFETY: forwarded caller contract.
            track(unsafe { System.alloc(layout) }, layout.size())
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            if fails(layout.size()) {
                return std::ptr::null_mut();
            }
            // SAFETY: forwarded caller contract.
            track(unsafe { System.alloc_zeroed(layout) }, layout.size())
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if untrack(ptr).is_some_and(|size| size != layout.size()) {
                // A block freed with another layout than it was allocated with (no panic
                // inside an allocator).
                std::process::abort();
            }
            // SAFETY: forwarded caller contract.
            unsafe { System.dealloc(ptr, layout) };
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            if fails(new_size) {
                return std::ptr::null_mut();
            }
            // Forgotten first: once moved, its address may be another thread's next block.
            let was = untrack(ptr);
            // SAFETY: forwarded caller contract.
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if p.is_null() {
                if was.is_some() {
                    track(ptr, layout.size());
                }
                return p;
            }
            track(p, new_size)
        }
    }
}

/// A block from the global allocator, filled with a pattern so that a lost or moved content
/// shows; freed on drop.
struct Raw {
    ptr: *mut u8,
    layout: Layout,
    fill: u8,
}

// SAFETY: a Raw owns its block exclusively.
unsafe impl Send for Raw {}

impl Raw {
    /// Takes a fresh block (non-null) and fills it.
    fn new(ptr: *mut u8, layout: Layout, fill: u8) -> Raw {
        // SAFETY: `ptr` is a live block of `layout.size()` bytes.
        unsafe { std::ptr::write_bytes(ptr, fill, layout.size()) };
        Raw { ptr, layout, fill }
    }

    /// The first and last 64 bytes still hold the pattern.
    fn check(&self, what: &str) {
        let n = self.layout.size();
        // SAFETY: the block is live and `n` bytes long, all written.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr, n) };
        let ends = bytes.iter().take(64).chain(bytes.iter().skip(n.saturating_sub(64)));
        assert!(
            ends.into_iter().all(|&b| b == self.fill),
            "{what}: a block of {n} bytes lost its content"
        );
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.check("at its free");
        // SAFETY: allocated by the global allocator with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// The counters a failed attempt must leave as they were, flushed (peak left out: a charge
/// that is taken back may raise it).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Counts {
    usage: usize,
    kmem: usize,
    overhead: usize,
    allocs: u64,
    frees: u64,
    events: Events,
}

fn counts(g: &Group) -> Counts {
    let s = exact(g);
    Counts {
        usage: s.usage,
        kmem: s.kmem,
        overhead: s.overhead,
        allocs: s.allocs,
        frees: s.frees,
        events: s.events,
    }
}

/// A charge refused at a limit changes no counter but the events: one more `fail` (and the
/// `max` events of the limit it hit).
fn assert_refused(before: Counts, after: Counts, what: &str) {
    assert_eq!(Counts { events: before.events, ..after }, before, "{what}");
    assert_eq!(after.events.fail, before.events.fail + 1, "{what}: one refusal");
}

/// An attempt the inner allocator failed changes no counter of the group or its parent, but
/// a block charged first (`counted` 1, see `charged_first`) counts one allocation and one free.
fn assert_failed(before: [Counts; 2], after: [Counts; 2], counted: u64, what: &str) {
    for (x, y) in before.into_iter().zip(after) {
        let moved = Counts { allocs: x.allocs + counted, frees: x.frees + counted, ..x };
        assert_eq!(y, moved, "{what}");
    }
}

/// A block of `size` at `align` asks the inner allocator only after it was charged (so a
/// failed attempt counts as an allocation and a free): the tag design's blocks of at most a
/// batch (its size with the tag and, at align 16, the header's other 8 bytes).
fn charged_first(size: usize, align: usize) -> bool {
    let pad = if align == 16 { TAG_SIZE } else { 0 };
    size + TAG_SIZE + pad <= stock_batch()
}

fn pick_size(rng: &mut Rng) -> usize {
    match rng.range(0, 9) {
        0..=4 => rng.range(1, 512),
        5..=7 => rng.range(513, 16 << 10),
        _ => rng.range(16 << 10, 300 << 10),
    }
}

const ALIGNS: [usize; 5] = [1, 8, 16, 64, 4096];

/// What a workload saw.
#[derive(Debug, Default)]
struct Seen {
    injected: u64,
    refused: u64,
    succeeded: u64,
}

/// One thread's workload of `steps` random allocations, reallocations, `try_reserve`s and
/// frees in two groups (`b` under a 4 MiB max with `OnLimit::Fail`), with `schedule` in force
/// around each attempt; half the attempts are checked exactly (flushed before and after), the
/// other half run through the fast paths unflushed. Checks everything the header says.
fn workload(schedule: Schedule, seed: u64, steps: usize) -> Seen {
    let inner_before = faulty::live();
    faulty::arm(schedule);
    let t = fresh("fault");
    let a = fresh_child(&t, "a");
    let b = fresh_child(&t, "b");
    b.set_max(Some(4 << 20));
    b.set_on_limit(OnLimit::Fail);
    let groups = [&a, &b];
    let mut model_allocs = [0u64; 2];
    let mut held: Vec<(Raw, usize)> = Vec::with_capacity(steps);
    let mut vecs: Vec<(Vec<u8>, usize)> = Vec::with_capacity(steps);
    let mut seen = Seen::default();
    let mut rng = Rng::new(seed);
    for step in 0..steps {
        let gi = rng.range(0, 1);
        let g = groups[gi];
        let checked = rng.one_in(2);
        let before = checked.then(|| [counts(g), counts(&t)]);
        let after = || [counts(g), counts(&t)];
        let op = rng.range(0, 9);
        let what = format!("step {step} (seed {seed}, {schedule:?})");
        match op {
            // An allocation, a quarter of them zeroed, a quarter inside kernel().
            0..=4 => {
                let size = pick_size(&mut rng);
                let align = ALIGNS[rng.range(0, ALIGNS.len() - 1)];
                let layout = Layout::from_size_align(size, align).unwrap();
                let (zeroed, kern) = (rng.one_in(4), rng.one_in(4));
                let raw = || {
                    // SAFETY: a non-zero size.
                    unsafe {
                        if zeroed {
                            std::alloc::alloc_zeroed(layout)
                        } else {
                            std::alloc::alloc(layout)
                        }
                    }
                };
                let (p, fails) = g.run(|| faulty::during(|| if kern { kernel(raw) } else { raw() }));
                let p = std::hint::black_box(p);
                let counted = u64::from(charged_first(size, align));
                if fails > 0 {
                    assert!(p.is_null(), "{what}: an injected failure returns null");
                    assert_eq!(fails, 1, "{what}: one inner call per allocation");
                    seen.injected += 1;
                    model_allocs[gi] += counted;
                    if let Some(before) = before {
                        assert_failed(before, after(), counted, &format!("{what}: a failed alloc of {size} at {align}"));
                    }
                } else if p.is_null() {
                    assert_eq!(gi, 1, "{what}: only b has a limit, yet {size} at {align} failed");
                    seen.refused += 1;
                    if let Some([bg, _]) = before {
                        assert_refused(bg, after()[0], &format!("{what}: a refused alloc of {size}"));
                    }
                } else {
                    seen.succeeded += 1;
                    model_allocs[gi] += 1;
                    if zeroed {
                        // SAFETY: a live block of `size` bytes.
                        let bytes = unsafe { std::slice::from_raw_parts(p, size) };
                        assert!(bytes.iter().all(|&b| b == 0), "{what}: zeroed");
                    }
                    held.push((Raw::new(p, layout, step as u8), gi));
                    if let Some([bg, _]) = before {
                        assert_eq!(after()[0].allocs, bg.allocs + 1, "{what}: one block");
                    }
                }
            }
            // A realloc of a held block (of either group: the owner stays the allocating one).
            5..=6 if !held.is_empty() => {
                let i = rng.range(0, held.len() - 1);
                let (old, owner) = &mut held[i];
                let owner_group = groups[*owner];
                let before = checked.then(|| [counts(owner_group), counts(&t)]);
                let new_size = pick_size(&mut rng);
                let (p, fails) = faulty::during(|| {
                    // SAFETY: a live block of ours with its layout; a non-zero new size.
                    unsafe { std::alloc::realloc(old.ptr, old.layout, new_size) }
                });
                let p = std::hint::black_box(p);
                let from = old.layout.size();
                if fails > 0 || p.is_null() {
                    assert!(p.is_null(), "{what}: an injected failure returns null");
                    old.check(&format!("{what}: after a failed realloc"));
                    if fails > 0 {
                        seen.injected += 1;
                    } else {
                        assert_eq!(*owner, 1, "{what}: only b has a limit");
                        seen.refused += 1;
                    }
                    match before {
                        Some([bg, _]) if fails == 0 => assert_refused(
                            bg,
                            counts(owner_group),
                            &format!("{what}: a refused realloc {from} -> {new_size}"),
                        ),
                        Some([bg, bt]) => {
                            let [ag, at] = [counts(owner_group), counts(&t)];
                            assert_eq!(ag, bg, "{what}: a failed realloc {from} -> {new_size}");
                            assert_eq!(at, bt, "{what}: a failed realloc, the parent");
                        }
                        None => {}
                    }
                } else {
                    seen.succeeded += 1;
                    old.ptr = p;
                    let keep = from.min(new_size);
                    let moved = Raw {
                        ptr: p,
                        layout: Layout::from_size_align(keep, old.layout.align()).unwrap(),
                        fill: old.fill,
                    };
                    moved.check(&format!("{what}: after realloc {from} -> {new_size}"));
                    std::mem::forget(moved);
                    old.layout = Layout::from_size_align(new_size, old.layout.align()).unwrap();
                    // SAFETY: the block is live and `new_size` bytes long.
                    unsafe { std::ptr::write_bytes(p, old.fill, new_size) };
                    if let Some([bg, _]) = before {
                        let ag = counts(owner_group);
                        assert_eq!(
                            (ag.allocs, ag.frees),
                            (bg.allocs, bg.frees),
                            "{what}: a realloc counts no block"
                        );
                    }
                }
            }
            // try_reserve on a fresh vector: Err for a failure.
            7 => {
                let n = pick_size(&mut rng);
                let mut v: Vec<u8> = Vec::new();
                let (r, fails) = g.run(|| faulty::during(|| v.try_reserve_exact(n)));
                let counted = u64::from(charged_first(n, 1));
                if fails > 0 {
                    assert!(r.is_err(), "{what}: an injected failure is an Err");
                    seen.injected += 1;
                    model_allocs[gi] += counted;
                    if let Some(before) = before {
                        assert_failed(before, after(), counted, &format!("{what}: a failed try_reserve of {n}"));
                    }
                } else if r.is_err() {
                    assert_eq!(gi, 1, "{what}: only b has a limit");
                    seen.refused += 1;
                } else {
                    seen.succeeded += 1;
                    model_allocs[gi] += 1;
                    v.resize(n, 7);
                    vecs.push((std::hint::black_box(v), gi));
                }
            }
            // A free.
            _ => {
                if !held.is_empty() {
                    drop(held.swap_remove(rng.range(0, held.len() - 1)));
                } else if !vecs.is_empty() {
                    drop(vecs.swap_remove(0));
                }
            }
        }
    }
    for (v, _) in &vecs {
        assert!(v.iter().all(|&b| b == 7), "a vector kept its content");
    }
    drop(held);
    drop(vecs);
    for (gi, g) in groups.iter().enumerate() {
        let s = exact(g);
        assert_eq!(
            (s.usage, s.kmem, s.overhead, s.allocs, s.frees),
            (0, 0, 0, model_allocs[gi], model_allocs[gi]),
            "{} after the workload (seed {seed}, {schedule:?}), model allocs {}: {s:?}",
            g.name(),
            model_allocs[gi]
        );
    }
    // The children's records are the parent's kernel memory until they are removed.
    a.remove().unwrap();
    b.remove().unwrap();
    let s = exact(&t);
    assert_eq!((s.usage, s.kmem, s.overhead, live(&s)), (0, 0, 0, 0), "{s:?}");
    t.remove().unwrap();
    faulty::disarm();
    assert_eq!(
        faulty::live(),
        inner_before,
        "the inner allocator's live blocks and bytes are back (seed {seed}, {schedule:?}): {seen:?}"
    );
    assert!(seen.injected > 0, "the schedule injected failures: {seen:?}");
    println!("{schedule:?} seed {seed}: {seen:?}");
    seen
}

child_test! {
    fn every_third_inner_call_fails => every_third_inner() {
        for seed in 1..=3 {
            workload(Schedule::Every(3), seed, 2000);
        }
    }
}

child_test! {
    fn every_inner_call_fails => every_inner() {
        let seen = workload(Schedule::Every(1), 4, 1000);
        // Only small blocks of the arena design reach no inner allocator.
        assert!(seen.injected > 100, "{seen:?}");
    }
}

child_test! {
    fn random_inner_calls_fail => random_inner() {
        for seed in 10..=14 {
            workload(Schedule::Random { one_in: 4, seed }, seed, 2000);
        }
    }
}

child_test! {
    fn large_inner_calls_fail => large_inner() {
        for (seed, min) in [(20, 16 << 10), (21, 64 << 10), (22, 200 << 10)] {
            workload(Schedule::Large { min }, seed, 2000);
        }
    }
}

child_test! {
    /// With stocks off (`MEMGROUP_BATCH=0`) every block asks the inner allocator first, so no
    /// failed attempt counts anything.
    fn failures_without_stocks => no_stocks_inner("MEMGROUP_BATCH" = "0") {
        assert_eq!(stock_batch(), 0);
        workload(Schedule::Random { one_in: 3, seed: 30 }, 30, 2000);
    }
}

child_test! {
    /// Without pockets (`MEMGROUP_POCKETS=0`) small blocks are charged to the CPU's stock directly;
    /// the same holds.
    fn failures_without_pockets => no_pockets_inner("MEMGROUP_POCKETS" = "0") {
        workload(Schedule::Random { one_in: 3, seed: 31 }, 31, 2000);
        workload(Schedule::Every(2), 32, 2000);
    }
}

child_test! {
    /// A small batch (4 KiB: the smallest pockets, so blocks past 4 KiB are charged to the
    /// counters directly and ask the inner allocator first).
    fn failures_with_a_small_batch => small_batch_inner("MEMGROUP_BATCH" = "4K") {
        assert_eq!(stock_batch(), 4096);
        workload(Schedule::Random { one_in: 3, seed: 33 }, 33, 2000);
    }
}

child_test! {
    /// Four threads allocate in two tenants' leaves at random failures, hand blocks to each other
    /// (so frees are remote), reallocate and free: every failure is null and every counter ends
    /// exactly at 0, the inner allocator's live blocks back where they were.
    fn threads_churn_under_random_failures => threads_churn_inner() {
        static INJECTED: AtomicU64 = AtomicU64::new(0);
        static SUCCEEDED: AtomicU64 = AtomicU64::new(0);
        let inner_before = faulty::live();
        let tenants = Tenants::new("fault-churn");
        let leaves = tenants.leaves.clone();
        churn_threads(4, 3000, 64, 40, move |rng, held: &mut Vec<Raw>, to, rx| {
            if held.capacity() == 0 {
                // The first step of the thread: its own schedule, seeded from its generator.
                faulty::arm(Schedule::Random {
                    one_in: 5,
                    seed: rng.next(),
                });
                held.reserve(128);
            }
            while let Ok(r) = rx.try_recv() {
                held.push(r);
            }
            let g = &leaves[rng.range(0, leaves.len() - 1)];
            match rng.range(0, 9) {
                0..=4 => {
                    let size = pick_size(rng);
                    let layout = Layout::from_size_align(size, ALIGNS[rng.range(0, 4)]).unwrap();
                    let kern = rng.one_in(4);
                    // SAFETY: a non-zero size.
                    let raw = || unsafe { std::alloc::alloc(layout) };
                    let (p, fails) = g.run(|| faulty::during(|| if kern { kernel(raw) } else { raw() }));
                    let p = std::hint::black_box(p);
                    assert_eq!(p.is_null(), fails > 0, "null exactly when a failure was injected");
                    if p.is_null() {
                        INJECTED.fetch_add(1, Ordering::Relaxed);
                    } else {
                        SUCCEEDED.fetch_add(1, Ordering::Relaxed);
                        held.push(Raw::new(p, layout, size as u8));
                    }
                }
                5..=6 if !held.is_empty() => {
                    let i = rng.range(0, held.len() - 1);
                    let old = &mut held[i];
                    let new_size = pick_size(rng);
                    let (p, fails) = faulty::during(|| {
                        // SAFETY: a live block of ours with its layout; a non-zero new size.
                        unsafe { std::alloc::realloc(old.ptr, old.layout, new_size) }
                    });
                    assert_eq!(p.is_null(), fails > 0, "null exactly when a failure was injected");
                    if p.is_null() {
                        INJECTED.fetch_add(1, Ordering::Relaxed);
                        old.check("after a failed realloc");
                    } else {
                        old.ptr = p;
                        old.layout = Layout::from_size_align(new_size, old.layout.align()).unwrap();
                        // SAFETY: the block is live and `new_size` bytes long.
                        unsafe { std::ptr::write_bytes(p, old.fill, new_size) };
                    }
                }
                7 => common::send_one(rng, g, held, to),
                _ => common::drop_one(rng, g, held),
            }
        });
        tenants.check_back_to_zero();
        assert_eq!(faulty::live(), inner_before, "the inner allocator's live blocks and bytes are back");
        let (injected, succeeded) = (INJECTED.load(Ordering::Relaxed), SUCCEEDED.load(Ordering::Relaxed));
        assert!(injected > 100 && succeeded > 100, "{injected} injected, {succeeded} succeeded");
        println!("churn: {injected} injected failures, {succeeded} allocations");
    }
}

// ---- memgroup's own mappings failing -----------------------------------------------------------

child_test! {
    /// While memgroup's mappings fail (new pocket chunks in the tag design; the arena's thread
    /// heaps, group heaps, key tables and segments), allocation still works (the arena hands
    /// what it cannot serve to the inner allocator, a thread without a pocket charges the stocks)
    /// and every counter stays exact; once mappings work again, so does everything else.
    fn memgroup_mappings_fail => maps_fail_inner() {
        const ASKED: u32 = 1 << 30;
        let g = fresh("maps");
        let base = exact(&g);
        assert_eq!(memgroup::fail_next_maps(ASKED), 0);
        // More threads alive at once than a chunk of pocket places (16 KiB of 16-byte places)
        // holds, each with a heap of its own in the arena.
        let threads = 1100;
        let sizes = [8, 100, 1000, 5000, 100_000];
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(threads + 1));
        let (tx, rx) = std::sync::mpsc::channel::<Vec<Block>>();
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (g, barrier, tx) = (g.clone(), barrier.clone(), tx.clone());
                std::thread::Builder::new()
                    .stack_size(64 << 10)
                    .spawn(move || {
                        let blocks: Vec<Block> =
                            g.run(|| sizes.iter().map(|&s| Block::filled(s, 3)).collect());
                        barrier.wait();
                        tx.send(blocks).unwrap();
                    })
                    .expect("spawning a thread")
            })
            .collect();
        barrier.wait();
        drop(tx);
        // Past a segment of one slab size: the arena needs new segments.
        let mine: Vec<Block> = g.run(|| (0..100_000).map(|_| Block::filled(64, 5)).collect());
        let theirs: Vec<Vec<Block>> = rx.iter().collect();
        for h in handles {
            h.join().unwrap();
        }
        let failed = ASKED - memgroup::fail_next_maps(0);
        assert!(failed > 0, "some mapping was attempted and failed");
        let s = exact(&g);
        assert_eq!(
            live(&s) - live(&base),
            (threads * (sizes.len() + 1) + mine.len() + 1) as u64,
            "every block (and the vectors holding them) counted: {s:?}"
        );
        drop(mine);
        drop(theirs);
        let s = exact(&g);
        assert_eq!((s.usage, s.kmem, s.overhead, live(&s)), (0, 0, 0, 0), "back to 0: {s:?}");
        // Mappings work again: a fresh thread and group allocate as before.
        let h = fresh("maps-after");
        let g2 = h.clone();
        std::thread::spawn(move || {
            let blocks: Vec<Block> = g2.run(|| (0..20_000).map(|i| Block::filled(8 + i % 900, 1)).collect());
            drop(blocks);
        })
        .join()
        .unwrap();
        let s = exact(&h);
        assert_eq!((s.usage, s.kmem, s.overhead, live(&s)), (0, 0, 0, 0), "{s:?}");
        assert_eq!(s.allocs, 20_001, "the blocks and their vector");
        if IS_ARENA {
            #[cfg(feature = "arena")]
            {
                // A group's first blocks of a class go the tag way (a slab's worth by
                // default; 16 KiB is more than any threshold up to 16K): past those, slabs.
                let b: Vec<Block> = h.run(|| (0..=(16 << 10) / 64).map(|_| Block::filled(64, 9)).collect());
                // SAFETY: a live block of this binary's global allocator.
                let slab = unsafe { memgroup::slab_of(b[b.len() - 1].ptr()) };
                assert!(slab.is_some(), "small blocks come from slabs again");
                println!("arena after the failures: {:?}", memgroup::arena_footprint());
            }
        }
        println!("{failed} of memgroup's mappings failed");
    }
}
