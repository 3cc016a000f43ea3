// Process life: fork() while other threads allocate, threads that exit before their memory is
// freed, allocation in thread-local destructors, allocation before main.

include!("common.rs");

use common::{exact, fresh, live, wait_child, Block};
use memgroup::Group;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the forked child does: allocate and free in groups (one made before the fork, one made
/// in the child), check the counters, and report through its exit code. No panics escape.
fn forked_child_work(pre: &Group, i: usize) -> bool {
    let run = || -> bool {
        let before = exact(pre);
        let mut blocks = Vec::with_capacity(64);
        pre.run(|| {
            for k in 1..=50usize {
                blocks.push(Block::filled(k * 17, 3));
            }
            blocks.push(Block::filled(100_000, 4));
        });
        let requested: usize = blocks.iter().map(Block::size).sum();
        let s = exact(pre);
        let mut ok = s.usage - before.usage == requested + (s.overhead - before.overhead)
            && live(&s) - live(&before) == 51;
        drop(blocks);
        let s = exact(pre);
        ok &= s.usage == before.usage && live(&s) == live(&before);
        // The group registry works in the child too.
        let Ok(g) = Group::new(&format!("forked-{i}-{}", std::process::id())) else {
            return false;
        };
        // black_box: the optimizer may otherwise elide an allocation nobody writes to.
        let v: Vec<u8> = g.run(|| std::hint::black_box(Vec::with_capacity(5000)));
        let s = exact(&g);
        ok &= s.usage == 5000 + s.overhead;
        drop(v);
        ok &= exact(&g).usage == 0;
        ok &= g.remove().is_ok();
        ok
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or(false)
}

#[test]
fn fork_while_other_threads_allocate() {
    let pre = fresh("prefork");
    let stop = Arc::new(AtomicBool::new(false));
    let busy: Vec<_> = (0..2)
        .map(|t| {
            let stop = stop.clone();
            let g = fresh("fork-busy");
            std::thread::spawn(move || {
                let mut rng = common::Rng::new(t);
                let mut held = Vec::with_capacity(64);
                while !stop.load(Ordering::Relaxed) {
                    g.run(|| {
                        held.push(Block::new(rng.range(1, 2000), 8));
                        if rng.one_in(20) {
                            held.push(Block::new(rng.range(70_000, 200_000), 8));
                        }
                    });
                    if held.len() > 50 {
                        held.clear();
                    }
                }
                drop(held);
                let s = exact(&g);
                (s.usage, s.overhead, live(&s))
            })
        })
        .collect();
    // And one thread creating and removing groups, so the registry's lock is often held.
    let registry_busy = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let g = fresh("fork-reg");
                let c = g.child("c").expect("child");
                let _ = c.name();
                c.remove().expect("remove child");
                g.remove().expect("remove");
                n += 1;
            }
            n
        })
    };

    for i in 0..30 {
        // SAFETY: the child only allocates (which the allocator must support after fork), runs
        // the work above and leaves with _exit, never returning into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let ok = forked_child_work(&pre, i);
            // SAFETY: _exit is async-signal-safe and skips atexit handlers and destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let status = wait_child(pid, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("forked child {i} hung (a lock held across fork?)"));
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "forked child {i} failed: status {status:#x}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    assert!(registry_busy.join().unwrap() > 0);
    for h in busy {
        assert_eq!(h.join().unwrap(), (0, 0, 0), "busy group back to zero");
    }
    let s = exact(&pre);
    assert_eq!(
        (s.usage, live(&s)),
        (0, 0),
        "the parent's group is untouched by the children"
    );
}

/// A shrinker for `fork_while_subscriptions_change`: holds nothing.
struct Nothing;

impl memgroup::Shrinker for Nothing {
    fn chunk_size(&self) -> usize {
        1
    }
    fn count(&self) -> usize {
        0
    }
    fn shrink(&self, _chunks: usize) -> usize {
        0
    }
}

#[test]
fn fork_while_subscriptions_change() {
    // One thread subscribes and unsubscribes, registers and unregisters a shrinker, in a loop,
    // so the pressure registry's lock is often held when the main thread forks. A child that
    // inherited it locked would hang at its first subscription.
    let g = fresh("fork-subs");
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (g, stop) = (g.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let sub = g.on_pressure(|_| {});
                let shrinker = g.register_shrinker(Nothing);
                drop(sub);
                drop(shrinker);
                n += 1;
            }
            n
        })
    };
    for i in 0..200 {
        // SAFETY: the child subscribes, registers, unregisters and leaves with _exit, never
        // returning into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let sub = g.on_pressure(|_| {});
            let shrinker = g.register_shrinker(Nothing);
            drop(sub);
            drop(shrinker);
            // SAFETY: _exit is async-signal-safe and skips atexit handlers and destructors.
            unsafe { libc::_exit(0) };
        }
        let status = wait_child(pid, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("forked child {i} hung (pressure registry held across fork?)"));
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "forked child {i} failed: status {status:#x}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    assert!(churn.join().unwrap() > 0);
}

/// A shrinker for `fork_during_a_shrinker_call`: its `shrink` says it started, then waits
/// until `go` (in the parent; in a forked child the call was cut short).
struct Blocking {
    started: Arc<AtomicBool>,
    go: Arc<AtomicBool>,
}

impl memgroup::Shrinker for Blocking {
    fn chunk_size(&self) -> usize {
        1000
    }
    fn count(&self) -> usize {
        10
    }
    fn shrink(&self, _chunks: usize) -> usize {
        self.started.store(true, Ordering::SeqCst);
        while !self.go.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        0
    }
}

#[test]
fn fork_during_a_shrinker_call() {
    // The fork happens while another thread is inside a shrinker (through `Group::reclaim`),
    // holding that shrinker's call lock. In the child that thread does not exist: unregistering
    // the shrinker, or reclaiming through it, must not wait for it.
    let g = fresh("fork-shrinking");
    let (started, go) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let handle = g.register_shrinker(Blocking {
        started: started.clone(),
        go: go.clone(),
    });
    let caller = {
        let g = g.clone();
        std::thread::spawn(move || g.reclaim(5000))
    };
    let start = Instant::now();
    while !started.load(Ordering::SeqCst) {
        assert!(start.elapsed() < Duration::from_secs(10), "the shrinker was never called");
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: the child reclaims, unregisters and leaves with _exit, never returning into the
    // test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        go.store(true, Ordering::SeqCst);
        let freed = g.reclaim(5000);
        drop(handle);
        // SAFETY: _exit is async-signal-safe and skips atexit handlers and destructors.
        unsafe { libc::_exit(if freed == 0 { 0 } else { 1 }) };
    }
    let status = wait_child(pid, Duration::from_secs(10));
    // Let the parent's call finish first, so that a failure below does not hang on `handle`.
    go.store(true, Ordering::SeqCst);
    let status = status.expect("forked child hung on a shrinker lock held at the fork");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "forked child failed: status {status:#x}"
    );
    assert_eq!(caller.join().unwrap(), 0);
    drop(handle);
}

#[test]
fn memory_of_exited_threads_freed_later() {
    let g = fresh("exited");
    let handles: Vec<_> = (0..16usize)
        .map(|t| {
            let g = g.clone();
            std::thread::spawn(move || {
                g.run(|| {
                    let mut v = Vec::with_capacity(20);
                    for k in 1..=20 {
                        v.push(Block::filled(t * 100 + k * 13, 9));
                    }
                    v.push(Block::filled(80_000 + t, 9));
                    v
                })
            })
        })
        .collect();
    let blocks: Vec<Vec<Block>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    // Every thread has exited; its blocks are still charged to g.
    let requested: usize = blocks.iter().flatten().map(Block::size).sum();
    let vec_bytes: usize = blocks
        .iter()
        .map(|v| v.capacity() * std::mem::size_of::<Block>())
        .sum();
    let s = exact(&g);
    assert_eq!(s.usage, requested + vec_bytes + s.overhead);
    assert_eq!(live(&s), 16 * 22);
    assert!(blocks
        .iter()
        .flatten()
        .all(|b| b.bytes().iter().all(|&x| x == 9)));
    drop(blocks);
    let s = exact(&g);
    assert_eq!((s.usage, s.overhead, s.kmem, live(&s)), (0, 0, 0, 0));
}

// Blocks allocated by thread-local destructors, for the test to inspect after the thread ended.
static FROM_DTORS: Mutex<Vec<Block>> = Mutex::new(Vec::new());

struct Holder {
    group: Group,
    block: Option<Block>,
    size: usize,
}

impl Drop for Holder {
    fn drop(&mut self) {
        // Free a block charged to the group, then allocate a new one inside the group.
        drop(self.block.take());
        let size = self.size;
        let b = self.group.run(|| Block::filled(size, 0xD7));
        FROM_DTORS.lock().unwrap_or_else(|e| e.into_inner()).push(b);
    }
}

thread_local! {
    static HOLDER: RefCell<Option<Holder>> = const { RefCell::new(None) };
}

#[test]
fn allocation_in_thread_local_destructors() {
    // Capacity so the pushes from the destructors allocate nothing.
    FROM_DTORS.lock().unwrap().reserve(16);
    let g = fresh("tls-dtor");
    let sizes = [1000usize, 2000, 70_000, 3000];
    let handles: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let g = g.clone();
            std::thread::spawn(move || {
                let early = i % 2 == 0;
                if early {
                    // Register our destructor before the thread's first scope, so it runs after
                    // whatever thread-local state the allocator set up at that scope.
                    HOLDER.with(|h| assert!(h.borrow().is_none()));
                }
                let block = g.run(|| Block::filled(size / 2, 1));
                HOLDER.with(|h| {
                    *h.borrow_mut() = Some(Holder {
                        group: g.clone(),
                        block: Some(block),
                        size,
                    });
                });
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread with a TLS destructor");
    }
    let blocks: Vec<Block> = std::mem::take(&mut *FROM_DTORS.lock().unwrap());
    let mut got: Vec<usize> = blocks.iter().map(Block::size).collect();
    got.sort_unstable();
    let mut want = sizes.to_vec();
    want.sort_unstable();
    assert_eq!(got, want, "every destructor allocated its block");
    assert!(blocks.iter().all(|b| b.bytes().iter().all(|&x| x == 0xD7)));
    let s = exact(&g);
    assert_eq!(
        s.usage,
        sizes.iter().sum::<usize>() + s.overhead,
        "charged to the group"
    );
    assert_eq!(
        (s.allocs, s.frees),
        (8, 4),
        "one freed and one allocated per destructor"
    );
    drop(blocks);
    let s = exact(&g);
    assert_eq!((s.usage, s.overhead, live(&s)), (0, 0, 0));
}

#[test]
fn allocation_in_thread_local_destructor_of_an_unscoped_thread() {
    // A destructor allocating outside any scope charges the root, and frees its own memory.
    thread_local! {
        static V: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }
    struct Alloc;
    impl Drop for Alloc {
        fn drop(&mut self) {
            let s: String = (0..1000)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
            assert_eq!(s.len(), 1000);
            let _ = V.try_with(|v| v.borrow_mut().push(s));
        }
    }
    thread_local! {
        static A: Alloc = const { Alloc };
    }
    let g = fresh("tls-unscoped");
    let g2 = g.clone();
    std::thread::spawn(move || {
        A.with(|_| {});
        V.with(|v| g2.run(|| v.borrow_mut().push("hello".repeat(100))));
    })
    .join()
    .unwrap();
    let s = exact(&g);
    assert_eq!(
        (s.usage, live(&s)),
        (0, 0),
        "the thread's TLS memory was freed at its exit"
    );
    assert_eq!(s.allocs, 2, "the String and the Vec's buffer");
}

// Allocation before main: a constructor in .init_array boxes data, creates a group and allocates
// in it; the test checks both after main started and frees them.
static EARLY_BOX: AtomicPtr<[u8; 100]> = AtomicPtr::new(std::ptr::null_mut());
static EARLY_GROUP: Mutex<Option<(Group, Block)>> = Mutex::new(None);

extern "C" fn before_main() {
    let b = Box::new([0x42u8; 100]);
    EARLY_BOX.store(Box::into_raw(b), Ordering::SeqCst);
    if let Ok(g) = Group::new("before-main") {
        let blk = g.run(|| Block::filled(777, 0x43));
        if let Ok(mut slot) = EARLY_GROUP.lock() {
            *slot = Some((g, blk));
        }
    }
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = before_main;

#[test]
fn allocation_before_main() {
    let p = EARLY_BOX.swap(std::ptr::null_mut(), Ordering::SeqCst);
    assert!(!p.is_null(), "the constructor ran and allocated");
    // SAFETY: p came from Box::into_raw in before_main and is taken only once (swap).
    let b = unsafe { Box::from_raw(p) };
    assert!(b.iter().all(|&x| x == 0x42));
    drop(b);
    let (g, blk) = EARLY_GROUP
        .lock()
        .unwrap()
        .take()
        .expect("a group created before main");
    assert_eq!(g.name(), "before-main");
    assert!(blk.bytes().iter().all(|&x| x == 0x43));
    let s = exact(&g);
    assert_eq!(s.usage, 777 + s.overhead);
    assert_eq!(live(&s), 1);
    let more = g.run(|| Block::filled(5000, 1));
    let s = exact(&g);
    assert_eq!(s.usage, 777 + 5000 + s.overhead);
    assert_eq!(live(&s), 2);
    drop((more, blk));
    let s = exact(&g);
    assert_eq!((s.usage, s.overhead, live(&s)), (0, 0, 0));
    g.remove().expect("remove the early group");
}
