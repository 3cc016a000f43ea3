//! The arena design against the tag design and the raw inner allocator, in one run (needs
//! `--features arena`; without it this benchmark only says so).
//!
//! Part 1, time: the small-size churn of `benches/churn.rs` (same workload, same harness: a
//! ring of `CHURN_SLOTS` live blocks of 8..=512 bytes, each step frees the oldest and allocates
//! a new one), 1 thread, and 2 threads each churning its own group with 1 block in
//! `CHURN_REMOTE` freed by the other thread. Rows: `system` (the raw inner allocator),
//! `mimalloc` (for reference), `tag` (`TagAlloc<System>`) and `arena` (`ArenaAlloc<System>`),
//! interleaved, as ns per alloc+free pair (median and min of `CHURN_RUNS` runs) and ratios to
//! `system`. Target: `arena` <= 1.3x `system` (median). A third scenario, `2r`, frees every
//! block on the other thread (a producer/consumer pair), the arena's slowest case.
//!
//! Part 2, memory (seeds/003's trade-off), for `tag` and `arena`:
//! - 10,000 groups, each holding 4 small blocks (sizes from the churn's distribution);
//! - one group holding 1,000,000 small blocks.
//!
//! Reported: bytes requested, bytes charged (the groups' `usage`, bookkeeping of the groups'
//! records excluded), charged per requested byte, and the memory the design really holds for
//! them: for `tag`, the inner allocator's in-use bytes (glibc `mallinfo2().uordblks`, which
//! counts each chunk's header and rounding but not free memory); for `arena`, the slabs charged
//! plus the memory it mapped for its per-group caches (group heaps and key tables), charged to
//! no one.
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
//! `ARENA_GROUPS=n` (default 10000); `ARENA_OBJECTS=n` (default 1000000).
//!
//! Instructions per alloc+free pair, 1 thread (load-independent; quick mode runs 20,000 steps
//! after filling a 1024-block ring, so Ir per pair = "Collected" / 20000):
//!
//! ```text
//! BIN=$(cargo bench --features arena --bench arena --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p')
//! for a in system tag arena; do
//!   ARENA_QUICK=1 ARENA_PART=time ARENA_SCENARIOS=1 CHURN_ONLY=$a valgrind --tool=callgrind \
//!     --toggle-collect='arena::bench::churn*' --callgrind-out-file=callgrind.arena.$a "$BIN" --bench
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

#[cfg(feature = "arena")]
mod bench {
    use std::alloc::{handle_alloc_error, GlobalAlloc, Layout, System};
    use std::hint::black_box;
    use std::ptr::null_mut;
    use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU16, AtomicUsize, Ordering};
    use std::sync::Barrier;
    use std::time::{Duration, Instant};

    use memgroup::{ArenaAlloc, Group, TagAlloc};
    use mimalloc::MiMalloc;

    #[global_allocator]
    static GLOBAL: System = System;

    static SYSTEM: System = System;
    static MIMALLOC: MiMalloc = MiMalloc;
    static TAG: TagAlloc = TagAlloc::system();
    static ARENA: ArenaAlloc = ArenaAlloc::system();

    // ---- the churn workload (as in benches/churn.rs) --------------------------------------

    /// One step's request, packed: bits 0..=9 size (8..=512), bit 10 align 16 (else 8), bit
    /// 11 "freed by the other thread" (2-thread scenarios only).
    type Req = u16;
    const ALIGN16: Req = 1 << 10;
    const REMOTE: Req = 1 << 11;
    const TABLE_LEN: usize = 1 << 13;
    type Table = [Req; TABLE_LEN];

    fn xorshift(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// Half the blocks 8..=32 bytes, a quarter 33..=128, an eighth 129..=256, an eighth
    /// 257..=512 (mean about 100 bytes); a quarter aligned to 16.
    fn make_table(seed: u64, remote_one_in: u64) -> Box<Table> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut t = Box::new([0; TABLE_LEN]);
        for r in t.iter_mut() {
            let v = xorshift(&mut x);
            let u = v >> 8;
            let size = match v & 7 {
                0..=3 => 8 + u % 25,
                4 | 5 => 33 + u % 96,
                6 => 129 + u % 128,
                _ => 257 + u % 256,
            };
            let mut req = size as Req;
            if (v >> 40) & 3 == 0 {
                req |= ALIGN16;
            }
            if remote_one_in != 0 && (v >> 44) % remote_one_in == 0 {
                req |= REMOTE;
            }
            *r = req;
        }
        t
    }

    #[inline(always)]
    fn layout(req: Req) -> Layout {
        let size = (req & 0x3ff) as usize;
        let align = 8usize << ((req & ALIGN16) >> 10);
        // SAFETY: align is 8 or 16 and size <= 512.
        unsafe { Layout::from_size_align_unchecked(size, align) }
    }

    #[derive(Clone, Copy)]
    struct Slot {
        ptr: *mut u8,
        req: Req,
    }

    const EMPTY: Slot = Slot {
        ptr: null_mut(),
        req: 0,
    };

    #[inline(always)]
    fn alloc_one<A: GlobalAlloc>(a: &A, req: Req, step: usize) -> Slot {
        let layout = layout(req);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { a.alloc(layout) };
        if ptr.is_null() {
            handle_alloc_error(layout);
        }
        // SAFETY: `ptr` is valid for at least 8 bytes, aligned to at least 8.
        unsafe { ptr.cast::<u64>().write(step as u64) };
        Slot { ptr, req }
    }

    #[inline(always)]
    fn free_one<A: GlobalAlloc>(a: &A, s: Slot) {
        // SAFETY: `s.ptr` was returned by `a.alloc(layout(s.req))` and is freed once.
        unsafe { a.dealloc(s.ptr, layout(s.req)) }
    }

    #[inline(never)]
    fn fill<A: GlobalAlloc>(a: &A, ring: &mut [Slot], table: &Table) {
        for (step, s) in ring.iter_mut().enumerate() {
            *s = alloc_one(a, table[step % TABLE_LEN], step);
        }
    }

    #[inline(never)]
    fn drain<A: GlobalAlloc>(a: &A, ring: &mut [Slot]) {
        for s in ring.iter_mut() {
            free_one(a, *s);
            *s = EMPTY;
        }
    }

    /// The measured loop (see benches/churn.rs).
    #[inline(never)]
    fn churn<A: GlobalAlloc, const CROSS: bool>(
        a: &A,
        ring: &mut [Slot],
        table: &Table,
        ops: usize,
        mut link: Option<&mut Link<'_>>,
    ) {
        let n = ring.len();
        assert!(n.is_power_of_two());
        let mask = n - 1;
        for step in n..n + ops {
            let slot = &mut ring[step & mask];
            let old = *slot;
            match link.as_deref_mut() {
                Some(l) if CROSS => {
                    if old.req & REMOTE == 0 {
                        free_one(a, old);
                    } else {
                        l.send(old, |s| free_one(a, s));
                    }
                    if step % 16 == 0 {
                        l.receive(|s| free_one(a, s));
                    }
                }
                _ => free_one(a, old),
            }
            *slot = alloc_one(a, table[step % TABLE_LEN], step);
        }
        black_box(ring);
    }

    #[repr(align(128))]
    struct Padded<T>(T);

    /// A bounded single-producer single-consumer queue of blocks (see benches/churn.rs).
    struct Spsc {
        slots: Box<[(AtomicPtr<u8>, AtomicU16)]>,
        head: Padded<AtomicUsize>,
        tail: Padded<AtomicUsize>,
    }

    const SPSC_CAP: usize = 1 << 16;

    impl Spsc {
        fn new() -> Self {
            Spsc {
                slots: (0..SPSC_CAP)
                    .map(|_| (AtomicPtr::new(null_mut()), AtomicU16::new(0)))
                    .collect(),
                head: Padded(AtomicUsize::new(0)),
                tail: Padded(AtomicUsize::new(0)),
            }
        }
    }

    struct Link<'q> {
        out: &'q Spsc,
        tail: usize,
        head_seen: usize,
        inbox: &'q Spsc,
        head: usize,
        sent: usize,
        waits: usize,
    }

    impl<'q> Link<'q> {
        fn new(out: &'q Spsc, inbox: &'q Spsc) -> Self {
            Link {
                out,
                tail: out.tail.0.load(Ordering::Relaxed),
                head_seen: out.head.0.load(Ordering::Relaxed),
                inbox,
                head: inbox.head.0.load(Ordering::Relaxed),
                sent: 0,
                waits: 0,
            }
        }

        #[inline(always)]
        fn send(&mut self, s: Slot, mut free: impl FnMut(Slot)) {
            while self.tail.wrapping_sub(self.head_seen) == SPSC_CAP {
                self.head_seen = self.out.head.0.load(Ordering::Acquire);
                if self.tail.wrapping_sub(self.head_seen) == SPSC_CAP {
                    self.waits += 1;
                    self.receive(&mut free);
                    std::thread::yield_now();
                }
            }
            let cell = &self.out.slots[self.tail % SPSC_CAP];
            cell.0.store(s.ptr, Ordering::Relaxed);
            cell.1.store(s.req, Ordering::Relaxed);
            self.tail = self.tail.wrapping_add(1);
            self.out.tail.0.store(self.tail, Ordering::Release);
            self.sent += 1;
        }

        #[inline(always)]
        fn receive(&mut self, mut free: impl FnMut(Slot)) {
            let tail = self.inbox.tail.0.load(Ordering::Acquire);
            if tail == self.head {
                return;
            }
            while self.head != tail {
                let cell = &self.inbox.slots[self.head % SPSC_CAP];
                free(Slot {
                    ptr: cell.0.load(Ordering::Relaxed),
                    req: cell.1.load(Ordering::Relaxed),
                });
                self.head = self.head.wrapping_add(1);
            }
            self.inbox.head.0.store(self.head, Ordering::Release);
        }
    }

    struct Params {
        ops: usize,
        slots: usize,
        /// Per scenario: the tables of thread 0 and 1 (the 1-thread scenario uses the first).
        tables: [Box<Table>; 2],
        groups: [Group; 3],
    }

    #[derive(Default, Clone, Copy)]
    struct RunOut {
        elapsed: Duration,
        sent: usize,
        waits: usize,
    }

    fn run_one<A: GlobalAlloc + Sync>(a: &A, p: &Params) -> RunOut {
        let _scope = p.groups[0].enter();
        let mut ring = vec![EMPTY; p.slots];
        fill(a, &mut ring, &p.tables[0]);
        let t0 = Instant::now();
        churn::<A, false>(a, &mut ring, &p.tables[0], p.ops, None);
        let elapsed = t0.elapsed();
        drain(a, &mut ring);
        RunOut {
            elapsed,
            ..RunOut::default()
        }
    }

    fn run_two<A: GlobalAlloc + Sync>(a: &A, p: &Params) -> RunOut {
        let queues = [Spsc::new(), Spsc::new()];
        let done = [AtomicBool::new(false), AtomicBool::new(false)];
        let start = Barrier::new(3);
        let end = Barrier::new(3);
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..2)
                .map(|i| {
                    let (queues, done, start, end) = (&queues, &done, &start, &end);
                    s.spawn(move || {
                        let _scope = p.groups[1 + i].enter();
                        let table = &p.tables[i];
                        let mut ring = vec![EMPTY; p.slots];
                        let mut link = Link::new(&queues[i], &queues[1 - i]);
                        fill(a, &mut ring, table);
                        start.wait();
                        let t0 = Instant::now();
                        churn::<A, true>(a, &mut ring, table, p.ops, Some(&mut link));
                        done[i].store(true, Ordering::Release);
                        loop {
                            let peer_done = done[1 - i].load(Ordering::Acquire);
                            link.receive(|s| free_one(a, s));
                            if peer_done {
                                break;
                            }
                            std::thread::yield_now();
                        }
                        let t1 = Instant::now();
                        end.wait();
                        drain(a, &mut ring);
                        (t0, t1, link.sent, link.waits)
                    })
                })
                .collect();
            start.wait();
            end.wait();
            let mut out = RunOut::default();
            let (mut first, mut last) = (None::<Instant>, None::<Instant>);
            for w in workers {
                let (t0, t1, sent, waits) = w.join().expect("churn thread panicked");
                first = Some(first.map_or(t0, |f| f.min(t0)));
                last = Some(last.map_or(t1, |l| l.max(t1)));
                out.sent += sent;
                out.waits += waits;
            }
            if let (Some(first), Some(last)) = (first, last) {
                out.elapsed = last - first;
            }
            out
        })
    }

    // ---- rows ---------------------------------------------------------------------------

    struct Row {
        key: &'static str,
        /// Charges memgroup groups (checked after every run).
        charges: bool,
        run: fn(&Params, usize) -> RunOut,
    }

    fn run_with<A: GlobalAlloc + Sync>(a: &A, p: &Params, threads: usize) -> RunOut {
        if threads == 1 {
            run_one(a, p)
        } else {
            run_two(a, p)
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

    fn counts(p: &Params, threads: usize) -> Vec<(u64, u64)> {
        groups_of(p, threads)
            .iter()
            .map(|g| {
                g.flush();
                let s = g.stat();
                (s.allocs, s.frees)
            })
            .collect()
    }

    /// Fails loudly if an allocator lost or invented a charge, so the benchmark never measures
    /// a broken allocator: after each run every group is back to 0 with the expected counts.
    fn check(row: &Row, p: &Params, threads: usize, before: &[(u64, u64)]) {
        let expected = if row.charges {
            (p.slots + p.ops) as u64
        } else {
            0
        };
        for (g, &(allocs0, frees0)) in groups_of(p, threads).iter().zip(before) {
            g.flush();
            let s = g.stat();
            assert_eq!(
                (s.usage, s.overhead),
                (0, 0),
                "{}: group {} holds memory after all its blocks were freed",
                row.key,
                g.name()
            );
            assert_eq!(
                (s.allocs - allocs0, s.frees - frees0),
                (expected, expected),
                "{}: group {} (allocs, frees)",
                row.key,
                g.name()
            );
        }
    }

    fn run_checked(row: &Row, p: &Params, threads: usize) -> RunOut {
        let before = counts(p, threads);
        let out = (row.run)(p, threads);
        check(row, p, threads, &before);
        out
    }

    // ---- configuration and report -------------------------------------------------------

    fn env_usize(name: &str) -> Option<usize> {
        let v = std::env::var(name).ok()?;
        Some(
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
        )
    }

    fn median(v: &[f64]) -> f64 {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        }
    }

    fn min(v: &[f64]) -> f64 {
        v.iter().copied().fold(f64::INFINITY, f64::min)
    }

    fn load_average() -> String {
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next().map(str::to_string))
            .unwrap_or_else(|| "?".to_string())
    }

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

    /// `groups` groups under one parent, `per` blocks each, allocated with `a`.
    fn many_groups<A: GlobalAlloc>(a: &A, design: &str, groups: usize, per: usize) -> Mem {
        let table = make_table(3, 0);
        let parent = Group::new(&format!("mem-{design}-groups")).expect("group");
        let kids: Vec<Group> = (0..groups)
            .map(|i| parent.child(&format!("g{i}")).expect("child"))
            .collect();
        parent.flush();
        let base = parent.stat();
        let (malloc0, arena0) = (malloc_in_use(), memgroup::arena_footprint());
        let mut held = Vec::with_capacity(groups * per);
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
            let meta = arena1.metadata - arena0.metadata;
            (
                charged + meta,
                format!(
                    "slabs {charged} + caches {meta} ({} group heaps)",
                    arena1.group_heaps - arena0.group_heaps
                ),
            )
        };
        for s in held {
            free_one(a, s);
        }
        for g in kids {
            g.flush();
            assert_eq!(
                g.stat().usage,
                0,
                "{design}: a group holds memory after the frees"
            );
            g.remove().expect("remove");
        }
        parent.flush();
        assert_eq!(parent.stat().usage, 0);
        parent.remove().expect("remove");
        Mem {
            requested,
            charged,
            real,
            detail,
        }
    }

    /// One group holding `n` blocks allocated with `a`; also times the allocations.
    fn one_group<A: GlobalAlloc>(a: &A, design: &str, n: usize) -> (Mem, f64, f64) {
        let table = make_table(4, 0);
        let g = Group::new(&format!("mem-{design}-one")).expect("group");
        let (malloc0, arena0) = (malloc_in_use(), memgroup::arena_footprint());
        let mut held = Vec::with_capacity(n);
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
            let meta = arena1.metadata - arena0.metadata;
            (charged + meta, format!("slabs {charged} + caches {meta}"))
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

    fn memory_part(quick: bool) {
        let groups = env_usize("ARENA_GROUPS").unwrap_or(if quick { 1000 } else { 10_000 });
        let objects = env_usize("ARENA_OBJECTS").unwrap_or(if quick { 100_000 } else { 1_000_000 });
        let per = 4;
        println!("\n## memgroup arena: memory (seeds/003)\n");
        println!(
            "Block sizes from the churn's distribution (8..=512 bytes, mean about 100). charged: \
             the groups' usage (their records' bookkeeping excluded). real: what the design \
             holds for the blocks (tag: glibc's in-use bytes; arena: slabs charged + per-group \
             caches, uncharged).\n"
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
        Ok(())
    }
}
