//! alloc+free churn of small mixed sizes: the raw inner allocator, a single global atomic
//! counter with a limit (the `cap` crate's approach), an 8-byte word stored where `TagAlloc`
//! stores its tag, in a header of the same size, but with no accounting (`pad8`: the floor of
//! this inline-tag design) and
//! memgroup's `TagAlloc`, in one run, reported as ratios to the raw allocator. Target: `tag` costs at most 1.5x `system` per
//! alloc+free pair (median), later 1.1x.
//!
//! The binary's own `#[global_allocator]` stays `System`. Every allocator under test is a value
//! implementing `GlobalAlloc`, and one generic workload, [`churn`], calls its `alloc`/`dealloc`
//! directly, so every row runs exactly the same code. The harness (rings, hand-off queues,
//! tables) allocates through the global `System` before timing starts, never through the
//! allocator under test.
//!
//! Workload: a ring of `CHURN_SLOTS` live blocks; each step frees the oldest block and allocates
//! a new one (8..=512 bytes skewed small, alignment 8 or 16, from a fixed xorshift stream), and
//! writes its first word. Threads run inside a memgroup group, so `TagAlloc` charges a real
//! tenant (for the other rows the scope is irrelevant but identical). 2 threads: each churns
//! its own group; 1 block in `CHURN_REMOTE` is sent, when its turn to be freed comes, to the
//! other thread through a preallocated SPSC ring and freed there.
//!
//! Reported per row: ns per alloc+free pair per thread (median and min of `CHURN_RUNS` runs,
//! interleaved across allocators so machine noise hits them equally), and the ratio to the raw
//! inner allocator measured in the same run. After every run, memgroup groups are flushed and
//! checked: usage back to 0, and exactly the expected number of allocs and frees charged.
//!
//! Commands:
//!
//! ```text
//! cargo bench --bench churn                      # full table (15-30 s on 2 cores)
//! CHURN_QUICK=1 cargo bench --bench churn        # smoke check: 1 short repetition
//! cargo bench --features jemalloc --bench churn  # with the jemalloc and tag-jemalloc rows
//! cargo test --benches                           # the same smoke check (no `--bench` argument)
//!
//! # Instructions per alloc+free pair (1 thread, one allocator, one run of a fixed op count).
//! # `--toggle-collect` counts only the steady-state loop (`churn`, never inlined), so
//! # Ir per pair = "Collected" / CHURN_OPS.
//! BIN=$(cargo bench --bench churn --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p')
//! for a in system cap tag; do
//!   CHURN_ONLY=$a CHURN_THREADS=1 CHURN_OPS=200000 valgrind --tool=callgrind \
//!     --toggle-collect='churn::workload::churn*' --callgrind-out-file=callgrind.churn.$a "$BIN" --bench
//! done
//! callgrind_annotate --inclusive=yes callgrind.churn.tag | head -60   # where tag's Ir go
//! ```
//!
//! Under valgrind glibc registers no rseq area, so memgroup's CPU lookup takes its fallback:
//! rows that go through the per-CPU stocks on every operation (`MEMGROUP_POCKETS=0`) then count
//! about 17 Ir per pair more than they execute natively; `tag`'s pockets do not read the CPU.
//!
//! Environment (all optional):
//! `CHURN_QUICK=1` one short repetition (smoke check; also the default without `--bench`);
//! `CHURN_RUNS=K` timed runs per row (default 9); `CHURN_MS=ms` target length of one raw run
//! (default 150; the op count is calibrated once on `system` and then fixed for every row);
//! `CHURN_OPS=n` fixed steps per thread per run, no calibration and no warm-up, 1 run unless
//! `CHURN_RUNS` is set (the callgrind mode); `CHURN_ONLY=a,b` rows to run, among `system`,
//! `cap`, `pad8`, `tag`, `tag-sub` (`tag` charging groups that have a pressure subscriber and a
//! shrinker), `mimalloc`, `cap-mimalloc`, `tag-mimalloc`, and with feature `jemalloc`
//! `jemalloc`, `tag-jemalloc`; `CHURN_THREADS=1|2` one scenario
//! only; `CHURN_SLOTS=n` live blocks per thread (power of two, default 1024);
//! `CHURN_REMOTE=r` 1 block in r freed by the other thread (default 8, 0 = none);
//! `CHURN_GROW=1` instead of the ring, `CHURN_OPS` (default 20,000) `Vec`-like growths in one
//! thread, in its group: an 8-byte block (alignment 8) grown by `realloc`, doubling, to
//! 2 KiB, then freed (8 reallocs per block; for callgrind, `--toggle-collect='churn::grow*'`,
//! Ir per growth = "Collected" / `CHURN_OPS`), checked back to 0 like the ring.

use std::alloc::{GlobalAlloc, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use memgroup::{Group, TagAlloc};
use mimalloc::MiMalloc;

// The workload (request tables, the measured loop `churn`, the hand-off between threads, the
// runs), shared with benches/arena.rs.
#[path = "common/mod.rs"]
mod common;
#[path = "workload/mod.rs"]
mod workload;

use common::{Cap, Pad8};

use workload::{env_usize, load_average, make_table, median, min, run_one, run_two, RunOut};

#[global_allocator]
static GLOBAL: System = System;

/// The six groups: see `groups` in `main`.
type Params = workload::Params<6>;

const CAP_LIMIT: usize = 1 << 40;
static SYSTEM: System = System;
static CAP_SYSTEM: Cap<System> = Cap::new(System, CAP_LIMIT);
static TAG_SYSTEM: TagAlloc = TagAlloc::system();
static PAD_SYSTEM: Pad8<System> = Pad8::new(System);
static MIMALLOC: MiMalloc = MiMalloc;
static CAP_MIMALLOC: Cap<MiMalloc> = Cap::new(MiMalloc, CAP_LIMIT);
static TAG_MIMALLOC: TagAlloc<MiMalloc> = TagAlloc::new(MiMalloc);
#[cfg(feature = "jemalloc")]
static JEMALLOC: memgroup::Jemalloc = memgroup::Jemalloc;
#[cfg(feature = "jemalloc")]
static TAG_JEMALLOC: TagAlloc<memgroup::Jemalloc> = TagAlloc::jemalloc();

/// A shrinker with nothing to give: its presence is what the `tag-sub` row measures.
struct NoShrinker;

impl memgroup::Shrinker for NoShrinker {
    fn chunk_size(&self) -> usize {
        4096
    }
    fn count(&self) -> usize {
        0
    }
    fn shrink(&self, _chunks: usize) -> usize {
        0
    }
}

// ---- rows and checks ---------------------------------------------------------------------

enum Kind {
    Raw,
    Cap(&'static AtomicUsize),
    Tag,
}

struct Row {
    key: &'static str,
    base: &'static str,
    kind: Kind,
    /// Which groups the row charges: 0, or 3 for the ones with a subscriber and a shrinker.
    set: usize,
    run: fn(&Params, usize, usize) -> RunOut,
}

fn run_with<A: GlobalAlloc + Sync>(a: &A, p: &Params, threads: usize, set: usize) -> RunOut {
    if threads == 1 {
        run_one(a, p, set)
    } else {
        run_two(a, p, set)
    }
}

fn all_rows() -> Vec<Row> {
    #[allow(unused_mut)] // without feature `jemalloc`
    let mut rows = vec![
        Row {
            key: "system",
            base: "system",
            kind: Kind::Raw,
            set: 0,
            run: |p, t, set| run_with(&SYSTEM, p, t, set),
        },
        Row {
            key: "cap",
            base: "system",
            kind: Kind::Cap(CAP_SYSTEM.allocated()),
            set: 0,
            run: |p, t, set| run_with(&CAP_SYSTEM, p, t, set),
        },
        Row {
            key: "pad8",
            base: "system",
            kind: Kind::Raw,
            set: 0,
            run: |p, t, set| run_with(&PAD_SYSTEM, p, t, set),
        },
        Row {
            key: "tag",
            base: "system",
            kind: Kind::Tag,
            set: 0,
            run: |p, t, set| run_with(&TAG_SYSTEM, p, t, set),
        },
        Row {
            key: "tag-sub",
            base: "system",
            kind: Kind::Tag,
            set: 3,
            run: |p, t, set| run_with(&TAG_SYSTEM, p, t, set),
        },
        Row {
            key: "mimalloc",
            base: "mimalloc",
            kind: Kind::Raw,
            set: 0,
            run: |p, t, set| run_with(&MIMALLOC, p, t, set),
        },
        Row {
            key: "cap-mimalloc",
            base: "mimalloc",
            kind: Kind::Cap(CAP_MIMALLOC.allocated()),
            set: 0,
            run: |p, t, set| run_with(&CAP_MIMALLOC, p, t, set),
        },
        Row {
            key: "tag-mimalloc",
            base: "mimalloc",
            kind: Kind::Tag,
            set: 0,
            run: |p, t, set| run_with(&TAG_MIMALLOC, p, t, set),
        },
    ];
    #[cfg(feature = "jemalloc")]
    rows.extend([
        Row {
            key: "jemalloc",
            base: "jemalloc",
            kind: Kind::Raw,
            set: 0,
            run: |p, t, set| run_with(&JEMALLOC, p, t, set),
        },
        Row {
            key: "tag-jemalloc",
            base: "jemalloc",
            kind: Kind::Tag,
            set: 0,
            run: |p, t, set| run_with(&TAG_JEMALLOC, p, t, set),
        },
    ]);
    rows
}

fn groups_of(p: &Params, threads: usize, set: usize) -> &[Group] {
    if threads == 1 {
        &p.groups[set..set + 1]
    } else {
        &p.groups[set + 1..set + 3]
    }
}

/// Fails loudly if an allocator under test lost or invented a charge during the run.
fn check(row: &Row, p: &Params, threads: usize, before: &[(u64, u64)]) {
    let expected = match row.kind {
        Kind::Tag => (p.slots + p.ops) as u64,
        Kind::Raw | Kind::Cap(_) => 0,
    };
    workload::check_groups(row.key, groups_of(p, threads, row.set), before, expected);
    if let Kind::Cap(counter) = row.kind {
        assert_eq!(counter.load(Ordering::Relaxed), 0, "{}: counter", row.key);
    }
}

fn run_checked(row: &Row, p: &Params, threads: usize) -> RunOut {
    let before = workload::counts(groups_of(p, threads, row.set));
    let out = (row.run)(p, threads, row.set);
    check(row, p, threads, &before);
    out
}

// ---- Vec-like growth by realloc (CHURN_GROW) -----------------------------------------------

/// `ops` blocks, each allocated at 8 bytes, grown by `realloc` (doubling) to 2 KiB, written
/// at each step, and freed: what a `Vec` pushed to 256 words does. Never inlined, so callgrind
/// can count it alone.
#[inline(never)]
fn grow<A: GlobalAlloc>(a: &A, ops: usize) {
    for i in 0..ops {
        let mut size = 8;
        let mut layout = std::alloc::Layout::from_size_align(size, 8).expect("layout");
        // SAFETY: a non-zero size.
        let mut p = unsafe { a.alloc(layout) };
        assert!(!p.is_null(), "grow: alloc");
        while size < 2048 {
            // SAFETY: 8 bytes of the block are valid.
            unsafe { p.cast::<usize>().write(black_box(i)) };
            size *= 2;
            // SAFETY: a live block of `layout`, and a non-zero new size.
            p = unsafe { a.realloc(p, layout, size) };
            assert!(!p.is_null(), "grow: realloc");
            layout = std::alloc::Layout::from_size_align(size, 8).expect("layout");
        }
        // SAFETY: a live block of `layout`.
        unsafe { a.dealloc(black_box(p), layout) };
    }
}

/// The `CHURN_GROW` mode: each selected row runs `grow` in the 1-thread group, checked.
fn run_growth(rows: &[Row], p: &Params, ops: usize) {
    for row in rows {
        let before = workload::counts(groups_of(p, 1, row.set));
        let g = groups_of(p, 1, row.set)[0].clone();
        g.run(|| match row.key {
            "system" => grow(&SYSTEM, ops),
            "cap" => grow(&CAP_SYSTEM, ops),
            "pad8" => grow(&PAD_SYSTEM, ops),
            "tag" | "tag-sub" => grow(&TAG_SYSTEM, ops),
            "mimalloc" => grow(&MIMALLOC, ops),
            "cap-mimalloc" => grow(&CAP_MIMALLOC, ops),
            "tag-mimalloc" => grow(&TAG_MIMALLOC, ops),
            #[cfg(feature = "jemalloc")]
            "jemalloc" => grow(&JEMALLOC, ops),
            #[cfg(feature = "jemalloc")]
            "tag-jemalloc" => grow(&TAG_JEMALLOC, ops),
            other => panic!("CHURN_GROW: no growth for {other}"),
        });
        let expected = match row.kind {
            Kind::Tag => ops as u64,
            Kind::Raw | Kind::Cap(_) => 0,
        };
        workload::check_groups(row.key, groups_of(p, 1, row.set), &before, expected);
        if let Kind::Cap(counter) = row.kind {
            assert_eq!(counter.load(Ordering::Relaxed), 0, "{}: counter", row.key);
        }
        println!("grow: {} ok, {ops} growths of 8 B to 2 KiB", row.key);
    }
}

// ---- configuration and report ------------------------------------------------------------

struct Line {
    threads: usize,
    key: &'static str,
    base: &'static str,
    ns: Vec<f64>,
    sent: usize,
    waits: usize,
    frees: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let load_before = load_average();
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then a smoke check.
    let under_cargo_bench = std::env::args().any(|a| a == "--bench");
    let quick = std::env::var("CHURN_QUICK").is_ok_and(|v| v != "0") || !under_cargo_bench;
    let fixed_ops = env_usize("CHURN_OPS");
    let runs = env_usize("CHURN_RUNS")
        .unwrap_or(if quick || fixed_ops.is_some() { 1 } else { 9 })
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
    let scenarios: Vec<usize> = match env_usize("CHURN_THREADS") {
        Some(t) => vec![t],
        None => vec![1, 2],
    };
    assert!(scenarios.iter().all(|t| *t == 1 || *t == 2));

    let rows: Vec<Row> = all_rows()
        .into_iter()
        .filter(|r| only.as_ref().is_none_or(|o| o.iter().any(|k| k == r.key)))
        .collect();
    if let Some(o) = &only {
        for k in o {
            assert!(rows.iter().any(|r| r.key == k), "CHURN_ONLY: unknown {k}");
        }
    }
    let warm_up = !quick && fixed_ops.is_none();

    let mut p = Params {
        ops: 0,
        slots,
        tables: [make_table(1, remote as u64), make_table(2, remote as u64)],
        // `bench-1t`, then the two groups of the 2-thread scenario; then the same three again,
        // each with a pressure subscriber and a shrinker (the `tag-sub` row, `set` 3).
        groups: [
            Group::new("bench-1t")?,
            Group::new("bench-2t-a")?,
            Group::new("bench-2t-b")?,
            Group::new("bench-sub-1t")?,
            Group::new("bench-sub-2t-a")?,
            Group::new("bench-sub-2t-b")?,
        ],
    };
    // Every group gets the same limits, far above what the workload holds, so the stock
    // refills check the same thresholds; only the `tag-sub` groups have a subscriber and a
    // shrinker. Issue 4's bar: `tag-sub` within 2% of `tag`.
    for g in &p.groups {
        g.set_high(Some(1 << 40));
        g.set_max(Some(1 << 41));
    }
    let _listeners: Vec<_> = p.groups[3..]
        .iter()
        .map(|g| {
            let sub = g.on_pressure(|level| {
                black_box(level);
            });
            (sub, g.register_shrinker(NoShrinker))
        })
        .collect();
    if std::env::var("CHURN_GROW").is_ok_and(|v| v != "0") {
        run_growth(&rows, &p, fixed_ops.unwrap_or(20_000));
        return Ok(());
    }
    let system = all_rows().into_iter().next().expect("system row");

    let mut lines = Vec::new();
    let mut ops_used = Vec::new();
    for &threads in &scenarios {
        p.ops = match fixed_ops {
            Some(n) => n,
            None if quick => 20_000,
            None => {
                // Calibrate once on the raw system allocator; every row then runs that count.
                p.ops = 100_000;
                for _ in 0..2 {
                    let t = run_checked(&system, &p, threads).elapsed.as_secs_f64();
                    let scaled = p.ops as f64 * target.as_secs_f64() / t.max(1e-6);
                    p.ops = (scaled as usize).clamp(10_000, 100_000_000);
                }
                p.ops
            }
        };
        ops_used.push((threads, p.ops));
        if warm_up {
            for row in &rows {
                run_checked(row, &p, threads);
            }
        }
        let mut ls: Vec<Line> = rows
            .iter()
            .map(|r| Line {
                threads,
                key: r.key,
                base: r.base,
                ns: Vec::new(),
                sent: 0,
                waits: 0,
                frees: 0,
            })
            .collect();
        for rep in 0..runs {
            // Interleave, and rotate the order so no row always follows the same neighbour.
            for j in 0..rows.len() {
                let i = (j + rep) % rows.len();
                let out = run_checked(&rows[i], &p, threads);
                ls[i]
                    .ns
                    .push(out.elapsed.as_secs_f64() * 1e9 / p.ops as f64);
                ls[i].sent += out.sent;
                ls[i].waits += out.waits;
                ls[i].frees += threads * p.ops;
            }
        }
        lines.extend(ls);
    }

    // Report.
    println!("## memgroup churn: alloc+free pairs of 8..=512-byte blocks\n");
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let ops: Vec<String> = ops_used
        .iter()
        .map(|(t, o)| {
            format!(
                "{o} steps/thread ({t} thread{})",
                if *t == 1 { "" } else { "s" }
            )
        })
        .collect();
    println!(
        "runs/row: {runs}{}, {}, ring: {slots} live blocks/thread, remote frees (2 threads): \
         1 in {remote}, memgroup stock batch: {} B, CPUs: {cpus}, load average before/after: \
         {load_before}/{}\n",
        if quick { " (quick)" } else { "" },
        ops.join(", "),
        memgroup::stock_batch(),
        load_average(),
    );
    println!("ns/pair is per thread: wall time x threads / pairs. ratio: to the raw inner allocator in the same run.\n");
    println!(
        "| threads | allocator | median ns/pair | min ns/pair | ratio (median) | ratio (min) |"
    );
    println!("|---:|---|---:|---:|---:|---:|");
    for l in &lines {
        let base = lines
            .iter()
            .find(|b| b.threads == l.threads && b.key == l.base);
        let (rmed, rmin) = match base {
            Some(b) => (
                format!("{:.2}x", median(&l.ns) / median(&b.ns)),
                format!("{:.2}x", min(&l.ns) / min(&b.ns)),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {} | {:.1} | {:.1} | {rmed} | {rmin} |",
            l.threads,
            l.key,
            median(&l.ns),
            min(&l.ns),
        );
    }
    let two: Vec<&Line> = lines.iter().filter(|l| l.threads == 2).collect();
    if let Some(l) = two.first() {
        let waits: Vec<String> = two
            .iter()
            .filter(|l| l.waits > 0)
            .map(|l| format!("{} {}", l.key, l.waits))
            .collect();
        println!(
            "\n2 threads: {:.1}% of frees are remote (the same blocks for every row); waits for a full hand-off queue: {}",
            100.0 * l.sent as f64 / l.frees.max(1) as f64,
            if waits.is_empty() { "none".to_string() } else { waits.join(", ") }
        );
    }
    for threads in [1, 2] {
        let med = |key: &str| {
            lines
                .iter()
                .find(|l| l.threads == threads && l.key == key)
                .map(|l| median(&l.ns))
        };
        if let (Some(tag), Some(sub)) = (med("tag"), med("tag-sub")) {
            println!(
                "\n{threads} thread(s): tag-sub / tag = {:.3} (a pressure subscriber and a shrinker on the charged groups; target <= 1.02)",
                sub / tag
            );
        }
    }
    println!("\ntarget: tag <= 1.5x system per pair (median), later 1.1x");
    Ok(())
}
