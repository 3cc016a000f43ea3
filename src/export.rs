//! Export of the groups' figures: the Prometheus text exposition (format 0.0.4, [`prometheus`]),
//! a `prometheus_client` [`Collector`] (feature `prometheus-client`), and the `metrics` facade
//! (`report`, feature `metrics`). All three take one table of metrics, below, and read the
//! figures when called, with no thread of their own.
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

/// The per-group gauges, in bytes: name, help, and the figure (`None`: not exported).
/// A metric's name, its help text, and how a group's figure is read.
type Metric<T> = (&'static str, &'static str, fn(&Stat) -> T);

const GAUGES: [Metric<Option<usize>>; 7] = [
    ("memgroup_usage_bytes", "Bytes charged to the group and its descendants, user and kernel, overhead included (memory.current).", |s| Some(s.usage)),
    ("memgroup_kmem_bytes", "The part of usage charged as kernel memory.", |s| Some(s.kmem)),
    ("memgroup_overhead_bytes", "The part of usage that is the allocator's own cost.", |s| Some(s.overhead)),
    ("memgroup_peak_bytes", "The highest usage seen (memory.peak).", |s| Some(s.peak)),
    ("memgroup_max_bytes", "The hard limit (memory.max); absent when unlimited.", |s| s.max),
    ("memgroup_high_bytes", "The pressure threshold (memory.high); absent when unlimited.", |s| s.high),
    ("memgroup_kmem_max_bytes", "The kernel-memory limit; absent when unlimited.", |s| s.kmem_max),
];

/// The per-group block counters: name, help, figure.
const COUNTS: [Metric<u64>; 2] = [
    ("memgroup_allocs_total", "Blocks allocated.", |s| s.allocs),
    ("memgroup_frees_total", "Blocks freed.", |s| s.frees),
];

const EVENTS: (&str, &str) = (
    "memgroup_events_total",
    "Limit events (memory.events): high = usage went above high, max = a charge would have passed max or kmem_max, fail = a charge refused.",
);

const DYING: (&str, &str) = (
    "memgroup_dying_groups",
    "Removed groups whose memory is not freed yet.",
);

/// A group's limit events, by the `event` label.
fn events(s: &Stat) -> [(&'static str, u64); 3] {
    [
        ("high", s.events.high),
        ("max", s.events.max),
        ("fail", s.events.fail),
    ]
}

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
        for (name, help, f) in GAUGES {
            header(out, name, help, "gauge");
            for (label, s) in &rows {
                if let Some(v) = f(s) {
                    let _ = writeln!(out, "{name}{{group=\"{label}\"}} {v}");
                }
            }
        }
        for (name, help, f) in COUNTS {
            header(out, name, help, "counter");
            for (label, s) in &rows {
                let _ = writeln!(out, "{name}{{group=\"{label}\"}} {}", f(s));
            }
        }
        let (name, help) = EVENTS;
        header(out, name, help, "counter");
        for (label, s) in &rows {
            for (event, v) in events(s) {
                let _ = writeln!(out, "{name}{{group=\"{label}\",event=\"{event}\"}} {v}");
            }
        }
        let (name, help) = DYING;
        header(out, name, help, "gauge");
        let _ = writeln!(out, "{name} {}", dying_groups());
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

/// Records every live group's figures through the [`metrics`] facade (feature `metrics`),
/// under the names, labels and help texts of [`prometheus`]: gauges for the bytes and limits
/// (a limit that is unset is not recorded), absolute counters for the counts and events,
/// described once with their units. Call it before each scrape, or on a timer; it runs in the
/// root's scope and does not flush.
#[cfg(feature = "metrics")]
pub fn report() {
    use ::metrics::{counter, describe_counter, describe_gauge, gauge, Unit};
    Group::root().run(|| {
        static DESCRIBED: std::sync::Once = std::sync::Once::new();
        DESCRIBED.call_once(|| {
            for (name, help, _) in GAUGES {
                describe_gauge!(name, Unit::Bytes, help);
            }
            for (name, help, _) in COUNTS {
                describe_counter!(name, Unit::Count, help);
            }
            describe_counter!(EVENTS.0, Unit::Count, EVENTS.1);
            describe_gauge!(DYING.0, Unit::Count, DYING.1);
        });
        for (path, s) in walk(str::to_owned) {
            for (name, _, f) in GAUGES {
                if let Some(v) = f(&s) {
                    gauge!(name, "group" => path.clone()).set(v as f64);
                }
            }
            for (name, _, f) in COUNTS {
                counter!(name, "group" => path.clone()).absolute(f(&s));
            }
            for (event, v) in events(&s) {
                counter!(EVENTS.0, "group" => path.clone(), "event" => event).absolute(v);
            }
        }
        gauge!(DYING.0).set(dying_groups() as f64);
    })
}

/// A [`prometheus_client`] collector of every live group's figures (feature
/// `prometheus-client`): register it once and each scrape of the registry encodes the figures
/// of that moment, with no thread and nothing stored between scrapes.
///
/// ```no_run
/// let mut registry = prometheus_client::registry::Registry::default();
/// registry.register_collector(Box::new(memgroup::export::Collector));
/// // in the /metrics handler:
/// let mut body = String::new();
/// prometheus_client::encoding::text::encode(&mut body, &registry).unwrap();
/// ```
///
/// The metrics are [`prometheus`]'s: the same names, labels, help texts and units, from the same
/// table. The byte gauges are described with the unit `bytes` (OpenMetrics' `# UNIT` line, the
/// suffix of the name), the counters with the `counter` type, whose samples the encoder names
/// with `_total`: `prometheus_client::encoding::text::encode` (OpenMetrics) writes
/// `# TYPE memgroup_allocs counter` and `memgroup_allocs_total{group="/"} 42`, and
/// `prometheus_client::encoding::prometheus_text::encode` (format 0.0.4) gives [`prometheus`]'s
/// lines. A registry prefix (`Registry::with_prefix`) is put before every name.
///
/// Encoding runs in the root's scope (the encoder's buffers are charged to the root, not to the
/// caller's group), holds no memgroup lock while it formats, and does not flush.
#[cfg(feature = "prometheus-client")]
#[derive(Debug, Default, Clone, Copy)]
pub struct Collector;

#[cfg(feature = "prometheus-client")]
impl prometheus_client::collector::Collector for Collector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> core::fmt::Result {
        use prometheus_client::encoding::NoLabelSet;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::registry::Unit;
        Group::root().run(|| {
            let rows = walk(str::to_owned);
            for (name, help, f) in GAUGES {
                let base = name.strip_suffix("_bytes").unwrap_or(name);
                let mut metric =
                    encoder.encode_descriptor(base, help, Some(&Unit::Bytes), MetricType::Gauge)?;
                for (path, s) in &rows {
                    if let Some(v) = f(s) {
                        let labels = [("group", path.as_str())];
                        metric.encode_family(&labels)?.encode_gauge(&v)?;
                    }
                }
            }
            for (name, help, f) in COUNTS {
                let base = name.strip_suffix("_total").unwrap_or(name);
                let mut metric =
                    encoder.encode_descriptor(base, help, None, MetricType::Counter)?;
                for (path, s) in &rows {
                    let labels = [("group", path.as_str())];
                    metric
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&f(s), None)?;
                }
            }
            let (name, help) = EVENTS;
            let base = name.strip_suffix("_total").unwrap_or(name);
            let mut metric = encoder.encode_descriptor(base, help, None, MetricType::Counter)?;
            for (path, s) in &rows {
                for (event, v) in events(s) {
                    let labels = [("group", path.as_str()), ("event", event)];
                    metric
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
                }
            }
            let (name, help) = DYING;
            encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&dying_groups())
        })
    }
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
