//! Small groups the tag way (issue 12.3), under the arena design with its defaults: a group's
//! first small blocks on a thread are served by the inner allocator with the tag design's 8-byte
//! tag (charged exactly, no slab, no per-group cache) until it has asked that thread for
//! `MEMGROUP_ARENA_SLAB_AFTER` bytes (4 KiB by default); then the thread makes it a group heap,
//! which takes a slab of a class only once it has asked for that many bytes of the class (and
//! at least a slab's worth). Counters return to exactly 0 whoever frees; reallocs across the
//! boundary stay exact. Run without `MEMGROUP_ARENA_SLAB_AFTER` in the environment (the figures
//! are the default's).
#![cfg(feature = "arena")]
#[global_allocator]
static ALLOC: memgroup::ArenaAlloc = memgroup::ArenaAlloc::system();

include!("suite/common.rs");

use common::{exact, fresh, live, Block};
use memgroup::{Group, SlabInfo};

/// The default `MEMGROUP_ARENA_SLAB_AFTER`.
const SLAB_AFTER: usize = 4 << 10;

/// Blocks of class size `size` (slabs of `slab` bytes) a group heap serves the tag way before
/// its first slab of the class.
fn tag_way(size: usize, slab: usize) -> usize {
    SLAB_AFTER.max(slab).div_ceil(size)
}

/// Blocks of class size `size` a fresh group serves the tag way on a thread before its first
/// slab, when they are its first blocks there: on trial (no group heap) until the block that
/// makes `SLAB_AFTER` bytes, which makes the group heap; then `tag_way` more.
fn tag_way_first(size: usize, slab: usize) -> usize {
    SLAB_AFTER.div_ceil(size) - 1 + tag_way(size, slab)
}

fn slab_of(b: &Block) -> Option<SlabInfo> {
    // SAFETY: every block here is a live block of this binary's global allocator.
    unsafe { memgroup::slab_of(b.ptr()) }
}

/// The tag design's charge for one block: its size and its 8-byte tag (a 16-byte header at
/// alignment 16; above 16 the tag trails the block).
fn tagged(size: usize, align: usize) -> usize {
    size + if align == 16 { 16 } else { 8 }
}

/// `n` blocks of `size` allocated in `g` on this thread, into a vector made outside the group.
fn blocks(g: &Group, n: usize, size: usize, align: usize) -> Vec<Block> {
    let mut v = Vec::with_capacity(n);
    g.run(|| {
        for _ in 0..n {
            v.push(Block::new(size, align));
        }
    });
    v
}

/// Every counter of `g` back to exactly 0 (after a flush), then `g` removed.
fn back_to_zero(g: Group) {
    let s = exact(&g);
    assert_eq!(
        (s.usage, s.kmem, s.overhead, live(&s)),
        (0, 0, 0, 0),
        "{s:?}"
    );
    g.remove().expect("remove");
}

#[test]
fn a_small_groups_blocks_are_charged_like_the_tag_designs() {
    let g = fresh("small");
    let sizes = [
        (1, 1),
        (8, 8),
        (24, 8),
        (40, 8),
        (100, 4),
        (512, 8),
        (4000, 8),
        (8192, 8),
    ];
    let aligned = [(16, 16), (48, 16), (64, 64), (1000, 128)];
    let mut held = Vec::with_capacity(64);
    let mut charge = 0;
    for &(size, align) in sizes.iter().chain(&aligned) {
        for _ in 0..3 {
            held.push(g.run(|| Block::new(size, align)));
            charge += tagged(size, align);
        }
    }
    assert!(
        held.iter().all(|b| slab_of(b).is_none()),
        "no slab for a small group"
    );
    let s = exact(&g);
    assert_eq!(s.usage, charge, "exactly size + tag per block: {s:?}");
    assert_eq!(
        s.usage,
        held.iter().map(Block::size).sum::<usize>() + s.overhead
    );
    assert_eq!(live(&s), held.len() as u64);
    drop(held);
    back_to_zero(g);
}

#[test]
fn past_the_threshold_a_group_takes_a_slab() {
    let g = fresh("graduate");
    let first = tag_way_first(24, 4096);
    let mut held = blocks(&g, first, 24, 8);
    assert!(held.iter().all(|b| slab_of(b).is_none()));
    let before = exact(&g);
    assert_eq!(before.usage, first * tagged(24, 8));
    // flush() leaves the count: the next block still takes the slab.
    g.run(|| held.push(Block::new(24, 8)));
    let info = slab_of(&held[first]).expect("past the threshold: a slab");
    assert_eq!(
        (info.len, info.object_size, info.group),
        (4096, 24, g.clone())
    );
    let after = exact(&g);
    assert_eq!(
        after.usage,
        before.usage + 4096,
        "the charge jumps by a slab"
    );
    // The slab's other objects come free.
    held.extend(blocks(&g, 10, 24, 8));
    assert!(held[first..]
        .iter()
        .all(|b| slab_of(b).map(|i| i.start) == Some(info.start)));
    assert_eq!(exact(&g).usage, after.usage);
    // Other classes have not asked for enough: still the tag way.
    let other = g.run(|| Block::new(100, 8));
    assert!(slab_of(&other).is_none());
    assert_eq!(exact(&g).usage, after.usage + tagged(100, 8));
    drop((held, other));
    back_to_zero(g);
}

/// Kernel blocks count on their own (a kernel key has its own group heap): a group's kernel
/// blocks go the tag way, charged as kmem, even once its user blocks took slabs.
#[test]
fn kernel_blocks_count_on_their_own() {
    let g = fresh("small-kmem");
    let user = blocks(&g, tag_way_first(64, 4096) + 1, 64, 8);
    assert!(slab_of(&user[user.len() - 1]).is_some());
    let before = exact(&g);
    let k = g.run(|| memgroup::kernel(|| Block::new(64, 8)));
    assert!(slab_of(&k).is_none());
    let s = exact(&g);
    if memgroup::kmem_accounting() {
        assert_eq!(s.kmem, tagged(64, 8));
    }
    assert_eq!(s.usage, before.usage + tagged(64, 8));
    drop((user, k));
    back_to_zero(g);
}

#[test]
fn counters_return_to_zero_when_another_thread_frees() {
    let g = fresh("small-remote");
    // Tag-way blocks of many classes and, past the threshold, slab objects of one.
    let mut held = Vec::with_capacity(2048);
    for size in [8, 24, 100, 300, 2000] {
        held.extend(blocks(&g, 5, size, 8));
    }
    held.extend(blocks(&g, tag_way(48, 4096) + 50, 48, 8));
    assert!(held.iter().any(|b| slab_of(b).is_some()) && held.iter().any(|b| slab_of(b).is_none()));
    let s = exact(&g);
    assert_eq!(live(&s), held.len() as u64);
    // Half freed here, half on another thread.
    let theirs = held.split_off(held.len() / 2);
    std::thread::spawn(move || drop(theirs))
        .join()
        .expect("freeing thread");
    drop(held);
    back_to_zero(g);
}

/// A thread of its own allocates (so its group heap is fresh) and another frees everything.
#[test]
fn a_thread_that_exits_leaves_exact_counters() {
    let g = fresh("small-exit");
    // 480 bytes of 24-byte blocks on trial; the 16-byte blocks finish the trial (the one that
    // makes 4 KiB makes the group heap), then a slab's worth of them, then 3 in a slab.
    let on_trial = (SLAB_AFTER - 20 * 24).div_ceil(16) - 1;
    let g2 = g.clone();
    let held = std::thread::spawn(move || {
        let mut v = blocks(&g2, 20, 24, 8);
        v.extend(blocks(&g2, on_trial + tag_way(16, 4096) + 3, 16, 8));
        v
    })
    .join()
    .expect("allocating thread");
    let tag_blocks = held.iter().filter(|b| slab_of(b).is_none()).count();
    assert_eq!(tag_blocks, 20 + on_trial + tag_way(16, 4096));
    assert!(held[held.len() - 3..].iter().all(|b| slab_of(b).is_some()));
    let s = exact(&g);
    assert_eq!(
        s.usage,
        20 * tagged(24, 8) + (on_trial + tag_way(16, 4096)) * tagged(16, 8) + 4096
    );
    drop(held);
    back_to_zero(g);
}

#[test]
fn reallocs_across_the_boundary_stay_exact() {
    let g = fresh("small-realloc");
    // Class 24 past the threshold: two objects in its slab.
    let mut held = blocks(&g, tag_way_first(24, 4096) + 2, 24, 8);
    let s0 = exact(&g);
    let slab_block = held.pop().expect("a block");
    assert!(slab_of(&slab_block).is_some());
    let other_slab_block = held.pop().expect("a block");
    assert!(slab_of(&other_slab_block).is_some());
    let tag_block2 = held.remove(0);
    assert!(slab_of(&tag_block2).is_none());

    // Slab object to a class that has not asked for enough (40 -> class 48): the tag way. The
    // slab stays charged (it holds another object).
    let moved = g
        .run(|| slab_block.realloc(40))
        .unwrap_or_else(|_| panic!("realloc"));
    assert!(slab_of(&moved).is_none());
    let s = exact(&g);
    assert_eq!(s.usage, s0.usage + tagged(40, 8), "{s:?}");
    // A tagged block into the graduated class: it stays tagged, charged its new size.
    let back = g
        .run(|| tag_block2.realloc(20))
        .unwrap_or_else(|_| panic!("realloc"));
    assert!(slab_of(&back).is_none());
    assert_eq!(exact(&g).usage, s.usage - 4);
    // A tagged block past the slab sizes and back.
    let big = g
        .run(|| back.realloc(20_000))
        .unwrap_or_else(|_| panic!("realloc"));
    assert_eq!(exact(&g).usage, s.usage - 24 + 20_000);
    let small = g
        .run(|| big.realloc(100))
        .unwrap_or_else(|_| panic!("realloc"));
    assert!(slab_of(&small).is_none());
    assert_eq!(exact(&g).usage, s.usage - 24 + 100);
    // The slab object in place, within its class.
    let in_place = g
        .run(|| other_slab_block.realloc(17))
        .unwrap_or_else(|_| panic!("realloc"));
    assert!(slab_of(&in_place).is_some());
    let s = exact(&g);
    // The slab object became a tagged 40; a tagged 24 became a tagged 100.
    assert_eq!(
        s.usage,
        s0.usage + tagged(40, 8) - tagged(24, 8) + tagged(100, 8)
    );
    assert_eq!(
        s.usage,
        held.iter().map(Block::size).sum::<usize>() + 40 + 100 + 17 + s.overhead
    );
    drop((held, moved, small, in_place));
    back_to_zero(g);
}

/// A tiny group that churns one block forever: the count is cumulative, so past the threshold
/// it takes one slab, and keeps it while it churns (what a cumulative count costs: one slab of
/// the class per thread and group, here 4 KiB for one live 32-byte block).
#[test]
fn a_churning_group_takes_one_slab_past_the_threshold() {
    let g = fresh("small-churn");
    let n = tag_way_first(32, 4096);
    for i in 0..n {
        let b = g.run(|| Block::new(32, 8));
        assert!(slab_of(&b).is_none(), "block {i}");
        drop(b);
    }
    let s = exact(&g);
    assert_eq!((s.usage, live(&s)), (0, 0));
    let mut start = None;
    for _ in 0..1000 {
        let b = g.run(|| Block::new(32, 8));
        let info = slab_of(&b).expect("past the threshold: the slab");
        assert_eq!(*start.get_or_insert(info.start), info.start, "one slab");
        drop(b);
    }
    back_to_zero(g);
}

/// A removed group's thread caches go: a new group (which may reuse its id) starts counting
/// from 0.
#[test]
fn a_removed_groups_count_does_not_carry_over() {
    for round in 0..3 {
        let g = fresh("small-removed");
        let held = blocks(&g, tag_way_first(24, 4096) + 1, 24, 8);
        assert!(slab_of(&held[0]).is_none(), "round {round}: a fresh count");
        assert!(slab_of(&held[held.len() - 1]).is_some(), "round {round}");
        drop(held);
        back_to_zero(g);
    }
}

child_test! {
    /// Small groups make no per-group cache: 500 groups of 4 small blocks each on one thread
    /// leave the arena's group heaps as they were (give or take the root's own, which this
    /// test's names are allocated in), and one group past the trial makes exactly one. In a
    /// child process: the count is process-wide.
    fn small_groups_make_no_group_heap => no_group_heap_inner() {
        let heaps = || memgroup::arena_footprint().group_heaps;
        let mut groups = Vec::with_capacity(501);
        let mut held = Vec::with_capacity(2100);
        let before = heaps();
        for i in 0..500 {
            let g = fresh("tiny");
            for size in [16, 100, 300, 500] {
                held.push(g.run(|| Block::new(size + i % 7, 8)));
            }
            groups.push(g);
        }
        let after = heaps();
        assert!(after - before <= 2, "{} group heaps for 500 small groups", after - before);
        assert!(held.iter().all(|b| slab_of(b).is_none()));
        let big = fresh("past-trial");
        let n = SLAB_AFTER.div_ceil(64);
        held.extend(blocks(&big, n, 64, 8));
        assert_eq!(heaps(), after + 1, "the block that ends the trial makes the group heap");
        groups.push(big);
        drop(held);
        for g in groups {
            back_to_zero(g);
        }
    }
}

child_test! {
    /// Two groups on trial taking turns on one thread (the slow path's shortcut for a group
    /// that stays on trial, which counts its block without the heap's lock or key table): each
    /// block counts once, toward its own group, so each group's trial ends (its group heap is
    /// made) exactly at its block that makes `SLAB_AFTER` bytes, not a block earlier or later,
    /// and its blocks up to that one go the tag way. In a child process: the count is
    /// process-wide.
    fn groups_on_trial_taking_turns_end_their_trials_on_time => turns_inner() {
        let heaps = || memgroup::arena_footprint().group_heaps;
        let (a, b) = (fresh("turns-a"), fresh("turns-b"));
        // Class sizes 48 and 64: their trials end at different blocks (the 86th, the 64th).
        let (na, nb) = (SLAB_AFTER.div_ceil(48), SLAB_AFTER.div_ceil(64));
        assert_ne!(na, nb);
        let mut held = Vec::with_capacity(2 * (na + nb));
        let before = heaps();
        for i in 1..=na.max(nb) + 2 {
            held.push(a.run(|| Block::new(48, 8)));
            let ended_a = usize::from(i >= na);
            let ended_b = usize::from(i > nb);
            assert_eq!(heaps(), before + ended_a + ended_b, "a's block {i}");
            if i <= na {
                assert!(slab_of(&held[held.len() - 1]).is_none(), "a's block {i}");
            }
            held.push(b.run(|| Block::new(64, 8)));
            let ended_b = usize::from(i >= nb);
            assert_eq!(heaps(), before + ended_a + ended_b, "b's block {i}");
            if i <= nb {
                assert!(slab_of(&held[held.len() - 1]).is_none(), "b's block {i}");
            }
        }
        drop(held);
        back_to_zero(a);
        back_to_zero(b);
    }
}
