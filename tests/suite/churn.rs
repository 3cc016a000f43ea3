// Thread churn: 10,000 short-lived threads (a blocking pool growing and shrinking), each
// allocating in its own group or a shared one, their memory freed later by threads of later
// waves; counters exact and the process's resident memory bounded. And fork() in a loop while
// two threads churn threads of their own: each child allocates, flushes, checks exact figures
// and exits cleanly.

include!("common.rs");

use common::{exact, fresh, fresh_child, live, resident, wait_child};
use common::{Block, Rng};
use memgroup::{dying_groups, Group};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Threads in the churn, started in waves of `WAVE` (all of a wave run at once).
const THREADS: usize = 10_000;
const WAVE: usize = 64;
/// Blocks each churn thread allocates; it frees half of them itself and leaves the other half
/// to a thread of a later wave.
const BLOCKS: usize = 96;
/// The growth allowed between the 2,000th and the 10,000th thread, of the resident memory not
/// held by the arena's pool (see `held`): medians over `WINDOW` waves from the 2,000th thread
/// on and over the last `WINDOW` waves, so that the memory in flight in one wave (more of it
/// when the machine is busy and a wave's threads overlap less) does not count as growth.
const GROWTH: usize = 4 << 20;
const WINDOW: usize = 15;
/// The resident-memory growth allowed over the whole churn (the arena's pool included).
const TOTAL: usize = 24 << 20;

/// The resident memory the arena's pool keeps for reuse (empty slabs, up to
/// `MEMGROUP_ARENA_POOL` and a batch per slab size waiting to be given back: bounded by its
/// configuration, and filled and emptied in steps of megabytes), 0 under the tag design.
fn pooled() -> usize {
    #[cfg(feature = "arena")]
    return memgroup::arena_footprint().pooled_resident;
    #[cfg(not(feature = "arena"))]
    0
}

/// The resident memory, less what the arena's pool keeps.
fn held() -> usize {
    resident().saturating_sub(pooled())
}

/// The size of the block each thread of the shared group leaves for the end of the churn.
const KEPT: usize = 100;

fn median(v: &[usize]) -> usize {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[v.len() / 2]
}

/// One churn thread's work: takes up to two batches another thread left and frees them, then
/// allocates `BLOCKS` blocks in `g` (a few large ones among small ones of many size classes),
/// frees every other one and leaves the rest for a later thread. With `keep`, one more block
/// of `KEPT` bytes goes there, to live until the end of the churn (a connection's state, a
/// cache entry: memory that outlives the thread that made it). Returns the blocks allocated.
fn churn_one(
    seed: u64,
    g: &Group,
    inbox: &Mutex<VecDeque<Vec<Block>>>,
    keep: Option<&Mutex<Vec<Block>>>,
) -> usize {
    let mut rng = Rng::new(seed);
    for _ in 0..2 {
        let batch = inbox.lock().unwrap().pop_front();
        drop(batch);
    }
    // Both vectors are the root's: only the blocks are allocated inside `g`.
    let mut mine = Vec::with_capacity(BLOCKS);
    let mut left = Vec::with_capacity(BLOCKS);
    g.run(|| {
        for i in 0..BLOCKS {
            let size = if rng.one_in(32) {
                rng.range(9000, 40_000)
            } else {
                rng.range(1, 3000)
            };
            let align = if rng.one_in(4) { 16 } else { 8 };
            let b = std::hint::black_box(Block::new(size, align));
            if i % 2 == 0 {
                mine.push(b);
            } else {
                left.push(b);
            }
        }
    });
    drop(mine);
    inbox.lock().unwrap().push_back(left);
    let Some(keep) = keep else {
        return BLOCKS;
    };
    let kept = g.run(|| std::hint::black_box(Block::new(KEPT, 8)));
    keep.lock().unwrap().push(kept);
    BLOCKS + 1
}

/// Runs `THREADS` threads in waves; even threads allocate in `shared` (and keep a block there
/// until the end), odd ones in a group of their own under `tenant`, which they remove before
/// they exit (its memory still held, freed later by others). Returns (blocks allocated in
/// `shared`, in the own groups, resident bytes at the start, the most seen, and at the end,
/// and the medians of the resident bytes not in the arena's pool over `WINDOW` waves from the
/// 2,000th thread on and over the last `WINDOW` waves).
fn churn(shared: &Group, tenant: &Group) -> (usize, usize, [usize; 5]) {
    let inbox = Arc::new(Mutex::new(VecDeque::<Vec<Block>>::new()));
    let keep = Arc::new(Mutex::new(Vec::<Block>::with_capacity(THREADS / 2)));
    let in_shared = Arc::new(AtomicUsize::new(0));
    let in_own = Arc::new(AtomicUsize::new(0));
    let start = resident();
    let mut most_rss = 0;
    // The resident bytes outside the arena's pool after each wave from the 2,000th thread on.
    let mut net = Vec::with_capacity(THREADS / WAVE);
    let mut started = 0;
    while started < THREADS {
        let wave: Vec<_> = (started..(started + WAVE).min(THREADS))
            .map(|i| {
                let (inbox, keep) = (inbox.clone(), keep.clone());
                let (shared, tenant) = (shared.clone(), tenant.clone());
                let (in_shared, in_own) = (in_shared.clone(), in_own.clone());
                std::thread::spawn(move || {
                    if i % 2 == 0 {
                        let n = churn_one(i as u64, &shared, &inbox, Some(&keep));
                        in_shared.fetch_add(n, Ordering::Relaxed);
                    } else {
                        let own = fresh_child(&tenant, "own");
                        let n = churn_one(i as u64, &own, &inbox, None);
                        in_own.fetch_add(n, Ordering::Relaxed);
                        own.remove().expect("removing the thread's own group");
                    }
                })
            })
            .collect();
        started += wave.len();
        for t in wave {
            t.join().expect("churn thread");
        }
        most_rss = most_rss.max(resident());
        if started >= 2000 {
            net.push(held());
        }
    }
    let end = resident();
    #[cfg(feature = "arena")]
    eprintln!("churn: arena {:?}", memgroup::arena_footprint());
    // What the last waves left, and the blocks kept.
    let rest: Vec<_> = inbox.lock().unwrap().drain(..).collect();
    drop(rest);
    let kept = std::mem::take(&mut *keep.lock().unwrap());
    assert_eq!(kept.len(), THREADS / 2);
    drop(kept);
    (
        in_shared.load(Ordering::Relaxed),
        in_own.load(Ordering::Relaxed),
        [start, most_rss, end, median(&net[..WINDOW]), median(&net[net.len() - WINDOW..])],
    )
}

child_test! {
    /// Alone in a process, so the resident memory is the churn's own.
    fn ten_thousand_short_lived_threads_leave_exact_counters_and_bounded_memory => thread_churn_inner() {
        let dying0 = dying_groups();
        let shared = fresh("churn-shared");
        let tenant = fresh("churn-tenant");
        let (n_shared, n_own, [start, most_rss, end, at_2000, late]) = churn(&shared, &tenant);
        eprintln!(
            "churn: resident {} KiB at the start, at most {} KiB, {} KiB after {THREADS} threads; \
             outside the arena's pool (medians of {WINDOW} waves) {} KiB from 2,000 threads, {} KiB \
             at the end",
            start >> 10,
            most_rss >> 10,
            end >> 10,
            at_2000 >> 10,
            late >> 10,
        );
        assert_eq!(
            (n_shared, n_own),
            (THREADS / 2 * (BLOCKS + 1), THREADS / 2 * BLOCKS)
        );
        // Every block was allocated inside its group, and every one is freed.
        let s = exact(&shared);
        assert_eq!(
            (s.usage, s.kmem, s.overhead, s.allocs, s.frees),
            (0, 0, 0, n_shared as u64, n_shared as u64),
            "the shared group after the churn: {s:?}"
        );
        let t = exact(&tenant);
        assert_eq!(
            (t.usage, t.kmem, t.overhead, t.allocs, t.frees),
            (0, 0, 0, n_own as u64, n_own as u64),
            "the tenant of the threads' own groups after the churn: {t:?}"
        );
        assert!(
            tenant.children().is_empty(),
            "every own group was removed"
        );
        assert_eq!(
            dying_groups(),
            dying0,
            "the removed groups' records went with their last byte"
        );
        assert!(
            late.saturating_sub(at_2000) < GROWTH,
            "resident memory (outside the arena's pool) grew by {} KiB between 2,000 and {THREADS} \
             threads",
            late.saturating_sub(at_2000) >> 10
        );
        assert!(
            most_rss - start < TOTAL,
            "resident memory grew by {} KiB over the churn",
            (most_rss - start) >> 10
        );
        let root = exact(&Group::root());
        assert_eq!(root.allocs - root.frees, live(&root), "sanity");
        shared.remove().unwrap();
        tenant.remove().unwrap();
    }
}

/// Runs `f` on a thread started with `pthread_create`, and returns what it returned (`None` if
/// it panicked or no thread could start). A forked child of this multi-threaded test cannot use
/// `std::thread::spawn`: a new std thread takes a lock of std's own (the thread-info map of its
/// stack-overflow handler) that a parent thread starting a thread at the fork may hold, and the
/// child then hangs there (seen: 2 children in 80 runs of this test, stuck in std's
/// `set_current_info`). glibc's `pthread_create` is safe after fork.
fn on_a_raw_thread<T: Send>(f: impl FnOnce() -> T + Send) -> Option<T> {
    struct Job<F, T> {
        f: Option<F>,
        out: Option<T>,
    }
    extern "C" fn start<F: FnOnce() -> T, T>(arg: *mut libc::c_void) -> *mut libc::c_void {
        // SAFETY: `arg` is the `Job` below, which outlives the thread (joined before it goes)
        // and which no other thread touches meanwhile.
        let job = unsafe { &mut *arg.cast::<Job<F, T>>() };
        if let Some(f) = job.f.take() {
            job.out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok();
        }
        std::ptr::null_mut()
    }
    fn run<F: FnOnce() -> T, T>(f: F) -> Option<T> {
        let mut job = Job { f: Some(f), out: None };
        let mut tid: libc::pthread_t = 0;
        // SAFETY: `start` matches the job type; the job lives until the join below.
        let rc = unsafe {
            libc::pthread_create(
                &mut tid,
                std::ptr::null(),
                start::<F, T>,
                (&raw mut job).cast(),
            )
        };
        if rc != 0 {
            return None;
        }
        // SAFETY: `tid` is a joinable thread started above, joined once.
        if unsafe { libc::pthread_join(tid, std::ptr::null_mut()) } != 0 {
            return None;
        }
        job.out
    }
    run(f)
}

/// What a forked child does: spawns a thread (which may take over a heap the parent's other
/// threads left behind), allocates in a group made before the fork and in one of its own,
/// and checks exact figures after each flush. No panic escapes.
fn forked_child_work(pre: &Group, i: usize) -> bool {
    let run = || -> bool {
        let before = exact(pre);
        let mut ok = (before.usage, live(&before)) == (0, 0);
        let pre2 = pre.clone();
        let Some(blocks) = on_a_raw_thread(move || {
            let blocks: Vec<Block> = Vec::with_capacity(60);
            let mut blocks = std::hint::black_box(blocks);
            pre2.run(|| {
                for k in 1..=60usize {
                    blocks.push(Block::filled(k * 37, 5));
                }
            });
            blocks
        }) else {
            return false;
        };
        let requested: usize = blocks.iter().map(Block::size).sum();
        let s = exact(pre);
        ok &= s.usage == requested + s.overhead && live(&s) == 60 && s.allocs == 60;
        drop(blocks);
        let s = exact(pre);
        ok &= (s.usage, s.kmem, s.overhead, live(&s), s.frees) == (0, 0, 0, 0, 60);
        let Ok(g) = Group::new(&format!("forked-{i}-{}", std::process::id())) else {
            return false;
        };
        let v: Vec<Vec<u8>> = g.run(|| {
            (1..=30usize)
                .map(|k| std::hint::black_box(vec![7u8; k * 101]))
                .collect()
        });
        let s = exact(&g);
        ok &= live(&s) == 31 && s.usage >= (1..=30usize).map(|k| k * 101).sum::<usize>();
        drop(v);
        let s = exact(&g);
        ok &= (s.usage, s.overhead, live(&s)) == (0, 0, 0);
        ok &= g.remove().is_ok();
        ok
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or(false)
}

#[test]
fn fork_in_a_loop_while_two_threads_churn_threads() {
    let pre = fresh("churn-prefork");
    let stop = Arc::new(AtomicBool::new(false));
    let inbox = Arc::new(Mutex::new(VecDeque::<Vec<Block>>::new()));
    // Two threads, each starting short-lived threads one after another (allocating in a group,
    // leaving half of their blocks to a later one), and allocating themselves meanwhile.
    let churners: Vec<_> = (0..2u64)
        .map(|c| {
            let (stop, inbox) = (stop.clone(), inbox.clone());
            let g = fresh("churn-fork");
            std::thread::spawn(move || {
                let mut rng = Rng::new(c);
                let mut n = 0u64;
                let mut held = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let (g2, inbox2) = (g.clone(), inbox.clone());
                    let t = std::thread::spawn(move || churn_one(c * 1_000_000 + n, &g2, &inbox2, None));
                    g.run(|| held.push(Block::new(rng.range(1, 5000), 8)));
                    if held.len() > 40 {
                        held.clear();
                    }
                    t.join().expect("short-lived thread");
                    n += 1;
                }
                drop(held);
                (g, n)
            })
        })
        .collect();
    for i in 0..20 {
        // SAFETY: the child runs `forked_child_work` (allocation and thread creation, which
        // the allocator and glibc support after fork) and leaves with _exit, never returning
        // into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let ok = forked_child_work(&pre, i);
            // SAFETY: _exit is async-signal-safe and skips atexit handlers and destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let status = wait_child(pid, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("forked child {i} hung (a lock held across fork?)"));
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "forked child {i} failed: status {status:#x}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    let groups: Vec<(Group, u64)> = churners.into_iter().map(|h| h.join().unwrap()).collect();
    let rest: Vec<_> = inbox.lock().unwrap().drain(..).collect();
    drop(rest);
    for (g, n) in groups {
        assert!(n > 0, "the churner started threads");
        let s = exact(&g);
        assert_eq!(
            (s.usage, s.kmem, s.overhead, live(&s)),
            (0, 0, 0, 0),
            "{} after the churn: {s:?}",
            g.name()
        );
        assert!(s.allocs >= n * BLOCKS as u64);
        g.remove().unwrap();
    }
    let s = exact(&pre);
    assert_eq!(
        (s.usage, live(&s)),
        (0, 0),
        "the parent's group is untouched by the children"
    );
    pre.remove().unwrap();
}
