//! A larson-like server churn under every allocator, in one run (after Larson and Krishnan's
//! benchmark, as mimalloc and others run it): many threads, each owning bins of live blocks
//! and replacing random ones with blocks of random size, while the live set turns over and
//! threads come and go.
//!
//! Each thread owns `LARSON_BINS` live blocks (default 1,000). A step picks a random bin,
//! frees its block and allocates a new one of a random size (uniform, 16 B to 4 KiB), writing
//! its first and last byte. A round runs `LARSON_THREADS` threads (default 1 and 2; any count
//! works) of `LARSON_ITERS` steps each; then the threads exit and the next round's new threads
//! inherit their bins, so most frees happen on another thread than the allocation did (as in
//! a server whose connections' buffers outlive the worker that made them). Every thread works
//! in a group: thread `i` of round `r` in group `(i + r) % threads`, so with 2 threads an
//! inherited block belongs to the other tenant and its free uncharges that one. The bins are
//! filled before timing; the timed span is every round, thread start and exit included.
//! After the last round the remaining blocks are freed and every group is checked back to
//! exactly 0 with as many frees as allocations.
//!
//! Rows (each a child process, see `benches/switch/mod.rs`): `system`, `cap`, `pad8`, `tag`,
//! `arena` (with `--features arena`), `mimalloc`, `tag-mimalloc`, `jemalloc`, `tag-jemalloc`;
//! interleaved repetitions, in wall time and in the threads' CPU time: ns per alloc+free pair per
//! thread (median, min-max) and ratios to the raw inner allocator.
//!
//! ```text
//! taskset -c 1   cargo bench --features arena --bench larson   # 1 thread, pinned
//! taskset -c 0,1 cargo bench --features arena --bench larson   # 1 and 2 threads, 2 CPUs
//! LARSON_QUICK=1 cargo bench --features arena --bench larson   # smoke check
//! ```
//!
//! Environment (all optional): `LARSON_QUICK=1` one short repetition; `LARSON_RUNS=K`
//! repetitions (default 7); `LARSON_ITERS=n` steps per thread per round (default 100,000,
//! quick 5,000); `LARSON_ROUNDS=n` (default 8, quick 3); `LARSON_BINS=n` (default 1,000);
//! `LARSON_THREADS=1,2,16` scenarios; `LARSON_ONLY=system,tag` rows.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::hint::black_box;
use std::time::{Duration, Instant};

use memgroup::Group;

#[path = "common/mod.rs"]
mod common;
#[path = "switch/mod.rs"]
mod switch;

use switch::{env_usize, Config, Sample};

#[global_allocator]
static GLOBAL: switch::Switch = switch::Switch;

const MIN_SIZE: usize = 16;
const MAX_SIZE: usize = 4096;

/// A live block: its address and size (alignment 8).
#[derive(Clone, Copy)]
struct Block {
    ptr: *mut u8,
    size: usize,
}

// SAFETY: a `Block` is an exclusively owned heap block; it moves between threads with its bin.
unsafe impl Send for Block {}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).expect("layout")
}

#[inline(always)]
fn new_block(size: usize) -> Block {
    let l = layout(size);
    // SAFETY: `l` has a non-zero size.
    let ptr = unsafe { alloc(l) };
    if ptr.is_null() {
        handle_alloc_error(l);
    }
    // SAFETY: `ptr` is valid for `size >= 16` bytes.
    unsafe {
        ptr.write(size as u8);
        ptr.add(size - 1).write(1);
    }
    Block { ptr, size }
}

#[inline(always)]
fn free_block(b: Block) {
    // SAFETY: `b` was allocated by `new_block` with this layout and is freed once.
    unsafe {
        black_box(b.ptr.read());
        dealloc(b.ptr, layout(b.size));
    }
}

/// One thread's round: `iters` random replacements in its bin; returns the bytes allocated.
#[inline(never)]
fn turn_over(bin: &mut [Block], iters: usize, seed: u64) -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = 0u64;
    for _ in 0..iters {
        let v = xorshift(&mut x);
        let i = (v % bin.len() as u64) as usize;
        let size = MIN_SIZE + ((v >> 32) as usize) % (MAX_SIZE - MIN_SIZE + 1);
        free_block(bin[i]);
        bin[i] = new_block(size);
        bytes += size as u64;
    }
    bytes
}

fn child() -> Sample {
    let threads = switch::child_threads();
    let quick = std::env::var("LARSON_QUICK").is_ok_and(|v| v != "0")
        || !std::env::args().any(|a| a == "--bench");
    let iters = env_usize("LARSON_ITERS").unwrap_or(if quick { 5_000 } else { 100_000 });
    let rounds = env_usize("LARSON_ROUNDS")
        .unwrap_or(if quick { 3 } else { 8 })
        .max(1);
    let nbins = env_usize("LARSON_BINS").unwrap_or(1_000).max(1);
    let groups: Vec<Group> = (0..threads)
        .map(|i| Group::new(&format!("larson-{i}")).expect("group"))
        .collect();
    switch::warm_threads();
    let cap_before = switch::cap_allocated();
    let before: Vec<(u64, u64)> = groups.iter().map(switch::counts).collect();

    // Fill: thread slot i's bin in group i, before timing.
    let mut bins: Vec<Vec<Block>> = Vec::with_capacity(threads);
    let mut x = 12345u64;
    for g in &groups {
        let mut bin = Vec::with_capacity(nbins);
        let _in = g.enter();
        for _ in 0..nbins {
            let v = xorshift(&mut x);
            bin.push(new_block(
                MIN_SIZE + (v as usize) % (MAX_SIZE - MIN_SIZE + 1),
            ));
        }
        drop(_in);
        bins.push(bin);
    }

    let mut check = 0u64;
    let mut cpu = Duration::ZERO;
    let t0 = Instant::now();
    for r in 0..rounds {
        let handles: Vec<_> = bins
            .drain(..)
            .enumerate()
            .map(|(i, mut bin)| {
                let g = groups[(i + r) % threads].clone();
                let seed = (r * 1_000 + i) as u64 + 1;
                std::thread::spawn(move || {
                    let c0 = switch::thread_cpu();
                    let bytes = g.run(|| turn_over(&mut bin, iters, seed));
                    (bin, bytes, switch::thread_cpu() - c0)
                })
            })
            .collect();
        for h in handles {
            let (bin, bytes, used) = h.join().expect("larson thread");
            bins.push(bin);
            cpu += used;
            check = check.wrapping_add(bytes);
        }
    }
    let elapsed = t0.elapsed();

    for b in bins.drain(..).flatten() {
        free_block(b);
    }
    drop(bins);
    // Allocations in the timed rounds: the fill's are not timed.
    let mut allocs = 0u64;
    for (g, b) in groups.iter().zip(&before) {
        allocs += switch::check_group(g, *b);
    }
    let allocs = allocs.saturating_sub((threads * nbins) as u64);
    drop(before);
    switch::check_cap(cap_before);
    Sample {
        ns: elapsed.as_secs_f64() * 1e9 / (rounds * iters) as f64,
        cpu: cpu.as_secs_f64() * 1e9 / (rounds * iters * threads) as f64,
        allocs: allocs as f64 / (rounds * iters * threads) as f64,
        check,
    }
}

fn main() {
    if switch::is_child() {
        switch::report_child(child());
        return;
    }
    let cfg = Config::from_env("LARSON", "THREADS", &[1, 2]);
    let load = switch::load_average();
    let lines = switch::measure(&cfg);
    println!("## memgroup larson: bins of live blocks turned over by threads that come and go\n");
    println!(
        "{} live blocks/thread of 16..=4096 B, {} rounds of {} steps/thread, new threads each \
         round inherit the bins (frees cross threads and, with 2+ threads, groups); load average \
         before: {load}",
        env_usize("LARSON_BINS").unwrap_or(1_000),
        env_usize("LARSON_ROUNDS").unwrap_or(if cfg.quick { 3 } else { 8 }),
        env_usize("LARSON_ITERS").unwrap_or(if cfg.quick { 5_000 } else { 100_000 }),
    );
    switch::print_table(&cfg, &lines, "pair", "thread", false);
}
