// Pockets (src/core/pocket.rs, src/pocket.rs): each thread charges its small blocks through a
// slot of its own, pre-charged to one group. These tests leave bytes in a thread's pocket (the
// thread then waits on a barrier, which allocates nothing, so they stay there) and check that
// everything that must see them does: a charge about to be refused at a limit, flush(),
// remove(), the thread's exit, fork(). Also the tag design's overhead per alignment (16-aligned
// blocks have a 16-byte header, its extra 8 bytes pending in pockets until a flush), and the
// churn with pockets on, off (MEMGROUP_POCKETS=0), too small to be on (MEMGROUP_BATCH=1024),
// and at their smallest and largest sizes.
//
// The figures assume the tag design's placement: tests/pockets.rs only (see its header).

include!("common.rs");

use common::{
    drop_one, send_one,
    block_cost, exact, fresh, fresh_child, live,
    size_for_cost, wait_child, churn_threads, Block, Rng, Tenants,
};
use memgroup::{dying_groups, fallible, kernel, stock_batch, Group, OnLimit};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::time::Duration;

/// A pocket holds at most `batch / POCKET_SHARE` bytes (src/core/stock.rs), 16 KiB by default.
const POCKET_SHARE: usize = 4;

/// The tests of this binary run one at a time: dying_groups() is process-wide (and the probes
/// of `block_cost` and `pockets_on` remove groups), and a fork is best taken with only the
/// threads its test started.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The tag design's overhead for one live block at `align` (src/tag.rs): its 8-byte tag, as a
/// header up to align 8; a 16-byte header (the tag and 8 unused bytes) at align 16; above 16
/// the tag goes after the block, 8 bytes again.
fn tag_overhead(align: usize) -> usize {
    if align == 16 {
        16
    } else {
        8
    }
}

/// A helper thread that runs in steps, each when the test says so. Between steps it waits on a
/// barrier, which allocates nothing: whatever its pocket holds stays there meanwhile. Its body
/// must `pause` at least once and must not panic (the test would wait for it forever).
struct Helper {
    turn: Arc<Barrier>,
    handle: std::thread::JoinHandle<()>,
}

/// What a helper's body calls between its steps.
struct Pause(Arc<Barrier>);

impl Pause {
    fn pause(&self) {
        self.0.wait(); // the test sees the helper paused
        self.0.wait(); // and lets it go on
    }
}

impl Helper {
    /// Starts `body` and returns once it reaches its first `pause`.
    fn start(body: impl FnOnce(&Pause) + Send + 'static) -> Helper {
        let turn = Arc::new(Barrier::new(2));
        let pause = Pause(turn.clone());
        let handle = std::thread::spawn(move || {
            body(&pause);
            pause.0.wait(); // the end, as a last pause
        });
        turn.wait();
        Helper { turn, handle }
    }

    /// Lets the helper run its next step; returns once it paused again.
    fn step(&self) {
        self.turn.wait();
        self.turn.wait();
    }

    /// Lets the helper run to its end, and joins it.
    fn finish(self) {
        self.turn.wait();
        self.turn.wait();
        self.handle.join().expect("helper thread");
    }
}

/// A helper that charges `g` for `n` blocks of `size` (align 1), frees them all inside `g` and
/// pauses: the bytes the blocks were charged stay with it, in its pocket (at most a pocket's
/// worth, if `n` blocks fit in half a pocket). Its vector is made outside `g`.
fn fill_pocket(g: &Group, n: usize, size: usize) -> Helper {
    let g = g.clone();
    Helper::start(move |pause| {
        let mut held = Vec::with_capacity(n);
        g.run(|| {
            for _ in 0..n {
                held.push(Block::new(size, 1));
            }
            held.clear();
        });
        drop(g);
        pause.pause();
        drop(held);
    })
}

/// How many blocks of `size` (align 1) a helper can free into its pocket, in a group with no
/// stock for it: half a pocket's worth, so that none overflows it (and far fewer than the 255
/// frees a pocket word counts).
fn pocketful(size: usize) -> usize {
    let n = stock_batch() / POCKET_SHARE / 2 / block_cost(size, 1);
    assert!(n > 0, "a pocket holds blocks of {size}");
    n.min(200)
}

/// Whether this process's threads charge through pockets, seen from outside: a thread frees a
/// block into its pocket and exits, which empties its pocket into the counters; with no pocket
/// the freed bytes stay in a CPU stock until a flush. The group's max is under the batch, so
/// no stock is ever refilled for it and no other slack can hide the difference. No other
/// thread may be draining meanwhile (a drain keeps owners out of their pockets).
fn pockets_on() -> bool {
    stock_batch() != 0 && common::exit_empties_a_pocket()
}

/// Runs `work` on a fresh thread whose pocket holds `h`: the thread allocates a block of 100
/// bytes at `align` in `h` and frees it, then runs `work` (in `h` too: a block's free and its
/// realloc charge its owner, whatever group the thread is in), and gives back what it returned.
fn on_a_thread_holding<T: Send + 'static>(
    h: &Group,
    align: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let h = h.clone();
    std::thread::spawn(move || {
        h.run(|| {
            drop(Block::new(100, align));
            work()
        })
    })
    .join()
    .expect("a thread whose pocket holds the group")
}

/// The end of a test whose owner `g`'s blocks met `other` (a thread's pocket held it, charged
/// one block of `other`): `other` is back to exactly 0 with that one block counted, and both
/// groups go.
/// Checks that `g` holds nothing after a flush: no bytes, no overhead, no live block.
fn assert_empty(g: &Group) {
    let s = exact(g);
    assert_eq!((s.usage, s.overhead, live(&s)), (0, 0, 0), "{s:?}");
}

/// Checks that `g` holds nothing, then removes it.
fn remove_empty(g: Group) {
    assert_empty(&g);
    g.remove().expect("remove");
}

fn remove_with_other(g: Group, other: Group) {
    let s = exact(&other);
    assert_eq!(
        (s.usage, s.overhead, live(&s), s.allocs),
        (0, 0, 0, 1),
        "the other group: {s:?}"
    );
    g.remove().expect("removing the owner's group");
    other.remove().expect("removing the other group");
}

/// Pockets are on in a default configuration (they need `membarrier(2)`).
fn assert_pockets_on_by_default() {
    assert!(
        pockets_on(),
        "pockets are on by default (they need membarrier(2))"
    );
}

// ---- 1. overhead per alignment ----------------------------------------------------------------

/// One live block costs its size plus its placement's overhead, all of it reported in
/// `overhead`: 8 up to align 8, 16 at align 16, 8 above; back to 0 once freed. Sizes from a
/// byte to past the batch (charged to the counters directly).
#[test]
fn overhead_per_alignment_is_exact() {
    let _s = serial();
    let cases = [
        (1, 8),
        (2, 8),
        (4, 8),
        (8, 8),
        (16, 16),
        (32, 8),
        (64, 8),
        (4096, 8),
    ];
    for (align, overhead) in cases {
        assert_eq!(tag_overhead(align), overhead);
        let g = fresh("pk-align");
        for size in [1, 8, 15, 16, 24, 100, 1000, 5000, 100_000] {
            let b = g.run(|| Block::new(size, align));
            assert_eq!(b.ptr() as usize % align, 0, "{size} at align {align}");
            let s = exact(&g);
            assert_eq!(
                (s.usage, s.overhead, live(&s), s.kmem),
                (size + overhead, overhead, 1, 0),
                "one live block of {size} at align {align}: {s:?}"
            );
            drop(b);
            let s = exact(&g);
            assert_eq!(
                (s.usage, s.overhead, live(&s)),
                (0, 0, 0),
                "{size} at align {align} freed: {s:?}"
            );
        }
        g.remove().expect("remove");
    }
}

/// The same for many blocks, most of them charged through the thread's pocket (the first one
/// refills it), whose headers' extra bytes wait there until the flush; and for kernel blocks,
/// whose overhead is kernel memory too.
#[test]
fn overhead_of_many_blocks_through_the_pocket_is_exact() {
    let _s = serial();
    let aligns = [1usize, 8, 16, 32, 16];
    let g = fresh("pk-many");
    let mut held: Vec<(Block, usize)> = Vec::with_capacity(600);
    for kernel_kind in [false, true] {
        g.run(|| {
            for i in 0..600usize {
                let align = aligns[i % aligns.len()];
                let b = if kernel_kind {
                    kernel(|| Block::new(i % 300 + 1, align))
                } else {
                    Block::new(i % 300 + 1, align)
                };
                held.push((b, align));
            }
        });
        let expect = |held: &[(Block, usize)]| {
            let req: usize = held.iter().map(|(b, _)| b.size()).sum();
            let oh: usize = held.iter().map(|&(_, a)| tag_overhead(a)).sum();
            (req + oh, oh, held.len() as u64)
        };
        let (usage, oh, n) = expect(&held);
        let s = exact(&g);
        assert_eq!((s.usage, s.overhead, live(&s)), (usage, oh, n), "{s:?}");
        assert_eq!(s.kmem, if kernel_kind { usage } else { 0 });
        // Free every other block (16-aligned ones among them), here.
        let mut i = 0;
        held.retain(|_| {
            i += 1;
            i % 2 == 0
        });
        let (usage, oh, n) = expect(&held);
        let s = exact(&g);
        assert_eq!((s.usage, s.overhead, live(&s)), (usage, oh, n), "{s:?}");
        held.clear();
        let s = exact(&g);
        assert_eq!(
            (s.usage, s.overhead, s.kmem, live(&s)),
            (0, 0, 0, 0),
            "{s:?}"
        );
    }
    g.remove().expect("remove");
}

/// 16-aligned blocks allocated here (through this thread's pocket) and freed on other
/// threads, outside any group: one that never charged the owner, one whose pocket holds the
/// owner (so the frees go into it, with their headers' extra bytes), one whose pocket holds
/// another group. The owner ends at exactly 0, overhead included.
#[test]
fn sixteen_aligned_blocks_freed_on_other_threads() {
    let _s = serial();
    let g = fresh("pk-x16");
    let h = fresh("pk-x16-other");
    let mut blocks = Vec::with_capacity(300);
    g.run(|| {
        for i in 0..300usize {
            blocks.push(Block::new(i % 500 + 1, 16));
        }
    });
    let check = |blocks: &[Block], step: &str| {
        let req: usize = blocks.iter().map(Block::size).sum();
        let oh = 16 * blocks.len();
        let s = exact(&g);
        assert_eq!(
            (s.usage, s.overhead, live(&s)),
            (req + oh, oh, blocks.len() as u64),
            "{step}: {s:?}"
        );
    };
    check(&blocks, "allocated");
    let part: Vec<Block> = blocks.split_off(200);
    std::thread::spawn(move || drop(part))
        .join()
        .expect("a fresh thread frees");
    check(&blocks, "freed on a fresh thread");
    let part: Vec<Block> = blocks.split_off(100);
    on_a_thread_holding(&g, 16, move || drop(part));
    check(&blocks, "freed by a thread whose pocket holds the owner");
    on_a_thread_holding(&h, 16, move || drop(blocks));
    check(&[], "all freed");
    remove_with_other(g, h);
}

/// Blocks grown and shrunk by `realloc` as a `Vec` grows (doubling, then shrinking to fit),
/// at alignments 8, 16 and 32: in the owner's group (the thread's pocket holds the owner, so
/// most steps go through it, some past what it holds through the stocks), on a thread whose
/// pocket holds another group, and outside any group. The owner is charged every step exactly
/// (the 120 blocks counted once: a realloc counts none; overhead unchanged), the other group
/// nothing, and every counter ends at 0.
#[test]
fn realloc_through_the_pocket_is_exact() {
    let _s = serial();
    let g = fresh("pk-realloc");
    let h = fresh("pk-realloc-other");
    let aligns = [8usize, 16, 32];
    // Blocks as (address, size, align); realloc'd in place of `Block`, whose layout is fixed.
    let mut blocks: Vec<(usize, usize, usize)> = Vec::with_capacity(120);
    let before = exact(&g);
    g.run(|| {
        for i in 0..120usize {
            let align = aligns[i % aligns.len()];
            let layout = Block::layout(8, align);
            // SAFETY: a non-zero size.
            let p = unsafe { std::alloc::alloc(layout) };
            assert!(!p.is_null());
            // SAFETY: 8 bytes are valid.
            unsafe { p.cast::<u64>().write(i as u64) };
            blocks.push((p as usize, 8, align));
        }
    });
    let resize = |blocks: &mut [(usize, usize, usize)], to: &dyn Fn(usize) -> usize| {
        for (i, b) in blocks.iter_mut().enumerate() {
            let new_size = to(b.1);
            let layout = Block::layout(b.1, b.2);
            // SAFETY: a live block of this layout; the new size is non-zero.
            let p = unsafe { std::alloc::realloc(b.0 as *mut u8, layout, new_size) };
            assert!(!p.is_null(), "realloc {} -> {new_size} at {}", b.1, b.2);
            assert_eq!(p as usize % b.2, 0, "realloc result misaligned at {}", b.2);
            // SAFETY: the first 8 bytes were kept.
            assert_eq!(unsafe { p.cast::<u64>().read() }, i as u64, "realloc lost data");
            *b = (p as usize, new_size, b.2);
        }
    };
    let check = |blocks: &[(usize, usize, usize)], step: &str| {
        let req: usize = blocks.iter().map(|b| b.1).sum();
        let oh: usize = blocks.iter().map(|b| tag_overhead(b.2)).sum();
        let s = exact(&g);
        assert_eq!(
            (s.usage, s.overhead, live(&s), s.allocs - before.allocs),
            (req + oh, oh, blocks.len() as u64, 120),
            "{step}: {s:?}"
        );
    };
    // Vec growth in the owner's group, with no flush between the steps (a flush empties the
    // pocket): 8 -> 16 -> ... -> 512, then 512 -> 200 -> 24.
    g.run(|| {
        for _ in 0..6 {
            resize(&mut blocks, &|n| n * 2);
        }
        resize(&mut blocks, &|_| 200);
        resize(&mut blocks, &|_| 24);
    });
    check(&blocks, "grown and shrunk in the owner's group");
    g.run(|| resize(&mut blocks, &|n| n * 3));
    check(&blocks, "grown once more in the owner's group");
    // On a thread whose pocket holds another group, then outside any group.
    let mut moved = std::mem::take(&mut blocks);
    let mut moved = on_a_thread_holding(&h, 8, move || {
        resize(&mut moved, &|n| n + 40);
        resize(&mut moved, &|n| n - 30);
        moved
    });
    check(&moved, "resized on a thread whose pocket holds another group");
    resize(&mut moved, &|n| n * 2);
    resize(&mut moved, &|n| n / 4);
    check(&moved, "resized outside any group");
    for (p, size, align) in moved.drain(..) {
        // SAFETY: a live block of this layout.
        unsafe { std::alloc::dealloc(p as *mut u8, Block::layout(size, align)) };
    }
    check(&[], "all freed");
    remove_with_other(g, h);
}

/// Frees of another group's blocks on a thread whose own pocket holds its own group wait in
/// that pocket's far word (after the first, which gives the far word their key), 16-aligned
/// ones with their headers' extra bytes: a charge at the limit takes them back (it fits
/// exactly), a flush does (the group is exactly 0, overhead included, while the thread sits
/// idle), and a removal does (the removed group's record goes at once, not at the thread's
/// exit).
#[test]
fn frees_of_another_groups_blocks_wait_in_the_far_word() {
    let _s = serial();
    let dying0 = dying_groups();
    let max = stock_batch() / 2;
    let fit = size_for_cost(max);
    let small = 100;
    let (n, cost) = (pocketful(small), block_cost(small, 16));
    let g = fresh("pk-far");
    g.set_max(Some(max));
    let home = fresh("pk-far-home");
    // The helper frees what each step hands it, inside its own group.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<Block>>();
    let home2 = home.clone();
    let helper = Helper::start(move |pause| {
        let own = home2.run(|| Block::new(64, 8));
        pause.pause();
        for _ in 0..3 {
            let blocks = rx.recv().expect("blocks to free");
            home2.run(|| drop(blocks));
            pause.pause();
        }
        drop(own);
    });
    // n blocks of `g`, in a vector made outside any group.
    let handed = |g: &Group| -> Vec<Block> {
        let mut v = Vec::with_capacity(n);
        g.run(|| v.extend((0..n).map(|_| Block::new(small, 16))));
        v
    };

    // A charge at the limit.
    tx.send(handed(&g)).expect("send");
    helper.step();
    assert_eq!(g.stat().usage, n * cost, "the freed bytes are still charged, unflushed");
    let b = g.run(|| fallible(|| Block::try_new(fit, 1)));
    let s = exact(&g);
    assert!(
        b.is_some(),
        "a block costing exactly max was refused while {} bytes sat in an idle thread's far word: {s:?}",
        n * cost
    );
    assert_eq!((s.usage, s.overhead, live(&s)), (max, tag_overhead(1), 1), "{s:?}");
    drop(b);

    // A flush.
    tx.send(handed(&g)).expect("send");
    helper.step();
    let s = exact(&g);
    assert_eq!((s.usage, s.overhead, s.kmem, live(&s)), (0, 0, 0, 0), "{s:?}");

    // A removal, of a child whose blocks the helper freed.
    let c = fresh_child(&g, "c");
    tx.send(handed(&c)).expect("send");
    helper.step();
    c.remove().expect("remove");
    assert_eq!(
        dying_groups(),
        dying0,
        "the removed group's bytes in the idle thread's far word were taken back: its record goes"
    );
    helper.finish();
    assert_empty(&g);
    remove_with_other(g, home);
    assert_eq!(dying_groups(), dying0);
}

// ---- 2. exact limits with bytes in an idle thread's pocket ------------------------------------

/// A max under the batch: no refill fits, so every charge goes to the counters exactly, and the
/// only bytes charged beyond the live blocks are those a helper's frees left in its pocket. A
/// block that fits only once they are taken back must succeed; one byte more must fail.
#[test]
fn a_charge_at_the_limit_takes_back_an_idle_threads_pocket() {
    let _s = serial();
    let batch = stock_batch();
    let max = batch / 2;
    let small = 100;
    let (n, cost) = (pocketful(small), block_cost(small, 1));
    let g = fresh("pk-limit");
    g.set_max(Some(max));

    limit_takes_back(&g, max, (n, cost), "pocket", || fill_pocket(&g, n, small));
    remove_empty(g);
}

/// The two halves of a limit's test with `n` freed blocks of `cost` each (nothing live) left
/// charged to `g` in an idle thread's `place`, which `hold` starts: a block costing exactly
/// `max` fits once they are taken back, and one byte more is refused; then, held again, a
/// block costing `max + 1` is refused and changes no counter, and an exact fit still succeeds.
/// `g` holds nothing at the start and at the end.
fn limit_takes_back(g: &Group, max: usize, (n, cost): (usize, usize), place: &str, hold: impl Fn() -> Helper) {
    let fit = size_for_cost(max);
    let base = exact(g);
    assert_eq!(base.usage, 0);
    let helper = hold();
    // Not flushed: nothing is live, the freed blocks' bytes are still charged.
    assert_eq!(g.stat().usage, n * cost, "the helper's {place} holds its frees");
    let b = g.run(|| fallible(|| Block::try_new(fit, 1)));
    let s = exact(g);
    assert!(
        b.is_some(),
        "a block costing exactly max was refused while {} bytes sat in an idle thread's {place}: {s:?}",
        n * cost
    );
    assert_eq!((s.usage, live(&s)), (max, 1), "{s:?}");
    assert_eq!((s.events.max, s.events.fail), (base.events.max, base.events.fail), "{s:?}");
    // Full: not one more byte.
    assert!(g.run(|| fallible(|| Block::try_new(1, 1))).is_none());
    let s = exact(g);
    assert_eq!(
        (s.usage, s.events.max, s.events.fail),
        (max, base.events.max + 1, base.events.fail + 1),
        "{s:?}"
    );
    drop(b);
    helper.finish();

    // Again with the bytes held: one byte too many is refused, and changes nothing.
    let base = exact(g);
    assert_eq!(base.usage, 0);
    let helper = hold();
    assert_eq!(g.stat().usage, n * cost);
    assert!(
        g.run(|| fallible(|| Block::try_new(fit + 1, 1))).is_none(),
        "a block costing max + 1 was charged"
    );
    let s = exact(g);
    assert_eq!(
        (s.usage, s.allocs, s.frees),
        (0, base.allocs + n as u64, base.frees + n as u64),
        "a refused charge changes no counter: {s:?}"
    );
    assert_eq!(
        (s.events.max, s.events.fail),
        (base.events.max + 1, base.events.fail + 1),
        "{s:?}"
    );
    let b = g
        .run(|| fallible(|| Block::try_new(fit, 1)))
        .expect("an exact fit after a refusal");
    assert_eq!(exact(g).usage, max);
    helper.finish();
    drop(b);
}

/// A block larger than the batch (charged to the counters directly) that fits only once the
/// CPU stock refilled by a helper and the helper's pocket are both taken back.
#[test]
fn a_large_charge_at_the_limit_takes_back_stocks_and_pockets() {
    let _s = serial();
    let batch = stock_batch();
    let max = 2 * batch;
    let fit = size_for_cost(max);
    assert!(fit > batch);
    let small = 100;
    let (n, cost) = (pocketful(small), block_cost(small, 1));
    let g = fresh("pk-limit-large");
    g.set_max(Some(max));
    // Its first block refills a stock with a batch, which then fills its pocket.
    let helper = fill_pocket(&g, n, small);
    let slack = g.stat().usage;
    assert!(
        slack >= batch && slack >= n * cost,
        "stock and pocket hold {slack}"
    );
    let b = g.run(|| fallible(|| Block::try_new(fit, 1)));
    let s = exact(&g);
    assert!(
        b.is_some(),
        "a block costing exactly max was refused with {slack} bytes in a stock and an idle thread's pocket: {s:?}"
    );
    assert_eq!((s.usage, live(&s), s.events.fail), (max, 1, 0), "{s:?}");
    drop(b);
    helper.finish();
    let helper = fill_pocket(&g, n, small);
    assert!(g.run(|| fallible(|| Block::try_new(fit + 1, 1))).is_none());
    let s = exact(&g);
    assert_eq!((s.usage, s.events.fail), (0, 1), "{s:?}");
    helper.finish();
    g.remove().expect("remove");
}

// ---- 3. flush() while another thread holds pocket bytes -----------------------------------------

/// Helpers in two children of a group keep some blocks (every alignment kind) and free others,
/// so their pockets hold bytes, counts and headers' extra bytes; while they wait, flush() of
/// each child and of the parent is exact, and stays so when repeated.
#[test]
fn flush_is_exact_while_other_threads_hold_pocket_bytes() {
    let _s = serial();
    let p = fresh("pk-flush");
    let children = [fresh_child(&p, "a"), fresh_child(&p, "b")];
    let base = exact(&p);
    let aligns = [1usize, 8, 16, 32];
    let plan = |seed: usize| -> Vec<(usize, usize, bool)> {
        (0..150usize)
            .map(|i| ((i * 13 + seed) % 700 + 1, aligns[i % 4], i % 3 != 0))
            .collect()
    };
    let helpers: Vec<Helper> = children
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let (c, plan) = (c.clone(), plan(k));
            Helper::start(move |pause| {
                let mut held: Vec<Option<Block>> = Vec::with_capacity(plan.len());
                c.run(|| {
                    for &(size, align, _) in &plan {
                        held.push(Some(Block::new(size, align)));
                    }
                    for (slot, &(_, _, keep)) in held.iter_mut().zip(&plan) {
                        if !keep {
                            drop(slot.take());
                        }
                    }
                });
                drop(c);
                pause.pause();
                drop(held);
            })
        })
        .collect();
    let expect = |seed: usize| {
        let kept: Vec<_> = plan(seed).into_iter().filter(|&(_, _, k)| k).collect();
        let req: usize = kept.iter().map(|&(s, _, _)| s).sum();
        let oh: usize = kept.iter().map(|&(_, a, _)| tag_overhead(a)).sum();
        (req + oh, oh, kept.len() as u64)
    };
    for (k, c) in children.iter().enumerate() {
        let fast = c.stat();
        for round in 0..2 {
            let s = exact(c);
            assert_eq!(
                (s.usage, s.overhead, live(&s), s.kmem),
                (expect(k).0, expect(k).1, expect(k).2, 0),
                "child {k}, flush {round}: {s:?}"
            );
            assert!(fast.usage >= s.usage, "stat() never under-reports");
        }
    }
    let s = exact(&p);
    let (u0, o0, l0) = expect(0);
    let (u1, o1, l1) = expect(1);
    assert_eq!(
        (s.usage, s.overhead, live(&s), s.kmem),
        (
            base.usage + u0 + u1,
            base.overhead + o0 + o1,
            live(&base) + l0 + l1,
            base.kmem
        ),
        "the parent: {s:?}"
    );
    for h in helpers {
        h.finish();
    }
    for c in &children {
        assert_empty(c);
    }
    for c in children {
        c.remove().expect("remove");
    }
    let s = exact(&p);
    assert_eq!((s.usage, s.kmem, s.overhead, live(&s)), (0, 0, 0, 0));
    p.remove().expect("remove");
}

// ---- 4. threads that exit with pocket content ---------------------------------------------------

/// 200 short threads charge a group and free everything into their pockets before they exit:
/// each pocket is emptied into the counters at its thread's exit, so the figures are exact even
/// before a flush (the group's max is under the batch, so no stock holds slack for it). Then new
/// threads, which take those pockets over, charge another group and keep some blocks: both
/// groups exact.
#[test]
fn pockets_of_exited_threads_are_emptied_and_reused() {
    let _s = serial();
    assert_pockets_on_by_default();
    let batch = stock_batch();
    let g = fresh("pk-exit");
    let h = fresh("pk-exit-next");
    g.set_max(Some(batch / 2));
    h.set_max(Some(batch / 2));
    for round in 0..50usize {
        let threads: Vec<_> = (0..4usize)
            .map(|t| {
                let g = g.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::with_capacity(10);
                    g.run(|| {
                        for k in 0..10usize {
                            held.push(Block::new((round * 7 + t * 3 + k) % 150 + 1, 1));
                        }
                        held.clear();
                    });
                })
            })
            .collect();
        for t in threads {
            t.join().expect("short thread");
        }
    }
    let s = g.stat();
    assert_eq!(
        (s.usage, s.overhead, s.allocs, s.frees),
        (0, 0, 2000, 2000),
        "not flushed: every exited thread's pocket went back at its exit: {s:?}"
    );
    let s = exact(&g);
    assert_eq!((s.usage, s.overhead, s.allocs, s.frees), (0, 0, 2000, 2000));

    let aligns = [1usize, 16, 8, 32];
    let threads: Vec<_> = (0..20usize)
        .map(|t| {
            let h = h.clone();
            std::thread::spawn(move || {
                let (mut keep, mut tmp) = (Vec::with_capacity(5), Vec::with_capacity(5));
                h.run(|| {
                    for k in 0..10usize {
                        let b = Block::new((t * 11 + k * 5) % 100 + 1, aligns[(t + k) % 4]);
                        if k % 2 == 0 {
                            keep.push((b, aligns[(t + k) % 4]));
                        } else {
                            tmp.push(b);
                        }
                    }
                    tmp.clear();
                });
                keep
            })
        })
        .collect();
    let kept: Vec<(Block, usize)> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("thread in h"))
        .collect();
    let req: usize = kept.iter().map(|(b, _)| b.size()).sum();
    let oh: usize = kept.iter().map(|&(_, a)| tag_overhead(a)).sum();
    let s = h.stat();
    assert_eq!(
        (s.usage, s.overhead, live(&s)),
        (req + oh, oh, 100),
        "not flushed: {s:?}"
    );
    let s = exact(&h);
    assert_eq!(
        (s.usage, s.overhead, live(&s)),
        (req + oh, oh, 100),
        "{s:?}"
    );
    let s = g.stat();
    assert_eq!(
        (s.usage, s.allocs, s.frees),
        (0, 2000, 2000),
        "g untouched: {s:?}"
    );
    drop(kept);
    assert_empty(&h);
    g.remove().expect("remove");
    h.remove().expect("remove");
}

/// Short threads exit, their pockets holding content, while another thread drains over and
/// over (each drain walks the pockets, reaching into their threads' thread-local blocks): an
/// exiting thread's pocket leaves the list before its thread goes, and no walk still holds
/// it. 32 threads at a time: their 2 MiB stacks (thread-local blocks included) overflow
/// glibc's 40 MiB stack cache, so some are unmapped at exit, and a walk reaching a gone
/// thread's block would touch unmapped memory. The figures end exact.
#[test]
fn threads_exit_while_drains_walk_their_pockets() {
    let _s = serial();
    assert_pockets_on_by_default();
    let g = fresh("pk-exit-drained");
    let stop = Arc::new(AtomicBool::new(false));
    let drainer = start_drainer(std::slice::from_ref(&g), &stop);
    let (rounds, width) = (20usize, 32usize);
    for round in 0..rounds {
        let threads: Vec<_> = (0..width)
            .map(|t| {
                let g = g.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::with_capacity(10);
                    g.run(|| {
                        for k in 0..10usize {
                            held.push(Block::new((round * 5 + t * 3 + k) % 200 + 1, 1));
                        }
                        held.truncate(3);
                    });
                    held
                })
            })
            .collect();
        for t in threads {
            drop(t.join().expect("short thread"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (drains, _) = drainer.join().expect("drainer");
    assert!(drains > 0, "the drainer ran");
    let s = exact(&g);
    let n = (rounds * width * 10) as u64;
    assert_eq!((s.usage, s.overhead, s.allocs, s.frees), (0, 0, n, n), "{s:?}");
    g.remove().expect("remove");
}

// ---- 5. removal while a parked thread's pocket holds the group's bytes --------------------------

/// A helper inside a child group keeps blocks and frees others into its pocket, and waits,
/// still inside the group. The group is removed: it is dying (live memory). The helper, still
/// inside the removed group, allocates (charged to the parent), leaves, and frees the group's
/// last blocks: the group's record goes then, without any flush, which it could not if its
/// pocket still held the group's bytes. The parent ends exact.
#[test]
fn removal_takes_back_a_parked_threads_pocket() {
    let _s = serial();
    let dying0 = dying_groups();
    let p = fresh("pk-rm");
    let c = fresh_child(&p, "c");
    let c2 = c.clone();
    let helper = Helper::start(move |pause| {
        let (mut kept, mut freed) = (Vec::with_capacity(3), Vec::with_capacity(40));
        let inside = c2.enter();
        drop(c2);
        for size in [300usize, 700, 1500] {
            kept.push(Block::new(size, 16));
        }
        for i in 0..40usize {
            freed.push(Block::new(i * 7 + 1, 1));
        }
        freed.clear();
        pause.pause(); // c is removed meanwhile
        let extra = Block::new(1000, 1);
        drop(inside);
        drop(kept);
        pause.pause(); // the test looks
        drop(extra);
    });
    c.remove()
        .expect("remove the group while a thread is inside it");
    assert_eq!(
        dying_groups(),
        dying0 + 1,
        "a removed group holding live memory is dying"
    );
    helper.step();
    assert_eq!(
        dying_groups(),
        dying0,
        "the removed group's last bytes are freed: its record goes (no flush)"
    );
    let s = exact(&p);
    assert_eq!(
        (s.usage, s.overhead, s.kmem, live(&s)),
        (1000 + tag_overhead(1), tag_overhead(1), 0, 1),
        "the parent holds only the block made inside the removed child: {s:?}"
    );
    helper.finish();
    let s = exact(&p);
    assert_eq!(
        (s.usage, s.overhead, s.kmem, live(&s)),
        (0, 0, 0, 0),
        "{s:?}"
    );
    p.remove().expect("remove");
    assert_eq!(dying_groups(), dying0);
}

// ---- 6. the churn, with pockets on, off, too small, smallest, largest ---------------------------

/// A block of the churn's limited group, counted in `held` while it is live (taken off before it
/// is freed, on whatever thread): `held` is never above the real usage of the group.
struct Limited {
    block: Option<Block>,
    cost: usize,
    held: Arc<AtomicUsize>,
}

impl Drop for Limited {
    fn drop(&mut self) {
        self.held.fetch_sub(self.cost, Ordering::SeqCst);
        drop(self.block.take());
    }
}

enum Item {
    Raw(Block),
    Wide(Vec<u128>),
    Limited(Limited),
}

/// Several threads churn groups (every alignment kind, kernel blocks, sizes past the batch),
/// hand blocks to each other, free each other's blocks, grow 16-aligned vectors, flush groups
/// (stopping every pocket), start short threads (which take exited threads' pockets) and fill a
/// limited group until it refuses (which drains pockets). The limited group's live blocks
/// never pass its max; at the end every group is exact.
fn churn(seed: u64) {
    const THREADS: usize = 4;
    const LIMIT: usize = 60_000;
    let tenants = Tenants::new("pkc-t");
    let limited = fresh("pkc-limited");
    limited.set_max(Some(LIMIT));
    limited.set_on_limit(OnLimit::Fail);
    let held_limited = Arc::new(AtomicUsize::new(0));
    let over = Arc::new(AtomicUsize::new(0));
    let aligns = [1usize, 1, 8, 16, 16, 32, 64];
    let (groups, limited2) = (tenants.groups.clone(), limited.clone());
    let (held_limited2, over2) = (held_limited.clone(), over.clone());
    churn_threads(THREADS, 30_000, 300, seed * 1000, move |rng, held, senders, rx| {
        let (limited, held_limited, over) = (&limited2, &held_limited2, &over2);
        let g = &groups[rng.range(0, groups.len() - 1)];
        match rng.next() % 100 {
            0..=34 => {
                let size = match rng.next() % 100 {
                    0..=84 => rng.range(1, 512),
                    85..=94 => rng.range(513, 6000),
                    95..=98 => rng.range(6001, 60_000),
                    _ => rng.range(70_000, 150_000),
                };
                let align = aligns[rng.range(0, aligns.len() - 1)];
                let b = if rng.one_in(8) {
                    g.run(|| kernel(|| Block::new(size, align)))
                } else {
                    g.run(|| Block::new(size, align))
                };
                held.push(Item::Raw(b));
            }
            35..=41 => {
                let n = rng.range(1, 300);
                let v: Vec<u128> = g.run(|| std::hint::black_box(vec![7; n]));
                held.push(Item::Wide(v));
            }
            42..=44 if !held.is_empty() => {
                let i = rng.range(0, held.len() - 1);
                match &mut held[i] {
                    Item::Wide(v) => {
                        let n = rng.range(1, 400);
                        g.run(|| v.extend(std::iter::repeat_n(9, n)));
                        if rng.one_in(3) {
                            v.truncate(v.len() / 3);
                            v.shrink_to_fit();
                        }
                    }
                    Item::Raw(b) => b.bytes_mut()[0] = 1,
                    Item::Limited(l) => {
                        if let Some(b) = &mut l.block {
                            b.bytes_mut()[0] = 2;
                        }
                    }
                }
            }
            45..=54 => {
                let size = rng.range(1024, 4096);
                let align = if rng.one_in(2) { 16 } else { 1 };
                match limited.run(|| fallible(|| Block::try_new(size, align))) {
                    Some(b) => {
                        let cost = size + tag_overhead(align);
                        let now = held_limited.fetch_add(cost, Ordering::SeqCst) + cost;
                        if now > LIMIT {
                            over.fetch_max(now, Ordering::SeqCst);
                        }
                        held.push(Item::Limited(Limited {
                            block: Some(b),
                            cost,
                            held: held_limited.clone(),
                        }));
                    }
                    None => {
                        // Refused: give back half of this thread's share.
                        let mut k = 0;
                        held.retain(|item| {
                            k += 1;
                            !matches!(item, Item::Limited(_)) || k % 2 == 0
                        });
                    }
                }
            }
            55..=64 => send_one(rng, g, held, senders),
            65..=72 => held.extend(rx.try_iter()),
            73..=92 => drop_one(rng, g, held),
            93..=95 => g.flush(),
            96 => {
                let (g, n, s) = (g.clone(), rng.range(1, 40), rng.next());
                std::thread::spawn(move || {
                    let mut v = Vec::with_capacity(n);
                    g.run(|| {
                        for k in 0..n {
                            let size = (s as usize >> (k % 32)) % 700 + 1;
                            v.push(Block::new(size, aligns[k % aligns.len()]));
                            if k % 3 == 0 {
                                v.swap_remove(0);
                            }
                        }
                    });
                    drop(v);
                })
                .join()
                .expect("short thread");
            }
            _ => {}
        }
    });

    assert_eq!(
        over.load(Ordering::SeqCst),
        0,
        "the limited group's live blocks passed its max of {LIMIT}"
    );
    let s = exact(&limited);
    assert!(
        s.events.fail > 0,
        "the limited group refused no charge: {s:?}"
    );
    assert_eq!(
        (s.usage, s.kmem, s.overhead, live(&s)),
        (0, 0, 0, 0),
        "the limited group after everything was freed: {s:?}"
    );
    for t in tenants.check_back_to_zero() {
        t.remove().expect("remove tenant");
    }
    limited.remove().expect("remove the limited group");
}

#[test]
fn churn_with_pockets_returns_to_zero() {
    let _s = serial();
    assert_pockets_on_by_default();
    churn(1);
}

child_test! {
    fn churn_without_pockets_returns_to_zero => churn_pockets_off_inner("MEMGROUP_POCKETS" = "0") {
        assert_eq!(stock_batch(), 64 << 10);
        assert!(!pockets_on(), "MEMGROUP_POCKETS=0 turns pockets off");
        churn(2);
    }
}

child_test! {
    /// A batch of 1 KiB gives pockets of 128 bytes: too small, so they are off.
    fn churn_with_a_batch_too_small_for_pockets_returns_to_zero => churn_small_batch_inner("MEMGROUP_BATCH" = "1024") {
        assert_eq!(stock_batch(), 1024);
        assert!(!pockets_on(), "a 1 KiB batch leaves no room for pockets");
        churn(3);
    }
}

child_test! {
    /// A batch of 4 KiB, the smallest with pockets (1 KiB): they fill and overflow all the time.
    fn churn_with_the_smallest_pockets_returns_to_zero => churn_smallest_pockets_inner("MEMGROUP_BATCH" = "4096") {
        assert_eq!(stock_batch(), 4096);
        assert!(pockets_on(), "a 4 KiB batch has pockets of 1 KiB");
        churn(4);
    }
}

child_test! {
    /// The largest batch, 8 MiB: pockets of 2 MiB, which serve blocks of up to 1 MiB.
    fn churn_with_the_largest_pockets_returns_to_zero => churn_largest_pockets_inner("MEMGROUP_BATCH" = "8M") {
        assert_eq!(stock_batch(), 8 << 20);
        assert!(pockets_on());
        churn(5);
    }
}

// ---- 7. fork() while other threads churn through their pockets ----------------------------------

/// Sets the flag that stops the threads a test started when the test ends, even by a failed
/// assertion, so that they do not run on into the next test.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// `n` threads that charge and free small blocks (align 1 and 16) in `groups` through their
/// pockets until `stop`; each returns its rounds.
fn start_churners(
    groups: &[Group],
    n: u64,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<u64>> {
    (0..n)
        .map(|t| {
            let (stop, groups) = (stop.clone(), groups.to_vec());
            std::thread::spawn(move || {
                let mut rng = Rng::new(t + 77);
                let mut held = Vec::with_capacity(64);
                let mut rounds = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let g = &groups[rng.range(0, groups.len() - 1)];
                    g.run(|| {
                        for k in 0..32usize {
                            held.push(Block::new(rng.range(1, 400), [1, 16][k % 2]));
                        }
                        held.truncate(16);
                    });
                    held.clear();
                    rounds += 1;
                }
                rounds
            })
        })
        .collect()
}

/// A thread that flushes `groups` in turn and charges a limited group of its own up to its max,
/// until `stop`: both take bytes out of pockets, stopping them. Returns its rounds and the
/// limited group's refusals.
fn start_drainer(groups: &[Group], stop: &Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, u64)> {
    let (stop, groups) = (stop.clone(), groups.to_vec());
    std::thread::spawn(move || {
        let limited = fresh("pk-fork-limited");
        limited.set_max(Some(20_000));
        let mut held = Vec::with_capacity(64);
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            groups[n as usize % groups.len()].flush();
            match limited.run(|| fallible(|| Block::try_new(1000, 1))) {
                Some(b) => held.push(b),
                None => held.clear(),
            }
            n += 1;
        }
        drop(held);
        let s = exact(&limited);
        assert_eq!((s.usage, live(&s)), (0, 0), "{s:?}");
        limited.remove().expect("remove");
        (n, s.events.fail)
    })
}

/// A forked child's failures, as bits of its exit status (0: it passed).
const CHILD_CHURNED_A: i32 = 1;
const CHILD_CHURNED_B: i32 = 2;
const CHILD_PRE: i32 = 4;
const CHILD_NEW_GROUP: i32 = 8;
const CHILD_THREAD: i32 = 16;
const CHILD_LIMIT: i32 = 32;
const CHILD_POCKETS: i32 = 64;
const CHILD_PANIC: i32 = 128;
const CHILD_BITS: &str =
    "churned a 1, churned b 2, pre 4, new group 8, thread 16, limit 32, pockets 64, panic 128";

/// Whether `MEMGROUP_TEST_QUICK=1`: what `.ci/run` sets when it runs this suite under
/// valgrind, where each forked child costs a second or more (valgrind's own work at the fork
/// and its leak check at the child's exit; a child's own checks take milliseconds).
fn quick() -> bool {
    std::env::var_os("MEMGROUP_TEST_QUICK").is_some_and(|v| v != "0")
}

/// `n`, or `few` if `quick()`.
fn quick_or(n: usize, few: usize) -> usize {
    if quick() {
        n.min(few)
    } else {
        n
    }
}

/// Forks `count` children (4 if `quick()`) that run `child` (its result is the exit status; a
/// panic is `CHILD_PANIC`) and `_exit`; each must exit within `limit` (60 s if `quick()`), with
/// status 0.
fn fork_children(count: usize, limit: Duration, child: impl Fn(usize) -> i32) {
    let limit = if quick() {
        limit.max(Duration::from_secs(60))
    } else {
        limit
    };
    for i in 0..quick_or(count, 4) {
        // SAFETY: the child allocates (which the allocator supports after fork), may start a
        // thread, and leaves with _exit, never returning into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| child(i)))
                .unwrap_or(CHILD_PANIC);
            // SAFETY: _exit is async-signal-safe and skips atexit handlers and destructors.
            unsafe { libc::_exit(failed) };
        }
        let status = wait_child(pid, limit)
            .unwrap_or_else(|| panic!("forked child {i} hung (a pocket stopped or busy forever?)"));
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "forked child {i} failed: status {status:#x}, failed checks {:#b} ({CHILD_BITS})",
            libc::WEXITSTATUS(status)
        );
    }
}

/// Allocates blocks of every alignment kind in `g` and frees them: the flushed figures move by
/// exactly their cost and come back. `all`: overhead and live blocks too; otherwise usage,
/// allocations and frees only, for a group other threads of the parent were charging at the
/// fork (the charges they had in flight may be missing from the child's counters, which can
/// leave fewer allocations than frees, and `overhead` is kept within `0..=usage`: its changes
/// then do not add up).
fn delta_exact(g: &Group, all: bool) -> bool {
    let before = exact(g);
    let mut blocks = Vec::with_capacity(40);
    g.run(|| {
        for k in 0..40usize {
            let align = [1, 16, 32][k % 3];
            blocks.push((Block::new(k * 29 % 900 + 1, align), align));
        }
    });
    let req: usize = blocks.iter().map(|(b, _)| b.size()).sum();
    let oh: usize = blocks.iter().map(|&(_, a)| tag_overhead(a)).sum();
    let with = exact(g);
    drop(blocks);
    let after = exact(g);
    let mut ok = (with.usage, with.allocs, with.frees)
        == (before.usage + req + oh, before.allocs + 40, before.frees)
        && (after.usage, after.allocs, after.frees)
            == (before.usage, before.allocs + 40, before.frees + 40);
    if all {
        ok &= (with.overhead, live(&with)) == (oh, live(&before) + 40)
            && (after.overhead, live(&after)) == (before.overhead, live(&before));
    }
    if !ok {
        // The child's stderr is the test process's (no capture there): say what went wrong.
        let m = format!(
            "forked child, group {}: +{req} bytes +{oh} overhead in 40 blocks\n  before {before:?}\n  with   {with:?}\n  after  {after:?}\n",
            g.name()
        );
        // SAFETY: writing a live buffer to fd 2.
        unsafe { libc::write(2, m.as_ptr().cast(), m.len()) };
    }
    ok
}

fn forked_child_checks(pre: &Group, churned: &[Group], i: usize) -> i32 {
    let mut failed = 0;
    for g in churned {
        g.flush();
    }
    if !delta_exact(&churned[0], false) {
        failed |= CHILD_CHURNED_A;
    }
    if !delta_exact(&churned[1], false) {
        failed |= CHILD_CHURNED_B;
    }
    if !delta_exact(pre, true) {
        failed |= CHILD_PRE;
    }
    match Group::new(&format!("pk-forked-{i}-{}", std::process::id())) {
        Ok(g) => {
            if !delta_exact(&g, true) || g.remove().is_err() {
                failed |= CHILD_NEW_GROUP;
            }
        }
        Err(_) => failed |= CHILD_NEW_GROUP,
    }
    // A thread of the child (which may take over the pocket of a parent's thread, emptied at
    // the fork) charges a group and exits.
    let g = fresh("pk-forked-thread");
    let g2 = g.clone();
    let joined = std::thread::spawn(move || {
        let mut v = Vec::with_capacity(50);
        g2.run(|| {
            for k in 0..50usize {
                v.push(Block::new(k * 7 + 1, [1, 16][k % 2]));
            }
        });
        drop(v);
    })
    .join();
    let s = exact(&g);
    if joined.is_err() || (s.usage, s.overhead, live(&s), s.allocs) != (0, 0, 0, 50) {
        failed |= CHILD_THREAD;
    }
    let _ = g.remove();
    // An exact fit at a limit, with bytes in this thread's pocket.
    let g = fresh("pk-forked-limit");
    let max = stock_batch() / 2;
    g.set_max(Some(max));
    let fit = size_for_cost(max);
    g.run(|| {
        for _ in 0..20 {
            drop(Block::new(100, 1));
        }
    });
    let b = g.run(|| fallible(|| Block::try_new(fit, 1)));
    if b.is_none() || exact(&g).usage != max {
        failed |= CHILD_LIMIT;
    }
    drop(b);
    let _ = g.remove();
    failed
}

/// fork() while threads churn small blocks through their pockets, and another flushes their
/// groups and charges a limited group up to its max (both stop every pocket). Each child
/// flushes, checks its figures exactly, starts a thread, fills a group to an exact limit, and
/// exits in time.
#[test]
fn fork_while_threads_churn_their_pockets() {
    let _s = serial();
    let pre = fresh("pk-prefork");
    let churned: Vec<Group> = (0..3).map(|_| fresh("pk-fork-churn")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = StopOnDrop(stop.clone());
    let churners = start_churners(&churned, 2, &stop);
    let drainer = start_drainer(&churned, &stop);
    fork_children(30, Duration::from_secs(20), |i| {
        forked_child_checks(&pre, &churned, i)
    });
    drop(stopper);
    for c in churners {
        assert!(c.join().expect("churner") > 0);
    }
    let (n, fails) = drainer.join().expect("drainer");
    assert!(
        n > 0 && fails > 0,
        "the drainer hit its limit: {n} rounds, {fails} refusals"
    );
    for g in churned {
        remove_empty(g);
    }
    let s = exact(&pre);
    assert_eq!(
        (s.usage, live(&s)),
        (0, 0),
        "the parent's group is untouched by the children"
    );
    pre.remove().expect("remove");
}

/// The same without the drainer, with more threads and many quick children, each of which
/// puts bytes in its own pocket and flushes: the flush stops every pocket, those of the
/// parent's threads included, and must not wait for one that a parent's thread was using at
/// the fork (the child will never have that thread).
#[test]
fn fork_children_flush_pockets_without_hanging() {
    let _s = serial();
    let churned: Vec<Group> = (0..2).map(|_| fresh("pk-fork-quick")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = StopOnDrop(stop.clone());
    let churners = start_churners(&churned, 3, &stop);
    fork_children(1000, Duration::from_secs(5), |_| {
        let g = &churned[0];
        g.run(|| {
            for k in 0..10usize {
                drop(Block::new(k * 10 + 1, 1));
            }
        });
        g.flush();
        0
    });
    drop(stopper);
    for c in churners {
        assert!(c.join().expect("churner") > 0);
    }
    for g in churned {
        remove_empty(g);
    }
}

/// A child forked while a drain is under way (another thread stopping the pockets) keeps
/// pockets working: the stop belongs to a thread the child does not have.
#[test]
fn fork_children_keep_their_pockets() {
    let _s = serial();
    assert_pockets_on_by_default();
    let churned: Vec<Group> = (0..2).map(|_| fresh("pk-fork-keep")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = StopOnDrop(stop.clone());
    let churners = start_churners(&churned, 1, &stop);
    let drainer = start_drainer(&churned, &stop);
    fork_children(100, Duration::from_secs(20), |_| {
        if pockets_on() {
            0
        } else {
            CHILD_POCKETS
        }
    });
    drop(stopper);
    for c in churners {
        c.join().expect("churner");
    }
    drainer.join().expect("drainer");
    for g in churned {
        assert_eq!(exact(&g).usage, 0);
        g.remove().expect("remove");
    }
}

// ---- 8. waits that progress when the waiter and the owner share one CPU ------------------------

/// The child of `waits_progress_on_one_cpu`: an owner thread churns small blocks in `g`
/// through its pocket (and now and then creates and removes a group, taking the registry
/// lock), at real-time priority 1; this thread, at priority 2 on the same CPU, wakes from short
/// sleeps at random moments, preempting the owner wherever it is (inside its pocket, in the
/// middle of a refill, holding a lock), and does what must wait for it: a flush of `g` (which
/// stops every pocket and waits for an owner inside one), a charge that fits a limit exactly
/// (waits for refills in flight, drains, stops pockets), a group created and removed (the
/// registry lock). A wait that only spins or yields never lets the lower-priority owner run
/// again: the child hangs. Returns its failures as bits (0: it passed).
fn one_cpu_child(rounds: usize) -> i32 {
    common::pin_to_one_cpu();
    let g = fresh("pk-one-cpu");
    let stop = Arc::new(AtomicBool::new(false));
    let owner = {
        let (g, stop) = (g.clone(), stop.clone());
        std::thread::spawn(move || {
            let fifo = common::real_time(1);
            let mut rng = Rng::new(4242);
            let mut held = Vec::with_capacity(64);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                g.run(|| {
                    for k in 0..32usize {
                        held.push(Block::new(rng.range(1, 600), [1, 16][k % 2]));
                    }
                    held.truncate(8);
                });
                if n % 64 == 0 {
                    let side = fresh("pk-one-cpu-side");
                    drop(side.run(|| Block::new(100, 1)));
                    side.remove().expect("removing the owner's side group");
                }
                n += 1;
            }
            drop(held);
            (fifo, n)
        })
    };
    let fifo = common::real_time(2);
    let mut rng = Rng::new(99);
    let (mut failed, mut exact_fits) = (0, 0);
    let limited = fresh("pk-one-cpu-limited");
    let max = stock_batch() / 2;
    limited.set_max(Some(max));
    let fit = size_for_cost(max);
    for round in 0..rounds {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: rng.range(20, 200) as libc::c_long * 1000,
        };
        // SAFETY: a plain relative sleep on a live timespec.
        unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
        match round % 3 {
            0 => g.flush(),
            1 => {
                limited.run(|| {
                    for _ in 0..8 {
                        drop(Block::new(rng.range(1, 200), 1));
                    }
                });
                let b = limited.run(|| fallible(|| Block::try_new(fit, 1)));
                let over = limited.run(|| fallible(|| Block::try_new(1, 1)));
                if b.is_none() || over.is_some() || exact(&limited).usage != max {
                    failed |= 1;
                }
                exact_fits += 1;
            }
            _ => {
                let side = fresh("pk-one-cpu-waiter");
                drop(side.run(|| Block::new(100, 16)));
                if side.remove().is_err() {
                    failed |= 2;
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    // Joining blocks this thread, which lets the owner run and see `stop`.
    let (owner_fifo, owner_rounds) = owner.join().expect("owner thread");
    let s = exact(&g);
    if (s.usage, s.overhead, live(&s)) != (0, 0, 0) {
        failed |= 4;
    }
    if owner_rounds == 0 || exact_fits == 0 {
        failed |= 8;
    }
    let s = exact(&limited);
    if (s.usage, live(&s)) != (0, 0) {
        failed |= 16;
    }
    if !(fifo && owner_fifo) {
        // Without the real-time policy the scheduler's time slices let any wait progress: the
        // run still checks the figures, but not the waits' progress. Said, not hidden.
        eprintln!("waits_progress_on_one_cpu: SCHED_FIFO not allowed here; ran with time slices");
    }
    failed
}

/// Every wait in memgroup progresses when the thread it waits for was preempted on the same
/// CPU by the waiter itself, even a waiter of higher real-time priority (see `one_cpu_child`),
/// and the figures stay exact. In a forked child (its scheduling changes stay there), which
/// must finish in time.
#[test]
fn waits_progress_on_one_cpu() {
    let _s = serial();
    // SAFETY: the child allocates (which the allocator supports after fork), starts a thread,
    // and leaves with _exit, never returning into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let rounds = quick_or(1500, 150);
        let failed = std::panic::catch_unwind(|| one_cpu_child(rounds)).unwrap_or(128);
        // SAFETY: _exit is async-signal-safe and skips atexit handlers and destructors.
        unsafe { libc::_exit(failed) };
    }
    let status = wait_child(pid, Duration::from_secs(60)).expect(
        "the child hung: a wait that never lets a preempted thread on its CPU run (or too slow)",
    );
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed: status {status:#x}, failed checks {:#b} (limit 1, remove 2, churned \
         group 4, no rounds 8, limited group 16, panic 128)",
        libc::WEXITSTATUS(status)
    );
}

// ---- 9. a group switch swaps the pocket's two words ----------------------------------------------

/// Two groups taking turns on one thread, block by block (each turn frees the group's oldest of
/// four live blocks and allocates one, so every allocation follows a switch: the pocket's words
/// trade places), some of the freed blocks handed to another thread that frees them in a group
/// of its own. Mid-way (blocks live) and at the end (all freed) every counter is exact after a
/// flush, and back to 0.
#[test]
fn two_groups_taking_turns_on_one_thread_stay_exact() {
    let _s = serial();
    let dying0 = dying_groups();
    const LIVE: usize = 4;
    let shapes = [(16, 1), (40, 8), (100, 16), (24, 1)];
    let costs: Vec<usize> = shapes.iter().map(|&(s, a)| block_cost(s, a)).collect();
    let groups = [fresh("pk-turn-a"), fresh("pk-turn-b")];
    let home = fresh("pk-turn-home");
    let (tx, rx) = std::sync::mpsc::channel::<Vec<Block>>();
    let home2 = home.clone();
    let freer = std::thread::spawn(move || {
        for v in rx {
            home2.run(|| drop(v));
        }
    });
    let steps = quick_or(20_000, 4_000);
    // Per group: its live blocks (with their shape), and its allocations.
    let mut held: [Vec<(Block, usize)>; 2] =
        [Vec::with_capacity(LIVE + 1), Vec::with_capacity(LIVE + 1)];
    let mut allocs = [0u64; 2];
    let mut out: Vec<Block> = Vec::with_capacity(16);
    let mut sent = 0;
    for step in 0..steps {
        let k = step % 2;
        let shape = (step / 2 + k) % shapes.len();
        groups[k].run(|| {
            if held[k].len() == LIVE {
                let (b, _) = held[k].remove(0);
                if step % 8 < 2 {
                    out.push(b);
                } else {
                    drop(b);
                }
            }
            let (size, align) = shapes[shape];
            held[k].push((Block::new(std::hint::black_box(size), align), shape));
        });
        allocs[k] += 1;
        if out.len() == out.capacity() {
            sent += out.len();
            tx.send(std::mem::replace(&mut out, Vec::with_capacity(16)))
                .expect("send");
        }
    }
    assert!(sent > 0, "some blocks were freed on the other thread");
    // Mid-way, once the other thread freed what it was handed: the live blocks exactly.
    tx.send(std::mem::take(&mut out)).expect("send");
    drop(tx);
    freer.join().expect("freeing thread");
    for (k, g) in groups.iter().enumerate() {
        let s = exact(g);
        let usage: usize = held[k].iter().map(|&(_, shape)| costs[shape]).sum();
        assert_eq!(
            (s.usage, live(&s), s.allocs, s.kmem),
            (usage, LIVE as u64, allocs[k], 0),
            "group {k} with {LIVE} blocks live: {s:?}"
        );
        assert_eq!(
            s.usage,
            held[k].iter().map(|(b, _)| b.size()).sum::<usize>() + s.overhead,
            "group {k}: usage is the live bytes plus their overhead: {s:?}"
        );
    }
    // The rest freed, half of it on this thread, half on another.
    let [h0, h1] = held;
    drop(h0);
    std::thread::spawn(move || drop(h1)).join().expect("freeing thread");
    for (k, g) in groups.iter().enumerate() {
        let s = exact(g);
        assert_eq!(
            (s.usage, s.overhead, s.kmem, s.allocs, s.frees),
            (0, 0, 0, allocs[k], allocs[k]),
            "group {k} back to 0: {s:?}"
        );
    }
    let s = exact(&home);
    assert_eq!((s.usage, s.overhead, s.allocs, s.frees), (0, 0, 0, 0), "{s:?}");
    for g in groups {
        g.remove().expect("remove");
    }
    home.remove().expect("remove");
    assert_eq!(dying_groups(), dying0);
}

/// A helper that charges `first` for `n` blocks of `size` (align 1) and frees them inside it
/// (its pocket's own word then holds their bytes), then switches to `second` and allocates a
/// block there: the switch moves `first`'s word to the far word. It pauses with both, and
/// frees its block of `second` at the end. Its vector is made outside the groups.
fn park_in_far_word(first: &Group, second: &Group, n: usize, size: usize) -> Helper {
    let (first, second) = (first.clone(), second.clone());
    Helper::start(move |pause| {
        let mut held = Vec::with_capacity(n);
        first.run(|| {
            for _ in 0..n {
                held.push(Block::new(size, 1));
            }
            held.clear();
        });
        let other = second.run(|| Block::new(size, 1));
        drop((first, second));
        pause.pause();
        drop(other);
        drop(held);
    })
}

/// A charge at a limit while the limited group's bytes sit in an idle thread's far word (the
/// thread switched to another group after freeing them): the drain before the refusal must take
/// the far word too, so a block costing exactly max fits, and one byte more is refused.
#[test]
fn a_charge_at_the_limit_takes_back_an_idle_threads_far_word() {
    let _s = serial();
    let max = stock_batch() / 2;
    let small = 100;
    let (n, cost) = (pocketful(small), block_cost(small, 1));
    let g = fresh("pk-far-limit");
    g.set_max(Some(max));
    let other = fresh("pk-far-limit-other");

    limit_takes_back(&g, max, (n, cost), "far word", || {
        park_in_far_word(&g, &other, n, small)
    });
    for g in [g, other] {
        remove_empty(g);
    }
}

/// The removal of a group whose word sits in an idle thread's far word: the removal takes it
/// back, so the removed group's record goes at once; the parent's counters stay exact.
#[test]
fn removal_takes_back_a_far_word() {
    let _s = serial();
    let dying0 = dying_groups();
    let small = 100;
    let (n, cost) = (pocketful(small), block_cost(small, 1));
    let parent = fresh("pk-far-rm");
    let c = fresh_child(&parent, "c");
    let other = fresh("pk-far-rm-other");
    let helper = park_in_far_word(&c, &other, n, small);
    assert!(
        c.stat().usage >= n * cost,
        "the helper's far word holds the child's frees"
    );
    c.remove().expect("remove");
    assert_eq!(
        dying_groups(),
        dying0,
        "the removed group's bytes in the idle thread's far word were taken back: its record goes"
    );
    let s = exact(&parent);
    assert_eq!(
        (s.usage, s.overhead, s.allocs, s.frees),
        (0, 0, n as u64, n as u64),
        "{s:?}"
    );
    helper.finish();
    let s = exact(&other);
    assert_eq!((s.usage, s.overhead, s.allocs, s.frees), (0, 0, 1, 1), "{s:?}");
    parent.remove().expect("remove");
    other.remove().expect("remove");
    assert_eq!(dying_groups(), dying0);
}
