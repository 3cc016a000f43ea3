//! What only the arena design promises: slabs never mix groups (or kinds), charges per slab,
//! frees from any thread, thousands of groups, memory given back at flush and to the OS, and no
//! cache of a removed group outliving its last object.
#![cfg(feature = "arena")]
#[global_allocator]
static ALLOC: memgroup::ArenaAlloc = memgroup::ArenaAlloc::system();

include!("suite/common.rs");
include!("suite/slabs_first.rs");

use common::{exact, fresh, fresh_child, live, resident, wait_child, Block, Rng};
use memgroup::{dying_groups, kernel, Group, SlabInfo};
use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex, MutexGuard};

/// dying_groups() and the pool are process-wide: tests that look at them run one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a live block lives: `None` for the inner allocator's.
fn slab_of(p: *const u8) -> Option<SlabInfo> {
    // SAFETY: every pointer given here is a live block of this binary's global allocator.
    unsafe { memgroup::slab_of(p) }
}

/// The slab of a block, which must be one.
fn slab(b: &Block) -> SlabInfo {
    let info = slab_of(b.ptr()).expect("a small block lives in a slab");
    let p = b.ptr() as usize;
    assert!(p >= info.start && p + b.size() <= info.start + info.len);
    assert_eq!(
        (p - info.start) % info.object_size,
        0,
        "blocks start on objects"
    );
    info
}

/// `g`'s exact figures are 0: usage, kernel memory, overhead and live blocks.
fn assert_empty(g: &Group, what: &str) {
    let s = exact(g);
    assert_eq!(
        (s.usage, s.kmem, s.overhead, live(&s)),
        (0, 0, 0, 0),
        "{what}: {s:?}"
    );
}

/// The owner thread of the race tests: it allocates blocks and then stays alive until `exit`,
/// so its heap keeps their slabs (and their group heap) while the test frees them elsewhere.
struct Owner {
    quit: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Owner {
    /// Starts the owner; `fill` runs on it (outside any group: it enters the blocks' group
    /// itself) and the blocks it returns come back with the owner.
    fn start(fill: impl FnOnce() -> Vec<Block> + Send + 'static) -> (Owner, Vec<Block>) {
        let (blocks_tx, blocks_rx) = mpsc::channel::<Vec<Block>>();
        let (quit, quit_rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            blocks_tx.send(fill()).unwrap();
            quit_rx.recv().unwrap();
        });
        let blocks = blocks_rx.recv().expect("the owner's blocks");
        (Owner { quit, thread }, blocks)
    }

    /// Lets the owner exit (its heap is left for the next thread) and waits for it.
    fn exit(self) {
        self.quit.send(()).unwrap();
        self.thread.join().expect("owner thread");
    }
}

#[test]
fn large_blocks_go_to_the_inner_allocator() {
    let g = fresh("large");
    let big = g.run(|| Block::new(8193, 1));
    let aligned = g.run(|| Block::new(100, 8192));
    let small = g.run(|| Block::new(8192, 1));
    assert!(slab_of(big.ptr()).is_none() && slab_of(aligned.ptr()).is_none());
    assert_eq!(slab(&small).object_size, 8192);
    let s = exact(&g);
    // Tagged blocks cost size + 8; the 8 KiB object's slab holds four.
    assert_eq!(s.usage, 8193 + 8 + 100 + 8 + slab(&small).len);
    assert_eq!(s.usage, 8193 + 100 + 8192 + s.overhead);
}

#[test]
fn a_group_is_charged_per_slab() {
    let g = fresh("perslab");
    let one = g.run(|| Block::new(24, 1));
    let info = slab(&one);
    assert_eq!((info.len, info.object_size), (4096, 24));
    assert_eq!(info.group, g);
    let s = exact(&g);
    assert_eq!((s.usage, s.overhead, live(&s)), (4096, 4096 - 24, 1));
    // The slab's other objects come free, until it is full.
    let per_slab = 4096 / 24;
    let more: Vec<Block> = g.run(|| (1..per_slab).map(|_| Block::new(24, 1)).collect());
    assert!(more.iter().all(|b| slab(b).start == info.start));
    let buffer = slab_of(more.as_ptr().cast())
        .expect("the Vec's buffer is small")
        .len;
    assert_eq!(
        exact(&g).usage,
        4096 + buffer,
        "the Vec's buffer has a slab of its own"
    );
    let next = g.run(|| Block::new(24, 1));
    assert_ne!(slab(&next).start, info.start);
    // Kernel objects get slabs of their own, charged as kmem.
    let k = g.run(|| kernel(|| Block::new(24, 1)));
    assert!(slab(&k).kernel && !slab(&one).kernel);
    let s = exact(&g);
    assert_eq!(s.kmem, 4096);
    drop((one, more, next, k));
    assert_empty(&g, "every block freed");
}

/// Many groups, both kinds, two threads, random sizes and alignments, interleaved: every slab
/// holds the objects of one group and one kind only.
#[test]
fn no_slab_holds_two_groups_objects() {
    let groups: Vec<Group> = (0..40).map(|_| fresh("mix")).collect();
    let handles: Vec<_> = (0..2u64)
        .map(|t| {
            let groups = groups.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(t + 7);
                let mut held = Vec::with_capacity(20_000);
                for _ in 0..20_000 {
                    let i = rng.range(0, groups.len() - 1);
                    let kern = rng.one_in(4);
                    let size = if rng.one_in(8) {
                        rng.range(1, 8192)
                    } else {
                        rng.range(1, 300)
                    };
                    let align = 1 << rng.range(0, 6);
                    let b = groups[i].run(|| {
                        if kern {
                            kernel(|| Block::new(size, align))
                        } else {
                            Block::new(size, align)
                        }
                    });
                    assert_eq!(b.ptr() as usize % align, 0);
                    held.push((i, kern, b));
                    if rng.one_in(3) {
                        let j = rng.range(0, held.len() - 1);
                        held.swap_remove(j);
                    }
                }
                held
            })
        })
        .collect();
    let held: Vec<(usize, bool, Block)> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let mut owner: HashMap<usize, (usize, bool)> = HashMap::new();
    for (i, kern, b) in &held {
        let info = slab(b);
        assert_eq!(info.group, groups[*i], "a block in another group's slab");
        assert_eq!(info.kernel, *kern, "a block in a slab of the other kind");
        let prev = owner.insert(info.start, (*i, *kern));
        assert!(
            prev.is_none() || prev == Some((*i, *kern)),
            "slab {:#x} holds two groups' objects",
            info.start
        );
    }
    drop(held);
    for g in &groups {
        assert_empty(g, "every block freed");
    }
}

/// A producer allocates, consumers on other threads free everything: the producer's slabs get
/// their objects back (no growth), and every counter ends at zero.
#[test]
fn cross_thread_frees_are_reused_by_the_owner() {
    let g = fresh("xfree");
    let (tx, rx) = mpsc::sync_channel::<Vec<Block>>(2);
    let consumer = std::thread::spawn(move || {
        let mut n = 0;
        for batch in rx {
            n += batch.len();
        }
        n
    });
    let mut worst = 0;
    let rounds = 300;
    let per_round = 1000;
    let g2 = g.clone();
    let producer = std::thread::spawn(move || {
        for r in 0..rounds {
            let batch: Vec<Block> = g2.run(|| {
                (0..per_round)
                    .map(|i| Block::new(16 + (i + r) % 100, 8))
                    .collect()
            });
            tx.send(batch).unwrap();
            if r % 10 == 0 {
                worst = worst.max(g2.stat().usage);
            }
        }
        worst
    });
    let worst = producer.join().unwrap();
    assert_eq!(consumer.join().unwrap(), rounds * per_round);
    // At most about four batches are live at once (one being built, two queued, one being
    // freed), ~120 KiB each; the stocks may hold up to a batch per CPU on top.
    assert!(
        worst < 2 << 20,
        "usage reached {worst}: remote frees were not reused"
    );
    let s = exact(&g);
    assert_eq!((s.usage, s.overhead, live(&s)), (0, 0, 0));
    assert_eq!(s.allocs, (rounds * per_round + rounds) as u64);
}

/// Threads free each other's blocks while they allocate, in several groups: all exact at the
/// end, with the allocating threads still alive (their caches hold empty slabs until flush).
#[test]
fn usage_is_exactly_zero_after_flush() {
    let groups: Vec<Group> = (0..3).map(|_| fresh("flush0")).collect();
    let done = Arc::new(Barrier::new(5));
    let checked = Arc::new(Barrier::new(5));
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..4).map(|_| mpsc::channel::<Block>()).unzip();
    let handles: Vec<_> = receivers
        .into_iter()
        .enumerate()
        .map(|(t, rx)| {
            let (groups, senders) = (groups.clone(), senders.clone());
            let (done, checked) = (done.clone(), checked.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(t as u64);
                let mut held = Vec::new();
                for _ in 0..20_000 {
                    let g = &groups[rng.range(0, 2)];
                    held.push(g.run(|| Block::new(rng.range(1, 2000), 8)));
                    if rng.one_in(2) {
                        let b = held.swap_remove(rng.range(0, held.len() - 1));
                        senders[rng.range(0, 3)].send(b).unwrap();
                    }
                    held.extend(rx.try_iter());
                    if held.len() > 300 {
                        held.truncate(100);
                    }
                }
                drop(held);
                drop(senders);
                done.wait();
                // Others' blocks sent here after our loop are freed by the main thread's drops.
                for b in rx.try_iter() {
                    drop(b);
                }
                checked.wait();
            })
        })
        .collect();
    drop(senders);
    done.wait();
    // The workers are alive, their caches full of empty slabs, some blocks still in channels.
    checked.wait();
    for h in handles {
        h.join().unwrap();
    }
    for g in &groups {
        let s = exact(g);
        assert!(s.allocs > 10_000);
        assert_eq!(
            (s.usage, s.kmem, s.overhead, live(&s)),
            (0, 0, 0, 0),
            "{s:?}"
        );
    }
}

/// Empty slabs held by live threads' caches are given back by flush(), not only at exit.
#[test]
fn flush_takes_empty_slabs_from_live_threads() {
    let g = fresh("livecache");
    let (go, wait) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
    let g2 = g.clone();
    let (go2, wait2) = (go.clone(), wait.clone());
    let t = std::thread::spawn(move || {
        let blocks: Vec<Block> = g2.run(|| (0..5000).map(|i| Block::new(i % 700 + 1, 1)).collect());
        drop(blocks); // freed by the owner: its slabs are empty, cached
        go2.wait();
        wait2.wait();
        // Still usable afterwards.
        let b = g2.run(|| Block::new(100, 1));
        exact(&g2).usage == slab(&b).len
    });
    go.wait();
    let before = g.stat().usage;
    let s = exact(&g);
    assert!(before > 0, "the thread's cache holds charged slabs");
    assert_eq!((s.usage, s.overhead, live(&s)), (0, 0, 0));
    wait.wait();
    assert!(t.join().unwrap());
    assert_eq!(exact(&g).usage, 0);
}

/// 10,000 siblings under one parent, each holding a few small objects: every one is charged
/// exactly its own slabs, and everything goes back.
#[test]
fn a_group_with_10000_siblings() {
    let _s = serial();
    let dying0 = dying_groups();
    let p = fresh("siblings");
    let n = 10_000;
    let mut kids = Vec::with_capacity(n);
    let mut blocks = Vec::with_capacity(3 * n);
    for i in 0..n {
        let c = p.child(&format!("c{i}")).expect("child");
        c.run(|| {
            blocks.push(Block::new(24, 8));
            blocks.push(Block::new(100 + i % 20, 8));
            blocks.push(kernel(|| Block::new(64, 8)));
        });
        kids.push(c);
    }
    for (i, c) in kids.iter().enumerate() {
        let mine = &blocks[3 * i..3 * i + 3];
        let slabs: usize = mine.iter().map(|b| slab(b).len).sum();
        assert!(mine.iter().all(|b| slab(b).group == *c));
        let s = exact(c);
        assert_eq!(
            (s.usage, s.kmem, live(&s)),
            (slabs, 4096, 3),
            "{}",
            c.name()
        );
        assert_eq!(s.usage, 24 + 100 + i % 20 + 64 + s.overhead);
    }
    let ps = exact(&p);
    assert_eq!(ps.usage - ps.kmem, 2 * 4096 * n, "two user slabs per child");
    drop(blocks);
    for c in kids.iter() {
        assert_eq!(exact(c).usage, 0);
    }
    for c in kids {
        c.remove().unwrap();
    }
    assert_eq!(dying_groups(), dying0);
    assert_empty(&p, "the parent, its children removed");
    p.remove().unwrap();
}

child_test! {
    /// Removing a group with live objects on several live threads: its caches go at once (its
    /// slabs become orphans), its record waits for its last object (freed on any thread), and
    /// the threads carry on in the parent.
    ///
    /// Alone in a process: it counts the group heaps of the whole process.
    fn dying_caches_are_freed_with_their_last_object => dying_caches_inner() {
        let dying0 = dying_groups();
        let heaps0 = memgroup::arena_footprint().group_heaps;
        let p = fresh("dying-p");
        let c = fresh_child(&p, "c");
        let start = Arc::new(Barrier::new(4));
        let removed = Arc::new(Barrier::new(4));
        let (tx, rx) = mpsc::channel::<Vec<Block>>();
        let handles: Vec<_> = (0..3)
            .map(|t| {
                let (c, start, removed, tx) = (c.clone(), start.clone(), removed.clone(), tx.clone());
                std::thread::spawn(move || {
                    let _in = c.enter();
                    let blocks: Vec<Block> = (0..500)
                        .map(|i| Block::new(8 + (i * 7 + t) % 3000, 8))
                        .collect();
                    tx.send(blocks).unwrap();
                    start.wait();
                    removed.wait();
                    // Inside the removed group: new blocks are the parent's.
                    let after = Block::new(50, 8);
                    let info = slab(&after);
                    drop(_in);
                    (info.group, after)
                })
            })
            .collect();
        drop(tx);
        let blocks: Vec<Vec<Block>> = rx.iter().take(3).collect();
        start.wait();
        assert!(memgroup::arena_footprint().group_heaps >= heaps0 + 3);
        let cs = exact(&c);
        assert!(
            live(&cs) >= 1500 + 3,
            "the blocks, the threads' vectors (and the channel's)"
        );
        let p0 = exact(&p);
        let ch = c.clone();
        c.remove().unwrap();
        assert_eq!(dying_groups(), dying0 + 1);
        assert!(
            blocks.iter().flatten().all(|b| slab(b).orphan),
            "a removed group's slabs have no cache any more"
        );
        assert_eq!(
            exact(&p).usage,
            p0.usage,
            "charges stay, counted in the parent"
        );
        removed.wait();
        let after: Vec<(Group, Block)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(
            after.iter().all(|(g, _)| *g == p),
            "a thread inside a removed group charges the parent"
        );
        drop((ch, rx)); // the channel's buffer was allocated in c too
                        // Free from another thread: the record goes with the last object, no flush needed.
        std::thread::spawn(move || drop(blocks)).join().unwrap();
        assert_eq!(dying_groups(), dying0);
        drop(after);
        assert_empty(&p, "the parent, every block freed");
        // The exited threads' and the removed group's group heaps are gone too.
        assert!(memgroup::arena_footprint().group_heaps <= heaps0 + 1);
        p.remove().unwrap();
    }
}

child_test! {
    /// Empty slabs go to a shared pool (uncharged); past `MEMGROUP_ARENA_POOL` resident bytes the
    /// pool gives their memory back to the OS.
    fn the_pool_gives_memory_back => pool_inner("MEMGROUP_ARENA_POOL" = "1M") {
        let g = fresh("pool");
        let blocks: Vec<Block> = g.run(|| {
            (0..100_000)
                .map(|i| Block::filled(64 + i % 200, 1))
                .collect()
        });
        let used = exact(&g).usage;
        // Every block is in a slab; the vector's buffer is a large block (inner allocator).
        let slabs = used - (blocks.capacity() * std::mem::size_of::<Block>() + memgroup::TAG_SIZE);
        assert!(slabs > 10 << 20);
        drop(blocks);
        assert_eq!(exact(&g).usage, 0, "every slab uncharged");
        let f = memgroup::arena_footprint();
        assert!(
            f.pooled + f.free_segments >= slabs,
            "the slabs are pooled, or went back with their whole segment: {slabs} {f:?}"
        );
        // 1 MiB, and up to a batch of slabs per slab size waiting to be given back.
        let batches = 128 * ((4 + 8 + 16 + 32) << 10);
        assert!(
            f.pooled_resident <= (1 << 20) + batches,
            "at most 1 MiB (and the batches) stays resident: {f:?}"
        );
        // Pooled slabs are reused, by any group.
        let h = fresh("pool-reuse");
        let again: Vec<Block> = h.run(|| {
            (0..100_000)
                .map(|i| Block::filled(64 + i % 200, 1))
                .collect()
        });
        let f2 = memgroup::arena_footprint();
        assert_eq!(
            f2.segments, f.segments,
            "no new segment: pooled slabs and free segments were reused"
        );
        drop(again);
        assert_eq!(exact(&h).usage, 0);
    }
}

// A free inside `fork()` (between the arena's prepare and release handlers, on the forking
// thread) that is the last of a removed group's orphan slab: the slab is released after the
// handlers let the pool locks go, not under them (it used to deadlock inside fork). The
// prepare handler below is registered before the arena's (by a constructor), so it runs after
// the arena's prepare handler (glibc runs prepare handlers in reverse order).
#[cfg(target_os = "linux")]
mod fork_window {
    use super::*;

    extern "C" {
        fn pthread_atfork(
            prepare: Option<extern "C" fn()>,
            parent: Option<extern "C" fn()>,
            child: Option<extern "C" fn()>,
        ) -> i32;
        fn fork() -> i32;
        fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
        fn _exit(code: i32) -> !;
    }

    /// The block the prepare handler frees, when a test armed it.
    pub static ARMED: Mutex<Option<Block>> = Mutex::new(None);

    extern "C" fn prepare() {
        if let Ok(mut slot) = ARMED.try_lock() {
            drop(slot.take());
        }
    }

    extern "C" fn register() {
        // SAFETY: a plain registration, before main; `prepare` is a valid handler.
        unsafe { pthread_atfork(Some(prepare), None, None) };
    }

    #[used]
    #[link_section = ".init_array"]
    static INIT: extern "C" fn() = register;

    /// Forks; the child exits at once with 0. The child's exit status.
    pub fn fork_and_wait() -> i32 {
        // SAFETY: the child only calls `_exit`.
        let pid = unsafe { fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: async-signal-safe, ends the child.
            unsafe { _exit(0) };
        }
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is a valid out pointer.
        let r = unsafe { waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid);
        status
    }
}

child_test! {
    fn a_free_inside_fork_releases_the_last_slab_of_a_removed_group => fork_window_inner() {
        let dying0 = dying_groups();
        let p = fresh("fork-p");
        let c = fresh_child(&p, "c");
        // Allocated by a thread that exits: its slab stays with the exited thread's abandoned heap,
        // this block its only object, until the group's removal makes it an orphan.
        let cc = c.clone();
        let b = std::thread::spawn(move || cc.run(|| Block::new(2000, 8)))
            .join()
            .unwrap();
        assert!(slab(&b).abandoned && !slab(&b).orphan);
        c.remove().unwrap();
        assert!(slab(&b).orphan, "a removed group's slabs have no owner");
        assert_eq!(dying_groups(), dying0 + 1, "the block keeps the record");
        *fork_window::ARMED.lock().unwrap() = Some(b);
        assert_eq!(fork_window::fork_and_wait(), 0, "the child exited cleanly");
        assert!(
            fork_window::ARMED.lock().unwrap().is_none(),
            "freed inside fork"
        );
        assert_eq!(
            dying_groups(),
            dying0,
            "the slab was released, the record freed"
        );
        assert_eq!(exact(&p).usage, 0);
        p.remove().unwrap();
    }
}

child_test! {
    /// A thread that exits leaves its heap, slabs still holding objects included, for the next new
    /// thread: that thread allocates from those slabs instead of new ones, frees into an abandoned
    /// heap's slabs still release an emptied slab (and its group heap) without a flush, and the
    /// figures stay exact. In exact mode (`MEMGROUP_BATCH=0`) too.
    fn a_new_thread_adopts_an_exited_threads_slabs => adoption_inner("MEMGROUP_BATCH" = "0") {
        let g = fresh("adopt");
        // Thread A: ten blocks in one slab, still live when it exits. (The vectors are this
        // thread's, so that only the blocks are in the exited threads' slabs.)
        let ga = g.clone();
        let mut v: Vec<Block> = Vec::with_capacity(40);
        let mut blocks = std::thread::spawn(move || {
            ga.run(|| v.extend((0..10).map(|_| Block::new(100, 8))));
            v
        })
        .join()
        .unwrap();
        let first = slab(&blocks[0]);
        assert!(blocks.iter().all(|b| slab(b).start == first.start));
        assert!(
            first.abandoned && !first.orphan,
            "an exited thread's slab waits for adoption: {first:?}"
        );
        let s = exact(&g);
        assert_eq!((s.usage, live(&s)), (first.len, 10), "{s:?}");
        let segments = memgroup::arena_footprint().segments;
        // Thread B (the next new thread) takes A's heap: its blocks come from A's slab, which is
        // its own again while it runs.
        let gb = g.clone();
        let mut v: Vec<Block> = Vec::with_capacity(10);
        let (more, owned) = std::thread::spawn(move || {
            gb.run(|| v.extend((0..10).map(|_| Block::new(100, 8))));
            let owned = v.iter().all(|b| {
                let info = slab(b);
                !info.abandoned && info.start == first.start
            });
            (v, owned)
        })
        .join()
        .unwrap();
        assert!(
            owned,
            "the new thread allocated from the exited thread's slab, as its owner"
        );
        assert_eq!(
            memgroup::arena_footprint().segments,
            segments,
            "no new segment"
        );
        blocks.extend(more);
        let s = exact(&g);
        assert_eq!(
            (s.usage, live(&s), s.allocs),
            (first.len, 20, 20),
            "one slab holds both threads' blocks: {s:?}"
        );
        assert!(slab(&blocks[0]).abandoned, "B exited too");
        // Freed from this thread: the emptied slab goes back and the group heap is retired at the
        // last free, without a flush.
        let heaps = memgroup::arena_footprint().group_heaps;
        drop(blocks);
        assert_eq!(
            memgroup::arena_footprint().group_heaps,
            heaps - 1,
            "the abandoned heap's group heap went with its last slab"
        );
        let s = exact(&g);
        assert_eq!(
            (s.usage, s.kmem, s.overhead, s.allocs, s.frees),
            (0, 0, 0, 20, 20),
            "{s:?}"
        );
        g.remove().unwrap();
    }
}

child_test! {
    /// A segment whose slabs are all empty goes back whole: its memory to the OS, the segment to a
    /// free list from which the next segment cut, for any slab size, is taken.
    fn empty_segments_go_back_and_serve_other_slab_sizes => segments_inner() {
        let g = fresh("segments");
        let rss0 = resident();
        let f0 = memgroup::arena_footprint();
        assert_eq!(f0.free_segments, 0, "{f0:?}");
        // 64-byte blocks live in one-page slabs: 200,000 of them fill about three segments.
        let mut small = Vec::with_capacity(200_000);
        g.run(|| small.extend((0..200_000).map(|_| Block::filled(64, 1))));
        let f1 = memgroup::arena_footprint();
        let rss1 = resident();
        assert!(
            f1.segments >= f0.segments + (8 << 20),
            "at least two segments cut: {f1:?}"
        );
        drop(small);
        assert_eq!(exact(&g).usage, 0);
        let f2 = memgroup::arena_footprint();
        let rss2 = resident();
        eprintln!(
            "segments: resident {} KiB, {} KiB with 200,000 blocks of 64 bytes, {} KiB once freed; \
             {f2:?}",
            rss0 >> 10,
            rss1 >> 10,
            rss2 >> 10
        );
        assert!(
            rss1 - rss2 >= f2.free_segments / 2,
            "the free segments' memory went back to the OS: {} KiB of {} KiB",
            (rss1 - rss2) >> 10,
            (rss1 - rss0) >> 10
        );
        assert!(
            f2.free_segments >= 8 << 20,
            "the emptied segments (all but the one being cut) went back: {f2:?}"
        );
        assert_eq!(f2.segments, f1.segments);
        // The pool's 4 MiB, and up to a batch of slabs per slab size waiting to be given back.
        let batches = 128 * ((4 + 8 + 16 + 32) << 10);
        assert!(
            f2.pooled_resident <= (4 << 20) + batches,
            "what stays pooled is within the pool's limit: {f2:?}"
        );
        // 8 KiB blocks live in eight-page slabs: another slab size, served from the free segments
        // (no new address space) until they run out.
        let per_segment = (4 << 20) / 8192;
        let n = per_segment * (f2.free_segments >> 22) / 2;
        let big: Vec<Block> = g.run(|| (0..n).map(|_| Block::filled(8192, 2)).collect());
        let f3 = memgroup::arena_footprint();
        assert_eq!(
            f3.segments, f2.segments,
            "no new segment while free ones remain: {f3:?}"
        );
        assert!(f3.free_segments < f2.free_segments, "{f3:?}");
        drop(big);
        let s = exact(&g);
        assert_eq!((s.usage, s.overhead, live(&s)), (0, 0, 0), "{s:?}");
        g.remove().unwrap();
    }
}

child_test! {
    /// A group removed while other threads free its blocks: the removal makes the group heap's
    /// slabs orphans, and the free of an orphan's last object releases the slab to the pool, where
    /// another thread's group heap may take it at once. The removal must not touch a slab after
    /// the word that made it an orphan: it once nulled the owner (and the links and state) of a
    /// slab reused and parked full meanwhile, and the next remote free into it crashed in
    /// `notify` on the null owner (the thread-churn test's rare abort). `pause_after_orphaning`
    /// holds the removal in that window for long enough that the reuse happens inside it.
    fn a_slab_reused_while_its_old_group_heap_is_removed => orphan_reuse_inner() {
        const SIZE: usize = 64;
        const PAUSE: std::time::Duration = std::time::Duration::from_millis(50);
        let dying0 = dying_groups();
        memgroup::pause_after_orphaning(PAUSE.as_micros() as u32);
        let mut reused = 0;
        for round in 0..10 {
            let g = fresh("orphan-reuse-g");
            let h = fresh("orphan-reuse-h");
            // The owner of `g`'s blocks stays alive through the removal: its group heap is live.
            let g2 = g.clone();
            let (owner, blocks) = Owner::start(move || {
                let mut blocks = Vec::with_capacity(200);
                g2.run(|| blocks.extend((0..200).map(|_| Block::new(SIZE, 8))));
                blocks
            });
            let starts: Vec<usize> = blocks.iter().map(|b| slab(b).start).collect();
            let go = Arc::new(Barrier::new(3));
            // Frees every block of `g` once the removal has orphaned its first slab.
            let freer = {
                let go = go.clone();
                std::thread::spawn(move || {
                    go.wait();
                    std::thread::sleep(PAUSE / 5);
                    drop(blocks);
                })
            };
            // Allocates in `h` until it gets an object of one of `g`'s slabs (the orphan its last
            // free released), then fills that slab, so it is parked full, owned by this thread.
            let reuser = {
                let (go, h) = (go.clone(), h.clone());
                std::thread::spawn(move || {
                    go.wait();
                    std::thread::sleep(PAUSE / 5 + PAUSE / 10);
                    let mut mine = Vec::with_capacity(4096);
                    let mut target = None;
                    h.run(|| {
                        while mine.len() < 4000 {
                            let b = Block::new(SIZE, 8);
                            let s = slab(&b).start;
                            match target {
                                None if starts.contains(&s) => target = Some(s),
                                Some(t) if s != t => {
                                    mine.push(b);
                                    break;
                                }
                                _ => {}
                            }
                            mine.push(b);
                        }
                    });
                    (target, mine)
                })
            };
            go.wait();
            g.remove().unwrap();
            freer.join().unwrap();
            let (target, mine) = reuser.join().unwrap();
            // Remote frees (this thread owns none of them): the first one into the slab parked
            // full hands its object to the owner through `notify`, which reads the slab's owner.
            drop(mine);
            owner.exit();
            assert_empty(&h, &format!("round {round}"));
            h.remove().unwrap();
            if target.is_some() {
                reused += 1;
                if reused == 3 {
                    break;
                }
            }
        }
        memgroup::pause_after_orphaning(0);
        assert_eq!(dying_groups(), dying0, "every removed group's record went");
        assert!(
            reused > 0,
            "no round had the orphan's slab reused inside the removal's window"
        );
    }
}

child_test! {
    /// A fork while another thread is inside `notify` (the first remote free into a slab parked
    /// full, holding the slab's `NOTIFYING` bit until it has handed its object to the owner): that
    /// thread holds no lock, so the fork does not wait for it, and in the child, where it does not
    /// run, the bit must not stay set, or the child hangs in the first wait for it (here the
    /// removal of the slab's group, which orphans the slab).
    fn a_fork_during_a_notify_leaves_no_wait_hanging_in_the_child => fork_notify_inner() {
        const SIZE: usize = 64;
        const PAUSE: std::time::Duration = std::time::Duration::from_millis(400);
        let g = fresh("fork-notify");
        // The owner fills a slab and takes another: the first is parked full.
        let g2 = g.clone();
        let (owner, mut blocks) = Owner::start(move || {
            let mut v = Vec::with_capacity(4096);
            g2.run(|| {
                v.push(Block::new(SIZE, 8));
                let first = slab(&v[0]).start;
                while v.len() < 4000 {
                    let b = Block::new(SIZE, 8);
                    let next = slab(&b).start != first;
                    v.push(b);
                    if next {
                        break;
                    }
                }
            });
            v
        });
        assert!(
            slab(&blocks[0]).start != slab(blocks.last().unwrap()).start,
            "the owner filled its first slab"
        );
        let b = blocks.swap_remove(0);
        memgroup::pause_in_notify(PAUSE.as_micros() as u32);
        let notifier = std::thread::spawn(move || drop(b));
        std::thread::sleep(PAUSE / 4);
        // SAFETY: the child only removes a group (allocation and the group registry, which the
        // allocator and its fork handlers support after fork) and leaves with _exit, never
        // returning into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            memgroup::pause_in_notify(0);
            let ok = g.remove().is_ok();
            // SAFETY: _exit is async-signal-safe and skips atexit handlers and destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let status = wait_child(pid, std::time::Duration::from_secs(20));
        notifier.join().unwrap();
        memgroup::pause_in_notify(0);
        assert_eq!(
            status,
            Some(0),
            "the child removed the group and exited (None: it hung)"
        );
        drop(blocks);
        owner.exit();
        assert_empty(&g, "after the fork");
        g.remove().unwrap();
    }
}

child_test! {
    /// A segment whose memory cannot be committed costs no address space: the range cut for it
    /// goes back, so failures (here injected, every commit refused) do not eat the region 4 MiB at
    /// a time; the blocks go to the inner allocator meanwhile, and the next commit that works cuts
    /// the very range again.
    fn a_failed_commit_gives_its_segment_back => failed_commit_inner() {
        const SIZE: usize = 8192;
        const ASKED: u32 = 1_000_000;
        let g = fresh("failed-commit");
        let mut blocks = Vec::with_capacity(4096);
        // This thread's heap, key table and group heap exist before any failure.
        g.run(|| blocks.push(Block::new(SIZE, 8)));
        let segments = memgroup::arena_footprint().segments;
        assert_eq!(memgroup::fail_next_maps(ASKED), 0);
        // Slabs come from the pool and the segment being cut until a new segment is needed: its
        // commit fails, and every later one.
        let mut outside = 0;
        g.run(|| {
            while blocks.len() < 4000 && outside < 50 {
                let b = Block::new(SIZE, 8);
                outside += slab_of(b.ptr()).is_none() as usize;
                blocks.push(b);
            }
        });
        let failed = ASKED - memgroup::fail_next_maps(0);
        assert_eq!(
            outside, 50,
            "the segment's commit failed: blocks went to the inner allocator"
        );
        assert!(failed >= 50, "{failed} commits failed");
        assert_eq!(
            memgroup::arena_footprint().segments,
            segments,
            "{failed} failed commits cut no address space"
        );
        let b = g.run(|| Block::new(SIZE, 8));
        assert!(slab_of(b.ptr()).is_some(), "commits work again");
        assert_eq!(
            memgroup::arena_footprint().segments,
            segments + (4 << 20),
            "one segment cut"
        );
        drop((b, blocks));
        assert_empty(&g, "every block freed");
        g.remove().unwrap();
    }
}

/// The child of `arena_waits_progress_on_one_cpu`: an owner thread at real-time priority 1
/// churns small blocks of `g` (the arena's fast and slow paths, its heap's lock), and this
/// thread, at priority 2 on the same CPU, wakes from short sleeps at random moments, preempting
/// the owner wherever it is (inside its fast path, `busy` raised; holding its heap's lock), and
/// flushes `g`, which locks every heap and waits for its owner to leave its fast path. A wait
/// that only spins and yields never lets the owner run again: the child hangs. Returns its
/// failures as bits (0: passed).
fn one_cpu_child(rounds: usize) -> i32 {
    common::pin_to_one_cpu();
    let g = fresh("arena-one-cpu");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let owner = {
        let (g, stop) = (g.clone(), stop.clone());
        std::thread::spawn(move || {
            let fifo = common::real_time(1);
            let mut rng = Rng::new(77);
            let mut held = Vec::with_capacity(64);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                g.run(|| {
                    for _ in 0..32 {
                        held.push(Block::new(rng.range(1, 3000), 8));
                    }
                    held.truncate(8);
                });
                n += 1;
            }
            drop(held);
            (fifo, n)
        })
    };
    let fifo = common::real_time(2);
    let mut rng = Rng::new(78);
    let mut failed = 0;
    for _ in 0..rounds {
        std::thread::sleep(std::time::Duration::from_micros(rng.range(20, 300) as u64));
        let s = exact(&g);
        if s.usage < s.overhead {
            failed |= 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (owner_fifo, owner_rounds) = owner.join().expect("owner thread");
    let s = exact(&g);
    if (s.usage, s.kmem, s.overhead, live(&s)) != (0, 0, 0, 0) {
        failed |= 2;
    }
    if owner_rounds == 0 {
        failed |= 4;
    }
    if !(fifo && owner_fifo) {
        // Without the real-time policy time slices let any wait progress: the figures are
        // still checked, the waits' progress not. Said, not hidden.
        eprintln!(
            "arena_waits_progress_on_one_cpu: SCHED_FIFO not allowed here; ran with time slices"
        );
    }
    failed
}

/// The arena's waits progress when the thread waited for was preempted on the same CPU by the
/// waiter itself, even a waiter of higher real-time priority (see `one_cpu_child`): they end
/// in short sleeps, not only in `sched_yield`. In a forked child (its scheduling changes stay
/// there), which must finish in time.
#[test]
fn arena_waits_progress_on_one_cpu() {
    let _s = serial();
    // SAFETY: the child allocates (which the allocator supports after fork), starts a thread,
    // and leaves with _exit, never returning into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let failed = std::panic::catch_unwind(|| one_cpu_child(1500)).unwrap_or(128);
        // SAFETY: _exit is async-signal-safe and skips atexit handlers and destructors.
        unsafe { libc::_exit(failed) };
    }
    let status = wait_child(pid, std::time::Duration::from_secs(60))
        .expect("the child hung: an arena wait that never lets a preempted thread on its CPU run");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed: status {status:#x}, failed checks {:#b} (figures 1, churned group 2, no \
         rounds 4, panic 128)",
        libc::WEXITSTATUS(status)
    );
}

child_test! {
    /// A flush must not miss slabs another thread is releasing. Sweeping a heap takes its empty
    /// slabs out under the heap's lock and uncharges them after letting it go (uncharging may
    /// free a group's record, which takes other locks); a flush that took the lock in between
    /// found the slabs neither in the heap nor uncharged, and the group's figures stayed off
    /// by whole slabs (the limits suite's rare `usage == 0` failure after all blocks were
    /// freed, there with a test thread adopting and then abandoning an exited racer's heap).
    /// `pause_before_release` holds a parent's flush in that window while the group's own
    /// flush runs.
    fn a_flush_waits_for_slabs_being_released => release_window_inner() {
        const PAUSE: std::time::Duration = std::time::Duration::from_millis(300);
        memgroup::pause_before_release(PAUSE.as_micros() as u32);
        let mut hits = 0;
        for round in 0..5 {
            let p = fresh("release-p");
            let g = fresh_child(&p, "g");
            // The owner of `g`'s slabs stays alive, so only a sweep releases them.
            let g2 = g.clone();
            let (owner, blocks) = Owner::start(move || {
                let mut blocks = Vec::with_capacity(100);
                g2.run(|| blocks.extend((0..100).map(|_| Block::new(300, 8))));
                blocks
            });
            // Remote frees: the slabs are empty but still the owner's, and charged.
            drop(blocks);
            let flusher = {
                let p = p.clone();
                std::thread::spawn(move || p.flush())
            };
            std::thread::sleep(PAUSE / 3);
            let t = std::time::Instant::now();
            let s = exact(&g);
            let waited = t.elapsed() > PAUSE / 3;
            assert_eq!(
                (s.usage, s.overhead, live(&s)),
                (0, 0, 0),
                "round {round}: the group's figures once its blocks are freed and it is flushed"
            );
            flusher.join().unwrap();
            owner.exit();
            hits += waited as u32;
            if hits == 2 {
                break;
            }
        }
        memgroup::pause_before_release(0);
        assert!(hits > 0, "no round's flush ran while the parent's flush was releasing");
    }
}
