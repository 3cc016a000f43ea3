//! The allocator switch and the child-process harness shared by `benches/real.rs`,
//! `benches/larson.rs` and `benches/xthread.rs`: workloads that allocate through the global
//! allocator (serde_json, regex, std collections, channels), so the allocator under test has
//! to *be* the `#[global_allocator]`.
//!
//! Each bench binary installs [`Switch`], which forwards every call to one of the rows'
//! allocators, chosen once, at the process's first allocation, from `MEMGROUP_BENCH_ALLOC`
//! (read with `libc::getenv`, which does not allocate; unset means `system`). The choice never
//! changes afterwards, so every block is freed by the allocator that made it. The dispatch (one
//! relaxed load and a predictable branch, about 11 instructions a call with the call into the
//! row's allocator) is the same for every row, so ratios compare the allocators and not the
//! switch; it adds the same cost to a row and to its base, so a ratio reads slightly closer to 1
//! than with the allocator fixed at build time (on `real`, 3.7% of the `System` row's
//! instructions: a tag row's 1.072 would be 1.075).
//!
//! The parent (the process `cargo bench` starts, with the variable unset) measures nothing
//! itself: for each repetition it runs the same binary once per row, with the variable set,
//! in an order rotated every repetition (interleaved, so machine noise hits every row alike),
//! and reads the one result line each child prints. A child runs its workload once outside
//! any group (thread-locals and lazy statics are then created and charged to no tenant), then
//! the timed part in its groups, then checks every group back to exactly 0 (after `flush`)
//! with as many frees as allocations (none at all for the rows that charge nothing), and the
//! `cap` row's counter back to where it started. A failed check fails the child, and the
//! parent with it: a benchmark never reports a broken allocator.
//!
//! A child reports its wall time per unit of work and its working threads' CPU time
//! (`CLOCK_THREAD_CPUTIME_ID`, user and system, summed over the threads). On a machine that
//! other work shares, wall times swing with the load while CPU times stay within a few
//! percent: the tables give both. CPU time leaves out time a thread spends blocked (a
//! consumer waiting on its channel, a lock), which wall time includes.
//!
//! Rows: `system` (glibc), `cap` (one global counter with a limit), `pad8` (the tag's header
//! placed, written and checked, no accounting: what the tag design costs before it counts), `tag`
//! (`TagAlloc<System>`), `arena` (`ArenaAlloc<System>`, with feature `arena`), `mimalloc`,
//! `tag-mimalloc`, `jemalloc` (`tikv-jemallocator`, its prefixed symbols: glibc stays the
//! `system` row), `tag-jemalloc`. Each `tag-*` row's ratio is to its own inner allocator.
//!
//! Pinning (`taskset -c 1 cargo bench ...`) is inherited by the children.

#![allow(dead_code)] // each bench uses part of the harness

use crate::common::{die, Cap, Pad8};
pub use crate::common::{env_usize, load_average, median};

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::CStr;
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};

use memgroup::{Group, TagAlloc};
use mimalloc::MiMalloc;
use tikv_jemallocator::Jemalloc;

/// The variable that tells a child which allocator to be.
pub const ALLOC_ENV: &str = "MEMGROUP_BENCH_ALLOC";
const ALLOC_ENV_C: &CStr = c"MEMGROUP_BENCH_ALLOC";
/// The variable that gives a child its scenario (the thread count, or pairs, of the run).
pub const THREADS_ENV: &str = "MEMGROUP_BENCH_THREADS";
/// The prefix of a child's result line.
const RESULT: &str = "memgroup-bench-result";

// ---- rows ----------------------------------------------------------------------------------

/// The allocators under test. The discriminant is what [`Switch`] dispatches on (0: not
/// chosen yet).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Row {
    /// glibc malloc, raw.
    System = 1,
    /// A single global atomic counter with a limit over `System` (the `cap` crate's approach).
    Cap = 2,
    /// `TagAlloc<System>`.
    Tag = 3,
    /// `ArenaAlloc<System>` (feature `arena`).
    Arena = 4,
    /// mimalloc, raw.
    Mimalloc = 5,
    /// `TagAlloc<MiMalloc>`.
    TagMimalloc = 6,
    /// jemalloc (`tikv-jemallocator`), raw.
    Jemalloc = 7,
    /// `TagAlloc<Jemalloc>`.
    TagJemalloc = 8,
    /// An 8-byte word placed, written and checked where `TagAlloc` puts its tag, over
    /// `System`, with no accounting: the cost of the tag's header alone.
    Pad8 = 9,
}

impl Row {
    /// Every row this build has, in report order.
    pub fn all() -> Vec<Row> {
        let mut v = vec![Row::System, Row::Cap, Row::Pad8, Row::Tag];
        if cfg!(feature = "arena") {
            v.push(Row::Arena);
        }
        v.extend([
            Row::Mimalloc,
            Row::TagMimalloc,
            Row::Jemalloc,
            Row::TagJemalloc,
        ]);
        v
    }

    pub fn key(self) -> &'static str {
        match self {
            Row::System => "system",
            Row::Cap => "cap",
            Row::Tag => "tag",
            Row::Arena => "arena",
            Row::Mimalloc => "mimalloc",
            Row::TagMimalloc => "tag-mimalloc",
            Row::Jemalloc => "jemalloc",
            Row::TagJemalloc => "tag-jemalloc",
            Row::Pad8 => "pad8",
        }
    }

    fn from_key(key: &[u8]) -> Option<Row> {
        [
            Row::System,
            Row::Cap,
            Row::Tag,
            Row::Arena,
            Row::Mimalloc,
            Row::TagMimalloc,
            Row::Jemalloc,
            Row::TagJemalloc,
            Row::Pad8,
        ]
        .into_iter()
        .find(|r| r.key().as_bytes() == key)
    }

    /// The raw allocator the row's ratio is taken against: the inner allocator it wraps (for
    /// `mimalloc` and `jemalloc` themselves, `system`, so their lines say what they alone gain).
    pub fn base(self) -> Row {
        match self {
            Row::TagMimalloc => Row::Mimalloc,
            Row::TagJemalloc => Row::Jemalloc,
            _ => Row::System,
        }
    }

    /// Whether the row charges memgroup groups.
    pub fn charges(self) -> bool {
        matches!(
            self,
            Row::Tag | Row::Arena | Row::TagMimalloc | Row::TagJemalloc
        )
    }
}

// ---- the switch ----------------------------------------------------------------------------

static SYSTEM: System = System;
static PAD8: Pad8<System> = Pad8::new(System);
static CAP: Cap<System> = Cap::new(System, 1 << 40);
static TAG: TagAlloc = TagAlloc::system();
#[cfg(feature = "arena")]
static ARENA: memgroup::ArenaAlloc = memgroup::ArenaAlloc::system();
static MIMALLOC: MiMalloc = MiMalloc;
static TAG_MIMALLOC: TagAlloc<MiMalloc> = TagAlloc::new(MiMalloc);
static JEMALLOC: Jemalloc = Jemalloc;
static TAG_JEMALLOC: TagAlloc<Jemalloc> = TagAlloc::new(Jemalloc);

static CHOSEN: AtomicU8 = AtomicU8::new(0);

/// The `#[global_allocator]` of the benches: one of the rows, chosen at the first allocation.
pub struct Switch;

#[inline(always)]
fn chosen() -> u8 {
    match CHOSEN.load(Ordering::Relaxed) {
        0 => choose(),
        r => r,
    }
}

/// Reads `MEMGROUP_BENCH_ALLOC`, without allocating. The process's first allocation happens
/// on its main thread before any other thread exists, so the choice is made once.
#[cold]
#[inline(never)]
fn choose() -> u8 {
    // SAFETY: the name is NUL-terminated; getenv does not allocate, and nothing in these
    // benches modifies the environment.
    let value = unsafe { libc::getenv(ALLOC_ENV_C.as_ptr()) };
    let row = if value.is_null() {
        Row::System
    } else {
        // SAFETY: getenv returned a NUL-terminated string.
        let key = unsafe { CStr::from_ptr(value) }.to_bytes();
        match Row::from_key(key) {
            Some(Row::Arena) if !cfg!(feature = "arena") => {
                die(b"arena row needs --features arena\n")
            }
            Some(r) => r,
            None => die(b"MEMGROUP_BENCH_ALLOC: unknown allocator\n"),
        }
    };
    CHOSEN.store(row as u8, Ordering::Relaxed);
    row as u8
}

/// The row this process runs as.
pub fn current_row() -> Row {
    match chosen() {
        2 => Row::Cap,
        3 => Row::Tag,
        4 => Row::Arena,
        5 => Row::Mimalloc,
        6 => Row::TagMimalloc,
        7 => Row::Jemalloc,
        8 => Row::TagJemalloc,
        9 => Row::Pad8,
        _ => Row::System,
    }
}

/// The `cap` row's counter (bytes live through it).
pub fn cap_allocated() -> usize {
    CAP.allocated().load(Ordering::Relaxed)
}

macro_rules! dispatch {
    ($method:ident ( $($arg:expr),* )) => {
        match chosen() {
            1 => SYSTEM.$method($($arg),*),
            2 => CAP.$method($($arg),*),
            3 => TAG.$method($($arg),*),
            #[cfg(feature = "arena")]
            4 => ARENA.$method($($arg),*),
            5 => MIMALLOC.$method($($arg),*),
            6 => TAG_MIMALLOC.$method($($arg),*),
            7 => JEMALLOC.$method($($arg),*),
            8 => TAG_JEMALLOC.$method($($arg),*),
            9 => PAD8.$method($($arg),*),
            _ => die(b"allocator switch: bad row\n"),
        }
    };
}

// SAFETY: every call goes to the same allocator for the whole process (`CHOSEN` is set once,
// before any block exists), with the caller's arguments unchanged, so each block is freed or
// resized by the allocator that made it.
unsafe impl GlobalAlloc for Switch {
    #[inline(always)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { dispatch!(alloc(layout)) }
    }

    #[inline(always)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { dispatch!(alloc_zeroed(layout)) }
    }

    #[inline(always)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on to the allocator that made `ptr`.
        unsafe { dispatch!(dealloc(ptr, layout)) }
    }

    #[inline(always)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on to the allocator that made `ptr`.
        unsafe { dispatch!(realloc(ptr, layout, new_size)) }
    }
}

// ---- checks in the child -------------------------------------------------------------------

/// A group's exact (allocs, frees), after `flush`.
pub fn counts(g: &Group) -> (u64, u64) {
    g.flush();
    let s = g.stat();
    (s.allocs, s.frees)
}

/// Fails loudly unless `g` holds nothing after `flush` and was charged as many frees as
/// allocations since `before` (some if the row charges, none otherwise). Returns the
/// allocations charged.
pub fn check_group(g: &Group, before: (u64, u64)) -> u64 {
    let row = current_row();
    g.flush();
    let s = g.stat();
    assert_eq!(
        (s.usage, s.overhead, s.kmem),
        (0, 0, 0),
        "{}: group {} holds memory after all its blocks were freed",
        row.key(),
        g.name()
    );
    let (allocs, frees) = (s.allocs - before.0, s.frees - before.1);
    assert_eq!(
        allocs,
        frees,
        "{}: group {} charged {allocs} allocations but {frees} frees",
        row.key(),
        g.name()
    );
    if row.charges() {
        assert!(
            allocs > 0,
            "{}: group {} charged nothing",
            row.key(),
            g.name()
        );
    } else {
        assert_eq!(allocs, 0, "{}: group {} was charged", row.key(), g.name());
    }
    allocs
}

/// Spawns and joins a thread, so what std allocates once, at a process's first spawn, is
/// live before [`check_cap`]'s starting point is taken. (`join`, not a scope: a scope returns
/// once the closures are done, while their threads may still be freeing their handles.)
pub fn warm_threads() {
    std::thread::spawn(|| std::hint::black_box(vec![0u8; 64]))
        .join()
        .expect("warm-up thread");
}

/// Fails loudly if the `cap` row's counter is not back at `before` (it counts every live
/// byte in the process).
pub fn check_cap(before: usize) {
    if current_row() == Row::Cap {
        assert_eq!(
            cap_allocated(),
            before,
            "cap: counter not back to its start"
        );
    }
}

// ---- configuration -------------------------------------------------------------------------

fn env_list(name: &str) -> Option<Vec<String>> {
    std::env::var(name).ok().map(|v| {
        v.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    })
}

/// The parent's configuration, from `<P>_QUICK`, `<P>_RUNS`, `<P>_ONLY` and the scenarios
/// `<P>_<S>` (`S` = `THREADS`, or `PAIRS`, ...).
pub struct Config {
    pub prefix: &'static str,
    pub quick: bool,
    pub runs: usize,
    pub rows: Vec<Row>,
    pub threads: Vec<usize>,
}

impl Config {
    pub fn from_env(prefix: &'static str, scenarios: &str, default_threads: &[usize]) -> Config {
        // `cargo bench` passes `--bench`; `cargo test --benches` does not: then a smoke check.
        let under_cargo_bench = std::env::args().any(|a| a == "--bench");
        let quick =
            std::env::var(format!("{prefix}_QUICK")).is_ok_and(|v| v != "0") || !under_cargo_bench;
        let runs = env_usize(&format!("{prefix}_RUNS"))
            .unwrap_or(if quick { 1 } else { 7 })
            .max(1);
        let rows = match env_list(&format!("{prefix}_ONLY")) {
            None => Row::all(),
            Some(keys) => keys
                .iter()
                .map(|k| {
                    Row::all()
                        .into_iter()
                        .find(|r| r.key() == k)
                        .unwrap_or_else(|| panic!("{prefix}_ONLY: unknown or absent row {k}"))
                })
                .collect(),
        };
        let threads = match env_list(&format!("{prefix}_{scenarios}")) {
            None => default_threads.to_vec(),
            Some(v) => v.iter().map(|t| t.parse().expect("a count")).collect(),
        };
        assert!(threads.iter().all(|t| *t >= 1));
        Config {
            prefix,
            quick,
            runs,
            rows,
            threads,
        }
    }
}

/// The CPU time the calling thread has used so far.
pub fn thread_cpu() -> std::time::Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write; the clock id is a constant Linux knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime");
    std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// In a child: the scenario the parent gave it.
pub fn child_threads() -> usize {
    env_usize(THREADS_ENV).expect("child without a scenario")
}

/// Whether this process is a child (a row), rather than the parent.
pub fn is_child() -> bool {
    std::env::var_os(ALLOC_ENV).is_some()
}

// ---- results -------------------------------------------------------------------------------

/// What a child measured: `ns` wall time per unit of work per thread, `cpu` the CPU time its
/// working threads spent per unit of work per thread (their `CLOCK_THREAD_CPUTIME_ID` time,
/// summed: time the threads were preempted by other processes is not in it, so it is the
/// steadier figure on a shared machine), and a value that every row must compute identically
/// (the workload's checksum). `allocs`: the allocations the groups were charged per unit of
/// work per thread (0 for the rows that charge nothing).
#[derive(Clone, Copy)]
pub struct Sample {
    pub ns: f64,
    pub cpu: f64,
    pub allocs: f64,
    pub check: u64,
}

/// Printed by the child as its last line.
pub fn report_child(s: Sample) {
    println!(
        "{RESULT} ns={} cpu={} allocs={} check={}",
        s.ns, s.cpu, s.allocs, s.check
    );
}

fn run_child(row: Row, threads: usize) -> Sample {
    let exe = std::env::current_exe().expect("own executable");
    let out = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(ALLOC_ENV, row.key())
        .env(THREADS_ENV, threads.to_string())
        .output()
        .expect("run a child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        panic!(
            "row {} ({threads} threads) failed: {}\n{stdout}\n{}",
            row.key(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with(RESULT))
        .unwrap_or_else(|| panic!("row {}: no result line in {stdout}", row.key()));
    let field = |name: &str| -> &str {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name).and_then(|f| f.strip_prefix('=')))
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    Sample {
        ns: field("ns").parse().expect("ns"),
        cpu: field("cpu").parse().expect("cpu"),
        allocs: field("allocs").parse().expect("allocs"),
        check: field("check").parse().expect("check"),
    }
}

/// One row of one scenario: its samples, in repetition order.
pub struct Line {
    pub threads: usize,
    pub row: Row,
    pub samples: Vec<Sample>,
}

/// Runs every row of every scenario `cfg.runs` times, each run a child process, interleaved
/// and rotated; checks that every row computed the same checksum.
pub fn measure(cfg: &Config) -> Vec<Line> {
    let mut lines = Vec::new();
    for &threads in &cfg.threads {
        let mut ls: Vec<Line> = cfg
            .rows
            .iter()
            .map(|&row| Line {
                threads,
                row,
                samples: Vec::new(),
            })
            .collect();
        for rep in 0..cfg.runs {
            for j in 0..ls.len() {
                let i = (j + rep) % ls.len();
                let s = run_child(ls[i].row, threads);
                ls[i].samples.push(s);
            }
        }
        let first = ls[0].samples[0].check;
        for l in &ls {
            for s in &l.samples {
                assert_eq!(
                    s.check,
                    first,
                    "{} ({threads} threads) computed another result than {}",
                    l.row.key(),
                    ls[0].row.key()
                );
            }
        }
        lines.extend(ls);
    }
    lines
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        })
}

/// Prints the tables, wall time then CPU time: per row, the median and min-max per unit per
/// thread, the ratio of the medians to the row's raw allocator, and the min-max of the
/// per-repetition ratios (each run against its base's run in the same repetition); then, for
/// each scenario past the first, the per-thread throughput against the first scenario's.
/// `micros`: microseconds rather than nanoseconds.
pub fn print_table(cfg: &Config, lines: &[Line], unit: &str, scenario: &str, micros: bool) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "runs/row: {}{}, CPUs: {cpus}, memgroup stock batch: {} B, load average after: {}\n",
        cfg.runs,
        if cfg.quick { " (quick)" } else { "" },
        memgroup::stock_batch(),
        load_average()
    );
    println!(
        "Per {scenario}: time x {scenario}s / {unit}s. ratio: to the raw inner allocator (base) \
         measured in the same run; per-run ratios pair each run with its base's run of the same \
         repetition. CPU: the working threads' own CPU time (preemption by other processes \
         excluded).\n"
    );
    let metrics: [(&str, Metric); 2] = [("wall", |s| s.ns), ("CPU", |s| s.cpu)];
    for (name, metric) in metrics {
        metric_table(cfg, lines, unit, scenario, micros, name, metric);
    }
    per_allocation(cfg, lines, unit, scenario);
}

/// What each row adds to one allocation (and its free), in CPU time: the difference of the
/// medians to the base, divided by the allocations per unit that the `tag` row's groups were
/// charged (every row runs the same allocations).
fn per_allocation(cfg: &Config, lines: &[Line], unit: &str, scenario: &str) {
    let med = |l: &Line| median(&l.samples.iter().map(|s| s.cpu).collect::<Vec<_>>());
    for &t in &cfg.threads {
        let Some(counted) = lines
            .iter()
            .find(|l| l.threads == t && l.row.charges())
            .map(|l| median(&l.samples.iter().map(|s| s.allocs).collect::<Vec<_>>()))
        else {
            continue;
        };
        let parts: Vec<String> = lines
            .iter()
            .filter(|l| l.threads == t && l.row.base() != l.row)
            .filter_map(|l| {
                let b = lines
                    .iter()
                    .find(|b| b.threads == t && b.row == l.row.base())?;
                Some(format!(
                    "{} {:+.1} ns",
                    l.row.key(),
                    (med(l) - med(b)) / counted
                ))
            })
            .collect();
        println!(
            "{t} {scenario}(s): {counted:.2} allocations per {unit} (the groups' count); CPU time \
             added per alloc+free over the base: {}",
            parts.join(", ")
        );
    }
}

/// Which figure of a sample a table shows.
type Metric = fn(&Sample) -> f64;

fn metric_table(
    cfg: &Config,
    lines: &[Line],
    unit: &str,
    scenario: &str,
    micros: bool,
    name: &str,
    metric: Metric,
) {
    let (tu, div) = if micros { ("us", 1e3) } else { ("ns", 1.0) };
    let values = |l: &Line| -> Vec<f64> { l.samples.iter().map(metric).collect() };
    println!(
        "| {scenario}s | allocator | {name} median {tu}/{unit} | min-max | base | ratio (medians) | per-run ratio min-max |"
    );
    println!("|---:|---|---:|---:|---|---:|---:|");
    for l in lines {
        let v = values(l);
        let (lo, hi) = min_max(&v);
        let base = lines
            .iter()
            .find(|b| b.threads == l.threads && b.row == l.row.base());
        let (ratio, range, bkey) = match base {
            Some(b) if b.row != l.row => {
                let bv = values(b);
                let per: Vec<f64> = v.iter().zip(&bv).map(|(x, y)| x / y).collect();
                let (rlo, rhi) = min_max(&per);
                (
                    format!("{:.3}x", median(&v) / median(&bv)),
                    format!("{rlo:.3}-{rhi:.3}"),
                    b.row.key(),
                )
            }
            _ => ("-".to_string(), "-".to_string(), "-"),
        };
        println!(
            "| {} | {} | {:.1} | {:.1}-{:.1} | {bkey} | {ratio} | {range} |",
            l.threads,
            l.row.key(),
            median(&v) / div,
            lo / div,
            hi / div
        );
    }
    let first = cfg.threads[0];
    for &t in &cfg.threads[1..] {
        let parts: Vec<String> = cfg
            .rows
            .iter()
            .filter_map(|&r| {
                let med = |threads: usize| {
                    lines
                        .iter()
                        .find(|l| l.threads == threads && l.row == r)
                        .map(|l| median(&values(l)))
                };
                Some(format!("{} {:.0}%", r.key(), 100.0 * med(first)? / med(t)?))
            })
            .collect();
        println!(
            "\n{name}: per-{scenario} throughput at {t} against {first} (median per {unit} at {first} / at {t}): {}",
            parts.join(", ")
        );
    }
    println!();
}
