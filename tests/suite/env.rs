// Bad input from the environment (issue 14.6): every MEMGROUP_* variable, set to garbage,
// overflowing, negative and boundary values, in a child process each. A bad value gives exactly
// one warning on stderr, in one format,
//
//     memgroup: NAME="value" <why>; using <value used>
//
// and memgroup goes on with the value named there (the default, or the largest a size variable
// takes), which the child reports and the parent checks; a good value gives no output at all.
// Every child also runs a small workload (blocks of many sizes on two threads, freed on the
// other, large ones included) and checks its group back to exactly 0, so each accepted value is
// one memgroup really works with.
//
// The variables (name, default, range), as the README lists them:
//   MEMGROUP_BATCH       64K  a size 0..=8M (0: no stocks); over 8M: 8M
//   MEMGROUP_KMEM        1    0 or 1 (0: kernel memory charged as user memory)
//   MEMGROUP_POCKETS     1    0 or 1 (0: no per-thread pockets)
//   MEMGROUP_MEMBARRIER  1    0 or 1 (0: never use membarrier(2): no pockets, the arena's
//                             fallback fast path)
//   MEMGROUP_ARENA_POOL  4M   a size 0..=1024G (arena only: empty slabs kept resident); over
//                             1024G: 1024G
//   MEMGROUP_ARENA_SLAB_AFTER 4K a size 0..=256K (arena only: bytes a group has a thread
//                             serve the tag way before its cache there, and of a class before
//                             a slab); over 256K: 256K

include!("common.rs");

use common::{exact, fresh, in_child_process, live, Block};
use memgroup::{kernel, kmem_accounting, stock_batch};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

/// The installed design reads MEMGROUP_ARENA_POOL.
const ARENA: bool = IS_ARENA;

/// What a child reports of the settings in force.
#[derive(Debug, PartialEq, Clone, Copy)]
struct Seen {
    batch: usize,
    kmem: bool,
    /// None where the probe cannot tell (see `pockets_on`).
    pockets: Option<bool>,
    /// Blocks of 24 bytes a fresh group served the tag way before its first slab (see
    /// `tag_way`); 0 in the tag design.
    tag_way: usize,
}

const DEFAULTS: Seen = Seen {
    batch: 64 << 10,
    kmem: true,
    pockets: Some(true),
    tag_way: tag_way_for(4 << 10),
};

/// What `tag_way` reports for `MEMGROUP_ARENA_SLAB_AFTER=bytes`: 24-byte blocks on trial (no
/// group heap) until the one that makes `bytes`, then enough to make `bytes` and at least a
/// 4 KiB slab's worth; 0 for 0, and in the tag design.
const fn tag_way_for(bytes: usize) -> usize {
    if !ARENA || bytes == 0 {
        return 0;
    }
    let trial = bytes.div_ceil(24) - 1;
    let slab = if bytes > 4096 { bytes } else { 4096 };
    trial + slab.div_ceil(24)
}

/// Runs the child with `name=value` (raw bytes) and returns its stderr and what it saw.
fn child(name: &str, value: &[u8]) -> (String, Seen) {
    let exe = std::env::current_exe().expect("current_exe");
    let out = std::process::Command::new(exe)
        .args(["--exact", "env_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("MEMGROUP_TEST_CHILD", "1")
        .env(name, OsStr::from_bytes(value))
        .output()
        .expect("spawning the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child with {name}={:?} failed: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        String::from_utf8_lossy(value),
        out.status
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("seen: ").map(|(_, seen)| seen))
        .unwrap_or_else(|| panic!("no report from the child:\n{stdout}"));
    let field = |key: &str| -> usize {
        line.split(' ')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
    };
    let seen = Seen {
        batch: field("batch"),
        kmem: field("kmem") == 1,
        pockets: match field("pockets") {
            2 => None,
            p => Some(p == 1),
        },
        tag_way: field("tag_way"),
    };
    (stderr, seen)
}

/// Checks one value: `warning` is the exact line expected (None: no output at all), `seen` the
/// settings in force.
fn case(name: &str, value: &[u8], warning: Option<&str>, seen: Seen) {
    let (stderr, got) = child(name, value);
    let shown = String::from_utf8_lossy(value);
    match warning {
        None => assert_eq!(stderr, "", "{name}={shown:?} is good: no output"),
        Some(line) => assert_eq!(stderr, format!("{line}\n"), "{name}={shown:?}: one warning"),
    }
    assert_eq!(got, seen, "{name}={shown:?}: the settings in force");
}

/// `memgroup: NAME="value" why; using used`
fn warning(name: &str, value: &str, why: &str, used: &str) -> String {
    format!("memgroup: {name}=\"{value}\" {why}; using {used}")
}

const NOT_A_SIZE: &str = "is not a size (bytes, or a number with K, M or G)";

#[test]
fn batch_values() {
    let n = "MEMGROUP_BATCH";
    let with = |batch| Seen { batch, ..DEFAULTS };
    // Good values, the boundaries included: no output, the value in force.
    for (value, batch) in [
        ("65536", 65536),
        ("0", 0),
        ("1", 1),
        ("4095", 4095),
        ("4096", 4096),
        ("64k", 64 << 10),
        ("1M", 1 << 20),
        ("8M", 8 << 20),
        ("8192K", 8 << 20),
        ("8388608", 8 << 20),
        ("0G", 0),
        ("0008M", 8 << 20),
    ] {
        // Pockets need a batch of at least 4K (a pocket of 512 bytes).
        let seen = Seen {
            pockets: (ARENA || batch == 0 || batch >= PROBE_BATCH).then_some(batch >= 4096 && !ARENA),
            ..with(batch)
        };
        case(n, value.as_bytes(), None, seen);
    }
    // Over the range, overflowing 64 bits included: the largest batch.
    for value in [
        "8388609",
        "9M",
        "1G",
        "18446744073709551615",
        "18446744073709551616",
        "99999999999999999999999999",
        "17179869184G",
    ] {
        case(
            n,
            value.as_bytes(),
            Some(&warning(n, value, "is over 8M", "8M")),
            Seen {
                pockets: Some(!ARENA),
                ..with(8 << 20)
            },
        );
    }
    // Not a size: the default.
    for value in [
        "", "-1", "-65536", "+4096", "abc", "64 K", " 64K", "64K ", "0x1000", "1.5M", "64KB",
        "64KiB", "1T", "1e6", "K", "64K\t",
    ] {
        let shown = value.replace('\t', "?");
        case(
            n,
            value.as_bytes(),
            Some(&warning(n, &shown, NOT_A_SIZE, "64K")),
            Seen {
                pockets: Some(!ARENA),
                ..DEFAULTS
            },
        );
    }
}

#[test]
fn batch_values_shown_safely() {
    let n = "MEMGROUP_BATCH";
    let seen = Seen {
        pockets: Some(!ARENA),
        ..DEFAULTS
    };
    // Bytes that are not printable ASCII (a newline, an escape, UTF-8) are shown as '?'.
    case(
        n,
        b"64\nK\x1b[31m\xc3\xa9",
        Some(&warning(n, "64?K?[31m??", NOT_A_SIZE, "64K")),
        seen,
    );
    // A long value is cut at 64 bytes.
    let long = "7".repeat(100) + "x";
    case(
        n,
        long.as_bytes(),
        Some(&warning(n, &format!("{}...", &long[..64]), NOT_A_SIZE, "64K")),
        seen,
    );
}

/// The three 0-or-1 switches.
fn switch_values(n: &str, off: Seen) {
    let on = Seen {
        pockets: Some(!ARENA),
        ..DEFAULTS
    };
    case(n, b"1", None, on);
    case(n, b"0", None, off);
    for value in [
        "", "2", "-1", "00", "01", "10", " 1", "0 ", "yes", "no", "true", "false", "on", "off",
        "18446744073709551616",
    ] {
        case(
            n,
            value.as_bytes(),
            Some(&warning(n, value, "must be 0 or 1", "1")),
            on,
        );
    }
}

#[test]
fn kmem_values() {
    switch_values(
        "MEMGROUP_KMEM",
        Seen {
            kmem: false,
            pockets: Some(!ARENA),
            ..DEFAULTS
        },
    );
}

#[test]
fn pockets_values() {
    let n = "MEMGROUP_POCKETS";
    // The arena reads it too: a group's first blocks of each class go the tag way, through the
    // tag design's pockets (which `pockets_on` does not probe there).
    switch_values(
        n,
        Seen {
            pockets: Some(false),
            ..DEFAULTS
        },
    );
}

#[test]
fn membarrier_values() {
    // Without membarrier(2) there are no pockets (and the arena's fast path takes the fallback).
    switch_values(
        "MEMGROUP_MEMBARRIER",
        Seen {
            pockets: Some(false),
            ..DEFAULTS
        },
    );
}

#[test]
fn arena_pool_values() {
    let n = "MEMGROUP_ARENA_POOL";
    let seen = Seen {
        pockets: Some(!ARENA),
        ..DEFAULTS
    };
    let quiet = |value: &str| case(n, value.as_bytes(), None, seen);
    // Good values, the boundaries included (1024G, the largest): no output.
    for value in ["0", "1", "4096", "4M", "1G", "1024G", "1048576M", "1099511627776"] {
        quiet(value);
    }
    // Over the range, overflowing 64 bits included: the largest pool, in the one format.
    for value in [
        "1025G",
        "1099511627777",
        "16000000000G",
        "18446744073709551615",
        "18446744073709551616",
        "17179869184G",
    ] {
        if ARENA {
            case(n, value.as_bytes(), Some(&warning(n, value, "is over 1024G", "1024G")), seen);
        } else {
            quiet(value);
        }
    }
    // Garbage and negative values: the default, in the one format.
    for value in ["", "-1", "-4M", "abc", "4 M", "1T", "0x1000", "4MB"] {
        if ARENA {
            case(n, value.as_bytes(), Some(&warning(n, value, NOT_A_SIZE, "4M")), seen);
        } else {
            // The tag design does not read the variable.
            quiet(value);
        }
    }
}

#[test]
fn arena_slab_after_values() {
    let n = "MEMGROUP_ARENA_SLAB_AFTER";
    let with = |bytes| Seen {
        pockets: Some(!ARENA),
        tag_way: tag_way_for(bytes),
        ..DEFAULTS
    };
    // Good values, the boundaries included (256K, the largest): no output, the value in force
    // (under the tag design, which does not read it: nothing).
    for (value, bytes) in [
        ("0", 0),
        ("1", 1),
        ("4096", 4096),
        ("4097", 4097),
        ("16K", 16 << 10),
        ("100000", 100_000),
        ("256K", 256 << 10),
        ("262144", 256 << 10),
    ] {
        case(n, value.as_bytes(), None, with(bytes));
    }
    // Over the range, overflowing 64 bits included: the largest, in the one format.
    for value in ["262145", "257K", "1M", "18446744073709551616", "17179869184G"] {
        let warning = warning(n, value, "is over 256K", "256K");
        case(n, value.as_bytes(), ARENA.then_some(warning.as_str()), with(256 << 10));
    }
    // Garbage and negative values: the default, in the one format.
    for value in ["", "-1", "abc", "16 K", "1T", "0x1000", "16KB"] {
        let warning = warning(n, value, NOT_A_SIZE, "4K");
        case(n, value.as_bytes(), ARENA.then_some(warning.as_str()), with(4 << 10));
    }
}

/// Under the arena, the blocks of 24 bytes a fresh group has this thread serve the tag way
/// before its first slab (`MEMGROUP_ARENA_SLAB_AFTER` in blocks; at most 40,000 are tried);
/// 0 in the tag design.
fn tag_way() -> usize {
    #[cfg(feature = "arena")]
    if ARENA {
        let g = fresh("env-tag-way");
        // Made outside the group: its buffer's growth would count toward the trial.
        let mut held = Vec::with_capacity(40_001);
        let n = g.run(|| loop {
            let b = Block::new(24, 1);
            // SAFETY: a live block of this binary's global allocator.
            let in_slab = unsafe { memgroup::slab_of(b.ptr()) }.is_some();
            held.push(b);
            if in_slab || held.len() > 40_000 {
                break held.len() - 1;
            }
        });
        drop(held);
        assert_eq!(exact(&g).usage, 0, "the probe group ends at 0");
        g.remove().expect("removing the probe group");
        return n;
    }
    0
}

/// Whether pockets are on: the probe of the pockets suite (a group whose max is half a batch:
/// a thread's block of 8 bytes leaves nothing charged once the thread exits only when it went
/// through a pocket, which the exit hook empties). In the arena design small blocks take no
/// pocket: false. None when the batch is under `PROBE_BATCH`: then the probe's block is
/// charged past the stocks, to the counters directly, with or without a pocket.
fn pockets_on() -> Option<bool> {
    let batch = stock_batch();
    if ARENA || batch == 0 {
        return Some(false);
    }
    if batch < PROBE_BATCH {
        return None;
    }
    Some(common::exit_empties_a_pocket())
}

/// The smallest batch `pockets_on` can see pockets with.
const PROBE_BATCH: usize = 64;

/// Blocks of many sizes (past the batch and the arena's largest class) on two threads, half
/// freed by the other thread, some inside kernel(): the group ends exactly at 0.
fn workload() {
    let g = fresh("env-work");
    let sizes = [1, 8, 24, 100, 512, 4000, 8192, 9000, 70_000, 1 << 20];
    let (tx, rx) = std::sync::mpsc::channel::<Block>();
    let g2 = g.clone();
    let worker = std::thread::spawn(move || {
        let mut mine = Vec::new();
        for round in 0..50 {
            for (i, &size) in sizes.iter().enumerate() {
                let b = g2.run(|| {
                    if i % 3 == 0 {
                        kernel(|| Block::filled(size, round as u8))
                    } else {
                        Block::filled(size, round as u8)
                    }
                });
                if i % 2 == 0 {
                    tx.send(b).expect("sending a block");
                } else {
                    mine.push(b);
                }
            }
        }
        drop(mine);
    });
    let theirs: Vec<Block> = rx.iter().collect();
    worker.join().expect("worker thread");
    let s = exact(&g);
    assert_eq!(live(&s), theirs.len() as u64, "the blocks still held: {s:?}");
    assert_eq!(s.kmem > 0, kmem_accounting(), "kmem charged iff accounted: {s:?}");
    drop(theirs);
    let s = exact(&g);
    assert_eq!(
        (s.usage, s.kmem, s.overhead, live(&s)),
        (0, 0, 0, 0),
        "back to 0: {s:?}"
    );
    assert_eq!(s.allocs, 50 * sizes.len() as u64);
    g.remove().expect("removing the workload group");
}

#[test]
#[ignore = "run by the other tests of this file, in a child process with one variable set"]
fn env_child() {
    if !in_child_process() {
        return;
    }
    workload();
    println!(
        "seen: batch={} kmem={} pockets={} tag_way={}",
        stock_batch(),
        kmem_accounting() as u8,
        pockets_on().map_or(2, u8::from),
        tag_way()
    );
}
