// Export: the Prometheus text exposition, parsed whole by prometheus-parse, against stat().

include!("common.rs");

use common::{exact, fresh, fresh_child};
use memgroup::{export, Group, Stat};
use prometheus_parse::{Scrape, Value};
use std::hint::black_box;

fn scrape() -> Scrape {
    let mut out = String::new();
    export::prometheus(&mut out);
    Scrape::parse(out.lines().map(|l| Ok(l.to_string()))).expect("the exposition parses")
}

/// prometheus-parse 0.2 does not unescape label values (it returns the text between the
/// quotes as written), so the tests undo the format's three escapes here.
fn unescape(v: &str) -> String {
    let mut out = String::new();
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('\\') => out.push('\\'),
                Some('"') => out.push('"'),
                Some('n') => out.push('\n'),
                other => panic!("bad escape {other:?} in {v:?}"),
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn value(s: &Scrape, metric: &str, group: &str, event: Option<&str>) -> Option<f64> {
    let found: Vec<f64> = s
        .samples
        .iter()
        .filter(|x| x.metric == metric)
        .filter(|x| x.labels.get("group").map(unescape).as_deref() == Some(group))
        .filter(|x| event.is_none() || x.labels.get("event") == event)
        .map(|x| match x.value {
            Value::Gauge(v) | Value::Counter(v) => v,
            ref v => panic!("{metric} is not typed: {v:?}"),
        })
        .collect();
    assert!(
        found.len() <= 1,
        "{metric} for {group:?} appears {} times",
        found.len()
    );
    found.first().copied()
}

fn has(s: &Scrape, group: &str) -> bool {
    value(s, "memgroup_usage_bytes", group, None).is_some()
}

fn check(s: &Scrape, path: &str, st: &Stat) {
    let v = |m: &str| value(s, m, path, None);
    assert_eq!(v("memgroup_usage_bytes"), Some(st.usage as f64));
    assert_eq!(v("memgroup_kmem_bytes"), Some(st.kmem as f64));
    assert_eq!(v("memgroup_overhead_bytes"), Some(st.overhead as f64));
    assert_eq!(v("memgroup_allocs_total"), Some(st.allocs as f64));
    assert_eq!(v("memgroup_frees_total"), Some(st.frees as f64));
    assert_eq!(v("memgroup_max_bytes"), st.max.map(|x| x as f64));
    assert_eq!(v("memgroup_high_bytes"), st.high.map(|x| x as f64));
    assert_eq!(v("memgroup_kmem_max_bytes"), st.kmem_max.map(|x| x as f64));
    assert!(v("memgroup_peak_bytes").unwrap() >= st.usage as f64);
    for e in ["high", "max", "fail"] {
        assert!(value(s, "memgroup_events_total", path, Some(e)).is_some());
    }
}

/// A scrape: the text exposition, or (feature prometheus-client) a `Collector` encoding.
type Scraper<'a> = &'a dyn Fn() -> Scrape;

/// A group with every limit set holds 100,000 bytes: each scrape shows its flushed `stat()`
/// exactly, and the process-wide `memgroup_dying_groups`. The group is returned still
/// holding the bytes.
fn limited_group_matches_stat(prefix: &str, scrapes: &[Scraper]) -> (Group, Vec<u8>) {
    let g = fresh(prefix);
    g.set_max(Some(64 << 20));
    g.set_high(Some(48 << 20));
    g.set_kmem_max(Some(8 << 20));
    let held = g.run(|| black_box(vec![7u8; 100_000]));
    let st = exact(&g);
    assert!(st.usage >= 100_000);
    for scrape in scrapes {
        let s = scrape();
        check(&s, &g.name(), &st);
        assert!(s
            .samples
            .iter()
            .any(|x| x.metric == "memgroup_dying_groups" && x.labels.is_empty()));
    }
    (g, held)
}

/// A parent's figures include its child's, and the root's include the parent's.
fn parent_includes_children(prefix: &str, scrapes: &[Scraper]) {
    let p = fresh(prefix);
    let c = fresh_child(&p, "kid");
    let held = c.run(|| black_box(vec![1u8; 50_000]));
    let (sp, sc) = (exact(&p), exact(&c));
    assert!(sp.usage >= sc.usage && sc.usage >= 50_000);
    for scrape in scrapes {
        let s = scrape();
        check(&s, &c.name(), &sc);
        check(&s, &p.name(), &sp);
        assert!(value(&s, "memgroup_usage_bytes", "/", None).unwrap() >= sp.usage as f64);
    }
    drop(held);
    c.remove().unwrap();
    p.remove().unwrap();
}

/// Group names with a quote, a backslash and a newline are escaped on the wire as the format
/// says, and come back whole.
fn escaped_names_round_trip(prefix: &str, scrapes: &[Scraper]) {
    let q = fresh(prefix);
    let a = q.child("a\"b\\c").unwrap();
    let n = q.child("line\nbreak").unwrap();
    let qn = q.name();
    assert_eq!(a.name(), format!("{qn}/a\"b\\c"));
    assert_eq!(n.name(), format!("{qn}/line\nbreak"));
    for scrape in scrapes {
        let s = scrape();
        let raw: Vec<&str> = s
            .samples
            .iter()
            .filter(|x| x.metric == "memgroup_usage_bytes")
            .filter_map(|x| x.labels.get("group"))
            .collect();
        // As written on the wire (prometheus-parse hands the escaped text back as is).
        assert!(
            raw.contains(&format!("{qn}/a\\\"b\\\\c").as_str()),
            "{raw:?}"
        );
        assert!(
            raw.contains(&format!("{qn}/line\\nbreak").as_str()),
            "{raw:?}"
        );
        assert!(has(&s, &a.name()) && has(&s, &n.name()));
        check(&s, &a.name(), &exact(&a));
    }
    a.remove().unwrap();
    n.remove().unwrap();
    q.remove().unwrap();
}

#[test]
fn export_values_equal_stat_after_flush() {
    let (g, held) = limited_group_matches_stat("exp-val", &[&scrape]);
    assert!(scrape().docs.contains_key("memgroup_usage_bytes"));
    drop(held);
    g.remove().unwrap();
}

#[test]
fn export_parent_includes_children() {
    parent_includes_children("exp-par", &[&scrape]);
}

#[test]
fn export_limits_absent_when_unlimited() {
    let g = fresh("exp-lim");
    let path = g.name();
    let s = scrape();
    for m in [
        "memgroup_max_bytes",
        "memgroup_high_bytes",
        "memgroup_kmem_max_bytes",
    ] {
        assert_eq!(value(&s, m, &path, None), None, "{m}");
    }
    g.set_max(Some(1 << 30));
    g.set_high(Some(1 << 29));
    g.set_kmem_max(Some(1 << 28));
    let s = scrape();
    assert_eq!(
        value(&s, "memgroup_max_bytes", &path, None),
        Some((1u64 << 30) as f64)
    );
    assert_eq!(
        value(&s, "memgroup_high_bytes", &path, None),
        Some((1u64 << 29) as f64)
    );
    assert_eq!(
        value(&s, "memgroup_kmem_max_bytes", &path, None),
        Some((1u64 << 28) as f64)
    );
    g.set_max(None);
    let s = scrape();
    assert_eq!(value(&s, "memgroup_max_bytes", &path, None), None);
    g.remove().unwrap();
}

#[test]
fn export_escaped_names_round_trip() {
    escaped_names_round_trip("exp-esc", &[&scrape]);
}

#[test]
fn export_removed_group_absent() {
    let g = fresh("exp-rm");
    let path = g.name();
    assert!(has(&scrape(), &path));
    g.remove().unwrap();
    assert!(!has(&scrape(), &path));
}

#[test]
fn children_lists_live_children_only() {
    let p = fresh("exp-kids");
    let a = p.child("a").unwrap();
    let b = p.child("b").unwrap();
    let c = p.child("c").unwrap();
    let _grand = a.child("g").unwrap();
    let mut names: Vec<String> = p.children().iter().map(|g| g.name()).collect();
    names.sort();
    let pn = p.name();
    assert_eq!(
        names,
        [format!("{pn}/a"), format!("{pn}/b"), format!("{pn}/c")]
    );
    b.remove().unwrap();
    let kids = p.children();
    assert_eq!(kids.len(), 2);
    assert!(kids.contains(&a) && kids.contains(&c));
    assert!(c.children().is_empty());
    assert!(Group::root().children().contains(&p));
}

#[cfg(feature = "metrics")]
#[test]
fn metrics_report_records_the_figures_of_stat() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let g = fresh("exp-metrics");
    g.set_max(Some(64 << 20));
    let held = g.run(|| black_box(vec![5u8; 200_000]));
    let s = exact(&g);
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, memgroup::export::report);
    let name = g.name();
    let mut found = std::collections::HashMap::new();
    for (key, unit, _help, value) in snapshotter.snapshot().into_vec() {
        let k = key.key();
        let labels: Vec<(String, String)> = k
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        if labels.iter().any(|(k, v)| k == "group" && *v == name) {
            let event = labels.iter().find(|(k, _)| k == "event").map(|(_, v)| v.clone());
            found.insert((k.name().to_owned(), event), (unit, value));
        }
    }
    let gauge = |n: &str| match found.get(&(n.to_owned(), None)) {
        Some((_, DebugValue::Gauge(v))) => v.into_inner() as usize,
        other => panic!("{n}: {other:?}"),
    };
    let counter = |n: &str, e: Option<&str>| match found.get(&(n.to_owned(), e.map(str::to_owned))) {
        Some((_, DebugValue::Counter(v))) => *v,
        other => panic!("{n} {e:?}: {other:?}"),
    };
    assert_eq!(gauge("memgroup_usage_bytes"), s.usage);
    assert_eq!(gauge("memgroup_kmem_bytes"), s.kmem);
    assert_eq!(gauge("memgroup_max_bytes"), 64 << 20);
    assert!(!found.contains_key(&("memgroup_high_bytes".to_owned(), None)), "unset limit recorded");
    assert_eq!(counter("memgroup_allocs_total", None), s.allocs);
    assert_eq!(counter("memgroup_frees_total", None), s.frees);
    assert_eq!(counter("memgroup_events_total", Some("fail")), s.events.fail);
    assert_eq!(
        found[&("memgroup_usage_bytes".to_owned(), None)].0,
        Some(metrics::Unit::Bytes),
        "described with its unit"
    );
    drop(held);
}

/// The `prometheus_client` collector: the same figures, encoded by the registry at scrape time.
#[cfg(feature = "prometheus-client")]
mod collector {
    use super::*;
    use prometheus_client::encoding::{prometheus_text, text};
    use prometheus_client::registry::Registry;
    use std::collections::{BTreeMap, BTreeSet};

    fn registry() -> Registry {
        let mut r = Registry::default();
        r.register_collector(Box::new(export::Collector));
        r
    }

    fn parse(out: &str) -> Scrape {
        Scrape::parse(out.lines().map(|l| Ok(l.to_string()))).expect("the encoding parses")
    }

    /// The registry's OpenMetrics text, parsed. prometheus-parse 0.2 knows the 0.0.4 format,
    /// where a counter's `# TYPE` names its samples (`x_total`); OpenMetrics names the family
    /// (`# TYPE x counter`, samples `x_total`), so the parser leaves those samples untyped. Here
    /// they get the type their family's `# TYPE` line gives, and no other sample may stay
    /// untyped.
    fn openmetrics() -> (String, Scrape) {
        let mut out = String::new();
        text::encode(&mut out, &registry()).expect("encoding");
        assert!(out.ends_with("# EOF\n"), "{}", &out[out.len().saturating_sub(200)..]);
        let mut s = parse(&out);
        let counters: BTreeSet<String> = out
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.strip_suffix(" counter"))
            .map(|f| format!("{f}_total"))
            .collect();
        for x in &mut s.samples {
            if let Value::Untyped(v) = x.value {
                assert!(counters.contains(&x.metric), "{} untyped", x.metric);
                x.value = Value::Counter(v);
            }
        }
        (out, s)
    }

    /// The registry's Prometheus 0.0.4 text, parsed.
    fn text004() -> Scrape {
        let mut out = String::new();
        prometheus_text::encode(&mut out, &registry()).expect("encoding");
        parse(&out)
    }

    /// Both encodings of the registry, parsed.
    const ENCODINGS: &[Scraper] = &[&|| openmetrics().1, &text004];

    #[test]
    fn collector_values_equal_stat_after_flush() {
        let (g, held) = limited_group_matches_stat("col-val", ENCODINGS);
        let (out, _) = openmetrics();
        for m in ["memgroup_usage_bytes", "memgroup_kmem_max_bytes"] {
            assert!(out.contains(&format!("\n# UNIT {m} bytes\n")), "{m} has no unit");
        }
        assert!(out.contains("\n# TYPE memgroup_allocs counter\n"));
        drop(held);
        let st = exact(&g);
        assert_eq!(st.usage, 0);
        let path = g.name();
        check(&openmetrics().1, &path, &st);
        g.remove().unwrap();
        assert!(!has(&openmetrics().1, &path), "a removed group is absent");
    }

    #[test]
    fn collector_parent_includes_children() {
        parent_includes_children("col-par", ENCODINGS);
    }

    #[test]
    fn collector_escaped_names_round_trip() {
        escaped_names_round_trip("col-esc", ENCODINGS);
    }

    /// A sample's metric name and its labels, sorted.
    type Series = (String, Vec<(String, String)>);

    /// Each sample's series and type, for the groups under `prefix`, and the unlabelled ones.
    fn shape(s: &Scrape, prefix: &str) -> BTreeMap<Series, &'static str> {
        s.samples
            .iter()
            .filter(|x| {
                x.labels
                    .get("group")
                    .is_none_or(|g| unescape(g).starts_with(prefix))
            })
            .map(|x| {
                let mut labels: Vec<(String, String)> = x
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                labels.sort();
                let kind = match x.value {
                    Value::Gauge(_) => "gauge",
                    Value::Counter(_) => "counter",
                    ref v => panic!("{}: {v:?}", x.metric),
                };
                ((x.metric.clone(), labels), kind)
            })
            .collect()
    }

    #[test]
    fn collector_has_the_metrics_of_the_text_exposition() {
        let p = fresh("col-same");
        let c = fresh_child(&p, "kid");
        c.set_max(Some(1 << 30));
        p.set_high(Some(1 << 29));
        let prefix = p.name();
        let ours = scrape();
        let want = shape(&ours, &prefix);
        // 2 groups: 2 x 4 byte gauges and the 2 limits set, 2 x 2 counts, 2 x 3 events, and
        // dying_groups.
        assert_eq!(want.len(), 10 + 4 + 6 + 1, "{want:?}");
        let (_, om) = openmetrics();
        let t = text004();
        assert_eq!(shape(&om, &prefix), want, "OpenMetrics");
        assert_eq!(shape(&t, &prefix), want, "0.0.4");
        // The same help texts: 0.0.4 keys them by sample name, OpenMetrics by family name.
        assert_eq!(t.docs, ours.docs);
        for (name, help) in &ours.docs {
            let family = name.strip_suffix("_total").unwrap_or(name);
            assert_eq!(om.docs.get(family), Some(help), "{name}");
        }
        c.remove().unwrap();
        p.remove().unwrap();
    }

    #[test]
    fn collector_names_take_the_registry_prefix() {
        let g = fresh("col-prefix");
        let mut r = Registry::with_prefix("app");
        r.register_collector(Box::new(export::Collector));
        let mut out = String::new();
        text::encode(&mut out, &r).expect("encoding");
        let s = parse(&out);
        let path = g.name();
        let named = |m: &str| {
            s.samples
                .iter()
                .any(|x| x.metric == m && x.labels.get("group") == Some(path.as_str()))
        };
        assert!(named("app_memgroup_usage_bytes") && named("app_memgroup_allocs_total"));
        assert!(s.samples.iter().all(|x| x.metric.starts_with("app_memgroup_")));
        assert!(out.contains("\n# UNIT app_memgroup_usage_bytes bytes\n"));
        g.remove().unwrap();
    }

    #[test]
    fn collector_allocates_in_the_root_scope() {
        let g = fresh("col-scope");
        // Encode once first, so the registry's and the encoder's lazily made state exists.
        let empty = Registry::default();
        let full = registry();
        let mut out = String::with_capacity(8 << 20);
        let mut allocs = |r: &Registry| {
            out.clear();
            let before = exact(&g).allocs;
            g.run(|| text::encode(&mut out, r)).unwrap();
            exact(&g).allocs - before
        };
        let (bare, with) = (allocs(&empty), allocs(&full));
        assert!(
            !out.is_empty() && out.len() < out.capacity(),
            "the output did not grow"
        );
        assert_eq!(
            with, bare,
            "the collector's own allocations were charged to the caller's group"
        );
        g.remove().unwrap();
    }
}
