//! A real-library workload under every allocator, in one run: what a tenant's request costs a
//! server when each of its allocations goes through memgroup, against the raw allocator.
//!
//! One unit of work (a "doc") is what a JSON API request handler does: build a serde_json
//! document of `REAL_ROWS` rows (default 400; each an object with strings, numbers, an array
//! and a nested object), serialize it (compact and pretty), parse it back, compile three regexes
//! and run them over the text (finds, captures), then index the parsed rows in std collections
//! (a `HashMap<String, Vec<u64>>` by city, a `BTreeMap` by zip code, a sorted and deduplicated
//! `Vec<String>` of names, half of the map's entries removed again). Every thread works in its
//! own group (a tenant); threads `REAL_THREADS` (default 1 and 2; any count works).
//!
//! Rows, each a child process of this binary whose `#[global_allocator]` is that allocator (the
//! harness in `benches/switch/mod.rs`): `system` (glibc), `cap` (a single global counter with a
//! limit), `pad8` (the tag's header alone, no accounting), `tag` (`TagAlloc<System>`), `arena`
//! (`ArenaAlloc<System>`, with `--features arena`), `mimalloc`, `tag-mimalloc`
//! (`TagAlloc<MiMalloc>`), `jemalloc`, `tag-jemalloc` (`TagAlloc<Jemalloc>`). Repetitions are
//! interleaved and rotated; reported twice, in wall time and in the working threads' CPU time (the
//! steadier figure on a shared machine): microseconds per doc per thread (median, min-max), the
//! ratio of the medians to the raw inner allocator, and the spread of the per-repetition ratios.
//! Each thread runs one doc outside its group first (thread-locals such as the `HashMap` seeds are
//! then charged to no tenant), then `REAL_ITERS` timed docs in its group; afterwards every group is
//! checked back to exactly 0 (and as many frees as allocations), the `cap` counter back to its
//! start, and every row must compute the same checksum.
//!
//! Issue 12's targets: `tag` / `system` <= 1.03x at 1 and 2 threads; `arena` <= 0.90x.
//!
//! ```text
//! taskset -c 1   cargo bench --features arena --bench real    # 1 thread, pinned
//! taskset -c 0,1 cargo bench --features arena --bench real    # both scenarios, 2 CPUs
//! REAL_QUICK=1 cargo bench --features arena --bench real      # smoke check (also without --bench)
//! ```
//!
//! Instructions per allocation (callgrind): the timed docs are `real::timed_docs`, so
//!
//! ```text
//! REAL_RUNS=1 REAL_THREADS=1 REAL_ONLY=tag REAL_ITERS=3 valgrind --tool=callgrind \
//!     --trace-children=yes --toggle-collect='real::timed_docs' target/release/deps/real-HASH --bench
//! ```
//!
//! and divide by the groups' allocation count the child prints (callgrind's own call counts
//! for the `__rust_alloc` shims came out about 1.7 times too high; the first instruction's
//! execution count, with `--dump-instr=yes`, is exact).
//!
//! Environment (all optional): `REAL_QUICK=1` one short repetition; `REAL_RUNS=K` repetitions
//! (default 7); `REAL_ITERS=n` timed docs per thread per run (default 40, quick 3);
//! `REAL_ROWS=n` rows per document (default 400); `REAL_THREADS=1,2,16` scenarios;
//! `REAL_ONLY=system,tag` rows.

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use memgroup::Group;
use regex::Regex;
use serde_json::{json, Value};

#[path = "common/mod.rs"]
mod common;
#[path = "switch/mod.rs"]
mod switch;

use switch::{Config, Sample};

#[global_allocator]
static GLOBAL: switch::Switch = switch::Switch;

const CITIES: [&str; 8] = [
    "Lisbon", "Osaka", "Quito", "Tartu", "Dakar", "Perth", "Oslo", "Leeds",
];

/// One request's worth of work; returns a checksum that does not depend on hash order.
fn doc(seed: u64, rows: usize) -> u64 {
    // Build.
    let items: Vec<Value> = (0..rows as u64)
        .map(|i| {
            json!({
                "id": seed * 100_000 + i,
                "name": format!("user-{seed}-{i}"),
                "email": format!("u{i}.{}@example{}.org", seed % 97, i % 7),
                "score": i as f64 * 1.5 + seed as f64,
                "active": i % 3 == 0,
                "tags": [format!("t{}", i % 5), format!("g{}", (i + seed) % 11), "common"],
                "address": {
                    "city": CITIES[(i % 8) as usize],
                    "zip": format!("{:05}", (seed * 31 + i * 7) % 100_000),
                    "since": format!("20{:02}-{:02}-{:02}", i % 25, i % 12 + 1, i % 28 + 1),
                },
            })
        })
        .collect();
    let document = json!({ "page": seed, "count": rows, "rows": items });

    // Serialize, parse back.
    let text = serde_json::to_string(&document).expect("serialize");
    let pretty = serde_json::to_vec_pretty(&document).expect("serialize pretty");
    drop(document);
    let parsed: Value = serde_json::from_str(&text).expect("parse");
    let back = parsed["rows"].as_array().expect("rows");
    assert_eq!(back.len(), rows);
    let mut sum = text.len() as u64 + pretty.len() as u64;

    // Regexes: compiled per request, as a handler with user-given patterns does.
    let email = Regex::new(r"[a-z0-9.]+@example[0-9]+\.org").expect("regex");
    let date = Regex::new(r"(\d{4})-(\d{2})-(\d{2})").expect("regex");
    let name = Regex::new(r#""name":"user-\d+-(\d+)""#).expect("regex");
    sum += email.find_iter(&text).count() as u64;
    for c in date.captures_iter(&text) {
        sum += c[2].parse::<u64>().expect("month") + c[3].parse::<u64>().expect("day");
    }
    for c in name.captures_iter(&text) {
        sum += c[1].parse::<u64>().expect("index");
    }

    // Collections over the parsed rows.
    let mut by_city: HashMap<String, Vec<u64>> = HashMap::new();
    let mut by_zip: BTreeMap<u64, String> = BTreeMap::new();
    let mut names: Vec<String> = Vec::new();
    for r in back {
        let city = r["address"]["city"].as_str().expect("city").to_string();
        let id = r["id"].as_u64().expect("id");
        by_city.entry(city).or_default().push(id);
        let zip: u64 = r["address"]["zip"]
            .as_str()
            .expect("zip")
            .parse()
            .expect("zip");
        by_zip.insert(zip, r["email"].as_str().expect("email").to_owned());
        names.push(r["name"].as_str().expect("name").to_owned());
        for t in r["tags"].as_array().expect("tags") {
            names.push(t.as_str().expect("tag").to_owned());
        }
    }
    names.sort_unstable();
    names.dedup();
    sum += names.len() as u64;
    for (city, ids) in &by_city {
        sum = sum.wrapping_add(city.len() as u64 * ids.iter().sum::<u64>());
    }
    let keys: Vec<u64> = by_zip.keys().copied().step_by(2).collect();
    for k in keys {
        sum = sum.wrapping_add(by_zip.remove(&k).expect("key").len() as u64);
    }
    by_city.retain(|c, _| c.len() % 2 == 0);
    sum = sum.wrapping_add(by_city.len() as u64 + by_zip.len() as u64);
    black_box((by_city, by_zip, names, parsed, pretty));
    sum
}

/// The timed docs of worker `i`, in its group `g`: a function of its own, never inlined, so
/// that a profiler can collect just these (`valgrind --tool=callgrind
/// --toggle-collect='real::timed_docs'`).
#[inline(never)]
fn timed_docs(g: &Group, i: usize, iters: usize, rows: usize) -> u64 {
    let _in = g.enter();
    let mut sum = 0u64;
    for k in 0..iters as u64 {
        sum = sum.wrapping_add(doc(k * 64 + i as u64 % 2, rows));
    }
    sum
}

/// The child: `threads` threads, each in its own group, `iters` docs each.
fn child() -> Sample {
    let threads = switch::child_threads();
    let quick = std::env::var("REAL_QUICK").is_ok_and(|v| v != "0")
        || !std::env::args().any(|a| a == "--bench");
    let iters = switch::env_usize("REAL_ITERS").unwrap_or(if quick { 3 } else { 40 });
    let rows = switch::env_usize("REAL_ROWS").unwrap_or(400);
    let groups: Vec<Group> = (0..threads)
        .map(|i| Group::new(&format!("real-{i}")).expect("group"))
        .collect();
    let start = Arc::new(Barrier::new(threads));
    // Whatever std and the libraries allocate once per process (not per thread) is made here,
    // before the `cap` counter's starting point.
    switch::warm_threads();
    black_box(doc(0, rows));
    let cap_before = switch::cap_allocated();
    // Joined threads, not a scope: `join` returns once a thread has freed everything it
    // allocated, so the `cap` check after it is exact.
    let workers: Vec<_> = groups
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let (g, start) = (g.clone(), Arc::clone(&start));
            std::thread::spawn(move || {
                // Outside the group: lazily made thread-locals stay the root's.
                black_box(doc(1_000 + i as u64, rows));
                let before = switch::counts(&g);
                start.wait();
                let t0 = Instant::now();
                let c0 = switch::thread_cpu();
                let sum = timed_docs(&g, i, iters, rows);
                let cpu = switch::thread_cpu() - c0;
                let t1 = Instant::now();
                let allocs = switch::check_group(&g, before);
                (t0, t1, cpu, sum, allocs)
            })
        })
        .collect();
    let results: Vec<(Instant, Instant, Duration, u64, u64)> = workers
        .into_iter()
        .map(|w| w.join().expect("worker"))
        .collect();
    let first = results.iter().map(|r| r.0).min().expect("a thread");
    let last = results.iter().map(|r| r.1).max().expect("a thread");
    let cpu: Duration = results.iter().map(|r| r.2).sum();
    let check = results.iter().fold(0u64, |a, r| a.wrapping_add(r.3));
    let allocs: u64 = results.iter().map(|r| r.4).sum();
    drop(results);
    switch::check_cap(cap_before);
    Sample {
        // Per thread: every thread did `iters` docs in the wall time.
        ns: (last - first).as_secs_f64() * 1e9 / iters as f64,
        cpu: cpu.as_secs_f64() * 1e9 / (threads * iters) as f64,
        allocs: allocs as f64 / (threads * iters) as f64,
        check,
    }
}

fn main() {
    if switch::is_child() {
        switch::report_child(child());
        return;
    }
    let cfg = Config::from_env("REAL", "THREADS", &[1, 2]);
    let load = switch::load_average();
    let lines = switch::measure(&cfg);
    println!(
        "## memgroup real: serde_json build/serialize/parse, regex compile+match, collections\n"
    );
    println!(
        "docs: {} rows each, {} per thread per run; one group per thread; load average before: {load}",
        switch::env_usize("REAL_ROWS").unwrap_or(400),
        switch::env_usize("REAL_ITERS").unwrap_or(if cfg.quick { 3 } else { 40 }),
    );
    switch::print_table(&cfg, &lines, "doc", "thread", true);
    println!(
        "\ntargets (issue 12): tag / system <= 1.03x at 1 and 2 threads; arena / system <= 0.90x"
    );
}
