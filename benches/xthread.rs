//! Producer/consumer cross-thread frees under every allocator, in one run: one thread
//! allocates in its group and sends the blocks through a channel, another frees them (a
//! request parsed on an I/O thread and dropped by a worker, or the reverse). Every free is
//! remote: in the tag design it uncharges the producer's group from the consumer's thread
//! (the stock of the consumer's CPU, not the producer's pocket), in the arena design it goes
//! to the slab's remote list, which the producer takes back.
//!
//! Each pair: the producer, in its own group, makes `XTHREAD_ITERS` blocks (a `Vec<u8>` of
//! 16..=1024 bytes, random sizes, its first and last byte written), sends them in batches of
//! `XTHREAD_BATCH` (a `Vec` of blocks, itself allocated by the producer) through a
//! `std::sync::mpsc::sync_channel` of `XTHREAD_DEPTH` batches; the consumer, in the root group,
//! reads a byte of each block and drops the batch. Scenarios: `XTHREAD_PAIRS` pairs (default
//! 1; any count works), so 2 threads per pair. After the run the producers' groups are checked
//! back to exactly 0 with as many frees as allocations.
//!
//! Rows (each a child process, see `benches/switch/mod.rs`): `system`, `cap`, `pad8`, `tag`,
//! `arena` (with `--features arena`), `mimalloc`, `tag-mimalloc`, `jemalloc`, `tag-jemalloc`;
//! interleaved repetitions, in wall time and in the threads' CPU time (both threads of a pair
//! summed): ns per block per pair (median, min-max) and ratios to the raw inner allocator.
//!
//! ```text
//! taskset -c 0,1 cargo bench --features arena --bench xthread   # one pair on 2 CPUs
//! taskset -c 1   cargo bench --features arena --bench xthread   # both threads on one CPU
//! XTHREAD_QUICK=1 cargo bench --features arena --bench xthread  # smoke check
//! ```
//!
//! Environment (all optional): `XTHREAD_QUICK=1` one short repetition; `XTHREAD_RUNS=K`
//! repetitions (default 7); `XTHREAD_ITERS=n` blocks per producer per run (default 1,000,000,
//! quick 20,000); `XTHREAD_BATCH=n` blocks per message (default 32); `XTHREAD_DEPTH=n`
//! messages in flight (default 16); `XTHREAD_PAIRS=1,2,8` scenarios; `XTHREAD_ONLY=system,tag`
//! rows.

use std::hint::black_box;
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use memgroup::Group;

#[path = "common/mod.rs"]
mod common;
#[path = "switch/mod.rs"]
mod switch;

use switch::{env_usize, Config, Sample};

#[global_allocator]
static GLOBAL: switch::Switch = switch::Switch;

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// The producer's loop: `iters` blocks in batches of `batch`; returns the bytes made.
#[inline(never)]
fn produce(
    tx: std::sync::mpsc::SyncSender<Vec<Vec<u8>>>,
    iters: usize,
    batch: usize,
    seed: u64,
) -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = 0u64;
    let mut left = iters;
    while left > 0 {
        let n = batch.min(left);
        let mut msg = Vec::with_capacity(n);
        for _ in 0..n {
            let size = 16 + (xorshift(&mut x) % 1009) as usize;
            let mut b = Vec::<u8>::with_capacity(size);
            // SAFETY: the capacity is `size`; the bytes between the two written stay
            // uninitialized and are never read (`u8` has no invalid values, but the length is
            // what `Vec` reads, and only the two written bytes are inside it).
            unsafe {
                b.as_mut_ptr().write(size as u8);
                b.as_mut_ptr().add(1).write(1);
                b.set_len(2);
            }
            bytes += size as u64;
            msg.push(b);
        }
        tx.send(msg).expect("consumer alive");
        left -= n;
    }
    bytes
}

/// The consumer's loop: reads a byte of every block and frees it.
#[inline(never)]
fn consume(rx: std::sync::mpsc::Receiver<Vec<Vec<u8>>>) -> u64 {
    let mut sum = 0u64;
    for msg in rx {
        for b in &msg {
            sum += u64::from(b[1]);
        }
        black_box(&msg);
    }
    sum
}

fn child() -> Sample {
    let pairs = switch::child_threads();
    let quick = std::env::var("XTHREAD_QUICK").is_ok_and(|v| v != "0")
        || !std::env::args().any(|a| a == "--bench");
    let iters = env_usize("XTHREAD_ITERS").unwrap_or(if quick { 20_000 } else { 1_000_000 });
    let batch = env_usize("XTHREAD_BATCH").unwrap_or(32).max(1);
    let depth = env_usize("XTHREAD_DEPTH").unwrap_or(16);
    let groups: Vec<Group> = (0..pairs)
        .map(|i| Group::new(&format!("xthread-{i}")).expect("group"))
        .collect();
    switch::warm_threads();
    let cap_before = switch::cap_allocated();
    let before: Vec<(u64, u64)> = groups.iter().map(switch::counts).collect();
    let start = Arc::new(Barrier::new(2 * pairs + 1));

    let mut producers = Vec::new();
    let mut consumers = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        let (tx, rx) = sync_channel(depth);
        let (g, go) = (g.clone(), Arc::clone(&start));
        producers.push(std::thread::spawn(move || {
            go.wait();
            let t0 = Instant::now();
            let c0 = switch::thread_cpu();
            let bytes = g.run(|| produce(tx, iters, batch, i as u64 + 1));
            (t0, bytes, switch::thread_cpu() - c0)
        }));
        let go = Arc::clone(&start);
        consumers.push(std::thread::spawn(move || {
            go.wait();
            let c0 = switch::thread_cpu();
            let sum = consume(rx);
            (Instant::now(), sum, switch::thread_cpu() - c0)
        }));
    }
    start.wait();
    drop(start);
    let mut first = None::<Instant>;
    let mut last = None::<Instant>;
    let mut check = 0u64;
    let mut cpu = Duration::ZERO;
    for p in producers {
        let (t0, bytes, used) = p.join().expect("producer");
        cpu += used;
        first = Some(first.map_or(t0, |f| f.min(t0)));
        check = check.wrapping_add(bytes);
    }
    for c in consumers {
        let (t1, sum, used) = c.join().expect("consumer");
        cpu += used;
        last = Some(last.map_or(t1, |l| l.max(t1)));
        assert_eq!(sum, iters as u64, "every block arrived once");
    }
    let elapsed = last.expect("a consumer") - first.expect("a producer");
    let mut allocs = 0u64;
    for (g, b) in groups.iter().zip(&before) {
        allocs += switch::check_group(g, *b);
    }
    drop(before);
    switch::check_cap(cap_before);
    Sample {
        ns: elapsed.as_secs_f64() * 1e9 / iters as f64,
        // Both threads of a pair: the CPU cost of moving one block from one to the other.
        cpu: cpu.as_secs_f64() * 1e9 / (pairs * iters) as f64,
        allocs: allocs as f64 / (pairs * iters) as f64,
        check,
    }
}

fn main() {
    if switch::is_child() {
        switch::report_child(child());
        return;
    }
    let cfg = Config::from_env("XTHREAD", "PAIRS", &[1]);
    let load = switch::load_average();
    let lines = switch::measure(&cfg);
    println!("## memgroup xthread: blocks allocated on one thread, freed on another\n");
    println!(
        "{} blocks of 16..=1024 B per producer, batches of {}, {} batches in flight; producer \
         in its group, consumer in the root; load average before: {load}",
        env_usize("XTHREAD_ITERS").unwrap_or(if cfg.quick { 20_000 } else { 1_000_000 }),
        env_usize("XTHREAD_BATCH").unwrap_or(32).max(1),
        env_usize("XTHREAD_DEPTH").unwrap_or(16),
    );
    switch::print_table(&cfg, &lines, "block", "pair", false);
}
