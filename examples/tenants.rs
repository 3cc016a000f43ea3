//! Tenants share one process. memgroup charges each allocation to the tenant that made it and
//! keeps every tenant inside its budget, as the Linux memory cgroup controller does.
//!
//!     cargo run --release --example tenants
//!
//!     tenants          max 64 MiB
//!     ├── web          max 16 MiB, high 8 MiB   parses request logs into records
//!     │   └── batch    max  6 MiB, high 4 MiB   web's batch job: sorts 1 MiB arrays
//!     ├── gateway      max  8 MiB, kmem 1 MiB   its socket buffers are kernel memory
//!     ├── greedy       max  4 MiB               misbehaves: a cache that never evicts
//!     ├── strict       max  2 MiB, OnLimit::Fail
//!     └── cache        max 3.5 MiB, high 3 MiB  parsed documents, with a shrinker that evicts
//!
//! Each tenant runs on its own thread for 3 s, with a table printed every second. Then all the
//! memory is freed, and the example asserts that every tenant's usage is back to 0.
//!
//! cache never evicts by itself: memory pressure does. Its shrinker gives back the oldest
//! entries when memgroup asks, on its notifier thread: in the background when cache goes above
//! high, and before a charge at max would be refused (direct reclaim).

use memgroup::{Group, OnLimit, Shrinker};
use std::collections::{HashMap, VecDeque};
use std::fmt::{Display, Write as _};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc::SyncSender, Arc, Mutex};
use std::thread::{self, sleep};
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: memgroup::GroupAlloc = memgroup::GroupAlloc::system();

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
static RUNNING: AtomicBool = AtomicBool::new(true);

/// A tenant's loop: `refused` counts the requests it saw refused, `out` goes to the writer.
type Work = fn(refused: &AtomicU64, out: &SyncSender<Vec<u8>>);

fn main() -> Result<(), memgroup::Error> {
    // A lazily created global, such as stdout's buffer, is charged to the group that touches it
    // first. So print once from main, which is in no group (it charges the root), before any
    // tenant runs.
    println!("memgroup example: 5 tenants for 3 s, one of them misbehaving\n");

    let tenants = Group::new("tenants")?;
    tenants.set_max(Some(64 * MIB)); // A charge counts in a group and in all its ancestors.
    let web = tenants.child("web")?;
    web.set_max(Some(16 * MIB));
    web.set_high(Some(8 * MIB)); // events.high counts how often usage goes above high.
    let batch = web.child("batch")?;
    batch.set_max(Some(6 * MIB));
    batch.set_high(Some(4 * MIB));
    let gateway = tenants.child("gateway")?;
    gateway.set_max(Some(8 * MIB));
    gateway.set_kmem_max(Some(MIB)); // A limit on kernel(..) memory only.
    let greedy = tenants.child("greedy")?; // Default policy: OnLimit::Overcharge.
    greedy.set_max(Some(4 * MIB));
    let strict = tenants.child("strict")?;
    strict.set_max(Some(2 * MIB));
    strict.set_on_limit(OnLimit::Fail);
    let cache = tenants.child("cache")?;
    cache.set_max(Some(7 * MIB / 2));
    cache.set_high(Some(3 * MIB));

    // cache's documents. Its shrinker is called on memgroup's notifier thread, never inside an
    // allocation, and is never called again once `shrinker` is dropped.
    let docs = Arc::new(DocCache::default());
    let shrinker = cache.register_shrinker(Evict(docs.clone()));
    // The levels of tenants and of every group below it, counted by level. The callback runs
    // on the notifier thread too, so it only counts: a slow one would delay reclaim.
    let levels: Arc<[AtomicU64; 3]> = Arc::default(); // Low, Medium, Critical
    let subscription = tenants.on_pressure({
        let levels = levels.clone();
        move |level| {
            levels[level as usize].fetch_add(1, Relaxed);
        }
    });

    // A block's owner is the group that allocated it, whichever thread frees it.
    let block = gateway.run(|| vec![1u8; MIB]);
    gateway.flush(); // Drains the per-CPU stocks, so that stat() is exact.
    let held = gateway.stat().usage;
    thread::spawn(move || drop(block)).join().unwrap();
    gateway.flush();
    let left = gateway.stat().usage;
    println!("gateway allocates 1 MiB: usage {held} B. Another thread frees it: {left} B\n");
    println!("events: high = went above high, max = over max (forced or refused), fail = refused");
    println!("refused: requests the tenant's own code saw refused (and handled)");
    println!("levels: low = 3/4 of high (or max), medium = above high, critical = over max\n");

    // The writer thread is in no group. It frees the buffers that the tenants send it.
    let (out, inbox) = std::sync::mpsc::sync_channel::<Vec<u8>>(1024);
    let writer = thread::spawn(move || inbox.into_iter().map(|buf| buf.len()).sum::<usize>());

    // Start the tenants. After this, `rows` holds the only handles to the groups.
    let batch_job = thread::spawn({
        let batch = batch.clone();
        move || batch.run(sort_arrays) // Everything this thread allocates is charged to batch.
    });
    let plan: [(Group, Work); 4] = [
        (web, run_web),
        (gateway, run_gateway),
        (greedy, run_greedy),
        (strict, run_strict),
    ];
    let (mut rows, mut threads) = (vec![(tenants, None)], vec![]);
    for (group, work) in plan {
        let refused = Arc::new(AtomicU64::new(0));
        let (counter, out) = (refused.clone(), out.clone());
        let handle = group.clone();
        threads.push(thread::spawn(move || handle.run(|| work(&counter, &out))));
        rows.push((group, Some(refused)));
    }
    let refused = Arc::new(AtomicU64::new(0));
    threads.push(thread::spawn({
        let (group, docs, refused) = (cache.clone(), docs.clone(), refused.clone());
        move || group.run(|| run_cache(&docs, &refused))
    }));
    rows.push((cache, Some(refused)));
    rows.insert(2, (batch, None)); // Right after its parent, web.
    drop(out);

    let start = Instant::now();
    for second in 1..=3 {
        sleep((start + Duration::from_secs(second)).saturating_duration_since(Instant::now()));
        print_table(&format!("t = {second} s (stat() without flush)"), &rows);
        let [low, medium, critical] = levels.each_ref().map(|n| count(n.load(Relaxed)));
        let evicted = count(docs.evicted.load(Relaxed));
        let levels = format!("low {low}, medium {medium}, critical {critical}");
        println!("levels on tenants: {levels}. cache's shrinker evicted {evicted} entries\n");
    }
    RUNNING.store(false, Relaxed);
    threads.into_iter().for_each(|t| t.join().unwrap());
    let written = bytes(writer.join().unwrap());
    println!("The writer thread freed {written} of buffers allocated by web and gateway.");

    // Unregister the shrinker and the callback, then free the cache (its tenant has stopped).
    drop((shrinker, subscription));
    let [evicted, big, waited] = [&docs.evicted, &docs.big, &docs.waited].map(|n| n.load(Relaxed));
    let [low, medium, critical] = levels.each_ref().map(|n| n.load(Relaxed));
    drop(docs);

    // Remove web/batch while its result is still alive: the result's charge moves to web, and
    // batch stays "dying" until that memory is freed.
    let result = batch_job.join().unwrap();
    rows.remove(2).0.remove()?;
    let dying = memgroup::dying_groups();
    println!("web/batch removed, its 1 MiB result still alive: dying_groups() = {dying}");
    drop(result);
    let dying = memgroup::dying_groups();
    println!("result dropped:                                 dying_groups() = {dying}\n");

    // All the tenants' memory has been freed. After flush(), every usage must be exactly 0.
    rows[0].0.flush();
    print_table("final: all work dropped, flush() called", &rows);
    for (group, refused) in &rows[1..] {
        let (stat, refused) = (group.stat(), refused.as_ref().unwrap().load(Relaxed));
        assert_eq!(stat.usage, 0, "{}: accounting drifted", group.name());
        // Every refusal the allocator counted was seen and handled by the tenant's code.
        assert_eq!(stat.events.fail, refused, "{}", group.name());
    }
    let greedy = rows[3].0.stat().events;
    println!("Every tenant's usage is 0 B again, and its events.fail equals its refused count.");
    let (hits, refused, forced) = (greedy.max, greedy.fail, greedy.max - greedy.fail);
    println!("greedy's charges hit its max {hits} times: {refused} refused, {forced} overcharged.");
    let strict = rows[4].0.stat();
    let (peak, refused) = (bytes(strict.peak), strict.events.fail);
    println!("strict (OnLimit::Fail) peaked at {peak}, under its max: {refused} uploads refused.");
    println!("The subscriber on tenants saw {low} low, {medium} medium and {critical} critical");
    println!("levels, its own and every tenant's (critical: mostly greedy's).");
    let cache = rows[5].0.stat().events;
    let (high, fail) = (cache.high, cache.fail);
    println!("cache went above high {high} times: the notifier trimmed it in the background.");
    println!("{waited} of its {big} big documents found it full: they waited while the shrinker");
    println!("made room (direct reclaim), and fitted: {fail} refused. {evicted} entries evicted.");
    println!("Nothing aborted, and the other tenants kept running.\n");

    // Removing the tenants frees their bookkeeping, which is charged to "tenants" as kmem.
    let tenants = rows.remove(0).0;
    rows.into_iter().try_for_each(|(group, _)| group.remove())?;
    tenants.flush();
    let usage = tenants.stat().usage;
    tenants.remove()?;
    let dying = memgroup::dying_groups();
    println!("All tenants removed: tenants usage {usage} B, dying_groups() = {dying}");
    assert_eq!((usage, dying), (0, 0));
    Ok(())
}

/// Reserves `capacity` bytes fallibly, the way code that can handle a refusal should. Inside
/// `fallible(..)`, an allocation over a limit returns null, and try_reserve turns that into an
/// Err. The caller fills the buffer within its capacity, so nothing else is allocated.
fn try_buffer(capacity: usize, refused: &AtomicU64) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let reserved = memgroup::fallible(|| buf.try_reserve_exact(capacity));
    if reserved.is_err() {
        refused.fetch_add(1, Relaxed); // The tenant drops this request and goes on.
    }
    reserved.ok().map(|()| buf)
}

/// web: parses batches of log lines into records and keeps the last 1 to 10 batches, so that
/// usage goes up and down through `high`. It sends a per-user summary to the writer.
fn run_web(refused: &AtomicU64, out: &SyncSender<Vec<u8>>) {
    let (mut seed, mut window, mut tick) = (1, VecDeque::new(), 0);
    while RUNNING.load(Relaxed) {
        let mut text = String::new();
        for i in 0..5000 {
            let (user, len) = (rand(&mut seed) % 500, rand(&mut seed) % 65_536);
            let item = seed % 99_999;
            writeln!(text, "{i} user{user} GET /api/items/{item} {len}").unwrap();
        }
        // One record per line: (user, path, bytes).
        let records: Vec<(String, String, u64)> = text
            .lines()
            .map(|line| line.split(' ').collect::<Vec<_>>())
            .map(|f| (f[1].to_owned(), f[3].to_owned(), f[4].parse().unwrap()))
            .collect();
        window.push_back(records);
        tick += 1;
        while window.len() > 1 + tick % 10 {
            window.pop_front();
        }
        let mut per_user = HashMap::<&str, u64>::new();
        for (user, _path, len) in window.iter().flatten() {
            *per_user.entry(user).or_default() += len;
        }
        if let Some(mut body) = try_buffer(per_user.len() * 24, refused) {
            for (user, len) in per_user {
                write!(body, "{user:>8}{len:>16}").unwrap(); // Exactly 24 bytes.
            }
            out.send(body).unwrap(); // Freed by the writer, uncharged from web.
        }
        sleep(Duration::from_millis(5));
    }
}

/// web/batch: sorts 1 MiB arrays and keeps the last 1 to 4 of them. Returns the last one.
fn sort_arrays() -> Vec<u64> {
    let (mut seed, mut kept, mut n) = (2, VecDeque::new(), 0);
    while RUNNING.load(Relaxed) {
        let mut array: Vec<u64> = (0..MIB / 8).map(|_| rand(&mut seed)).collect();
        array.sort_unstable();
        kept.push_back(array);
        n += 1;
        while kept.len() > 1 + n % 4 {
            kept.pop_front();
        }
        sleep(Duration::from_millis(20));
    }
    kept.pop_back().unwrap_or_default()
}

/// gateway: a proxy. A connection's 128 KiB socket buffer is memory the server spends on the
/// tenant's behalf, so it is allocated inside `kernel(..)`. kmem_max caps these buffers, and
/// connections after the 7th are refused. Request bodies are user memory, sent to the writer.
fn run_gateway(refused: &AtomicU64, out: &SyncSender<Vec<u8>>) {
    let (mut seed, mut sockets) = (3, Vec::<Vec<u8>>::new());
    while RUNNING.load(Relaxed) {
        if sockets.len() < 12 {
            if let Some(mut socket) = memgroup::kernel(|| try_buffer(128 * KIB, refused)) {
                socket.resize(128 * KIB, b'x');
                sockets.push(socket);
            }
        }
        for socket in &sockets {
            let len = 1 + rand(&mut seed) as usize % (32 * KIB);
            if let Some(mut body) = try_buffer(len, refused) {
                body.extend_from_slice(&socket[..len]);
                out.send(body).unwrap();
            }
        }
        if rand(&mut seed) % 3 == 0 && !sockets.is_empty() {
            sockets.swap_remove(seed as usize % sockets.len()); // A client hangs up.
        }
        sleep(Duration::from_millis(2));
    }
}

/// greedy misbehaves: its cache never evicts. Cache values are reserved fallibly, so past max
/// they are refused and greedy carries on. Its log grows with ordinary, infallible allocations.
/// Past max those are overcharged: allowed above max and counted in events.max, never aborted.
fn run_greedy(refused: &AtomicU64, _: &SyncSender<Vec<u8>>) {
    let (mut cache, mut log, mut key) = (HashMap::new(), vec![], 0u64);
    while RUNNING.load(Relaxed) {
        if let Some(mut value) = try_buffer(32 * KIB, refused) {
            value.resize(32 * KIB, key as u8);
            cache.insert(key, value);
        }
        log.push(format!("{key} miss, {} entries {:.>500}", cache.len(), ""));
        key += 1;
        sleep(Duration::from_millis(1));
    }
}

/// strict has OnLimit::Fail: past max, every allocation in its group fails, and a failed
/// infallible allocation aborts the process. So strict allocates only through try_reserve (an
/// infallible allocation would need `memgroup::nofail(..)`). When an upload is refused, strict
/// drops the older half of its uploads.
fn run_strict(refused: &AtomicU64, _: &SyncSender<Vec<u8>>) {
    let mut uploads = Vec::with_capacity(64); // 2 MiB holds only 10 uploads: this never grows.
    while RUNNING.load(Relaxed) {
        match try_buffer(192 * KIB, refused) {
            Some(mut upload) => {
                upload.resize(192 * KIB, 7);
                uploads.push(upload);
            }
            None => drop(uploads.drain(..uploads.len() / 2)),
        }
        sleep(Duration::from_millis(3));
    }
}

/// The size of one cache entry: a parsed document.
const ENTRY: usize = 64 * KIB;

/// cache's documents by id, oldest first.
#[derive(Default)]
struct DocCache {
    entries: Mutex<VecDeque<(u64, Vec<u8>)>>,
    /// Entries the shrinker evicted.
    evicted: AtomicU64,
    /// Big documents read, and those that waited at max while the shrinker evicted entries.
    big: AtomicU64,
    waited: AtomicU64,
}

impl DocCache {
    fn contains(&self, id: u64) -> bool {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .any(|(key, _)| *key == id)
    }

    /// Adds an entry, allocated by the caller before it took the lock. An allocation at max
    /// waits (at most 10 ms) for the notifier to run the shrinker, and the shrinker takes this
    /// lock: made under the lock, the entry would wait in vain and be refused. Growing the
    /// queue does allocate under the lock, but it is small and rare.
    fn insert(&self, id: u64, entry: Vec<u8>, refused: &AtomicU64) {
        let mut entries = self.entries.lock().unwrap();
        if memgroup::fallible(|| entries.try_reserve(1)).is_err() {
            refused.fetch_add(1, Relaxed);
            return;
        }
        entries.push_back((id, entry));
    }
}

/// cache's shrinker: one chunk is one entry, and the oldest go first.
struct Evict(Arc<DocCache>);

impl Shrinker for Evict {
    fn chunk_size(&self) -> usize {
        ENTRY
    }

    fn count(&self) -> usize {
        self.0.entries.lock().unwrap().len()
    }

    fn shrink(&self, chunks: usize) -> usize {
        let mut entries = self.0.entries.lock().unwrap();
        let n = chunks.min(entries.len());
        entries.drain(..n); // Freed here, on the notifier thread: uncharged from cache.
        self.0.evicted.fetch_add(n as u64, Relaxed);
        n
    }
}

/// cache: serves parsed documents. A miss reads the document's text (32 KiB, and 1 MiB for one
/// miss in 16) and parses it into a 64 KiB entry, which stays cached until the shrinker evicts
/// it. Both are allocated inside fallible(..): a charge at max waits for direct reclaim, and is
/// refused only if the shrinker could not make room.
fn run_cache(docs: &DocCache, refused: &AtomicU64) {
    let mut seed = 4;
    while RUNNING.load(Relaxed) {
        let id = rand(&mut seed) % 256;
        if !docs.contains(id) {
            let big = rand(&mut seed) % 16 == 0;
            let len = if big { MIB } else { 32 * KIB };
            let evicted = docs.evicted.load(Relaxed);
            let text = try_buffer(len, refused);
            if big {
                docs.big.fetch_add(1, Relaxed);
                if docs.evicted.load(Relaxed) != evicted {
                    docs.waited.fetch_add(1, Relaxed); // Direct reclaim evicted while we waited.
                }
            }
            if let Some(mut text) = text {
                text.resize(len, b'a' + (id % 26) as u8);
                if let Some(mut entry) = try_buffer(ENTRY, refused) {
                    entry.extend(text.iter().cycle().take(ENTRY)); // The parse.
                    docs.insert(id, entry, refused);
                }
            }
        }
        sleep(Duration::from_millis(1));
    }
}

/// Prints one stat() line per group, in columns that fit a 100-column terminal.
fn print_table(title: &str, rows: &[(Group, Option<Arc<AtomicU64>>)]) {
    println!("{title}\n{:>91}", "----- events -----");
    let header = "usage peak kmem overhead max allocs frees high max fail refused";
    print_row("group", header.split(' '));
    for (group, refused) in rows {
        let s = group.stat();
        let e = s.events;
        let sizes = [s.usage, s.peak, s.kmem, s.overhead].map(bytes);
        let max = s.max.map_or("-".into(), bytes);
        let counts = [s.allocs, s.frees, e.high, e.max, e.fail].map(count);
        let refused = refused
            .as_ref()
            .map_or("-".into(), |r| count(r.load(Relaxed)));
        let cells = [&sizes[..], &[max], &counts, &[refused]].concat();
        print_row(&group.name().replace("tenants/", "  "), cells);
    }
    println!();
}

fn print_row(name: &str, cells: impl IntoIterator<Item = impl Display>) {
    let mut line = format!("{name:<14}");
    for (cell, width) in cells.into_iter().zip([9, 9, 9, 9, 9, 7, 7, 6, 6, 6, 8]) {
        write!(line, "{cell:>width$}").unwrap();
    }
    println!("{line}");
}

/// 1023 B, 640 KiB, 12.3 MiB: at most 8 characters up to 1000 MiB.
fn bytes(n: usize) -> String {
    match n {
        0..KIB => format!("{n} B"),
        KIB..MIB => format!("{} KiB", n / KIB),
        _ => format!("{:.1} MiB", n as f64 / MIB as f64),
    }
}

/// 9999, 12k, 999k, 1.2M: at most 5 characters.
fn count(n: u64) -> String {
    match n {
        0..10_000 => n.to_string(),
        10_000..1_000_000 => format!("{}k", n / 1000),
        _ => format!("{:.1}M", n as f64 / 1e6),
    }
}

/// xorshift64: random enough for made-up workloads, with std only.
fn rand(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}
