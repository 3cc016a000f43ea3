//! The arena design against the tag design and the raw inner allocator, in one run (needs
//! `--features arena`; without it this benchmark only says so).
//!
//! Part 1, time: the small-size churn of `benches/churn.rs` (the same code, shared in
//! `benches/workload/mod.rs`: a ring of `CHURN_SLOTS` live blocks of 8..=512 bytes, each step
//! frees the oldest and allocates a new one), 1 thread, and 2 threads each churning its own
//! group with 1 block in `CHURN_REMOTE` freed by the other thread. Rows: `system` (the raw
//! inner allocator),
//! `mimalloc` (for reference), `tag` (`TagAlloc<System>`) and `arena` (`ArenaAlloc<System>`),
//! interleaved, as ns per alloc+free pair (median and min of `CHURN_RUNS` runs) and ratios to
//! `system`. Target: `arena` <= 1.3x `system` (median). A third scenario, `2r`, frees every
//! block on the other thread (a producer/consumer pair), the arena's slowest case.
//!
//! Part 2, memory (seeds/003's trade-off), for `tag` and `arena`:
//! - 10,000 groups, each holding 4 small blocks (sizes from the churn's distribution);
//! - one group holding 1,000,000 small blocks;
//! - memory per idle group: 100,000 groups created and left empty (resident memory, and what
//!   their records charge their parent).
//!
//! Part 3, many small groups (`ARENA_PART=groups`, issue 12.3's groups on trial): `SMALL_GROUPS`
//! groups (default 1,000) taking turns on one thread, 4 live blocks of 16..=64 bytes each,
//! `SMALL_STEPS` alloc+free pairs (default 20,000), rows `system`, `tag`, `arena` (`CHURN_ONLY`).
//! One run each: the figure is callgrind's, `--toggle-collect='arena::bench::small_groups_churn*'`,
//! Ir / `SMALL_STEPS`. With more groups than the arena's trial table holds (64 a thread), they
//! evict each other and start their trials over; `SMALL_GROUPS=16 SMALL_STEPS=1000` keeps
//! every group on trial.
//!
//! Reported: bytes requested, bytes charged (the groups' `usage`, bookkeeping of the groups'
//! records excluded), charged per requested byte, and the memory the design really holds for
//! them: for `tag`, the inner allocator's in-use bytes (glibc `mallinfo2().uordblks`, which
//! counts each chunk's header and rounding but not free memory); for `arena`, the slabs holding
//! the blocks, plus the inner allocator's in-use bytes for the blocks a group's thread had served
//! the tag way before taking slabs of their class (`MEMGROUP_ARENA_SLAB_AFTER`), plus the memory
//! it mapped for its per-group caches (group heaps and key tables), charged to no one.
//!
//! Commands:
//!
//! ```text
//! cargo bench --features arena --bench arena                  # everything (about a minute)
//! ARENA_QUICK=1 cargo bench --features arena --bench arena    # one short repetition
//! cargo test --features arena --benches                        # the same smoke check
//! ```
//!
//! Environment (all optional): `ARENA_QUICK=1`; `CHURN_RUNS=K` timed runs per row (default 9);
//! `CHURN_MS=ms` target length of one raw run (default 150); `CHURN_SLOTS=n` (default 1024);
//! `CHURN_REMOTE=r` (default 8); `CHURN_ONLY=a,b` rows among `system`, `mimalloc`, `tag`,
//! `arena`; `ARENA_SCENARIOS=1,2,2r` scenarios to run; `ARENA_PART=time|memory` one part only;
//! `ARENA_GROUPS=n` (default 10000); `ARENA_OBJECTS=n` (default 1000000);
//! `ARENA_IDLE_GROUPS=n` idle groups whose memory per group is measured (default 100000).
//!
//! Instructions per alloc+free pair, 1 thread (load-independent; quick mode runs 20,000 steps
//! after filling a 1024-block ring, so Ir per pair = "Collected" / 20000):
//!
//! ```text
//! BIN=$(cargo bench --features arena --bench arena --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p')
//! for a in system tag arena; do
//!   ARENA_QUICK=1 ARENA_PART=time ARENA_SCENARIOS=1 CHURN_ONLY=$a valgrind --tool=callgrind \
//!     --toggle-collect='arena::workload::churn*' --callgrind-out-file=callgrind.arena.$a "$BIN" --bench
//! done
//! ```

#[cfg(not(feature = "arena"))]
fn main() {
    println!("benches/arena.rs needs the arena design: cargo bench --features arena --bench arena");
}

#[cfg(feature = "arena")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    bench::main()
}

// The churn workload of benches/churn.rs (request tables, the measured loop `churn`, the
// hand-off between threads, the runs), shared with it.
#[cfg(feature = "arena")]
#[path = "common/mod.rs"]
mod common;
#[cfg(feature = "arena")]
#[path = "workload/mod.rs"]
mod workload;

#[cfg(feature = "arena")]
mod bench {
    use std::alloc::{GlobalAlloc, System};
    use std::time::{Duration, Instant};

    use memgroup::{ArenaAlloc, Group, TagAlloc};
    use mimalloc::MiMalloc;

    use crate::common::resident;
    use crate::workload::{
        alloc_one, env_usize, free_one, load_average, make_table, median, min, run_one, run_two,
        Req, RunOut, Slot, REMOTE, TABLE_LEN,
    };

    #[global_allocator]
    static GLOBAL: System = System;

    /// `arena-bench-1t`, then the two groups of the 2-thread scenarios.
    type Params = crate::workload::Params<3>;

    static SYSTEM: System = System;
    static MIMALLOC: MiMalloc = MiMalloc;
    static TAG: TagAlloc = TagAlloc::system();
    static ARENA: ArenaAlloc = ArenaAlloc::system();

    // ---- rows ---------------------------------------------------------------------------

    struct Row {
        key: &'static str,
        /// Charges memgroup groups (checked after every run).
        charges: bool,
        run: fn(&Params, usize) -> RunOut,
    }

    fn run_with<A: GlobalAlloc + Sync>(a: &A, p: &Params, threads: usize) -> RunOut {
        if threads == 1 {
            run_one(a, p, 0)
        } else {
            run_two(a, p, 0)
        }
    }

    fn all_rows() -> Vec<Row> {
        vec![
            Row {
                key: "system",
                charges: false,
                run: |p, t| run_with(&SYSTEM, p, t),
            },
            Row {
                key: "mimalloc",
                charges: false,
                run: |p, t| run_with(&MIMALLOC, p, t),
            },
            Row {
                key: "tag",
                charges: true,
                run: |p, t| run_with(&TAG, p, t),
            },
            Row {
                key: "arena",
                charges: true,
                run: |p, t| run_with(&ARENA, p, t),
            },
        ]
    }

    fn groups_of(p: &Params, threads: usize) -> &[Group] {
        if threads == 1 {
            &p.groups[..1]
        } else {
            &p.groups[1..]
        }
    }

    /// Fails loudly if an allocator lost or invented a charge during the run.
    fn check(row: &Row, p: &Params, threads: usize, before: &[(u64, u64)]) {
        let expected = if row.charges {
            (p.slots + p.ops) as u64
        } else {
            0
        };
        crate::workload::check_groups(row.key, groups_of(p, threads), before, expected);
    }

    fn run_checked(row: &Row, p: &Params, threads: usize) -> RunOut {
        let before = crate::workload::counts(groups_of(p, threads));
        let out = (row.run)(p, threads);
        check(row, p, threads, &before);
        out
    }

    // ---- configuration and report -------------------------------------------------------

    /// One row of the time table.
    struct Line {
        scenario: &'static str,
        key: &'static str,
        ns: Vec<f64>,
        sent: usize,
        waits: usize,
        frees: usize,
    }

    /// A scenario: threads, and 1 block in `remote` freed by the other thread.
    struct Scenario {
        name: &'static str,
        threads: usize,
        remote: usize,
    }

    fn time_part(quick: bool) -> Result<(), Box<dyn std::error::Error>> {
        let runs = env_usize("CHURN_RUNS")
            .unwrap_or(if quick { 1 } else { 9 })
            .max(1);
        let target = Duration::from_millis(env_usize("CHURN_MS").unwrap_or(150) as u64);
        let slots = env_usize("CHURN_SLOTS").unwrap_or(1024);
        assert!(
            slots.is_power_of_two(),
            "CHURN_SLOTS must be a power of two"
        );
        let remote = env_usize("CHURN_REMOTE").unwrap_or(8);
        let only: Option<Vec<String>> = std::env::var("CHURN_ONLY")
            .ok()
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
        let rows: Vec<Row> = all_rows()
            .into_iter()
            .filter(|r| only.as_ref().is_none_or(|o| o.iter().any(|k| k == r.key)))
            .collect();
        let scenarios = [
            Scenario {
                name: "1",
                threads: 1,
                remote: 0,
            },
            Scenario {
                name: "2",
                threads: 2,
                remote,
            },
            Scenario {
                name: "2r",
                threads: 2,
                remote: 1,
            },
        ];
        let groups = [
            Group::new("arena-bench-1t")?,
            Group::new("arena-bench-2t-a")?,
            Group::new("arena-bench-2t-b")?,
        ];
        let system = all_rows().into_iter().next().expect("system row");
        let mut lines: Vec<Line> = Vec::new();
        let mut ops_used = Vec::new();
        let mut groups = Some(groups);
        let wanted: Option<Vec<String>> = std::env::var("ARENA_SCENARIOS")
            .ok()
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
        let scenarios = scenarios.iter().filter(|sc| {
            wanted
                .as_ref()
                .is_none_or(|w| w.iter().any(|n| n == sc.name))
        });
        for sc in scenarios {
            let mut p = Params {
                ops: 100_000,
                slots,
                tables: [
                    make_table(1, sc.remote as u64),
                    make_table(2, sc.remote as u64),
                ],
                groups: groups.take().expect("groups"),
            };
            if quick {
                p.ops = 20_000;
            } else {
                for _ in 0..2 {
                    let t = run_checked(&system, &p, sc.threads).elapsed.as_secs_f64();
                    let scaled = p.ops as f64 * target.as_secs_f64() / t.max(1e-6);
                    p.ops = (scaled as usize).clamp(10_000, 100_000_000);
                }
                for row in &rows {
                    run_checked(row, &p, sc.threads);
                }
            }
            ops_used.push((sc.name, p.ops));
            let mut ns: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
            let (mut sent, mut waits) = (vec![0; rows.len()], vec![0; rows.len()]);
            for rep in 0..runs {
                for j in 0..rows.len() {
                    let i = (j + rep) % rows.len();
                    let out = run_checked(&rows[i], &p, sc.threads);
                    ns[i].push(out.elapsed.as_secs_f64() * 1e9 / p.ops as f64);
                    sent[i] += out.sent;
                    waits[i] += out.waits;
                }
            }
            for (i, r) in rows.iter().enumerate() {
                lines.push(Line {
                    scenario: sc.name,
                    key: r.key,
                    ns: ns[i].clone(),
                    sent: sent[i],
                    waits: waits[i],
                    frees: runs * sc.threads * p.ops,
                });
            }
            groups = Some(p.groups);
        }

        println!("## memgroup arena: alloc+free churn of 8..=512-byte blocks\n");
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let ops: Vec<String> = ops_used
            .iter()
            .map(|(n, o)| format!("{o} steps/thread ({n})"))
            .collect();
        println!(
            "runs/row: {runs}{}, {}, ring: {slots} live blocks/thread, remote frees: scenario 2 \
             1 in {remote}, scenario 2r all; stock batch: {} B, CPUs: {cpus}, load average \
             before/after: {}\n",
            if quick { " (quick)" } else { "" },
            ops.join(", "),
            memgroup::stock_batch(),
            load_average(),
        );
        println!("ns/pair is per thread: wall time x threads / pairs. ratio: to `system` in the same run.\n");
        println!("| threads | allocator | median ns/pair | min ns/pair | ratio (median) | ratio (min) | remote frees |");
        println!("|---|---|---:|---:|---:|---:|---:|");
        for l in &lines {
            let (sc, key, ns) = (l.scenario, l.key, &l.ns);
            let base = lines
                .iter()
                .find(|b| b.scenario == sc && b.key == "system")
                .map(|b| &b.ns);
            let (rmed, rmin) = match base {
                Some(b) => (
                    format!("{:.2}x", median(ns) / median(b)),
                    format!("{:.2}x", min(ns) / min(b)),
                ),
                None => ("-".into(), "-".into()),
            };
            println!(
                "| {sc} | {key} | {:.1} | {:.1} | {rmed} | {rmin} | {:.1}% |",
                median(ns),
                min(ns),
                100.0 * l.sent as f64 / l.frees.max(1) as f64
            );
        }
        let waits: Vec<String> = lines
            .iter()
            .filter(|l| l.waits > 0)
            .map(|l| format!("{} {} {}", l.scenario, l.key, l.waits))
            .collect();
        println!(
            "\nwaits for a full hand-off queue: {}",
            if waits.is_empty() {
                "none".to_string()
            } else {
                waits.join(", ")
            }
        );
        println!("target: arena <= 1.3x system per pair (median), 1 and 2 threads");
        Ok(())
    }

    // ---- memory ---------------------------------------------------------------------------

    /// Bytes in use in glibc's malloc (the tag design's inner allocator): chunk headers and
    /// rounding included, free memory excluded.
    fn malloc_in_use() -> usize {
        // SAFETY: mallinfo2 has no preconditions.
        unsafe { libc::mallinfo2().uordblks }
    }

    /// A block size from the churn's distribution.
    fn size_of_req(req: Req) -> usize {
        (req & 0x3ff) as usize
    }

    struct Mem {
        requested: usize,
        charged: usize,
        real: usize,
        detail: String,
    }

    /// What the arena really holds for `held`: the distinct slabs holding its blocks, the inner
    /// allocator's in-use growth (`malloc`, the blocks served the tag way) and the caches'
    /// growth (`meta`, with `heaps` group heaps); and the detail column.
    fn arena_real(held: &[Slot], malloc: usize, meta: usize, heaps: usize) -> (usize, String) {
        let mut slabs = std::collections::HashMap::new();
        let mut tagged = 0;
        for s in held {
            // SAFETY: every held block is a live block of `ARENA`.
            match unsafe { memgroup::slab_of(s.ptr) } {
                Some(info) => {
                    slabs.insert(info.start, info.len);
                }
                None => tagged += 1,
            }
        }
        let slab_bytes: usize = slabs.values().sum();
        (
            slab_bytes + malloc + meta,
            format!(
                "{} slabs {slab_bytes} + malloc in use {malloc} ({tagged} blocks the tag way) + \
                 caches {meta} ({heaps} group heaps)",
                slabs.len()
            ),
        )
    }

    /// `groups` groups under one parent, `per` blocks each, allocated with `a`.
    fn many_groups<A: GlobalAlloc>(a: &A, design: &str, groups: usize, per: usize) -> Mem {
        let table = make_table(3, 0);
        let parent = Group::new(&format!("mem-{design}-groups")).expect("group");
        let kids: Vec<Group> = (0..groups)
            .map(|i| parent.child(&format!("g{i}")).expect("child"))
            .collect();
        parent.flush();
        let base = parent.stat();
        // The vector first: its buffer comes from glibc (the bench's own allocator), whose
        // in-use figure is read next.
        let mut held = Vec::with_capacity(groups * per);
        let (malloc0, arena0) = (malloc_in_use(), memgroup::arena_footprint());
        let mut requested = 0;
        for (i, g) in kids.iter().enumerate() {
            let _in = g.enter();
            for k in 0..per {
                let req = table[(i * per + k) % TABLE_LEN] & !REMOTE;
                requested += size_of_req(req);
                held.push(alloc_one(a, req, k));
            }
        }
        parent.flush();
        let s = parent.stat();
        let charged = s.usage - base.usage;
        let (malloc1, arena1) = (malloc_in_use(), memgroup::arena_footprint());
        let (real, detail) = if design == "tag" {
            let real = malloc1 - malloc0;
            (real, format!("malloc in use {real}"))
        } else {
            arena_real(
                &held,
                malloc1 - malloc0,
                arena1.metadata - arena0.metadata,
                arena1.group_heaps - arena0.group_heaps,
            )
        };
        for s in held {
            free_one(a, s);
        }
        remove_all(parent, kids, design);
        Mem {
            requested,
            charged,
            real,
            detail,
        }
    }

    /// Removes `kids` and their `parent`, each checked back to a usage of 0 (after a flush)
    /// once `what`'s blocks are freed.
    fn remove_all(parent: Group, kids: Vec<Group>, what: &str) {
        for g in kids {
            g.flush();
            assert_eq!(
                g.stat().usage,
                0,
                "{what}: a group holds memory after the frees"
            );
            g.remove().expect("remove");
        }
        parent.flush();
        assert_eq!(parent.stat().usage, 0);
        parent.remove().expect("remove");
    }

    /// One group holding `n` blocks allocated with `a`; also times the allocations.
    fn one_group<A: GlobalAlloc>(a: &A, design: &str, n: usize) -> (Mem, f64, f64) {
        let table = make_table(4, 0);
        let g = Group::new(&format!("mem-{design}-one")).expect("group");
        let mut held = Vec::with_capacity(n);
        let (malloc0, arena0) = (malloc_in_use(), memgroup::arena_footprint());
        let mut requested = 0;
        let t0 = Instant::now();
        {
            let _in = g.enter();
            for k in 0..n {
                let req = table[k % TABLE_LEN] & !REMOTE;
                requested += size_of_req(req);
                held.push(alloc_one(a, req, k));
            }
        }
        let alloc_ns = t0.elapsed().as_secs_f64() * 1e9 / n as f64;
        g.flush();
        let charged = g.stat().usage;
        let (malloc1, arena1) = (malloc_in_use(), memgroup::arena_footprint());
        let (real, detail) = if design == "tag" {
            let real = malloc1 - malloc0;
            (real, format!("malloc in use {real}"))
        } else {
            arena_real(
                &held,
                malloc1 - malloc0,
                arena1.metadata - arena0.metadata,
                arena1.group_heaps - arena0.group_heaps,
            )
        };
        let t1 = Instant::now();
        for s in held {
            free_one(a, s);
        }
        let free_ns = t1.elapsed().as_secs_f64() * 1e9 / n as f64;
        g.flush();
        assert_eq!(g.stat().usage, 0, "{design}: memory left after the frees");
        g.remove().expect("remove");
        (
            Mem {
                requested,
                charged,
                real,
                detail,
            },
            alloc_ns,
            free_ns,
        )
    }

    /// Memory per idle group (issue 12): `n` groups created under one parent and left idle
    /// (nothing allocated in them, so no design has made caches or slabs for them): what the
    /// process's resident memory grows by (their records in memgroup's group table, which it
    /// maps itself and touches as ids are used), and what their records charge the parent as
    /// kernel memory. The handles' vector is filled before the first reading, so its pages
    /// are not counted.
    fn idle_groups(n: usize) {
        let parent = Group::new("mem-idle").expect("group");
        let mut kids: Vec<Option<Group>> = (0..n).map(|_| None).collect();
        parent.flush();
        let (rss0, kmem0) = (resident(), parent.stat().kmem);
        for (i, kid) in kids.iter_mut().enumerate() {
            *kid = Some(parent.child(&format!("g{i}")).expect("group"));
        }
        parent.flush();
        let (rss1, kmem1) = (resident(), parent.stat().kmem);
        std::hint::black_box(&kids);
        println!(
            "
{n} idle groups: resident memory +{} KiB, {:.0} B per group; charged to their \
             parent as kernel memory: {} B per group",
            (rss1 - rss0) >> 10,
            (rss1 - rss0) as f64 / n as f64,
            (kmem1 - kmem0) / n
        );
        for kid in kids.into_iter().flatten() {
            kid.remove().expect("remove");
        }
        parent.flush();
        assert_eq!(parent.stat().usage, 0, "the records are uncharged");
        parent.remove().expect("remove");
    }

    fn memory_part(quick: bool) {
        let groups = env_usize("ARENA_GROUPS").unwrap_or(if quick { 1000 } else { 10_000 });
        let objects = env_usize("ARENA_OBJECTS").unwrap_or(if quick { 100_000 } else { 1_000_000 });
        let per = 4;
        println!("\n## memgroup arena: memory (seeds/003)\n");
        println!(
            "Block sizes from the churn's distribution (8..=512 bytes, mean about 100). charged: \
             the groups' usage (their records' bookkeeping excluded). real: what the design \
             holds for the blocks (tag: glibc's in-use bytes; arena: the slabs holding them + \
             glibc's in-use bytes for the blocks served the tag way + per-group caches, \
             uncharged).\n"
        );
        println!("| workload | design | requested B | charged B | charged / requested | real B | real / requested | detail |");
        println!("|---|---|---:|---:|---:|---:|---:|---|");
        let row = |w: &str, d: &str, m: &Mem| {
            println!(
                "| {w} | {d} | {} | {} | {:.2} | {} | {:.2} | {} |",
                m.requested,
                m.charged,
                m.charged as f64 / m.requested as f64,
                m.real,
                m.real as f64 / m.requested as f64,
                m.detail
            );
        };
        let w = format!("{groups} groups x {per} blocks");
        row(&w, "tag", &many_groups(&TAG, "tag", groups, per));
        row(&w, "arena", &many_groups(&ARENA, "arena", groups, per));
        let w = format!("1 group x {objects} blocks");
        let (tm, ta, tf) = one_group(&TAG, "tag", objects);
        row(&w, "tag", &tm);
        let (am, aa, af) = one_group(&ARENA, "arena", objects);
        row(&w, "arena", &am);
        println!(
            "\n1 group x {objects} blocks, time per block (1 run, cold): tag alloc {ta:.1} ns, \
             free {tf:.1} ns; arena alloc {aa:.1} ns, free {af:.1} ns"
        );
        idle_groups(env_usize("ARENA_IDLE_GROUPS").unwrap_or(if quick { 10_000 } else { 100_000 }));
    }

    // ---- many small groups, taking turns ------------------------------------------------

    /// Live blocks per group in the small-groups part.
    const SMALL_PER: usize = 4;

    /// The request of the small-groups part at `step`: 16, 32, 48 or 64 bytes.
    fn small_req(step: usize) -> Req {
        (16 + 16 * ((step.wrapping_mul(0x9E37_79B9) >> 7) % 4)) as Req
    }

    /// The measured loop of the small-groups part: `steps` alloc+free pairs, group
    /// `step % groups` in turn, each freeing its oldest of `SMALL_PER` live blocks and
    /// allocating a new one (16..=64 bytes) in its own group. Its own function, for callgrind's
    /// `--toggle-collect='arena::bench::small_groups_churn*'`.
    #[inline(never)]
    fn small_groups_churn<A: GlobalAlloc>(
        a: &A,
        kids: &[Group],
        held: &mut [[Slot; SMALL_PER]],
        steps: usize,
    ) {
        let n = kids.len();
        for step in 0..steps {
            let (g, turn) = (step % n, step / n);
            let _in = kids[g].enter();
            let slot = &mut held[g][turn % SMALL_PER];
            free_one(a, *slot);
            *slot = alloc_one(a, std::hint::black_box(small_req(step)), step);
        }
    }

    /// One row of the small-groups part: fills every group's blocks, runs the churn (timed),
    /// frees everything. Ns per pair.
    fn small_run<A: GlobalAlloc>(a: &A, kids: &[Group], steps: usize) -> f64 {
        let mut held = vec![[crate::workload::EMPTY; SMALL_PER]; kids.len()];
        for (i, (g, blocks)) in kids.iter().zip(held.iter_mut()).enumerate() {
            let _in = g.enter();
            for (k, s) in blocks.iter_mut().enumerate() {
                *s = alloc_one(a, small_req(i * SMALL_PER + k), k);
            }
        }
        let t0 = Instant::now();
        small_groups_churn(a, kids, &mut held, steps);
        let ns = t0.elapsed().as_secs_f64() * 1e9 / steps.max(1) as f64;
        for (g, blocks) in kids.iter().zip(held) {
            let _in = g.enter();
            for s in blocks {
                free_one(a, s);
            }
        }
        ns
    }

    /// Many small tenants on one thread (issue 12.3: groups on trial, served the tag way):
    /// `SMALL_GROUPS` (default 1,000) groups holding `SMALL_PER` blocks each, `SMALL_STEPS`
    /// (default 20,000) alloc+free pairs taking turns; rows `system`, `tag`, `arena`
    /// (`CHURN_ONLY` picks). Ns per pair of one run (noisy: callgrind's Ir / steps is the
    /// figure), and every group's usage checked back to 0 at the end.
    fn small_groups_part() {
        let groups = env_usize("SMALL_GROUPS").unwrap_or(1000).max(1);
        let steps = env_usize("SMALL_STEPS").unwrap_or(20_000);
        let only: Option<Vec<String>> = std::env::var("CHURN_ONLY")
            .ok()
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
        type Run = fn(&[Group], usize) -> f64;
        let rows: [(&str, Run); 3] = [
            ("system", |k, n| small_run(&SYSTEM, k, n)),
            ("tag", |k, n| small_run(&TAG, k, n)),
            ("arena", |k, n| small_run(&ARENA, k, n)),
        ];
        println!(
            "\n## memgroup arena: {groups} small groups taking turns, {SMALL_PER} live blocks \
             each (16..=64 B), 1 thread\n"
        );
        println!("| allocator | ns/pair ({steps} pairs, 1 run) |");
        println!("|---|---:|");
        for (key, run) in rows {
            if !only.as_ref().is_none_or(|o| o.iter().any(|x| x == key)) {
                continue;
            }
            let parent = Group::new(&format!("small-{key}")).expect("group");
            let kids: Vec<Group> = (0..groups)
                .map(|i| parent.child(&format!("g{i}")).expect("child"))
                .collect();
            let ns = run(&kids, steps);
            println!("| {key} | {ns:.1} |");
            remove_all(parent, kids, key);
        }
    }

    pub(super) fn main() -> Result<(), Box<dyn std::error::Error>> {
        let under_bench = std::env::args().any(|a| a == "--bench");
        let quick = std::env::var("ARENA_QUICK").is_ok_and(|v| v != "0") || !under_bench;
        let part = std::env::var("ARENA_PART").unwrap_or_default();
        if part.is_empty() || part == "time" {
            time_part(quick)?;
        }
        if part.is_empty() || part == "memory" {
            memory_part(quick);
        }
        if part.is_empty() || part == "groups" {
            small_groups_part();
        }
        Ok(())
    }
}
