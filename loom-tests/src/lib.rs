//! Loom models of memgroup's concurrent core.
//!
//! The core's own source files (`src/sync.rs`, `src/core/`) are compiled here, unchanged, with
//! `--cfg memgroup_loom` (set by `build.rs`), which makes `sync` hand out loom's atomics. The
//! core's items are `pub(crate)`, so the models are unit tests of this crate: the files under
//! `tests/` are modules of it (see the bottom of this file), not integration tests
//! (`autotests = false` in `Cargo.toml`).
//!
//! This file is the harness: a tiny group table implementing the core's `Groups`, a model
//! thread implementing the core's `Caller` (a CPU number and perhaps a pocket), and a `World`
//! holding a table and its stocks. Its allocations and frees call the core's charge path
//! (`src/core/charge.rs`) as the designs do: `Stocks::charge` / `uncharge` as the arena
//! charges a slab, `charge_block` then `charge_block_slow` (and the uncharge pair) as the tag
//! design charges a block. The charge path itself is not written here.

// The whole core is compiled, but the models use only part of it (the real crate uses the
// rest, and `sync`'s other atomics): unused items are expected here. Nothing under `src/` is
// edited for the models.
#[allow(dead_code, unused_imports)]
#[path = "../../src/sync.rs"]
mod sync;

#[allow(dead_code)]
#[path = "../../src/core/mod.rs"]
pub mod core;

// The harness is used by the models only.
#[cfg(test)]
use harness::*;

#[cfg(test)]
mod harness {
    use crate::core::charge::Caller;
    use crate::core::counter::{Counter, Snapshot};
    use crate::core::pocket::{Place, Pocket};
    use crate::core::stock::{checked, key, sealed, Groups, Key, Mode, Stocks};
    use crate::sync::{AtomicUsize, Ordering};

    /// The model's group table: counters by id (ids start at 1), and what the stocks called:
    /// how many times each group was reported `emptied` (offline with usage 0: its record
    /// would be freed), the notifier woken, and a direct reclaim asked for (the model has no
    /// shrinkers: nothing is reclaimed).
    #[derive(Clone, Copy)]
    pub(crate) struct Records {
        counters: &'static [&'static Counter],
        emptied: &'static [AtomicUsize],
        woken: &'static AtomicUsize,
        reclaims: &'static AtomicUsize,
    }

    impl Groups for Records {
        fn counter(&self, id: u32) -> &Counter {
            self.counters[id as usize - 1]
        }

        fn emptied(&self, c: &Counter) {
            self.emptied[c.id as usize - 1].fetch_add(1, Ordering::SeqCst);
        }

        fn wake(&self) {
            self.woken.fetch_add(1, Ordering::SeqCst);
        }

        fn reclaim(&self, _at: &Counter, _bytes: usize) -> bool {
            self.reclaims.fetch_add(1, Ordering::SeqCst);
            false
        }

        /// `membarrier(2)`: a full fence here, paired with the one `light_fence` runs on the
        /// pockets' fast path under loom.
        fn barrier(&self) {
            crate::sync::fence(Ordering::SeqCst);
        }
    }

    /// A model thread as the charge path sees it: running on `cpu`, inside `fallible` (a
    /// charge over a limit is refused, not forced), with its pocket on the list if it has one
    /// (model threads that have none charge through `World::alloc`, not the block path).
    struct On {
        cpu: usize,
        pocket: Option<&'static Pocket>,
    }

    impl Caller for On {
        fn cpu(&self) -> usize {
            self.cpu
        }

        fn mode(&self) -> Mode {
            Mode::Fallible
        }

        fn pocketless(&self) -> bool {
            self.pocket.is_none()
        }

        fn listed_pocket(&self, _enlist: bool) -> Option<&Pocket> {
            self.pocket
        }
    }

    /// CPUs in the models: two, so that a thread can migrate (and a drain has two stocks to
    /// visit); two threads given the same CPU number model preemption on one CPU.
    pub(crate) const CPUS: usize = 2;

    /// One model execution's state: a group table and per-CPU stocks over it.
    ///
    /// Everything is leaked (loom threads need `'static` borrows): an execution leaks a couple
    /// of KiB, and the whole suite peaks at about 80 MB resident.
    #[derive(Clone, Copy)]
    pub(crate) struct World {
        pub(crate) stocks: &'static Stocks<Records, CPUS>,
        table: Records,
    }

    /// A group to create: its parent's id (`None` for a root), `max`, and `kmem_max`.
    #[derive(Clone, Copy)]
    pub(crate) struct Spec {
        pub(crate) parent: Option<u32>,
        pub(crate) max: Option<usize>,
        pub(crate) kmem_max: Option<usize>,
    }

    /// A group under `parent` with no limits.
    pub(crate) const fn under(parent: u32) -> Spec {
        Spec {
            parent: Some(parent),
            max: None,
            kmem_max: None,
        }
    }

    /// A root group with no limits.
    pub(crate) const ROOT: Spec = Spec {
        parent: None,
        max: None,
        kmem_max: None,
    };

    impl World {
        /// Groups `specs[0]` .. with ids 1 ..; a parent must come before its children; stocks
        /// for `CPUS` CPUs with this `batch`.
        pub(crate) fn new(specs: &[Spec], batch: usize) -> World {
            let mut counters: Vec<&'static Counter> = Vec::with_capacity(specs.len());
            for (i, spec) in specs.iter().enumerate() {
                let parent = spec.parent.map(|p| {
                    assert!((p as usize) <= i, "a parent must come before its children");
                    counters[p as usize - 1]
                });
                let c: &'static Counter = Box::leak(Box::new(Counter::new(i as u32 + 1, parent)));
                c.set_max(spec.max);
                c.set_kmem_max(spec.kmem_max);
                counters.push(c);
            }
            let emptied = specs
                .iter()
                .map(|_| AtomicUsize::new(0))
                .collect::<Vec<_>>();
            let table = Records {
                counters: Vec::leak(counters),
                emptied: Vec::leak(emptied),
                woken: Box::leak(Box::new(AtomicUsize::new(0))),
                reclaims: Box::leak(Box::new(AtomicUsize::new(0))),
            };
            let stocks = Box::leak(Box::new(Stocks::new_loom(batch, table)));
            World { stocks, table }
        }

        pub(crate) fn counter(&self, id: u32) -> &'static Counter {
            self.table.counters[id as usize - 1]
        }

        pub(crate) fn snap(&self, id: u32) -> Snapshot {
            self.counter(id).snapshot()
        }

        /// How many times the stocks reported group `id` emptied.
        pub(crate) fn emptied(&self, id: u32) -> usize {
            self.table.emptied[id as usize - 1].load(Ordering::SeqCst)
        }

        /// How many times the stocks asked for a direct reclaim (one per charge about to be
        /// refused or forced, as the model's reclaim never frees anything).
        pub(crate) fn reclaims(&self) -> usize {
            self.table.reclaims.load(Ordering::SeqCst)
        }

        /// Checks the doorbell rule once every thread is done: a counter with pressure levels
        /// pending was signalled by a charge that then woke the notifier. Takes the levels.
        pub(crate) fn check_woken(&self) {
            let woken = self.table.woken.load(Ordering::SeqCst);
            for c in self.table.counters {
                let pending = c.take_pending();
                assert!(
                    pending == 0 || woken > 0,
                    "group {}: levels {pending:#x} pending, notifier never woken",
                    c.id
                );
            }
        }

        /// An allocation of `bytes` (one block) by a thread in group `id` running on `cpu`, with
        /// no pocket, through `Stocks::charge` (the stock's fast path, else the slow path),
        /// inside `fallible`. Returns the key charged (a removed group's new block goes to its
        /// nearest live ancestor), or `None` when refused.
        pub(crate) fn alloc(&self, cpu: usize, id: u32, kernel: bool, bytes: usize) -> Option<Key> {
            let on = On { cpu, pocket: None };
            self.stocks.charge(&on, key(id, kernel), bytes, 1)
        }

        /// Frees a block of `bytes` charged to `key`, on `cpu`, through `Stocks::uncharge`.
        pub(crate) fn free(&self, cpu: usize, key: Key, bytes: usize) {
            self.stocks
                .uncharge(&On { cpu, pocket: None }, key, bytes, 1);
        }

        /// A pocket for a new thread, put on the list as `src/thread.rs` puts a thread's own:
        /// in a free place, else in a new one, published. Leaked (a real one lives in its
        /// thread's thread-local block; places are never freed).
        pub(crate) fn pocket(&self) -> &'static Pocket {
            let p = &*Box::leak(Box::new(Pocket::new()));
            let fresh = || Some(&*Box::leak(Box::new(Place::new())));
            assert!(
                self.stocks.pockets().enlist(p, fresh),
                "a place for the pocket"
            );
            p
        }

        /// An allocation of `bytes` (one block, whose overhead is `pad` bytes beyond the tag
        /// formula) by the owner of pocket `p`, in group `id`, running on `cpu`, inside
        /// `fallible`, as the tag design charges it: `Stocks::charge_block` (the pocket), then
        /// `Stocks::charge_block_slow` (the stock or the counters, and a refill of the pocket).
        /// Returns the key charged (a removed group's block goes to its nearest live
        /// ancestor), or `None` if refused.
        pub(crate) fn pocket_alloc(
            &self,
            cpu: usize,
            p: &'static Pocket,
            id: u32,
            kernel: bool,
            bytes: usize,
            pad: usize,
        ) -> Option<Key> {
            let (on, k) = (
                On {
                    cpu,
                    pocket: Some(p),
                },
                key(id, kernel),
            );
            if self.stocks.charge_block(&on, p, k, checked(k), bytes, pad) {
                return Some(k);
            }
            self.stocks.charge_block_slow(&on, k, bytes, pad)
        }

        /// Frees a block of `bytes` and `pad` charged to `key`, by the owner of pocket `p` on
        /// `cpu`, as the tag design uncharges it: `Stocks::uncharge_block` (the pocket, given the block's tag), then
        /// `Stocks::uncharge_block_unpocketed` (the stock, and a refill of the pocket if it was
        /// full).
        pub(crate) fn pocket_free(
            &self,
            cpu: usize,
            p: &'static Pocket,
            key: Key,
            bytes: usize,
            pad: usize,
        ) {
            let on = On {
                cpu,
                pocket: Some(p),
            };
            if !self.stocks.uncharge_block(p, sealed(key), bytes, pad) {
                self.stocks.uncharge_block_unpocketed(&on, key, bytes, pad);
            }
        }

        /// Whether some pocket's word (its own or its far one) names group `id` (either key),
        /// with or without content. A racy look through the owners' own access
        /// (`pocket_holds`, `pocket_far_holds`), so only meaningful once no pocket is in use;
        /// `false` for a pocket a taker is stopping.
        pub(crate) fn pocket_names(&self, id: u32) -> bool {
            self.stocks.pockets().iter().any(|p| {
                [false, true].into_iter().any(|kernel| {
                    self.stocks.pocket_holds(p, key(id, kernel))
                        || self.stocks.pocket_far_holds(p, key(id, kernel))
                })
            })
        }

        /// Drains every stock (what `Group::flush` does for the root), so that every counter is
        /// exact; also checks that no drain is left counted in.
        pub(crate) fn flush(&self) {
            self.stocks.drain(|_| true);
            assert!(self.stocks.quiescent(), "a drain is still counted in");
            self.check_woken();
        }
    }

    /// Runs `f` under loom, exploring every interleaving with at most `preemptions`
    /// preemptions (`LOOM_MAX_PREEMPTIONS`, if set, overrides it) and executions of at most
    /// 10,000 branches (`LOOM_MAX_BRANCHES` overrides it). `LOOM_LOG=trace` (with
    /// `LOOM_LOCATION=1` for source locations) logs every execution's operations; the last one
    /// logged before a failure is the failing interleaving.
    pub(crate) fn model<F>(preemptions: usize, f: F)
    where
        F: Fn() + Sync + Send + 'static,
    {
        let mut builder = loom::model::Builder::new();
        if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
            builder.preemption_bound = Some(preemptions);
        }
        // The scans of the per-CPU counts (`Stocks::quiescent`, the wait before a refused
        // charge drains) and the backoff's rounds make longer executions than loom's default
        // of 1,000 branches allows.
        if std::env::var_os("LOOM_MAX_BRANCHES").is_none() {
            builder.max_branches = 10_000;
        }
        let log = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("LOOM_LOG"))
            .with_test_writer()
            .without_time()
            .finish();
        tracing::subscriber::with_default(log, || builder.check(f));
    }
}

/// What the pocket models (`tests/pocket.rs`, `tests/swap.rs`) expect of a group once every
/// stock and pocket is drained, and its check.
#[cfg(test)]
mod expect {
    use crate::core::counter::Snapshot;
    use crate::World;

    /// What group `id` should show once every stock and pocket is drained.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub(crate) struct Expect {
        pub(crate) usage: usize,
        pub(crate) allocs: u64,
        pub(crate) frees: u64,
        pub(crate) overhead: isize,
        /// Charges refused at its limit or below (events `max` and `fail`).
        pub(crate) refused: u64,
    }

    pub(crate) fn check(w: &World, id: u32, e: Expect) {
        let s: Snapshot = w.snap(id);
        let got = Expect {
            usage: s.usage,
            allocs: s.allocs,
            frees: s.frees,
            overhead: s.overhead,
            refused: s.events[2],
        };
        assert_eq!(got, e, "group {id} (events {:?})", s.events);
        assert_eq!(s.kmem, 0, "group {id}: no kernel block");
        assert_eq!(s.events[1], s.events[2], "group {id}: nothing is forced");
    }

    /// The sum of two groups' expectations, for their parent.
    pub(crate) fn sum(a: Expect, b: Expect) -> Expect {
        Expect {
            usage: a.usage + b.usage,
            allocs: a.allocs + b.allocs,
            frees: a.frees + b.frees,
            overhead: a.overhead + b.overhead,
            refused: a.refused + b.refused,
        }
    }
}

#[cfg(test)]
#[path = "../tests/counter.rs"]
mod counter_models;

#[cfg(test)]
#[path = "../tests/stock.rs"]
mod stock_models;

#[cfg(test)]
#[path = "../tests/removal.rs"]
mod removal_models;

#[cfg(test)]
#[path = "../tests/pressure.rs"]
mod pressure_models;

#[cfg(test)]
#[path = "../tests/pocket.rs"]
mod pocket_models;

#[cfg(test)]
#[path = "../tests/swap.rs"]
mod swap_models;
