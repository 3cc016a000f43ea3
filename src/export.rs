//! Export of the groups' figures (Prometheus text exposition, format 0.0.4).
//!
//! [`prometheus`] appends one sample per live group (removed groups are absent), labelled
//! `group="<path>"` with the path [`Group::name`] returns: `"/"` for the root,
//! `"tenant-a/batch"` below it. Every figure is hierarchical, as [`Group::stat`]'s: a parent's
//! sample includes its children's.
//!
//! | metric | type | cgroup v2 file | cAdvisor counterpart |
//! | --- | --- | --- | --- |
//! | `memgroup_usage_bytes` | gauge | `memory.current` | `container_memory_usage_bytes` |
//! | `memgroup_kmem_bytes` | gauge | `memory.stat` `kernel` (v1 `memory.kmem.usage_in_bytes`) | `container_memory_kernel_usage` |
//! | `memgroup_overhead_bytes` | gauge | none (the allocator's own cost) | none |
//! | `memgroup_peak_bytes` | gauge | `memory.peak` | `container_memory_max_usage_bytes` |
//! | `memgroup_max_bytes` | gauge | `memory.max` | `container_spec_memory_limit_bytes` |
//! | `memgroup_high_bytes` | gauge | `memory.high` | `container_spec_memory_reservation_limit_bytes` (closest) |
//! | `memgroup_kmem_max_bytes` | gauge | v1 `memory.kmem.limit_in_bytes` | none |
//! | `memgroup_allocs_total` | counter | none | none |
//! | `memgroup_frees_total` | counter | none | none |
//! | `memgroup_events_total{event="high"}` | counter | `memory.events` `high` | none |
//! | `memgroup_events_total{event="max"}` | counter | `memory.events` `max` | `container_memory_failcnt` |
//! | `memgroup_events_total{event="fail"}` | counter | `memory.events` `oom` (the charge refused) | `container_oom_events_total` (closest) |
//! | `memgroup_dying_groups` | gauge (no label) | `cgroup.stat` `nr_dying_descendants` | none |
//!
//! The limit gauges are absent for a group whose limit is unset (unlimited), as cAdvisor
//! omits or zeroes `max`.
//!
//! **Precision.** The figures are [`Group::stat`]'s, read without a flush: fast, but `usage`,
//! `kmem`, `peak` and the counts may include per-CPU stock and pocket slack (see the README's
//! "Reading the counters"). A caller wanting exact figures calls [`Group::root`]`().flush()`
//! (or a group's own `flush`) first.
//!
//! **Scope.** memgroup accounts one process; the group label does not name the process. A fleet
//! scrapes every process and aggregates the series in its Prometheus (by `instance`, `job` or
//! labels it adds at scrape time).

use crate::{dying_groups, Group, Stat};
use core::fmt::Write;

/// Appends the Prometheus text exposition (format 0.0.4) of every live group to `out`.
///
/// Runs in the root's scope, so the growth of `out` and the walk's own allocations are charged
/// to the root, not to the caller's group; no memgroup lock is held while formatting. Does not
/// flush: see the module docs.
pub fn prometheus(out: &mut String) {
    Group::root().run(|| {
        let rows = walk(|path| {
            let mut label = String::new();
            escape(path, &mut label);
            label
        });

        let gauge = |out: &mut String, name: &str, help: &str, f: &dyn Fn(&Stat) -> Option<u64>| {
            header(out, name, help, "gauge");
            for (label, s) in &rows {
                if let Some(v) = f(s) {
                    let _ = writeln!(out, "{name}{{group=\"{label}\"}} {v}");
                }
            }
        };
        let b = |v: usize| Some(v as u64);
        let lim = |v: Option<usize>| v.map(|v| v as u64);
        gauge(out, "memgroup_usage_bytes", "Bytes charged to the group and its descendants, user and kernel, overhead included (memory.current).", &|s| b(s.usage));
        gauge(out, "memgroup_kmem_bytes", "The part of usage charged as kernel memory.", &|s| b(s.kmem));
        gauge(out, "memgroup_overhead_bytes", "The part of usage that is the allocator's own cost.", &|s| b(s.overhead));
        gauge(out, "memgroup_peak_bytes", "The highest usage seen (memory.peak).", &|s| b(s.peak));
        gauge(out, "memgroup_max_bytes", "The hard limit (memory.max); absent when unlimited.", &|s| lim(s.max));
        gauge(out, "memgroup_high_bytes", "The pressure threshold (memory.high); absent when unlimited.", &|s| lim(s.high));
        gauge(out, "memgroup_kmem_max_bytes", "The kernel-memory limit; absent when unlimited.", &|s| lim(s.kmem_max));

        header(out, "memgroup_allocs_total", "Blocks allocated.", "counter");
        for (label, s) in &rows {
            let _ = writeln!(out, "memgroup_allocs_total{{group=\"{label}\"}} {}", s.allocs);
        }
        header(out, "memgroup_frees_total", "Blocks freed.", "counter");
        for (label, s) in &rows {
            let _ = writeln!(out, "memgroup_frees_total{{group=\"{label}\"}} {}", s.frees);
        }
        header(
            out,
            "memgroup_events_total",
            "Limit events (memory.events): high = usage went above high, max = a charge would have passed max or kmem_max, fail = a charge refused.",
            "counter",
        );
        for (label, s) in &rows {
            for (event, v) in [
                ("high", s.events.high),
                ("max", s.events.max),
                ("fail", s.events.fail),
            ] {
                let _ = writeln!(
                    out,
                    "memgroup_events_total{{group=\"{label}\",event=\"{event}\"}} {v}"
                );
            }
        }
        header(
            out,
            "memgroup_dying_groups",
            "Removed groups whose memory is not freed yet.",
            "gauge",
        );
        let _ = writeln!(out, "memgroup_dying_groups {}", dying_groups());
    })
}

/// Every live group's (label made from its path, figures), parents before their children.
/// Call in the root's scope.
fn walk(label: impl Fn(&str) -> String) -> Vec<(String, Stat)> {
    let mut rows: Vec<(String, Stat)> = Vec::new();
    let mut stack = vec![Group::root()];
    while let Some(g) = stack.pop() {
        rows.push((label(&g.name()), g.stat()));
        stack.extend(g.children());
    }
    rows
}

/// Records every live group's figures through the [`metrics`] facade (feature
/// `metrics`), under the names and labels of [`prometheus`]: gauges for the bytes and limits
/// (a limit that is unset is not recorded), absolute counters for the counts and events,
/// described once with their units. Call it before each scrape, or on a timer; it runs in the
/// root's scope and does not flush.
#[cfg(feature = "metrics")]
pub fn report() {
    use ::metrics::{counter, describe_counter, describe_gauge, gauge, Unit};
    Group::root().run(|| {
        static DESCRIBED: std::sync::Once = std::sync::Once::new();
        DESCRIBED.call_once(|| {
            for (name, help) in [
                (
                    "memgroup_usage_bytes",
                    "Bytes charged, user and kernel, overhead included.",
                ),
                (
                    "memgroup_kmem_bytes",
                    "The part of usage charged as kernel memory.",
                ),
                (
                    "memgroup_overhead_bytes",
                    "The part of usage that is the allocator's own cost.",
                ),
                ("memgroup_peak_bytes", "The highest usage seen."),
                ("memgroup_max_bytes", "The hard limit."),
                ("memgroup_high_bytes", "The pressure threshold."),
                ("memgroup_kmem_max_bytes", "The kernel-memory limit."),
            ] {
                describe_gauge!(name, Unit::Bytes, help);
            }
            describe_counter!("memgroup_allocs_total", Unit::Count, "Blocks allocated.");
            describe_counter!("memgroup_frees_total", Unit::Count, "Blocks freed.");
            describe_counter!("memgroup_events_total", Unit::Count, "Limit events.");
            describe_gauge!(
                "memgroup_dying_groups",
                Unit::Count,
                "Removed groups whose memory is not freed yet."
            );
        });
        for (path, s) in walk(str::to_owned) {
            let bytes = [
                ("memgroup_usage_bytes", Some(s.usage)),
                ("memgroup_kmem_bytes", Some(s.kmem)),
                ("memgroup_overhead_bytes", Some(s.overhead)),
                ("memgroup_peak_bytes", Some(s.peak)),
                ("memgroup_max_bytes", s.max),
                ("memgroup_high_bytes", s.high),
                ("memgroup_kmem_max_bytes", s.kmem_max),
            ];
            for (name, v) in bytes {
                if let Some(v) = v {
                    gauge!(name, "group" => path.clone()).set(v as f64);
                }
            }
            counter!("memgroup_allocs_total", "group" => path.clone()).absolute(s.allocs);
            counter!("memgroup_frees_total", "group" => path.clone()).absolute(s.frees);
            for (event, v) in [
                ("high", s.events.high),
                ("max", s.events.max),
                ("fail", s.events.fail),
            ] {
                counter!("memgroup_events_total", "group" => path.clone(), "event" => event)
                    .absolute(v);
            }
        }
        gauge!("memgroup_dying_groups").set(dying_groups() as f64);
    })
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value: backslash, double quote and newline.
fn escape(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}
