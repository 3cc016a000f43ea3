//! Everything memgroup asks of the platform: the current CPU's number, mapping memory, the
//! environment, fork hooks and last-resort messages. None of it allocates.

use crate::sync::{AtomicU32, Ordering};
use core::cell::Cell;

/// The number of the CPU this thread is running on, or of a CPU-like slot it was given.
///
/// Only a hint: the thread may migrate right after. With glibc's rseq registration this is one
/// load from the thread's rseq area (whose address a thread local caches); without it (an old
/// kernel, valgrind) each thread gets a fixed slot, handed out round-robin, which keeps charges
/// correct and stocks shared by few threads.
#[inline(always)]
pub(crate) fn cpu() -> usize {
    let source = CPU_SOURCE.with(Cell::get);
    if !source.is_null() {
        // SAFETY: a non-null source is this thread's rseq `cpu_id` field or its `SLOT` (see
        // `cpu_slow`), both alive as long as the thread; the kernel writes the former, hence
        // the volatile read.
        let cpu = unsafe { core::ptr::read_volatile(source) } as i32;
        if let Ok(cpu) = usize::try_from(cpu) {
            return cpu;
        }
    }
    cpu_slow()
}

thread_local! {
    /// Where this thread reads its CPU number: its rseq area's `cpu_id`, or its `SLOT`.
    static CPU_SOURCE: Cell<*const u32> = const { Cell::new(core::ptr::null()) };
    /// A fixed CPU-like slot for a thread without rseq.
    static SLOT: Cell<u32> = const { Cell::new(0) };
}

#[cold]
fn cpu_slow() -> usize {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let source = match rseq::cpu_id() {
        // Registration may still be pending (cpu_id < 0): read the slot this time.
        Some(field) => field,
        None => SLOT.with(|slot| {
            slot.set(NEXT.fetch_add(1, Ordering::Relaxed) % 64);
            slot.as_ptr() as *const u32
        }),
    };
    CPU_SOURCE.with(|s| s.set(source));
    // SAFETY: as in `cpu`.
    let cpu = unsafe { core::ptr::read_volatile(source) } as i32;
    usize::try_from(cpu).unwrap_or_else(|_| SLOT.with(Cell::get) as usize)
}

#[cfg(all(
    target_os = "linux",
    target_env = "gnu",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod rseq {
    extern "C" {
        /// Offset of the thread's `struct rseq` from the thread pointer (glibc >= 2.35).
        static __rseq_offset: isize;
        /// Size of the registered area, 0 when glibc could not register it.
        static __rseq_size: u32;
    }

    /// The address of this thread's rseq `cpu_id`, if glibc registered an area.
    pub(super) fn cpu_id() -> Option<*const u32> {
        // SAFETY: both are plain data exported by glibc, written once before `main` (and before
        // any constructor that could allocate) and read-only afterwards.
        let (offset, size) = unsafe { (__rseq_offset, __rseq_size) };
        if size == 0 {
            return None;
        }
        // SAFETY: with a registered area, thread pointer + `__rseq_offset` is this thread's
        // `struct rseq`, whose second u32 is `cpu_id`.
        Some(unsafe { thread_pointer().offset(offset).add(4) as *const u32 })
    }

    #[inline(always)]
    fn thread_pointer() -> *const u8 {
        let tp: *const u8;
        // SAFETY: reads the thread pointer register (x86_64: the TCB's self pointer at fs:0);
        // touches no other state.
        unsafe {
            #[cfg(target_arch = "x86_64")]
            core::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly, preserves_flags, pure));
            #[cfg(target_arch = "aarch64")]
            core::arch::asm!("mrs {}, tpidr_el0", out(reg) tp, options(nostack, nomem, preserves_flags, pure));
        }
        tp
    }
}

#[cfg(not(all(
    target_os = "linux",
    target_env = "gnu",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
mod rseq {
    pub(super) fn cpu_id() -> Option<*const u32> {
        None
    }
}

/// Maps `bytes` of zeroed, lazily backed memory, or returns null.
pub(crate) fn map(bytes: usize) -> *mut u8 {
    map_anonymous(bytes, libc::PROT_READ | libc::PROT_WRITE)
}

/// An anonymous private mapping of `bytes` with protection `prot`, or null.
fn map_anonymous(bytes: usize, prot: libc::c_int) -> *mut u8 {
    if injected_map_failure() {
        return core::ptr::null_mut();
    }
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing has no
    // preconditions; failure is reported as MAP_FAILED and turned into null.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            bytes,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        core::ptr::null_mut()
    } else {
        p.cast()
    }
}

// ---- the environment: every MEMGROUP_* variable is read here, once, at its first use --------
//
// A value that is not what the variable takes gives one warning, in one format, and the
// variable's default (or, for a size over its range, the largest it takes):
//
//     memgroup: MEMGROUP_BATCH="64 K" is not a size (bytes, or a number with K, M or G); using 64K

/// A size variable: `default` when unset, at most `max`. A value that is not a size gives a
/// warning and `default`; one over `max` (a number too large for 64 bits included) gives a
/// warning and `max`.
pub(crate) fn env_size_in(name: &core::ffi::CStr, default: usize, max: usize) -> usize {
    let Some(text) = env(name) else {
        return default;
    };
    match parse_size(text) {
        Ok(n) if n <= max => n,
        Ok(_) | Err(Size::TooLarge) => {
            let mut buf = [0; SIZE_TEXT];
            bad_env(name, text, &[b"is over ", size_text(max, &mut buf)], max);
            max
        }
        Err(Size::NotASize) => {
            bad_env(
                name,
                text,
                &[b"is not a size (bytes, or a number with K, M or G)"],
                default,
            );
            default
        }
    }
}

/// A switch variable: `0` or `1`; `default` when unset, or (with a warning) when it is neither.
pub(crate) fn env_switch(name: &core::ffi::CStr, default: bool) -> bool {
    let Some(text) = env(name) else {
        return default;
    };
    switch(text).unwrap_or_else(|| {
        bad_switch(name, text, default);
        default
    })
}

fn switch(text: &[u8]) -> Option<bool> {
    match text {
        b"0" => Some(false),
        b"1" => Some(true),
        _ => None,
    }
}

fn bad_switch(name: &core::ffi::CStr, text: &[u8], default: bool) {
    bad_env(name, text, &[b"must be 0 or 1"], default as usize);
}

/// Reads a variable from the environment without allocating.
pub(crate) fn env(name: &core::ffi::CStr) -> Option<&'static [u8]> {
    // SAFETY: `name` is NUL-terminated. getenv does not allocate; the returned string lives in
    // the environment block, which memgroup never modifies. A concurrent setenv could
    // invalidate it; memgroup reads the environment once, at its first allocation.
    let value = unsafe { libc::getenv(name.as_ptr()) };
    if value.is_null() {
        return None;
    }
    // SAFETY: getenv returned a NUL-terminated string (see above).
    Some(unsafe { core::ffi::CStr::from_ptr(value) }.to_bytes())
}

/// The one warning for a bad value: `memgroup: NAME="value" <why>; using <used>`, the value
/// shown up to 64 bytes with anything but printable ASCII as `?`.
fn bad_env(name: &core::ffi::CStr, text: &[u8], why: &[&[u8]], used: usize) {
    const SHOWN: usize = 64;
    let mut shown = [0u8; SHOWN];
    for (out, &b) in shown.iter_mut().zip(text) {
        *out = if b.is_ascii_graphic() || b == b' ' {
            b
        } else {
            b'?'
        };
    }
    let shown_len = text.len().min(SHOWN);
    let more: &[u8] = if text.len() > SHOWN { b"...\"" } else { b"\"" };
    let mut buf = [0; SIZE_TEXT];
    let used = size_text(used, &mut buf);
    let mut line = Line::new();
    line.push(b"memgroup: ");
    line.push(name.to_bytes());
    line.push(b"=\"");
    line.push(&shown[..shown_len]);
    line.push(more);
    line.push(b" ");
    for part in why {
        line.push(part);
    }
    line.push(b"; using ");
    line.push(used);
    line.push(b"\n");
    warn(&[line.as_bytes()]);
}

/// A line of warning assembled on the stack, so it goes out in one `write` (whole, even with
/// other threads writing to standard error); cut at its capacity.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn new() -> Line {
        Line {
            buf: [0; 256],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Room for any `usize` in decimal and a unit.
const SIZE_TEXT: usize = 24;

/// `n` as the environment would write it: with the largest binary unit (`K`, `M`, `G`) that
/// divides it, so 65536 reads `64K`; a 0 or 1 switch value reads as itself.
fn size_text(n: usize, buf: &mut [u8; SIZE_TEXT]) -> &[u8] {
    let (mut v, unit) = match n {
        0 => (0, None),
        _ if n % (1 << 30) == 0 => (n >> 30, Some(b'G')),
        _ if n % (1 << 20) == 0 => (n >> 20, Some(b'M')),
        _ if n % (1 << 10) == 0 => (n >> 10, Some(b'K')),
        _ => (n, None),
    };
    let mut end = SIZE_TEXT;
    if let Some(unit) = unit {
        end -= 1;
        buf[end] = unit;
    }
    let mut start = end;
    loop {
        start -= 1;
        buf[start] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[start..]
}

/// Why a text is not a size.
#[derive(Debug, PartialEq)]
enum Size {
    NotASize,
    /// Digits (and a unit) for more than 64 bits hold.
    TooLarge,
}

fn parse_size(text: &[u8]) -> Result<usize, Size> {
    let (digits, shift) = match text.last() {
        Some(b'k' | b'K') => (&text[..text.len() - 1], 10),
        Some(b'm' | b'M') => (&text[..text.len() - 1], 20),
        Some(b'g' | b'G') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(Size::NotASize);
    }
    let mut n: usize = 0;
    for &d in digits {
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add((d - b'0') as usize))
            .ok_or(Size::TooLarge)?;
    }
    n.checked_mul(1 << shift).ok_or(Size::TooLarge)
}

/// Writes a message to standard error without allocating.
pub(crate) fn warn(parts: &[&[u8]]) {
    for part in parts {
        // SAFETY: writes from a valid slice to fd 2; a failed write is ignored on purpose.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
}

/// Ends the process after heap corruption: continuing would charge or free the wrong memory.
#[cold]
pub(crate) fn corrupted(what: &[u8]) -> ! {
    warn(&[b"memgroup: ", what, b"; aborting\n"]);
    // SAFETY: abort has no preconditions.
    unsafe { libc::abort() }
}

/// Registers fork handlers.
pub(crate) fn at_fork(prepare: extern "C" fn(), parent: extern "C" fn(), child: extern "C" fn()) {
    // SAFETY: the handlers are plain `extern "C"` functions that live for the whole program.
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if rc != 0 {
        warn(&[b"memgroup: pthread_atfork failed; group creation in a forked child may hang\n"]);
    }
}

/// Sleeps while `word` holds `expected`, for at most `timeout` (forever if `None`). May wake
/// early or spuriously: callers re-check their condition.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<core::time::Duration>) {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(core::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: FUTEX_WAIT reads the aligned u32 behind `word`, which lives for the call, and
    // an optional relative timeout from a live timespec.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            ts_ptr,
        )
    };
}

/// Wakes up to `n` threads sleeping in `futex_wait` on `word`.
pub(crate) fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY: FUTEX_WAKE only uses the address of `word` as a key.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            n,
        )
    };
}

// ---- membarrier and a thread-exit hook: the pockets' and the arena's -----------------------

const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

/// Registers the process for `membarrier`; false if the kernel (or valgrind) cannot, or if
/// `MEMGROUP_MEMBARRIER=0` says not to (then pockets are off and the arena's fast path uses an
/// atomic swap: the fallback of a kernel without it, which the test suites run under).
/// Decided once; later calls give the same answer.
pub(crate) fn membarrier_register() -> bool {
    static STATE: AtomicU32 = AtomicU32::new(0);
    const ON: u32 = 1;
    const OFF: u32 = 2;
    match STATE.load(Ordering::Acquire) {
        ON => return true,
        OFF => return false,
        _ => {}
    }
    const NAME: &core::ffi::CStr = c"MEMGROUP_MEMBARRIER";
    let text = env(NAME);
    let wanted = text.and_then(switch);
    let on = wanted.unwrap_or(true)
        // SAFETY: membarrier with a command and zero flags has no memory arguments.
        && unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
                0,
            ) == 0
        };
    // Two first callers (the pockets and the arena, on two threads) may both get here; they
    // decide alike, and only the one that records the decision warns.
    match STATE.compare_exchange(
        0,
        if on { ON } else { OFF },
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(_) => {
            if let (Some(text), None) = (text, wanted) {
                bad_switch(NAME, text, true);
            }
            on
        }
        Err(decided) => decided == ON,
    }
}

/// Runs a full memory barrier on every running thread of the process (after
/// `membarrier_register`): the heavy side of an asymmetric fence. False on failure.
pub(crate) fn membarrier() -> bool {
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0) == 0 }
}

/// Creates a thread-specific key whose destructor runs `hook` at the exit of each thread that
/// set a value for it, after the thread's Rust thread-local destructors.
pub(crate) fn thread_exit_key(hook: unsafe extern "C" fn(*mut libc::c_void)) -> Option<u32> {
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `key` is a valid out-pointer; the destructor lives for the whole program.
    (unsafe { libc::pthread_key_create(&mut key, Some(hook)) } == 0).then_some(key)
}

/// Sets this thread's value for a `thread_exit_key`; false if it could not (then the hook
/// will not run for this thread). May allocate (glibc's second-level key table), so the caller
/// must be ready for a nested allocation.
pub(crate) fn set_thread_exit_value(key: u32, value: *mut libc::c_void) -> bool {
    // SAFETY: `key` came from `thread_exit_key`; failure only loses the exit hook.
    unsafe { libc::pthread_setspecific(key, value) == 0 }
}

// ---- for the arena design: its own memory ---------------------------------------------------

#[cfg(feature = "arena")]
/// Reserves `bytes` of address space with no access and no memory behind it (nor any commit
/// charge), or returns null.
pub(crate) fn reserve(bytes: usize) -> *mut u8 {
    map_anonymous(bytes, libc::PROT_NONE)
}

#[cfg(feature = "arena")]
/// Makes reserved memory readable and writable (zeroed, backed lazily). False on failure.
pub(crate) fn commit(p: *mut u8, bytes: usize) -> bool {
    if injected_map_failure() {
        return false;
    }
    // SAFETY: the caller passes a page-aligned range of a mapping made by `reserve`, which
    // nothing else uses.
    unsafe { libc::mprotect(p.cast(), bytes, libc::PROT_READ | libc::PROT_WRITE) == 0 }
}

#[cfg(feature = "arena")]
/// Gives the memory of a committed range back to the operating system; it reads as zeros when
/// touched again. Failure only leaves the memory resident.
pub(crate) fn decommit(p: *mut u8, bytes: usize) {
    // SAFETY: the caller passes a page-aligned range that holds nothing live.
    unsafe { libc::madvise(p.cast(), bytes, libc::MADV_DONTNEED) };
}

#[cfg(feature = "arena")]
/// Unmaps a range made by `map`.
pub(crate) fn unmap(p: *mut u8, bytes: usize) {
    // SAFETY: the caller passes a whole mapping from `map` that nothing uses any more.
    unsafe { libc::munmap(p.cast(), bytes) };
}

// ---- fault injection, for the test suites -----------------------------------------------------

/// Mappings (`mmap`, and the arena's commits) still to fail on purpose.
static FAIL_MAPS: AtomicU32 = AtomicU32::new(0);

/// Makes the next `n` of memgroup's own mappings fail, as if the kernel refused them: every
/// `mmap` it makes (the group table, pocket chunks, the arena's region, heaps and key tables)
/// and every commit of an arena segment. Process-wide: for tests, in a process of their own.
/// Returns how many of an earlier call's failures were still to come. Not a stable API.
#[doc(hidden)]
pub fn fail_next_maps(n: u32) -> u32 {
    FAIL_MAPS.swap(n, Ordering::Relaxed)
}

/// Takes one of the failures `fail_next_maps` asked for, if any is left.
fn injected_map_failure() -> bool {
    FAIL_MAPS.load(Ordering::Relaxed) != 0
        && FAIL_MAPS
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
}

/// This process's id (never 0).
pub(crate) fn process_id() -> u64 {
    // SAFETY: getpid has no preconditions and cannot fail.
    unsafe { libc::getpid() as u64 }
}

#[cfg(test)]
mod tests {
    use super::{parse_size, size_text, Size, SIZE_TEXT};

    #[test]
    fn sizes() {
        assert_eq!(parse_size(b"65536"), Ok(65536));
        assert_eq!(parse_size(b"64K"), Ok(65536));
        assert_eq!(parse_size(b"64k"), Ok(65536));
        assert_eq!(parse_size(b"2m"), Ok(2 << 20));
        assert_eq!(parse_size(b"1G"), Ok(1 << 30));
        assert_eq!(parse_size(b"0"), Ok(0));
        assert_eq!(parse_size(b"007"), Ok(7));
        assert_eq!(parse_size(b"18446744073709551615"), Ok(usize::MAX));
        assert_eq!(parse_size(b"17179869183G"), Ok(17179869183 << 30));
        for bad in [
            &b""[..],
            b"K",
            b"-1",
            b"+1",
            b"12x",
            b" 1",
            b"1 ",
            b"1KB",
            b"0x10",
            b"1.5M",
        ] {
            assert_eq!(parse_size(bad), Err(Size::NotASize), "{:?}", bad);
        }
        for big in [
            &b"18446744073709551616"[..],
            b"99999999999999999999999",
            b"17179869184G",
            b"18446744073709551615K",
        ] {
            assert_eq!(parse_size(big), Err(Size::TooLarge), "{:?}", big);
        }
    }

    #[test]
    fn size_texts() {
        let mut buf = [0; SIZE_TEXT];
        assert_eq!(size_text(0, &mut buf), b"0");
        assert_eq!(size_text(1, &mut buf), b"1");
        assert_eq!(size_text(65536, &mut buf), b"64K");
        assert_eq!(size_text(8 << 20, &mut buf), b"8M");
        assert_eq!(size_text(3 << 30, &mut buf), b"3G");
        assert_eq!(size_text(1025, &mut buf), b"1025");
        assert_eq!(size_text(usize::MAX, &mut buf), b"18446744073709551615");
    }
}
