// Kernel memory: the three kmem_max configurations of seeds/000 and MEMGROUP_KMEM=0.

include!("common.rs");

use common::{
    exact, fresh, fresh_child, live, room, size_for_cost,
    Block,
};
use memgroup::{fallible, kernel, kmem_accounting, Group};

fn try_block(size: usize) -> Option<Block> {
    fallible(|| Block::try_new(size, 1))
}

/// kmem unlimited: kernel allocations count in usage and in kmem; only max matters.
#[test]
fn kmem_unlimited_only_max_matters() {
    assert!(kmem_accounting(), "kmem accounting is on by default");
    let g = fresh("kmem-unl");
    let k = g.run(|| kernel(|| Block::new(100_000, 1)));
    let s = exact(&g);
    assert_eq!(s.usage, 100_000 + s.overhead);
    assert_eq!(
        s.kmem, s.usage,
        "a kernel block is kmem, its overhead included"
    );
    assert_eq!(s.kmem_max, None);
    let u = g.run(|| Block::new(50_000, 1));
    let s2 = exact(&g);
    assert_eq!(s2.usage, 150_000 + s2.overhead);
    assert_eq!(s2.kmem, s.kmem, "user allocations do not count in kmem");
    // Limit only the total: kernel charges are refused exactly at max, like user ones.
    let max = s2.usage + 100_000;
    g.set_max(Some(max));
    let fits = size_for_cost(100_000);
    assert!(g.run(|| kernel(|| try_block(fits + 1))).is_none());
    let k2 = g
        .run(|| kernel(|| try_block(fits)))
        .expect("kernel exact fit");
    let s3 = exact(&g);
    assert_eq!(s3.usage, max);
    assert_eq!(s3.kmem, s.kmem + 100_000);
    assert_eq!(s3.events.fail, 1);
    drop((k, u, k2));
    let s = exact(&g);
    assert_eq!((s.usage, s.kmem, s.overhead), (0, 0, 0));
}

/// kmem_max < max: kernel charges fail first at kmem_max; user memory still fits up to max.
#[test]
fn kmem_max_below_max_fails_kernel_first() {
    let g = fresh("kmem-below");
    let (max, kmax) = (1_000_000, 300_000);
    g.set_max(Some(max));
    g.set_kmem_max(Some(kmax));
    assert_eq!(g.stat().kmem_max, Some(kmax));
    let kfits = size_for_cost(kmax);
    // Both nesting orders of kernel and fallible.
    assert!(
        g.run(|| kernel(|| try_block(kfits + 1))).is_none(),
        "over kmem_max"
    );
    assert!(g
        .run(|| fallible(|| kernel(|| Block::try_new(kfits + 1, 1))))
        .is_none());
    let s = exact(&g);
    assert_eq!(
        (s.usage, s.kmem, s.allocs),
        (0, 0, 0),
        "failed kernel charges change nothing"
    );
    assert_eq!(s.events.fail, 2);
    let k = g
        .run(|| kernel(|| try_block(kfits)))
        .expect("exactly kmem_max");
    let s = exact(&g);
    assert_eq!((s.usage, s.kmem), (kmax, kmax));
    // At kmem_max: one more kernel byte fails although the total is far below max.
    assert!(g.run(|| kernel(|| try_block(1))).is_none());
    assert_eq!(exact(&g).events.fail, 3);
    // User memory still fits up to max exactly.
    let ufits = size_for_cost(max - kmax);
    assert!(g.run(|| try_block(ufits + 1)).is_none(), "user over max");
    let u = g.run(|| try_block(ufits)).expect("user up to max");
    let s = exact(&g);
    assert_eq!((s.usage, s.kmem), (max, kmax));
    assert_eq!(
        (s.events.max, s.events.fail),
        (4, 4),
        "every refusal hit a max or kmem_max"
    );
    drop(k);
    let s = exact(&g);
    assert_eq!((s.usage, s.kmem), (max - kmax, 0));
    drop(u);
    assert_eq!(exact(&g).usage, 0);
}

/// Under the default policy an infallible kernel allocation over kmem_max is forced.
#[test]
fn kmem_max_overcharge_by_default() {
    let g = fresh("kmem-over");
    g.set_kmem_max(Some(50_000));
    let k = g.run(|| kernel(|| Block::new(100_000, 1)));
    let s = exact(&g);
    assert_eq!(s.kmem, 100_000 + s.overhead);
    assert!(s.kmem > 50_000);
    assert_eq!(s.events.fail, 0);
    assert_eq!(s.events.max, 1, "hitting kmem_max is a limit event");
    drop(k);
    assert_eq!(exact(&g).kmem, 0);
}

/// kmem_max on an ancestor is checked for kernel charges below it, not for user ones.
#[test]
fn kmem_max_on_the_chain() {
    let p = fresh("kmem-chain-p");
    let c = fresh_child(&p, "c");
    let base = exact(&p);
    assert!(base.kmem > 0, "c's bookkeeping is kernel memory of p");
    p.set_kmem_max(Some(base.kmem + 100_000));
    let fits = size_for_cost(100_000);
    assert!(c.run(|| kernel(|| try_block(fits + 1))).is_none());
    let s = exact(&c);
    assert_eq!((s.usage, s.kmem), (0, 0));
    let u = c
        .run(|| try_block(300_000))
        .expect("user memory is not held by kmem_max");
    let k = c
        .run(|| kernel(|| try_block(fits)))
        .expect("kernel exact fit on the chain");
    let ps = exact(&p);
    let cs = exact(&c);
    assert_eq!(cs.usage, 300_000 + fits + cs.overhead);
    assert_eq!(cs.kmem, 100_000);
    assert_eq!(ps.kmem, base.kmem + 100_000);
    assert_eq!(ps.usage, base.usage + cs.usage);
    assert_eq!(ps.events.fail - base.events.fail, 1);
    drop((u, k));
    assert_eq!(exact(&p).usage, base.usage);
}

/// kmem_max >= max: only the total matters, whatever the mix of kernel and user memory.
#[test]
fn kmem_max_at_or_above_max_only_total_matters() {
    for kmax in [500_000, 800_000] {
        let g = fresh("kmem-above");
        let max = 500_000;
        g.set_max(Some(max));
        g.set_kmem_max(Some(kmax));
        // All kernel, up to max.
        let fits = size_for_cost(max);
        assert!(g.run(|| kernel(|| try_block(fits + 1))).is_none());
        let k = g
            .run(|| kernel(|| try_block(fits)))
            .expect("kernel up to max");
        let s = exact(&g);
        assert_eq!((s.usage, s.kmem), (max, max));
        assert!(g.run(|| try_block(1)).is_none(), "user memory over max");
        drop(k);
        // A mix: 200_000 kernel + 300_000 user fills max exactly; then nothing more fits.
        let kpart = size_for_cost(200_000);
        let upart = size_for_cost(300_000);
        let k = g.run(|| kernel(|| try_block(kpart))).expect("kernel part");
        let u = g.run(|| try_block(upart)).expect("user part");
        let s = exact(&g);
        assert_eq!((s.usage, s.kmem), (max, 200_000));
        assert!(s.kmem < kmax);
        assert!(
            g.run(|| kernel(|| try_block(1))).is_none(),
            "kernel over the total"
        );
        assert!(g.run(|| try_block(1)).is_none(), "user over the total");
        let s = exact(&g);
        assert_eq!((s.usage, s.kmem), (max, 200_000));
        assert_eq!(s.events.fail, 4);
        drop((k, u));
        let s = exact(&g);
        assert_eq!((s.usage, s.kmem, live(&s)), (0, 0, 0));
    }
}

/// Small kernel allocations go through the stocks like user ones and are exact after flush.
#[test]
fn small_kernel_allocations_are_exact_after_flush() {
    let g = fresh("kmem-small");
    let sizes: Vec<usize> = (1..=300).map(|i| i * 7 % 1000 + 1).collect();
    let mut held = Vec::with_capacity(sizes.len() * 2);
    g.run(|| {
        for &s in &sizes {
            held.push(kernel(|| Block::new(s, 1)));
            held.push(Block::new(s, 1));
        }
    });
    let total: usize = sizes.iter().sum();
    let s = exact(&g);
    assert_eq!(s.usage, 2 * total + s.overhead);
    assert_eq!(live(&s), 2 * sizes.len() as u64);
    // Half the overhead is kernel (one kernel and one user block per size, same overhead each).
    assert_eq!(s.kmem, total + s.overhead / 2);
    // Kernel memory freed from a user scope of another group still uncharges kmem of its owner.
    let other = fresh("kmem-small-other");
    other.run(|| drop(held));
    let s = exact(&g);
    assert_eq!((s.usage, s.kmem, s.overhead, live(&s)), (0, 0, 0, 0));
    assert_eq!(exact(&other).usage, 0);
}

/// The kind of a new block follows the innermost scope, however `kernel` and `enter` nest: a
/// group entered inside `kernel` charges kernel memory until the scope ends, then user memory
/// (the guard outliving it), and the group left inside `kernel` charges kernel memory again.
#[test]
fn kind_follows_kernel_scope_across_enter() {
    let g = fresh("kmem-nest");
    let h = fresh_child(&g, "inner");
    // Whether a block of `size` made by `make` raised `grp`'s usage and its kmem.
    let kind = |grp: &Group, make: &dyn Fn() -> Block| -> (bool, bool) {
        let before = exact(grp);
        let b = make();
        let after = exact(grp);
        drop(std::hint::black_box(b));
        (
            after.usage >= before.usage + 700,
            after.kmem >= before.kmem + 700,
        )
    };
    let block = || Block::new(700, 1);
    // Entered inside kernel(..), the guard outliving the scope.
    g.run(|| {
        let guard = kernel(|| h.enter());
        assert_eq!(kind(&h, &block), (true, false), "after the kernel scope: user");
        assert_eq!(kind(&h, &|| kernel(block)), (true, true), "in kernel(..) again");
        drop(guard);
        assert_eq!(kind(&g, &block), (true, false), "g again, user");
    });
    // A guard made and dropped inside kernel(..): the group left is charged kernel memory.
    g.run(|| {
        kernel(|| {
            let e = h.enter();
            assert_eq!(kind(&h, &block), (true, true), "h, entered in kernel(..)");
            drop(e);
            assert_eq!(kind(&g, &block), (true, true), "g, h left in kernel(..)");
            assert_eq!(kind(&h, &block), (false, false), "h left");
        });
        assert_eq!(kind(&g, &block), (true, false), "g, after kernel(..)");
    });
}

/// A kernel block stays kernel memory through realloc, wherever the realloc happens.
#[test]
fn realloc_keeps_the_kind() {
    let g = fresh("kmem-realloc");
    let other = fresh("kmem-realloc-other");
    let b = g.run(|| kernel(|| Block::new(1000, 8)));
    let b = other.run(|| b.realloc(150_000)).ok().expect("grow");
    let s = exact(&g);
    assert_eq!(
        (s.usage, s.kmem),
        (150_000 + s.overhead, 150_000 + s.overhead)
    );
    let b = b.realloc(2000).ok().expect("shrink");
    let s = exact(&g);
    assert_eq!((s.usage, s.kmem), (2000 + s.overhead, 2000 + s.overhead));
    // And a user block stays user memory when reallocated inside kernel(..).
    let u = g.run(|| Block::new(500, 1));
    let u = kernel(|| u.realloc(90_000)).ok().expect("grow user block");
    let s = exact(&g);
    assert_eq!(s.kmem, 2000 + s.overhead / 2, "the user block adds no kmem");
    assert_eq!(s.usage, 2000 + 90_000 + s.overhead);
    drop((b, u));
    let s = exact(&g);
    assert_eq!((s.usage, s.kmem), (0, 0));
    assert_eq!(exact(&other).usage, 0);
}

child_test! {
    /// MEMGROUP_KMEM=0: kernel allocations are charged as user memory and kmem stays 0.
    fn kmem_accounting_off_by_env => kmem_off_inner("MEMGROUP_KMEM" = "0") {
        assert!(!kmem_accounting());
        let p = fresh("nokmem-p");
        let c = fresh_child(&p, "c");
        let ps = exact(&p);
        assert!(ps.usage > 0, "bookkeeping is still charged");
        assert_eq!(ps.kmem, 0, "bookkeeping is charged as user memory");
        c.set_kmem_max(Some(1000));
        let k = c
            .run(|| kernel(|| try_block(100_000)))
            .expect("kmem_max does not apply");
        let mut small = Vec::with_capacity(100);
        c.run(|| kernel(|| (1..100).for_each(|i| small.push(Block::new(i * 13, 1)))));
        let s = exact(&c);
        let requested = 100_000 + (1..100).map(|i| i * 13).sum::<usize>();
        assert_eq!(s.usage, requested + s.overhead);
        assert_eq!(live(&s), 100);
        assert_eq!(s.kmem, 0);
        assert_eq!(exact(&p).kmem, 0);
        // max still applies to kernel allocations: once the room already charged is used up (none
        // in the tag design; free objects of a slab in the arena design), the next is refused.
        let free = room(&c, 100);
        c.set_max(Some(s.usage + 10));
        let mut extra = Vec::with_capacity(free);
        for _ in 0..free {
            extra.push(
                c.run(|| kernel(|| try_block(100)))
                    .expect("room already charged"),
            );
        }
        assert!(c.run(|| kernel(|| try_block(100))).is_none());
        drop((k, small, extra));
        let s = exact(&c);
        assert_eq!((s.usage, s.kmem, s.overhead), (0, 0, 0));
        assert_eq!(
            Group::root().stat().kmem,
            0,
            "nothing in the process is kmem"
        );
    }
}
