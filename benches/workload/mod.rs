//! The alloc+free churn workload shared by `benches/churn.rs` and `benches/arena.rs`: the
//! request tables, the generic measured loop [`churn`], the SPSC hand-off between the two
//! threads, the 1- and 2-thread runs, and the small configuration and report helpers.
//!
//! Included by both benches with `#[path = "workload/mod.rs"] mod workload;` (this directory
//! is not a bench target). The measured loop's symbol is then `<bench>::workload::churn`,
//! which is what the callgrind `--toggle-collect` commands in both benches' headers match.

use std::alloc::{handle_alloc_error, GlobalAlloc, Layout};
use std::hint::black_box;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU16, AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use memgroup::Group;

pub use crate::common::{env_usize, load_average, median, min};

// ---- the workload ------------------------------------------------------------------------

/// One step's request, packed: bits 0..=9 size (8..=512), bit 10 align 16 (else 8), bit 11
/// "freed by the other thread" (2-thread scenario only).
pub type Req = u16;
pub const ALIGN16: Req = 1 << 10;
pub const REMOTE: Req = 1 << 11;
pub const TABLE_LEN: usize = 1 << 13; // 16 KiB of u16: stays in L1/L2, costs one load per step
pub type Table = [Req; TABLE_LEN];

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// The request stream of one thread: half the blocks 8..=32 bytes, a quarter 33..=128, an
/// eighth 129..=256, an eighth 257..=512 (mean about 100 bytes); a quarter aligned to 16.
pub fn make_table(seed: u64, remote_one_in: u64) -> Box<Table> {
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
    debug_assert!((8..=512).contains(&size));
    // SAFETY: align is 8 or 16 (a power of two) and size <= 512 cannot overflow isize.
    unsafe { Layout::from_size_align_unchecked(size, align) }
}

#[derive(Clone, Copy)]
pub struct Slot {
    pub ptr: *mut u8,
    pub req: Req,
}

pub const EMPTY: Slot = Slot {
    ptr: null_mut(),
    req: 0,
};

#[inline(always)]
pub fn alloc_one<A: GlobalAlloc>(a: &A, req: Req, step: usize) -> Slot {
    let layout = layout(req);
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { a.alloc(layout) };
    if ptr.is_null() {
        handle_alloc_error(layout);
    }
    // Touch the block as a program would; size >= 8 and align >= 8.
    // SAFETY: `ptr` is valid for `layout.size() >= 8` bytes and aligned to at least 8.
    unsafe { ptr.cast::<u64>().write(step as u64) };
    Slot { ptr, req }
}

#[inline(always)]
pub fn free_one<A: GlobalAlloc>(a: &A, s: Slot) {
    // SAFETY: `s.ptr` was returned by `a.alloc(layout(s.req))` and is freed exactly once.
    unsafe { a.dealloc(s.ptr, layout(s.req)) }
}

/// Allocates the ring's first blocks (steps `0..ring.len()`).
#[inline(never)]
pub fn fill<A: GlobalAlloc>(a: &A, ring: &mut [Slot], table: &Table) {
    for (step, s) in ring.iter_mut().enumerate() {
        *s = alloc_one(a, table[step % TABLE_LEN], step);
    }
}

/// Frees every block left in the ring.
#[inline(never)]
pub fn drain<A: GlobalAlloc>(a: &A, ring: &mut [Slot]) {
    for s in ring.iter_mut() {
        free_one(a, *s);
        *s = EMPTY;
    }
}

/// The measured loop: `ops` steps, each freeing the oldest block of the ring and allocating a
/// new one. With `CROSS`, blocks marked `REMOTE` go to the other thread instead of being freed
/// here, and every 16 steps the blocks the other thread sent are freed here.
/// Never inlined, so callgrind's `--toggle-collect='churn::workload::churn*'` (and
/// `'arena::workload::churn*'`) counts exactly this loop.
#[inline(never)]
pub fn churn<A: GlobalAlloc, const CROSS: bool>(
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

// ---- the cross-thread hand-off -----------------------------------------------------------

#[repr(align(128))]
struct Padded<T>(T);

/// A bounded single-producer single-consumer queue of blocks, allocated (through the global
/// `System`) before timing. Slot contents are relaxed atomics published by the Release store
/// of `tail` and read after the Acquire load of it.
pub struct Spsc {
    slots: Box<[(AtomicPtr<u8>, AtomicU16)]>,
    head: Padded<AtomicUsize>,
    tail: Padded<AtomicUsize>,
}

const SPSC_CAP: usize = 1 << 16;

impl Spsc {
    pub fn new() -> Self {
        Spsc {
            slots: (0..SPSC_CAP)
                .map(|_| (AtomicPtr::new(null_mut()), AtomicU16::new(0)))
                .collect(),
            head: Padded(AtomicUsize::new(0)),
            tail: Padded(AtomicUsize::new(0)),
        }
    }
}

/// One thread's ends: the queue to the peer and the queue from it.
pub struct Link<'q> {
    out: &'q Spsc,
    tail: usize,
    head_seen: usize,
    inbox: &'q Spsc,
    head: usize,
    pub sent: usize,
    pub waits: usize,
}

impl<'q> Link<'q> {
    pub fn new(out: &'q Spsc, inbox: &'q Spsc) -> Self {
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

    /// Queues `s` for the peer. When the queue is full (the peer was descheduled), waits for
    /// room while freeing what the peer sent (so two full queues cannot deadlock): every row
    /// then frees exactly the same blocks remotely.
    #[inline(always)]
    pub fn send(&mut self, s: Slot, mut free: impl FnMut(Slot)) {
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

    /// Hands every block the peer has sent so far to `free`.
    #[inline(always)]
    pub fn receive(&mut self, mut free: impl FnMut(Slot)) {
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

// ---- runs --------------------------------------------------------------------------------

pub struct Params<const G: usize> {
    pub ops: usize,
    pub slots: usize,
    /// The tables of thread 0 and 1 (the 1-thread run uses the first).
    pub tables: [Box<Table>; 2],
    /// The groups the threads charge: a run with `first` charges `groups[first]` (1 thread)
    /// or `groups[first + 1]` and `groups[first + 2]` (2 threads); see each bench's layout.
    pub groups: [Group; G],
}

#[derive(Default, Clone, Copy)]
pub struct RunOut {
    pub elapsed: Duration,
    pub sent: usize,
    pub waits: usize,
}

pub fn run_one<A: GlobalAlloc + Sync, const G: usize>(
    a: &A,
    p: &Params<G>,
    first: usize,
) -> RunOut {
    let _scope = p.groups[first].enter();
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

pub fn run_two<A: GlobalAlloc + Sync, const G: usize>(
    a: &A,
    p: &Params<G>,
    first: usize,
) -> RunOut {
    let queues = [Spsc::new(), Spsc::new()]; // queues[i]: from thread i to thread 1 - i
    let done = [AtomicBool::new(false), AtomicBool::new(false)];
    let start = Barrier::new(3);
    let end = Barrier::new(3);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|i| {
                let (queues, done, start, end) = (&queues, &done, &start, &end);
                s.spawn(move || {
                    let _scope = p.groups[first + 1 + i].enter();
                    let table = &p.tables[i];
                    let mut ring = vec![EMPTY; p.slots];
                    let mut link = Link::new(&queues[i], &queues[1 - i]);
                    fill(a, &mut ring, table);
                    start.wait();
                    let t0 = Instant::now();
                    churn::<A, true>(a, &mut ring, table, p.ops, Some(&mut link));
                    // Free what the peer still sends until it is done too; part of the timing.
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
        // Timed in the workers: from the first one leaving the start barrier to the last one
        // done, so barrier wake-up latency of this thread is not counted.
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

// ---- checks ------------------------------------------------------------------------------

/// (allocs, frees) of each group, exact (after `flush`).
pub fn counts(groups: &[Group]) -> Vec<(u64, u64)> {
    groups
        .iter()
        .map(|g| {
            g.flush();
            let s = g.stat();
            (s.allocs, s.frees)
        })
        .collect()
}

/// Fails loudly if the allocator of row `key` lost or invented a charge, so a benchmark never
/// measures a broken allocator: after a run every group holds nothing (usage and overhead 0)
/// and has `expected` more allocations and frees than `before` (from `counts`).
pub fn check_groups(key: &str, groups: &[Group], before: &[(u64, u64)], expected: u64) {
    for (g, &(allocs0, frees0)) in groups.iter().zip(before) {
        g.flush();
        let s = g.stat();
        assert_eq!(
            (s.usage, s.overhead),
            (0, 0),
            "{key}: group {} holds memory after all its blocks were freed",
            g.name()
        );
        assert_eq!(
            (s.allocs - allocs0, s.frees - frees0),
            (expected, expected),
            "{key}: group {} charged (allocs, frees) != expected",
            g.name()
        );
    }
}

// ---- configuration and report ------------------------------------------------------------
