// Memory pressure: the levels and their delivery (hierarchical, edge-triggered, coalesced, none
// lost), shrinkers and `reclaim`, direct reclaim at `max`, background reclaim toward `high`,
// unregistering, the lock case (a shrinker that needs a lock the allocating thread holds), and
// throttling.
//
// Deliveries are asynchronous (a notifier thread): every wait for one is a bounded poll. To show
// that something was NOT delivered, a test waits for a later level of the same group (usually a
// Critical raised by a refused charge, which leaves usage unchanged): a wrong delivery raised
// before it would have been made by then.

include!("common.rs");

use common::{block_cost, exact, fresh, fresh_child, Block};
use memgroup::{fallible, Group, Level, OnLimit, Shrinker, ShrinkerHandle, Subscription};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Barrier, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

/// How long an asynchronous delivery or reclaim may take before a test fails.
const PATIENCE: Duration = Duration::from_secs(5);

/// Polls `cond` until it holds or `PATIENCE` runs out; returns whether it held.
fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > PATIENCE {
            return cond();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs `f` on its own thread and returns its result, failing the test if it does not finish
/// within `secs` seconds (a hang is left behind; the process ends with the test binary).
fn finishes<T: Send + 'static>(what: &str, secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let r = f();
        let _ = tx.send(r);
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(r) => {
            worker.join().expect("worker thread");
            r
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what} did not finish within {secs} s: deadlock?")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the worker sends before it ends"),
        },
    }
}

/// The lock case stalls the notifier on purpose (for up to the allocator's bounded wait, over
/// and over). Tests whose result depends on direct reclaim getting the notifier in time do not
/// run at the same moment as it.
static NOTIFIER_STALLS: RwLock<()> = RwLock::new(());

fn stalls_notifier() -> std::sync::RwLockWriteGuard<'static, ()> {
    NOTIFIER_STALLS.write().unwrap_or_else(|e| e.into_inner())
}

fn needs_notifier() -> std::sync::RwLockReadGuard<'static, ()> {
    NOTIFIER_STALLS.read().unwrap_or_else(|e| e.into_inner())
}

/// A block size charged exactly, not through the per-CPU stocks (larger than their batch).
fn big() -> usize {
    (memgroup::stock_batch() + 1).max(100_000)
}

/// A Vec<u8> whose buffer is exactly `size` bytes, or the allocator's refusal.
fn try_bytes(size: usize) -> Result<Vec<u8>, std::collections::TryReserveError> {
    let mut v = Vec::<u8>::new();
    v.try_reserve_exact(size)?;
    Ok(v)
}

fn index(level: Level) -> usize {
    match level {
        Level::Low => 0,
        Level::Medium => 1,
        Level::Critical => 2,
    }
}

/// What one subscription received: a count per level, and for each level the value of `round`
/// (set by the test before it causes a crossing) at its latest delivery.
#[derive(Default)]
struct Seen {
    counts: [AtomicUsize; 3],
    rounds: [AtomicUsize; 3],
    round: AtomicUsize,
}

impl Seen {
    fn record(&self, level: Level) {
        let i = index(level);
        self.rounds[i].fetch_max(self.round.load(SeqCst), SeqCst);
        self.counts[i].fetch_add(1, SeqCst);
    }

    fn get(&self, level: Level) -> usize {
        self.counts[index(level)].load(SeqCst)
    }

    /// [Low, Medium, Critical]
    fn counts(&self) -> [usize; 3] {
        [Level::Low, Level::Medium, Level::Critical].map(|l| self.get(l))
    }

    fn round_of(&self, level: Level) -> usize {
        self.rounds[index(level)].load(SeqCst)
    }

    /// Waits until `level` was delivered at least `n` times; fails the test otherwise.
    fn expect(&self, level: Level, n: usize, what: &str) {
        assert!(
            wait_until(|| self.get(level) >= n),
            "{what}: {level:?} delivered {} times, expected {n} (counts {:?})",
            self.get(level),
            self.counts()
        );
    }
}

/// Subscribes a `Seen` to `g`'s pressure.
fn watch(g: &Group) -> (Arc<Seen>, Subscription) {
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    let sub = g.on_pressure(move |level| s.record(level));
    (seen, sub)
}

/// A charge in `g` of `size` bytes that must be refused (inside `fallible`): it leaves usage
/// unchanged and raises Critical on the group whose `max` it hit.
fn refuse(g: &Group, size: usize) {
    assert!(
        g.run(|| fallible(|| Block::try_new(size, 1))).is_none(),
        "a fallible charge of {size} bytes over {}'s max must be refused",
        g.name()
    );
}

/// A cache of `chunk`-byte buffers charged to the group that filled it, and its shrinker's
/// counters.
struct Cache {
    chunk: usize,
    items: Mutex<Vec<Vec<u8>>>,
    /// Calls of any `Shrinker` method.
    calls: AtomicUsize,
    /// Calls of `shrink`.
    shrinks: AtomicUsize,
    /// Chunks freed by `shrink`.
    freed: AtomicUsize,
}

impl Cache {
    fn new(chunk: usize) -> Arc<Cache> {
        Arc::new(Cache {
            chunk,
            items: Mutex::new(Vec::new()),
            calls: AtomicUsize::new(0),
            shrinks: AtomicUsize::new(0),
            freed: AtomicUsize::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Vec<u8>>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    /// Adds `n` chunks charged to `g`. Each chunk is allocated outside the cache's lock, and
    /// only the chunks are charged to `g` (the list of them is the caller's).
    fn fill(&self, g: &Group, n: usize) {
        self.lock().reserve(n);
        for i in 0..n {
            let v = g.run(|| vec![i as u8 | 1; self.chunk]);
            self.lock().push(v);
        }
    }

    /// The insert path of the lock case: allocates the chunk while holding the cache's lock.
    fn insert_locked(&self) {
        let mut items = self.lock();
        items.push(vec![0x5A; self.chunk]);
    }

    /// Like `insert_locked`, for use inside `fallible`: false when the allocator refused.
    fn try_insert_locked(&self) -> bool {
        let mut items = self.lock();
        if items.try_reserve(1).is_err() {
            return false;
        }
        let mut v = Vec::new();
        if v.try_reserve_exact(self.chunk).is_err() {
            return false;
        }
        v.resize(self.chunk, 0x5A);
        items.push(v);
        true
    }

    fn shrinker(self: &Arc<Self>) -> CacheShrinker {
        CacheShrinker(self.clone())
    }

    fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }

    fn shrinks(&self) -> usize {
        self.shrinks.load(SeqCst)
    }

    fn freed_bytes(&self) -> usize {
        self.freed.load(SeqCst) * self.chunk
    }
}

struct CacheShrinker(Arc<Cache>);

impl Shrinker for CacheShrinker {
    fn chunk_size(&self) -> usize {
        self.0.calls.fetch_add(1, SeqCst);
        self.0.chunk
    }

    fn count(&self) -> usize {
        self.0.calls.fetch_add(1, SeqCst);
        self.0.len()
    }

    fn shrink(&self, chunks: usize) -> usize {
        self.0.calls.fetch_add(1, SeqCst);
        let mut items = self.0.lock();
        let n = chunks.min(items.len());
        for _ in 0..n {
            drop(items.pop());
        }
        drop(items);
        self.0.freed.fetch_add(n, SeqCst);
        self.0.shrinks.fetch_add(1, SeqCst);
        n
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Levels

#[test]
fn low_at_three_quarters_of_high_medium_above_high_critical_at_max() {
    let size = big();
    let c = block_cost(size, 1);
    let g = fresh("pr-levels");
    g.set_high(Some(4 * c));
    g.set_max(Some(6 * c));
    let (seen, _sub) = watch(&g);

    let mut held: Vec<Block> = (0..3).map(|_| g.run(|| Block::new(size, 1))).collect();
    assert_eq!(exact(&g).usage, 3 * c);
    refuse(&g, 4 * size);
    seen.expect(Level::Critical, 1, "a refused charge over max");
    assert_eq!(
        seen.counts(),
        [0, 0, 1],
        "usage at exactly 3/4 of high: no Low yet"
    );

    held.push(g.run(|| Block::new(size, 1)));
    assert_eq!(exact(&g).usage, 4 * c);
    seen.expect(Level::Low, 1, "usage passed 3/4 of high");
    refuse(&g, 4 * size);
    seen.expect(Level::Critical, 2, "a second refused charge");
    assert_eq!(seen.counts(), [1, 0, 2], "usage == high: no Medium yet");

    held.push(g.run(|| Block::new(size, 1)));
    seen.expect(Level::Medium, 1, "usage went above high");

    // Overcharged: the default policy forces an infallible charge above max.
    held.push(g.run(|| Block::new(2 * size, 1)));
    let s = exact(&g);
    assert!(s.usage > 6 * c, "the charge was forced above max: {s:?}");
    seen.expect(Level::Critical, 3, "an overcharge above max");
    refuse(&g, size);
    seen.expect(Level::Critical, 4, "a refused charge while above max");
    assert_eq!(seen.counts(), [1, 1, 4]);
    assert_eq!((s.events.max, s.events.fail, s.events.high), (3, 2, 1));
    drop(held);
}

#[test]
fn low_at_three_quarters_of_max_when_it_is_the_lowest_limit() {
    let size = big();
    let c = block_cost(size, 1);
    // No high; then a high above max: either way max is the lowest limit.
    for high in [None, Some(8 * c)] {
        let g = fresh("pr-lowmax");
        g.set_high(high);
        g.set_max(Some(4 * c));
        let (seen, _sub) = watch(&g);

        let mut held: Vec<Block> = (0..3).map(|_| g.run(|| Block::new(size, 1))).collect();
        refuse(&g, 2 * size);
        seen.expect(Level::Critical, 1, "refused over max");
        assert_eq!(
            seen.counts(),
            [0, 0, 1],
            "high {high:?}: usage at 3/4 of max, no Low yet"
        );

        held.push(g.run(|| Block::new(size, 1)));
        assert_eq!(exact(&g).usage, 4 * c, "fits max exactly");
        seen.expect(Level::Low, 1, "usage passed 3/4 of max");

        held.push(g.run(|| Block::new(size, 1)));
        seen.expect(Level::Critical, 2, "overcharged above max");
        assert_eq!(
            seen.counts(),
            [1, 0, 2],
            "high {high:?}: never above high, so never Medium"
        );

        // OnLimit::Fail refuses an infallible charge outside `fallible`: Critical too.
        g.set_on_limit(OnLimit::Fail);
        assert!(g.run(|| Block::try_new(size, 1)).is_none());
        seen.expect(Level::Critical, 3, "refused by OnLimit::Fail");
        assert_eq!(seen.counts(), [1, 0, 3]);
        drop(held);
    }
}

#[test]
fn child_pressure_reaches_ancestors_not_siblings() {
    let size = big();
    let c = block_cost(size, 1);
    let top = fresh("pr-family");
    let mid = fresh_child(&top, "mid");
    let child = fresh_child(&mid, "child");
    let sibling = fresh_child(&mid, "sibling");
    // The sibling's subscriber is registered first: a wrong delivery to it would be made no
    // later than the right ones to the others.
    let (sib, _s_sib) = watch(&sibling);
    let (on_top, _s_top) = watch(&top);
    let (on_mid, _s_mid) = watch(&mid);
    let (own, _s_own) = watch(&child);
    child.set_high(Some(4 * c));
    child.set_max(Some(6 * c));

    let mut held: Vec<Block> = (0..4).map(|_| child.run(|| Block::new(size, 1))).collect();
    on_mid.expect(Level::Low, 1, "the parent sees the child's Low");
    held.push(child.run(|| Block::new(size, 1)));
    on_mid.expect(Level::Medium, 1, "the parent sees the child's Medium");
    refuse(&child, 2 * size);
    for (seen, who) in [
        (&own, "the child"),
        (&on_mid, "its parent"),
        (&on_top, "its grandparent"),
    ] {
        seen.expect(Level::Critical, 1, who);
        seen.expect(Level::Medium, 1, who);
        seen.expect(Level::Low, 1, who);
        assert_eq!(seen.counts(), [1, 1, 1], "{who} sees each level once");
    }
    assert_eq!(sib.counts(), [0, 0, 0], "a sibling sees nothing");
    drop(held);
}

// ---------------------------------------------------------------------------------------------
// 2. Delivery: none lost, edge-triggered, coalesced

#[test]
fn many_groups_crossing_high_at_once_lose_no_notification() {
    const GROUPS: usize = 16;
    const ROUNDS: usize = 20;
    let size = big();
    let c = block_cost(size, 1);
    let groups: Vec<Group> = (0..GROUPS).map(|_| fresh("pr-many")).collect();
    let mut seens = Vec::new();
    let mut subs = Vec::new();
    for g in &groups {
        // Low at > 1.125c, Medium at > 1.5c: each round goes from c to 2c, crossing both once.
        g.set_high(Some(c + c / 2));
        let (seen, sub) = watch(g);
        seens.push(seen);
        subs.push(sub);
    }
    let start = Arc::new(Barrier::new(GROUPS + 1));
    let crossed = Arc::new(Barrier::new(GROUPS + 1));
    let release = Arc::new(Barrier::new(GROUPS + 1));
    let threads: Vec<_> = groups
        .iter()
        .map(|g| {
            let g = g.clone();
            let (start, crossed, release) = (start.clone(), crossed.clone(), release.clone());
            std::thread::spawn(move || {
                let base = g.run(|| Block::new(size, 1));
                for _ in 0..ROUNDS {
                    start.wait();
                    let over = g.run(|| Block::new(size, 1));
                    crossed.wait();
                    release.wait();
                    drop(over);
                }
                drop(base);
            })
        })
        .collect();
    for round in 1..=ROUNDS {
        for seen in &seens {
            seen.round.store(round, SeqCst);
        }
        start.wait();
        crossed.wait();
        for (i, seen) in seens.iter().enumerate() {
            for level in [Level::Low, Level::Medium] {
                assert!(
                    wait_until(|| seen.round_of(level) >= round),
                    "group {i}: the {level:?} of round {round} was never delivered (counts {:?})",
                    seen.counts()
                );
            }
        }
        release.wait();
    }
    for t in threads {
        t.join().expect("crossing thread");
    }
    for (i, (seen, g)) in seens.iter().zip(&groups).enumerate() {
        let s = exact(g);
        assert_eq!(
            s.events.high, ROUNDS as u64,
            "group {i} crossed high once a round"
        );
        assert_eq!(
            seen.counts(),
            [ROUNDS, ROUNDS, 0],
            "group {i}: one Low and one Medium per crossing, each delivered before the next"
        );
    }
    drop(subs);
}

/// `threads` threads in one group with `high` each charge one block of `size` (cost `c`) at
/// once, `rounds` times (freeing them in between): usage goes from 0 to `threads * c`
/// and stays there until every level of the round was delivered. `high` is crossed, and 3/4
/// of it, exactly once a round, whichever thread's charge does it.
fn cross_together(threads: usize, rounds: usize, size: usize, high: usize) {
    let c = block_cost(size, 1);
    let g = fresh("pr-together");
    g.set_high(Some(high));
    let (seen, _sub) = watch(&g);
    let start = Arc::new(Barrier::new(threads + 1));
    let crossed = Arc::new(Barrier::new(threads + 1));
    let release = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let g = g.clone();
            let start = start.clone();
            let (crossed, release) = (crossed.clone(), release.clone());
            std::thread::spawn(move || {
                for _ in 0..rounds {
                    start.wait();
                    let b = g.run(|| Block::new(size, 1));
                    crossed.wait();
                    release.wait();
                    drop(b);
                }
            })
        })
        .collect();
    let mut lost = Vec::new();
    for round in 1..=rounds {
        seen.round.store(round, SeqCst);
        start.wait();
        crossed.wait();
        if lost.is_empty() {
            assert_eq!(exact(&g).usage, threads * c);
            if !wait_until(|| {
                seen.round_of(Level::Medium) >= round && seen.round_of(Level::Low) >= round
            }) {
                lost = [Level::Low, Level::Medium]
                    .into_iter()
                    .filter(|&l| seen.round_of(l) < round)
                    .map(|l| (round, l))
                    .collect();
            }
        }
        release.wait();
    }
    for w in workers {
        w.join().expect("crossing thread");
    }
    let s = exact(&g);
    assert!(
        lost.is_empty(),
        "{threads} threads: usage went from 0 to {} (high {high}, each charge {c}) and stayed \
         there, but these levels were never delivered: {lost:?}; counts {:?}, events.high {} \
         after {rounds} rounds",
        threads * c,
        seen.counts(),
        s.events.high,
    );
    assert_eq!(
        seen.counts(),
        [rounds, rounds, 0],
        "{threads} threads, high {high}: one Low and one Medium per round"
    );
    assert_eq!(
        s.events.high, rounds as u64,
        "{threads} threads, high {high}: high was crossed exactly once per round"
    );
}

#[test]
fn threads_crossing_one_high_at_once_lose_no_notification() {
    // More threads than this machine's 2 cores: a thread is often preempted mid-charge.
    const THREADS: usize = 4;
    const ROUNDS: usize = 3000;
    let size = big();
    let c = block_cost(size, 1);
    // High crossed by the second charge of a round, then by the first.
    cross_together(THREADS, ROUNDS, size, c + c / 2);
    cross_together(THREADS, ROUNDS, size, c / 2);
}

#[test]
fn medium_is_edge_triggered() {
    let size = big();
    let c = block_cost(size, 1);
    let g = fresh("pr-edge");
    g.set_high(Some(2 * c));
    g.set_max(Some(8 * c));
    let (seen, _sub) = watch(&g);

    let mut held: Vec<Block> = (0..2).map(|_| g.run(|| Block::new(size, 1))).collect();
    seen.expect(Level::Low, 1, "usage 2c passed 3/4 of high");
    held.push(g.run(|| Block::new(size, 1)));
    seen.expect(Level::Medium, 1, "first crossing of high");

    // Staying above high while allocating more: no new Medium.
    for _ in 0..3 {
        held.push(g.run(|| Block::new(size, 1)));
    }
    assert_eq!(exact(&g).usage, 6 * c);
    refuse(&g, 4 * size);
    seen.expect(Level::Critical, 1, "barrier");
    assert_eq!(
        seen.counts(),
        [1, 1, 1],
        "more charges above high are not new crossings"
    );

    // Back to high (not below 3/4 of it), then across again: Medium again, not Low.
    held.truncate(2);
    assert_eq!(exact(&g).usage, 2 * c);
    held.push(g.run(|| Block::new(size, 1)));
    seen.expect(Level::Medium, 2, "second crossing of high");
    refuse(&g, 8 * size);
    seen.expect(Level::Critical, 2, "barrier");
    assert_eq!(seen.counts(), [1, 2, 2]);

    // Below 3/4 of high, then one charge across both thresholds: one Low and one Medium.
    held.truncate(1);
    held.push(g.run(|| Block::new(2 * size, 1)));
    seen.expect(Level::Medium, 3, "third crossing of high");
    seen.expect(Level::Low, 2, "second crossing of 3/4 of high");
    refuse(&g, 8 * size);
    seen.expect(Level::Critical, 3, "barrier");
    assert_eq!(seen.counts(), [2, 3, 3]);
    assert_eq!(exact(&g).events.high, 3);
    drop(held);
}

#[test]
fn crossings_are_coalesced_and_the_last_is_delivered() {
    const THREADS: usize = 4;
    const ITERATIONS: usize = 400;
    let size = big();
    let c = block_cost(size, 1);
    let g = fresh("pr-coalesce");
    g.set_high(Some(c + c / 2));
    let (seen, _sub) = watch(&g);
    // Threads allocate and free as fast as they can: high is crossed many times, faster than
    // the notifier delivers.
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let g = g.clone();
            std::thread::spawn(move || {
                for _ in 0..ITERATIONS {
                    let b = g.run(|| Block::new(size, 1));
                    drop(b);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("hammering thread");
    }
    assert_eq!(exact(&g).usage, 0);
    // One last crossing, after all the others: it must be delivered.
    seen.round.store(1, SeqCst);
    let held: Vec<Block> = (0..2).map(|_| g.run(|| Block::new(size, 1))).collect();
    for level in [Level::Low, Level::Medium] {
        assert!(
            wait_until(|| seen.round_of(level) >= 1),
            "the last crossing's {level:?} was never delivered (counts {:?})",
            seen.counts()
        );
    }
    // Every crossing of high here also crosses 3/4 of it (usage moves in steps of c).
    let crossings = exact(&g).events.high as usize;
    let [low, medium, critical] = seen.counts();
    assert!(
        medium >= 1 && medium <= crossings,
        "{medium} Medium deliveries for {crossings} crossings"
    );
    assert!(
        low >= 1 && low <= crossings,
        "{low} Low deliveries for {crossings} crossings"
    );
    assert_eq!(critical, 0);
    drop(held);
}

// ---------------------------------------------------------------------------------------------
// 3. reclaim

#[test]
fn reclaim_splits_in_proportion_across_shrinkers_and_descendants() {
    let g = fresh("pr-reclaim");
    let child = fresh_child(&g, "child");
    let other = fresh("pr-reclaim-other");
    let a = Cache::new(4096);
    a.fill(&g, 10);
    let b = Cache::new(4096);
    b.fill(&child, 30);
    let cc = Cache::new(8192);
    cc.fill(&g, 20);
    let d = Cache::new(4096);
    d.fill(&other, 10);
    let _ha = g.register_shrinker(a.shrinker());
    let _hb = child.register_shrinker(b.shrinker());
    let _hc = g.register_shrinker(cc.shrinker());
    let _hd = other.register_shrinker(d.shrinker());
    let caches = [(&a, "a on g"), (&b, "b on g's child"), (&cc, "c on g")];
    let held: Vec<usize> = caches.iter().map(|(k, _)| k.len() * k.chunk).collect();
    let total: usize = held.iter().sum();

    let ask = 100_000;
    // Live requested bytes (usage without the design's overhead): in the arena design a freed
    // block leaves its slab charged until the slab is empty, so only these fall by what was freed.
    let live_bytes = |s: memgroup::Stat| s.usage - s.overhead;
    let before = live_bytes(exact(&g));
    let freed = g.reclaim(ask);
    let after = live_bytes(exact(&g));
    let by_each: Vec<usize> = caches.iter().map(|(k, _)| k.freed_bytes()).collect();
    assert_eq!(
        freed,
        by_each.iter().sum::<usize>(),
        "reclaim returns the bytes the shrinkers freed"
    );
    assert!(freed >= ask, "asked for {ask}, freed {freed}");
    for (((k, who), &had), &got) in caches.iter().zip(&held).zip(&by_each) {
        let share = ask as f64 * had as f64 / total as f64;
        assert!(
            (got as f64 - share).abs() <= k.chunk as f64,
            "{who} held {had} of {total} bytes: its share of {ask} is {share:.0}, within a chunk \
             ({}), but it freed {got} (all freed: {by_each:?})",
            k.chunk
        );
    }
    assert!(
        before - after >= freed,
        "live bytes fell by {} but the shrinkers freed {freed}",
        before - after
    );
    assert_eq!(d.shrinks(), 0, "a shrinker outside the group is not asked");
    assert_eq!(d.len(), 10);

    // Reclaiming in the child asks only the child's shrinker.
    let (a0, c0, b0) = (a.freed_bytes(), cc.freed_bytes(), b.freed_bytes());
    let freed = child.reclaim(3 * 4096);
    assert_eq!(freed, 3 * 4096);
    assert_eq!(b.freed_bytes() - b0, freed);
    assert_eq!((a.freed_bytes(), cc.freed_bytes()), (a0, c0));

    // Asking for more than is held frees all of it.
    let left: usize = caches.iter().map(|(k, _)| k.len() * k.chunk).sum();
    assert_eq!(g.reclaim(10 * total), left);
    for (k, who) in caches {
        assert_eq!(k.len(), 0, "{who} gave everything back");
    }
    assert_eq!(g.reclaim(4096), 0, "nothing left to free");
    assert_eq!(d.len(), 10);
}

#[test]
fn reclaim_without_shrinkers_frees_nothing() {
    let g = fresh("pr-reclaim-none");
    let held = g.run(|| Block::new(big(), 1));
    assert_eq!(g.reclaim(1 << 20), 0, "no shrinker registered");
    let empty = Cache::new(4096);
    let h = g.register_shrinker(empty.shrinker());
    assert_eq!(g.reclaim(1 << 20), 0, "a shrinker holding nothing");
    assert_eq!(g.reclaim(0), 0);
    drop(h);
    let full = Cache::new(4096);
    full.fill(&g, 4);
    let h = g.register_shrinker(full.shrinker());
    drop(h);
    assert_eq!(g.reclaim(1 << 20), 0, "a dropped shrinker frees nothing");
    assert_eq!(full.len(), 4);
    drop(held);
}

// ---------------------------------------------------------------------------------------------
// 4. Direct reclaim

/// A group holding `chunks` chunks of a cache, with `max` = its usage + one chunk.
fn cache_at_max(prefix: &str, chunks: usize) -> (Group, Arc<Cache>) {
    let g = fresh(prefix);
    let cache = Cache::new(big());
    cache.fill(&g, chunks);
    let usage = exact(&g).usage;
    g.set_max(Some(usage + cache.chunk));
    (g, cache)
}

/// `requester` asks (inside `fallible`) for three chunks more than fit under `limited`'s max,
/// which holds a cache of `CHUNKS` chunks in `holder` with a shrinker: direct reclaim must make
/// room. Direct reclaim waits a bounded time for the notifier; under load (the other tests run
/// in parallel) that time can run out, so a refusal is retried, from the same state, once the
/// shrinker has run: direct reclaim that never makes room still fails every attempt.
fn direct_reclaim_makes_room(limited: &Group, holder: &Group, requester: &Group) {
    const CHUNKS: usize = 10;
    const ATTEMPTS: usize = 5;
    let cache = Cache::new(big());
    cache.fill(holder, CHUNKS);
    let max = exact(limited).usage + cache.chunk;
    limited.set_max(Some(max));
    let _h = holder.register_shrinker(cache.shrinker());
    let request = 3 * cache.chunk;
    let mut refused = 0;
    let v = loop {
        cache.fill(holder, CHUNKS - cache.len());
        assert!(
            exact(limited).usage + request > max,
            "the request does not fit"
        );
        let shrinks = cache.shrinks();
        match requester.run(|| fallible(|| try_bytes(request))) {
            Ok(v) => {
                assert!(
                    cache.shrinks() > shrinks,
                    "the charge fit only because the shrinker ran"
                );
                break v;
            }
            Err(_) => {
                refused += 1;
                assert!(
                    wait_until(|| cache.shrinks() > shrinks),
                    "a refused charge over max never asked the shrinker"
                );
                assert!(
                    refused < ATTEMPTS,
                    "direct reclaim never made room in {ATTEMPTS} attempts (the shrinker freed \
                     {} bytes in all)",
                    cache.freed_bytes()
                );
                eprintln!("direct reclaim: attempt {refused} refused, retrying");
            }
        }
    };
    assert_eq!(v.capacity(), request);
    let s = exact(limited);
    assert!(s.usage <= max, "usage {} within max {max}", s.usage);
    assert!(cache.len() < CHUNKS, "the cache gave memory back");
    drop(v);
}

#[test]
fn fallible_charge_over_max_succeeds_when_direct_reclaim_makes_room() {
    let _gate = needs_notifier();
    // Without a shrinker, a request of three chunks does not fit.
    let (plain, plain_cache) = cache_at_max("pr-direct-plain", 10);
    let request = 3 * plain_cache.chunk;
    let r = plain.run(|| fallible(|| try_bytes(request)));
    assert!(
        r.is_err(),
        "{request} bytes over max must fail without reclaim"
    );
    assert_eq!(plain_cache.len(), 10);
    drop(r);

    // With one, it fits.
    let g = fresh("pr-direct");
    direct_reclaim_makes_room(&g, &g, &g);
}

#[test]
fn direct_reclaim_asks_the_shrinkers_under_the_limit_that_was_hit() {
    let _gate = needs_notifier();
    // The limit is the parent's; the cache is in one child; the request comes from another.
    let parent = fresh("pr-direct-tree");
    let holder = fresh_child(&parent, "holder");
    let requester = fresh_child(&parent, "requester");
    direct_reclaim_makes_room(&parent, &holder, &requester);
}

#[test]
fn direct_reclaim_serves_groups_at_their_max_at_once() {
    let _gate = needs_notifier();
    const GROUPS: usize = 8;
    const CHUNKS: usize = 10;
    const ROUNDS: usize = 5;
    let setups: Vec<(Group, Arc<Cache>, ShrinkerHandle)> = (0..GROUPS)
        .map(|_| {
            let (g, cache) = cache_at_max("pr-direct-many", CHUNKS);
            let h = g.register_shrinker(cache.shrinker());
            (g, cache, h)
        })
        .collect();
    let request = 3 * setups[0].1.chunk;
    for round in 0..ROUNDS {
        for (g, cache, _) in &setups {
            cache.fill(g, CHUNKS - cache.len());
        }
        // Each group's request fits only once its own cache shrinks; they all come at once.
        let start = Arc::new(Barrier::new(GROUPS));
        let threads: Vec<_> = setups
            .iter()
            .map(|(g, _, _)| {
                let (g, start) = (g.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    g.run(|| fallible(|| try_bytes(request))).is_ok()
                })
            })
            .collect();
        let ok: Vec<bool> = threads
            .into_iter()
            .map(|t| t.join().expect("requesting thread"))
            .collect();
        let shrinks: Vec<usize> = setups.iter().map(|(_, c, _)| c.shrinks()).collect();
        assert!(
            ok.iter().all(|&ok| ok),
            "round {round}: some requests were refused although direct reclaim in their own \
             group would have made room: {ok:?} (shrink calls per group: {shrinks:?})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Background reclaim

#[test]
fn background_reclaim_brings_usage_back_to_high() {
    let g = fresh("pr-background");
    let cache = Cache::new(big());
    cache.fill(&g, 8);
    let high = exact(&g).usage + cache.chunk / 2;
    g.set_high(Some(high));
    let (seen, _sub) = watch(&g);
    let _h = g.register_shrinker(cache.shrinker());
    // One charge takes usage well above high; the cache must give back the difference.
    let over = g.run(|| Block::new(3 * cache.chunk, 1));
    let peak = exact(&g).peak;
    assert!(peak > high + 2 * cache.chunk, "peak {peak}, high {high}");
    seen.expect(Level::Medium, 1, "crossed high");
    let mut usage = peak;
    assert!(
        wait_until(|| {
            usage = exact(&g).usage;
            usage <= high
        }),
        "usage {usage} (peak {peak}) never came back to high {high}; the shrinker freed {} bytes",
        cache.freed_bytes()
    );
    assert!(cache.len() > 0, "only what was over high was reclaimed");
    drop(over);
}

/// Lowers a limit below a group's usage with `set` and checks that its shrinkers bring usage
/// down to it with no further charge (live limits, as writing `memory.high`/`memory.max`).
fn lowering_a_limit_reclaims_at_once(prefix: &str, set: impl Fn(&Group, Option<usize>)) {
    let _n = needs_notifier();
    let g = fresh(prefix);
    let cache = Cache::new(big());
    cache.fill(&g, 8);
    let _h = g.register_shrinker(cache.shrinker());
    let before = exact(&g).usage;
    let target = before - 3 * cache.chunk - cache.chunk / 2;
    set(&g, Some(target));
    let mut usage = before;
    assert!(
        wait_until(|| {
            usage = exact(&g).usage;
            usage <= target
        }),
        "usage {usage} (before {before}) never came down to the new limit {target}; \
         the shrinker freed {} bytes",
        cache.freed_bytes()
    );
    assert!(
        cache.len() >= 4,
        "only what was over the limit was reclaimed: {} left",
        cache.len()
    );
    // Raising the limit again above usage reclaims nothing more.
    let freed = cache.freed_bytes();
    set(&g, Some(usage + 4 * cache.chunk));
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(
        cache.freed_bytes(),
        freed,
        "a limit above usage asked for reclaim"
    );
}

#[test]
fn lowering_high_below_usage_reclaims_at_once() {
    lowering_a_limit_reclaims_at_once("pr-live-high", |g, v| g.set_high(v));
}

#[test]
fn lowering_max_below_usage_reclaims_at_once() {
    lowering_a_limit_reclaims_at_once("pr-live-max", |g, v| g.set_max(v));
}

// ---------------------------------------------------------------------------------------------
// 6. Unregistering

#[test]
fn dropped_shrinker_is_never_called_again() {
    let g = fresh("pr-dropped");
    let chunk = big();
    let dead = Cache::new(chunk);
    dead.fill(&g, 4);
    let h_dead = g.register_shrinker(dead.shrinker());
    // Registered after the dropped one: if the dropped one were still asked, it would be asked
    // no later than this one.
    let live = Cache::new(chunk);
    live.fill(&g, 12);
    let _h_live = g.register_shrinker(live.shrinker());
    assert!(g.reclaim(1) > 0);
    assert!(dead.calls() > 0, "registered, it was asked");
    drop(h_dead);
    let calls = dead.calls();
    let dead_len = dead.len();

    // Explicit reclaim.
    assert!(g.reclaim(chunk) >= chunk);
    // Background reclaim: cross high.
    let shrinks = live.shrinks();
    g.set_high(Some(exact(&g).usage));
    let over = g.run(|| Block::new(chunk, 1));
    assert!(
        wait_until(|| live.shrinks() > shrinks),
        "background reclaim never ran"
    );
    drop(over);
    g.set_high(None);
    // Direct reclaim: a fallible charge over max.
    let shrinks = live.shrinks();
    g.set_max(Some(exact(&g).usage + chunk / 2));
    let r = g.run(|| fallible(|| try_bytes(chunk)));
    assert!(
        wait_until(|| live.shrinks() > shrinks),
        "direct reclaim never ran"
    );
    drop(r);

    assert_eq!(dead.calls(), calls, "the dropped shrinker was called");
    assert_eq!(dead.len(), dead_len, "the dropped shrinker freed memory");
}

#[test]
fn dropped_subscription_is_never_called_again() {
    let size = big();
    let g = fresh("pr-unsub");
    g.set_high(Some(size));
    let (dropped, sub) = watch(&g);
    let (kept, _kept_sub) = watch(&g);
    drop(sub);
    let held = g.run(|| Block::new(2 * size, 1));
    kept.expect(Level::Medium, 1, "the kept subscription");
    kept.expect(Level::Low, 1, "the kept subscription");
    assert_eq!(
        dropped.counts(),
        [0, 0, 0],
        "the dropped subscription was called"
    );
    drop(held);
}

/// A shrinker that drops its own handle from inside `shrink`.
struct SelfDropping {
    cache: Arc<Cache>,
    handle: Arc<Mutex<Option<ShrinkerHandle>>>,
}

impl Shrinker for SelfDropping {
    fn chunk_size(&self) -> usize {
        self.cache.shrinker().chunk_size()
    }
    fn count(&self) -> usize {
        self.cache.shrinker().count()
    }
    fn shrink(&self, chunks: usize) -> usize {
        let n = self.cache.shrinker().shrink(chunks);
        let handle = self.handle.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(handle);
        n
    }
}

fn self_dropping(g: &Group, cache: &Arc<Cache>) -> Arc<Mutex<Option<ShrinkerHandle>>> {
    let slot = Arc::new(Mutex::new(None));
    let h = g.register_shrinker(SelfDropping {
        cache: cache.clone(),
        handle: slot.clone(),
    });
    *slot.lock().unwrap() = Some(h);
    slot
}

#[test]
fn shrinker_dropping_its_handle_inside_shrink_does_not_deadlock() {
    let chunk = big();
    // From Group::reclaim, on the caller's thread.
    let g = fresh("pr-selfdrop");
    let cache = Cache::new(chunk);
    cache.fill(&g, 6);
    let slot = self_dropping(&g, &cache);
    let g2 = g.clone();
    let freed = finishes("reclaim with a self-dropping shrinker", 5, move || {
        g2.reclaim(chunk)
    });
    assert!(freed >= chunk);
    assert!(slot.lock().unwrap().is_none(), "the handle was dropped");
    let calls = cache.calls();
    let g2 = g.clone();
    assert_eq!(
        finishes("reclaim after the drop", 5, move || g2.reclaim(chunk)),
        0
    );
    assert_eq!(
        cache.calls(),
        calls,
        "never called after its handle was dropped"
    );

    // From background reclaim, on the notifier.
    let g = fresh("pr-selfdrop-bg");
    let cache = Cache::new(chunk);
    cache.fill(&g, 6);
    let slot = self_dropping(&g, &cache);
    let other = Cache::new(chunk);
    other.fill(&g, 6);
    let _h_other = g.register_shrinker(other.shrinker());
    let (seen, _sub) = watch(&g);
    let high = exact(&g).usage;
    g.set_high(Some(high));
    let over = g.run(|| Block::new(2 * chunk, 1));
    assert!(
        wait_until(|| slot.lock().unwrap().is_none()),
        "background reclaim never asked the self-dropping shrinker"
    );
    seen.expect(Level::Medium, 1, "first crossing");
    let calls = cache.calls();
    let shrinks = other.shrinks();
    // The notifier is still alive: a second crossing is delivered and reclaimed, without the
    // dropped shrinker.
    drop(over);
    g.set_high(Some(exact(&g).usage));
    let over = g.run(|| Block::new(2 * chunk, 1));
    seen.expect(
        Level::Medium,
        2,
        "the notifier survived a shrinker dropping itself",
    );
    assert!(
        wait_until(|| other.shrinks() > shrinks),
        "the second background reclaim never ran"
    );
    assert_eq!(
        cache.calls(),
        calls,
        "never called after its handle was dropped"
    );
    drop(over);
}

#[test]
fn subscription_dropped_inside_its_callback_does_not_deadlock() {
    let size = big();
    let g = fresh("pr-selfunsub");
    g.set_high(Some(size));
    let slot: Arc<Mutex<Option<Subscription>>> = Arc::new(Mutex::new(None));
    let calls = Arc::new(AtomicUsize::new(0));
    let (s, n) = (slot.clone(), calls.clone());
    let sub = g.on_pressure(move |_| {
        n.fetch_add(1, SeqCst);
        let sub = s.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(sub);
    });
    *slot.lock().unwrap() = Some(sub);
    let (later, _later_sub) = watch(&g);
    let held = g.run(|| Block::new(2 * size, 1));
    later.expect(
        Level::Medium,
        1,
        "the notifier survived a callback unsubscribing itself",
    );
    assert!(slot.lock().unwrap().is_none());
    assert_eq!(calls.load(SeqCst), 1, "called once (for Low), then gone");
    refuse_after_max(&g, size, &later);
    assert_eq!(calls.load(SeqCst), 1);
    drop(held);
}

#[test]
fn callback_that_unsubscribes_itself_and_reclaims() {
    // A one-shot callback: on its first level it drops its own subscription and reclaims.
    let size = big();
    let g = fresh("pr-oneshot");
    let cache = Cache::new(size);
    cache.fill(&g, 8);
    let _h = g.register_shrinker(cache.shrinker());
    let usage = exact(&g).usage;
    g.set_high(Some(2 * usage));
    let slot: Arc<Mutex<Option<Subscription>>> = Arc::new(Mutex::new(None));
    let calls = Arc::new(AtomicUsize::new(0));
    let freed_inside = Arc::new(AtomicUsize::new(0));
    let (s, n, f, g2) = (slot.clone(), calls.clone(), freed_inside.clone(), g.clone());
    let sub = g.on_pressure(move |_| {
        n.fetch_add(1, SeqCst);
        let sub = s.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(sub);
        f.fetch_add(g2.reclaim(size), SeqCst);
    });
    *slot.lock().unwrap() = Some(sub);
    let (later, _later_sub) = watch(&g);
    // One charge crosses 3/4 of high and high: two levels delivered together.
    let held = g.run(|| Block::new(usage * 3 / 2, 1));
    later.expect(Level::Medium, 1, "the later subscription");
    later.expect(Level::Low, 1, "the later subscription");
    assert!(slot.lock().unwrap().is_none(), "the callback ran");
    let (calls, freed_inside) = (calls.load(SeqCst), freed_inside.load(SeqCst));
    // The group's shrinker is still registered, and still asked.
    let shrinks = cache.shrinks();
    let freed_after = g.reclaim(size);
    let state = format!(
        "callback calls {calls}, reclaim inside it freed {freed_inside}, reclaim afterwards \
         freed {freed_after} (shrink calls {shrinks} -> {})",
        cache.shrinks()
    );
    assert_eq!(
        calls, 1,
        "a subscription dropped inside its callback was called again: {state}"
    );
    assert!(freed_inside >= size, "{state}");
    assert!(
        freed_after >= size,
        "the group's shrinker no longer frees anything: {state}"
    );
    drop(held);
}

/// Sets `g`'s max at its usage, refuses a charge and waits for `seen` to get the Critical.
fn refuse_after_max(g: &Group, size: usize, seen: &Seen) {
    let n = seen.get(Level::Critical);
    g.set_max(Some(exact(g).usage));
    refuse(g, size);
    seen.expect(Level::Critical, n + 1, "barrier");
}

// ---------------------------------------------------------------------------------------------
// 7. The lock case

#[test]
fn allocating_under_a_lock_the_shrinker_needs_does_not_hang() {
    let _gate = stalls_notifier();
    let chunk = big();
    const INSERTS: usize = 16;
    type Insert = fn(&Group, &Cache) -> usize;
    let cases: [(&str, Insert); 4] = [
        ("overcharge, lock per insert", |g, cache| {
            g.run(|| (0..INSERTS).for_each(|_| cache.insert_locked()));
            INSERTS
        }),
        ("fallible, lock per insert", |g, cache| {
            g.run(|| fallible(|| (0..INSERTS).filter(|_| cache.try_insert_locked()).count()))
        }),
        ("overcharge, lock held for all inserts", |g, cache| {
            let mut items = cache.lock();
            items.reserve(INSERTS);
            g.run(|| (0..INSERTS).for_each(|_| items.push(vec![0x5A; cache.chunk])));
            INSERTS
        }),
        ("fallible, lock held for all inserts", |g, cache| {
            let mut items = cache.lock();
            items.reserve(INSERTS);
            g.run(|| {
                fallible(|| {
                    let mut n = 0;
                    for _ in 0..INSERTS {
                        let mut v = Vec::new();
                        if v.try_reserve_exact(cache.chunk).is_ok() {
                            v.resize(cache.chunk, 0x5A);
                            items.push(v);
                            n += 1;
                        }
                    }
                    n
                })
            })
        }),
    ];
    for (what, insert) in cases {
        let g = fresh("pr-lock");
        g.set_max(Some(4 * chunk));
        let cache = Cache::new(chunk);
        let _h = g.register_shrinker(cache.shrinker());
        let (seen, _sub) = watch(&g);
        let (g2, cache2) = (g.clone(), cache.clone());
        let inserted = finishes(what, 5, move || insert(&g2, &cache2));
        assert!(inserted >= 3, "{what}: {inserted} inserts went in");
        let s = exact(&g);
        assert!(s.events.max >= 1, "{what}: the inserts hit max: {s:?}");
        assert!(
            wait_until(|| cache.shrinks() > 0),
            "{what}: the shrinker never ran once the lock was free (calls {}, cache {} chunks, \
             {:?})",
            cache.calls(),
            cache.len(),
            exact(&g)
        );
        seen.expect(Level::Critical, 1, what);
    }
}

// ---------------------------------------------------------------------------------------------
// 8. Throttling

/// The curve of src/pressure.rs: ((usage - high) / high)^2 seconds, capped at 2 s.
fn curve(usage: usize, high: usize) -> f64 {
    let over = (usage - high) as f64 / high as f64;
    (over * over).min(2.0)
}

#[test]
fn throttle_delay_grows_with_the_square_of_the_overage() {
    let size = big();
    let g = fresh("pr-throttle");
    let held: Vec<Block> = (0..4).map(|_| g.run(|| Block::new(size, 1))).collect();
    let usage = exact(&g).usage;
    assert_eq!(g.throttle_delay(), Duration::ZERO, "no high");
    for high in [usage, usage + 1, 2 * usage] {
        g.set_high(Some(high));
        assert_eq!(
            g.throttle_delay(),
            Duration::ZERO,
            "usage {usage} <= high {high}"
        );
    }
    let delay = |high: usize| {
        g.set_high(Some(high));
        g.flush();
        g.throttle_delay().as_secs_f64()
    };
    // 25% and 50% over high: 1/16 s and 1/4 s.
    let (h1, h2) = (usage * 4 / 5, usage * 2 / 3);
    let (d1, d2) = (delay(h1), delay(h2));
    assert!((d1 - curve(usage, h1)).abs() < 1e-6, "25% over: {d1} s");
    assert!((d2 - curve(usage, h2)).abs() < 1e-6, "50% over: {d2} s");
    assert!((d1 - 0.0625).abs() < 0.001 && (d2 - 0.25).abs() < 0.001);
    assert!(
        (d2 / d1 - 4.0).abs() < 0.05,
        "twice the overage, four times the delay"
    );
    // 100% over: 1 s; 150% and 300% over: capped at 2 s.
    assert!((delay(usage / 2) - curve(usage, usage / 2)).abs() < 1e-6);
    assert_eq!(delay(usage * 2 / 5), 2.0);
    assert_eq!(delay(usage / 4), 2.0, "capped at 2 s");

    // throttle() sleeps that long, and not at all at or below high.
    g.set_high(Some(h1));
    let start = Instant::now();
    g.throttle();
    assert!(
        start.elapsed().as_secs_f64() >= d1,
        "throttle slept {:?}",
        start.elapsed()
    );
    g.set_high(Some(usage));
    g.throttle();
    drop(held);
}
