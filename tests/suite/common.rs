// A test whose body runs alone in a fresh child process of this test binary, with the given
// environment (variables the allocator reads at its first allocation):
//
//     child_test! {
//         /// What it shows.
//         fn outer_name => inner_name("MEMGROUP_BATCH" = "0") { body }
//     }
//
// `outer_name` is the test the harness runs: it re-executes the binary to run `inner_name`
// alone (`#[ignore]`d, so it never runs in the parent), and asserts that it ran and passed.
#[allow(unused_macros)]
macro_rules! child_test {
    ($(#[$doc:meta])* fn $outer:ident => $inner:ident($($var:literal = $val:literal),* $(,)?) $body:block) => {
        $(#[$doc])*
        #[test]
        fn $outer() {
            common::run_in_child_process(stringify!($inner), &[$(($var, $val)),*]);
        }

        #[test]
        #[ignore = concat!("run in a child process by ", stringify!($outer))]
        fn $inner() {
            if common::in_child_process() $body
        }
    };
}

// Helpers shared by the test bodies. Included once per test binary by the body (`include!`), so
// it must not use inner attributes; every item is `allow(dead_code)` because no binary uses all.
#[allow(dead_code)]
mod common {
    use std::alloc::Layout;
    use std::ptr::NonNull;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use memgroup::{Group, Stat};

    include!("resident.rs");

    static NAME_SEQ: AtomicUsize = AtomicUsize::new(0);

    /// A name no other test of this process uses: `prefix-N`.
    pub fn unique_name(prefix: &str) -> String {
        format!("{prefix}-{}", NAME_SEQ.fetch_add(1, Ordering::Relaxed))
    }

    /// A fresh child of the root with a name unique in this process.
    pub fn fresh(prefix: &str) -> Group {
        Group::new(&unique_name(prefix)).expect("creating a fresh group")
    }

    /// A fresh child of `parent` with a name unique in this process.
    pub fn fresh_child(parent: &Group, prefix: &str) -> Group {
        parent
            .child(&unique_name(prefix))
            .expect("creating a fresh child group")
    }

    /// The exact figures of `g`: stocks drained first.
    pub fn exact(g: &Group) -> Stat {
        g.flush();
        g.stat()
    }

    /// Whether a thread's freed bytes go back to the group when the thread exits (its pocket
    /// takes them and is emptied into the counters at exit) rather than staying in a CPU
    /// stock until a flush (no pocket). The probe group's max is half the batch, so no stock
    /// is refilled for it and no other slack can hide the difference. Needs a batch (stocks
    /// on), and no other thread draining meanwhile.
    pub fn exit_empties_a_pocket() -> bool {
        let g = fresh("pk-probe");
        g.set_max(Some(memgroup::stock_batch() / 2));
        let g2 = g.clone();
        std::thread::spawn(move || g2.run(|| drop(Block::new(8, 1))))
            .join()
            .expect("probe thread");
        let left = g.stat().usage;
        let s = exact(&g);
        assert_eq!((s.usage, s.allocs, s.frees), (0, 1, 1), "the probe group: {s:?}");
        g.remove().expect("removing the probe group");
        left == 0
    }

    /// Puts the calling thread on the first CPU it may run on, alone; threads it starts later
    /// inherit that. Returns the CPU.
    pub fn pin_to_one_cpu() -> usize {
        // SAFETY: a zeroed cpu_set_t is an empty set; the calls read and write only `set`.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            assert_eq!(libc::sched_getaffinity(0, size, &mut set), 0, "sched_getaffinity");
            let cpu = (0..libc::CPU_SETSIZE as usize)
                .find(|&c| libc::CPU_ISSET(c, &set))
                .expect("some CPU is allowed");
            libc::CPU_ZERO(&mut set);
            libc::CPU_SET(cpu, &mut set);
            assert_eq!(libc::sched_setaffinity(0, size, &set), 0, "sched_setaffinity");
            cpu
        }
    }

    /// Gives the calling thread the real-time policy `SCHED_FIFO` at `priority`: it then runs until
    /// it blocks or a thread of higher priority preempts it, and `sched_yield` hands its CPU only
    /// to threads of its own priority or higher. False where that is not allowed (no
    /// `CAP_SYS_NICE`).
    pub fn real_time(priority: i32) -> bool {
        let param = libc::sched_param {
            sched_priority: priority,
        };
        // SAFETY: `param` is a valid sched_param for the call's duration.
        unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) == 0 }
    }

    /// Live blocks of a group according to its counters.
    pub fn live(s: &Stat) -> u64 {
        s.allocs - s.frees
    }

    /// A raw heap block of an exact layout, allocated through the global allocator (so charged to
    /// the current group) and freed on drop (uncharging its owner, whoever drops it).
    pub struct Block {
        ptr: NonNull<u8>,
        layout: Layout,
    }

    // SAFETY: a Block owns its allocation exclusively, like a Box<[u8]>.
    unsafe impl Send for Block {}

    impl Block {
        pub fn layout(size: usize, align: usize) -> Layout {
            Layout::from_size_align(size, align).expect("valid layout")
        }

        /// Allocates `size` bytes at `align`; panics on null (the test expected success).
        pub fn new(size: usize, align: usize) -> Block {
            Self::try_new(size, align)
                .unwrap_or_else(|| panic!("allocation of {size} bytes at align {align} failed"))
        }

        /// Allocates `size` bytes at `align`; None when the allocator returns null.
        pub fn try_new(size: usize, align: usize) -> Option<Block> {
            let layout = Self::layout(size, align);
            assert!(layout.size() > 0, "Block does not do zero-size layouts");
            // SAFETY: the layout has a non-zero size.
            let ptr = unsafe { std::alloc::alloc(layout) };
            // The optimizer may drop an allocation whose memory is never used (GlobalAlloc's
            // documentation): the tests count allocations, so the pointer must escape.
            let ptr = std::hint::black_box(ptr);
            NonNull::new(ptr).map(|ptr| Block { ptr, layout })
        }

        /// Like `new`, filled with `byte` (so the memory is really touched).
        pub fn filled(size: usize, byte: u8) -> Block {
            let mut b = Block::new(size, 1);
            b.bytes_mut().fill(byte);
            b
        }

        pub fn size(&self) -> usize {
            self.layout.size()
        }

        pub fn ptr(&self) -> *mut u8 {
            self.ptr.as_ptr()
        }

        pub fn bytes(&self) -> &[u8] {
            // SAFETY: the block is live and `size` bytes long; bytes were written before reading
            // in every use here (or come from alloc_zeroed).
            unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
        }

        pub fn bytes_mut(&mut self) -> &mut [u8] {
            // SAFETY: as in `bytes`, and we hold the block exclusively.
            unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
        }

        /// Reallocates to `new_size` (same alignment). On null the block is unchanged and
        /// Err(self) is returned.
        pub fn realloc(self, new_size: usize) -> Result<Block, Block> {
            let new_layout =
                Layout::from_size_align(new_size, self.layout.align()).expect("valid new layout");
            // SAFETY: ptr was allocated with self.layout by the global allocator; new_size is
            // non-zero and, rounded to the alignment, does not overflow isize (checked above).
            let p = unsafe { std::alloc::realloc(self.ptr.as_ptr(), self.layout, new_size) };
            match NonNull::new(p) {
                Some(ptr) => {
                    std::mem::forget(self);
                    Ok(Block {
                        ptr,
                        layout: new_layout,
                    })
                }
                None => Err(self),
            }
        }
    }

    impl Drop for Block {
        fn drop(&mut self) {
            // SAFETY: allocated by the global allocator with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
        }
    }

    /// What one block of `size` bytes at `align` costs in `usage`, measured in a fresh group.
    pub fn block_cost(size: usize, align: usize) -> usize {
        let g = fresh("probe");
        let b = g.run(|| Block::new(size, align));
        let with = exact(&g);
        drop(b);
        let without = exact(&g);
        assert_eq!(
            without.usage, 0,
            "a probe group holding nothing must have usage 0"
        );
        assert_eq!(live(&with), 1, "the probe allocated exactly one block");
        assert_eq!(
            with.usage,
            size + with.overhead,
            "usage == requested + overhead for one block of {size} at align {align}"
        );
        g.remove().expect("removing the probe group");
        with.usage
    }

    /// The request size (align 1) whose block costs exactly `cost` bytes of usage; checked.
    pub fn size_for_cost(cost: usize) -> usize {
        let overhead = block_cost(cost, 1) - cost;
        let size = cost - overhead;
        assert_eq!(
            block_cost(size, 1),
            cost,
            "per-block overhead is not constant near {cost}"
        );
        size
    }

    /// How the installed design charges blocks of one size (align 1) in a group holding nothing
    /// else: in units of `unit` bytes, each holding up to `per_unit` blocks. The tag design
    /// charges each block on its own (`unit` = size + 8, `per_unit` = 1); the arena design
    /// charges a slab at a time (`unit` = the slab, `per_unit` = its objects). Measured, so the
    /// suites' exact assertions hold for either design.
    #[derive(Clone, Copy, Debug)]
    pub struct Cost {
        pub unit: usize,
        pub per_unit: usize,
    }

    impl Cost {
        /// Measures blocks of `size` in a probe group: the first costs one unit, and blocks
        /// come free until the next one costs a second unit.
        pub fn of_size(size: usize) -> Cost {
            let g = fresh("cost");
            let mut held = vec![g.run(|| Block::new(size, 1))];
            let unit = exact(&g).usage;
            assert!(unit > size, "one block of {size} costs {unit}");
            loop {
                held.push(g.run(|| Block::new(size, 1)));
                let usage = exact(&g).usage;
                if usage != unit {
                    assert_eq!(
                        usage,
                        2 * unit,
                        "a second unit for {size} costs the first's"
                    );
                    break;
                }
                assert!(held.len() < 1 << 16, "no second unit for {size}");
            }
            let per_unit = held.len() - 1;
            drop(held);
            assert_eq!(
                exact(&g).usage,
                0,
                "a probe group holding nothing has usage 0"
            );
            g.remove().expect("removing the probe group");
            Cost { unit, per_unit }
        }

        /// What `n` blocks cost, allocated one after another in a group holding nothing else.
        pub fn of(&self, n: usize) -> usize {
            n.div_ceil(self.per_unit) * self.unit
        }

        /// How many blocks fit in `bytes` that way.
        pub fn fit(&self, bytes: usize) -> usize {
            bytes / self.unit * self.per_unit
        }
    }

    /// How many more blocks of `size` (align 1) `g` takes without charging anything: none in
    /// the tag design, the free objects of its slabs of that size in the arena design. Measured
    /// and given back.
    pub fn room(g: &Group, size: usize) -> usize {
        let before = exact(g).usage;
        let mut probe = Vec::new();
        loop {
            let b = g.run(|| Block::new(size, 1));
            if exact(g).usage != before {
                drop(b);
                break;
            }
            probe.push(b);
        }
        let n = probe.len();
        drop(probe);
        assert_eq!(
            exact(g).usage,
            before,
            "the room probe leaves the group as it was"
        );
        n
    }

    /// True inside a child process started by `run_in_child_process`.
    pub fn in_child_process() -> bool {
        std::env::var_os("MEMGROUP_TEST_CHILD").is_some()
    }

    /// Re-executes this test binary to run the `#[ignore]`d test `test` alone, in a fresh process
    /// with `env` set (variables the allocator reads at its first allocation), and asserts that it
    /// ran and passed.
    pub fn run_in_child_process(test: &str, env: &[(&str, &str)]) {
        let exe = std::env::current_exe().expect("current_exe");
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                test,
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("MEMGROUP_TEST_CHILD", "1")
            .envs(env.iter().copied())
            .output()
            .expect("spawning the test binary");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "child run of {test} with {env:?} failed: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            out.status
        );
        assert!(
            stdout.contains("1 passed"),
            "child run of {test} did not run exactly one test\n--- stdout\n{stdout}"
        );
    }

    /// A small deterministic PRNG (xorshift64*), so failing runs can be replayed from the seed.
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        pub fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        /// Uniform in lo..=hi.
        pub fn range(&mut self, lo: usize, hi: usize) -> usize {
            lo + (self.next() % (hi - lo + 1) as u64) as usize
        }

        /// True with probability 1/n.
        pub fn one_in(&mut self, n: u64) -> bool {
            self.next() % n == 0
        }
    }

    /// Waits for the forked child `pid` for at most `limit`; kills it and returns `None` on
    /// timeout, else its wait status.
    pub fn wait_child(pid: libc::pid_t, limit: std::time::Duration) -> Option<libc::c_int> {
        let start = std::time::Instant::now();
        loop {
            let mut status = 0;
            // SAFETY: plain waitpid on our own child.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            assert!(r >= 0, "waitpid failed");
            if r == pid {
                return Some(status);
            }
            if start.elapsed() > limit {
                // SAFETY: killing and reaping our own child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// Two tenants with two leaves each, for the churn tests; `groups` lists all six.
    pub struct Tenants {
        pub tenants: [Group; 2],
        pub leaves: Vec<Group>,
        pub groups: Vec<Group>,
        base: Vec<Stat>,
    }

    impl Tenants {
        pub fn new(prefix: &str) -> Tenants {
            let tenants = [fresh(prefix), fresh(prefix)];
            let leaves: Vec<Group> = tenants
                .iter()
                .flat_map(|t| [fresh_child(t, "x"), fresh_child(t, "y")])
                .collect();
            let groups = tenants.iter().chain(&leaves).cloned().collect();
            let base = tenants.iter().map(exact).collect();
            Tenants {
                tenants,
                leaves,
                groups,
                base,
            }
        }

        /// Once everything they charged is freed: every leaf was used and is exactly back to
        /// zero, each tenant back to its children's bookkeeping; then the leaves are removed and
        /// the tenants are exactly zero. Returns the tenants.
        pub fn check_back_to_zero(self) -> [Group; 2] {
            for leaf in &self.leaves {
                let s = exact(leaf);
                assert!(s.allocs > 0, "{} was used", leaf.name());
                assert_eq!(
                    (s.usage, s.kmem, s.overhead, s.allocs),
                    (0, 0, 0, s.frees),
                    "{} after everything was freed: {s:?}",
                    leaf.name()
                );
            }
            for (t, base) in self.tenants.iter().zip(&self.base) {
                let s = exact(t);
                assert!(s.allocs > base.allocs, "{} was used", t.name());
                assert_eq!(
                    (s.usage, s.kmem, s.overhead, live(&s)),
                    (base.usage, base.kmem, base.overhead, live(base)),
                    "{} back to its children's bookkeeping: {s:?}",
                    t.name()
                );
            }
            drop(self.groups); // handles keep records alive
            for leaf in self.leaves {
                leaf.remove().expect("remove leaf");
            }
            for t in &self.tenants {
                let s = exact(t);
                assert_eq!(
                    (s.usage, s.kmem, s.overhead, live(&s)),
                    (0, 0, 0, 0),
                    "{}: {s:?}",
                    t.name()
                );
            }
            self.tenants
        }
    }

    /// Runs `threads` threads of `iters` steps each. A thread holds items (at most `max_held`:
    /// past that, random ones are dropped) and has a channel from every thread; `step(rng,
    /// held, senders, receiver)` is one step. At the end each thread drops what it holds and
    /// what is still in flight to it, unscoped.
    pub fn churn_threads<I, F>(threads: usize, iters: usize, max_held: usize, seed: u64, step: F)
    where
        I: Send + 'static,
        F: Fn(&mut Rng, &mut Vec<I>, &[std::sync::mpsc::Sender<I>], &std::sync::mpsc::Receiver<I>)
            + Clone
            + Send
            + 'static,
    {
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..threads).map(|_| std::sync::mpsc::channel::<I>()).unzip();
        let handles: Vec<_> = receivers
            .into_iter()
            .enumerate()
            .map(|(t, rx)| {
                let senders = senders.clone();
                let step = step.clone();
                std::thread::spawn(move || {
                    let mut rng = Rng::new(seed + t as u64);
                    let mut held: Vec<I> = Vec::new();
                    for _ in 0..iters {
                        step(&mut rng, &mut held, &senders, &rx);
                        while held.len() > max_held {
                            held.swap_remove(rng.range(0, held.len() - 1));
                        }
                    }
                    drop(held);
                    drop(senders);
                    for item in rx {
                        drop(item);
                    }
                })
            })
            .collect();
        drop(senders);
        for h in handles {
            h.join().expect("churn thread");
        }
    }

    /// A churn step: hands a random held item to a random thread, half the time inside `g`.
    pub fn send_one<I>(rng: &mut Rng, g: &Group, held: &mut Vec<I>, to: &[std::sync::mpsc::Sender<I>]) {
        if held.is_empty() {
            return;
        }
        let item = held.swap_remove(rng.range(0, held.len() - 1));
        let to = &to[rng.range(0, to.len() - 1)];
        if rng.one_in(2) {
            g.run(|| to.send(item).unwrap());
        } else {
            to.send(item).unwrap();
        }
    }

    /// A churn step: drops a random held item, half the time inside `g`.
    pub fn drop_one<I>(rng: &mut Rng, g: &Group, held: &mut Vec<I>) {
        if held.is_empty() {
            return;
        }
        let item = held.swap_remove(rng.range(0, held.len() - 1));
        if rng.one_in(2) {
            g.run(|| drop(item));
        } else {
            drop(item);
        }
    }
}
