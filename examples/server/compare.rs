//! The server example's tables, and its comparison: the same server and load run in child
//! processes with memgroup's allocator and the system allocator, with greedy active and idle.

use super::{mib, Report, Row, GREEDY, PEAK_SLACK};

// ---------------------------------------------------------------------------------------------
// Printing.

fn name(r: &Report) -> String {
    let alloc = if r.memgroup { "memgroup" } else { "System" };
    let greedy = if r.greedy { "active" } else { "idle" };
    format!("{alloc}, greedy {greedy}")
}

/// Column widths of the table: tenant, then 11 figures.
const WIDTHS: [usize; 12] = [7, 9, 7, 7, 7, 6, 9, 9, 8, 7, 9, 7];

fn print_cells<T: std::fmt::Display>(cells: [T; 12]) {
    let mut line = format!("{:<7}", cells[0]);
    for (cell, w) in cells.iter().zip(WIDTHS).skip(1) {
        line += &format!(" {cell:>w$}");
    }
    println!("{line}");
}

pub fn print_table(r: &Report) {
    let (secs, cpu, per, rss) = (r.secs, r.cpu_s, cpu_per_request(r), mib(r.rss_peak));
    let head = format!("{secs:.1} s, server CPU {cpu:.1} s ({per:.0} us a request)");
    println!("\n{}: {head}, peak RSS {rss}", name(r));
    print_cells([
        "tenant",
        "requests",
        "rps",
        "p50 ms",
        "p99 ms",
        "errors",
        "usage",
        "peak",
        "max",
        "refused",
        "cancelled",
        "evicted",
    ]);
    for row in &r.rows {
        let counted = |bytes| if r.memgroup { mib(bytes) } else { "-".into() };
        print_cells([
            row.tenant.clone(),
            row.requests.to_string(),
            format!("{:.0}", row.rps),
            format!("{:.2}", row.p50_ms),
            format!("{:.2}", row.p99_ms),
            row.errors.to_string(),
            counted(row.usage),
            counted(row.peak),
            mib(row.max),
            row.refused.to_string(),
            row.cancelled.to_string(),
            row.evicted.to_string(),
        ]);
    }
    let system = "System: nothing is charged, so no limit binds (no 413 or 503 from memgroup)";
    println!("{}", if r.memgroup { &r.residue } else { system });
}

fn cpu_per_request(r: &Report) -> f64 {
    r.cpu_s * 1e6 / r.rows.iter().map(|row| row.requests).sum::<u64>().max(1) as f64
}

/// The well-behaved tenants together: their rps, their mean p99.
fn well_behaved(r: &Report) -> (f64, f64) {
    let rows = &r.rows[..GREEDY];
    let p99 = rows.iter().map(|row| row.p99_ms).sum::<f64>() / GREEDY as f64;
    (rows.iter().map(|row| row.rps).sum(), p99)
}

fn print_summary(reports: &[&Report]) {
    println!("\nalpha, beta and gamma together (rps summed, p99 averaged):");
    let head = ["", "rps", "p99 ms", "server us/req", "peak RSS"];
    println!(
        "  {:<24} {:>8} {:>8} {:>14} {:>10}",
        head[0], head[1], head[2], head[3], head[4]
    );
    for r in reports {
        let ((rps, p99), per, rss) = (well_behaved(r), cpu_per_request(r), mib(r.rss_peak));
        println!(
            "  {:<24} {rps:>8.0} {p99:>8.2} {per:>14.0} {rss:>10}",
            name(r)
        );
    }
}

fn print_ratio(what: &str, a: &Report, b: &Report) {
    let ((rps_a, p99_a), (rps_b, p99_b)) = (well_behaved(a), well_behaved(b));
    let (rps, p99) = (rps_a / rps_b, p99_a / p99_b);
    let cpu = cpu_per_request(a) / cpu_per_request(b);
    let rss = a.rss_peak as f64 / b.rss_peak.max(1) as f64;
    let figures = format!("rps {rps:.2}x  p99 {p99:.2}x  server CPU/req {cpu:.2}x");
    println!("  {what:<34} {figures}  peak RSS {rss:.2}x");
}

// ---------------------------------------------------------------------------------------------
// The comparison: children in rounds, their tables, ratios and checks.

/// The four configurations: (memgroup, greedy active).
const CONFIGS: [(bool, bool); 4] = [(true, true), (false, true), (true, false), (false, false)];

fn child(secs: u64, memgroup: bool, greedy: bool) -> Report {
    let exe = std::env::current_exe().expect("own path");
    let out = std::process::Command::new(exe)
        .args(["--child", &secs.to_string()])
        .env("SERVER_ALLOC", if memgroup { "memgroup" } else { "system" })
        .env("SERVER_GREEDY", if greedy { "1" } else { "0" })
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run a child");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find_map(|l| l.strip_prefix("REPORT "));
    let report = line.and_then(|l| serde_json::from_str(l).ok());
    report.unwrap_or_else(|| panic!("child failed ({}): {text}", out.status))
}

/// Runs each configuration `rounds` times for `secs`, interleaved (so a machine busy with
/// something else weighs on all four alike), prints them, and returns what it finds wrong.
pub fn compare(secs: u64, rounds: usize) -> Vec<String> {
    println!("memgroup server example: memgroup against the system allocator, greedy active");
    println!("and idle; {rounds} rounds of {secs} s, each run a child process with its server");
    let mut runs: [Vec<Report>; 4] = Default::default();
    for round in 1..=rounds {
        eprintln!("round {round} of {rounds}");
        for ((memgroup, greedy), runs) in CONFIGS.into_iter().zip(&mut runs) {
            runs.push(child(secs, memgroup, greedy));
        }
    }
    let [m_on, s_on, m_off, s_off] = runs.map(merge);
    for r in [&m_on, &s_on, &m_off, &s_off] {
        print_table(r);
    }
    print_summary(&[&m_off, &s_off, &m_on, &s_on]);
    print_ratio("memgroup / System, greedy idle:", &m_off, &s_off);
    print_ratio("memgroup / System, greedy active:", &m_on, &s_on);
    print_ratio("greedy active / idle, memgroup:", &m_on, &m_off);
    print_ratio("greedy active / idle, System:", &s_on, &s_off);
    let mut failures: Vec<String> = [&m_on, &s_on, &m_off, &s_off]
        .into_iter()
        .flat_map(check_well_behaved)
        .collect();
    failures.extend(check_greedy(&m_on.rows[GREEDY]));
    failures
}

/// One configuration's rounds as one report: counts summed, latency the median round's,
/// usage and peak the highest.
fn merge(rounds: Vec<Report>) -> Report {
    let mut all = rounds[0].clone();
    all.secs = rounds.iter().map(|r| r.secs).sum();
    all.cpu_s = rounds.iter().map(|r| r.cpu_s).sum();
    all.rss_peak = rounds.iter().map(|r| r.rss_peak).max().unwrap();
    all.metrics_ok = rounds.iter().all(|r| r.metrics_ok);
    all.residue = rounds.last().unwrap().residue.clone();
    for (i, row) in all.rows.iter_mut().enumerate() {
        let of = |f: fn(&Row) -> u64| rounds.iter().map(|r| f(&r.rows[i])).sum::<u64>();
        let median = |f: fn(&Row) -> f64| {
            let mut v: Vec<f64> = rounds.iter().map(|r| f(&r.rows[i])).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let highest = |f: fn(&Row) -> usize| rounds.iter().map(|r| f(&r.rows[i])).max().unwrap();
        row.requests = of(|r| r.requests);
        row.rps = row.requests as f64 / all.secs;
        (row.p50_ms, row.p99_ms) = (median(|r| r.p50_ms), median(|r| r.p99_ms));
        row.errors = of(|r| r.errors);
        (row.refused, row.cancelled, row.evicted) =
            (of(|r| r.refused), of(|r| r.cancelled), of(|r| r.evicted));
        (row.usage, row.peak) = (highest(|r| r.usage), highest(|r| r.peak));
    }
    all
}

fn check_well_behaved(r: &Report) -> Vec<String> {
    let mut failures = Vec::new();
    for row in &r.rows[..GREEDY] {
        let (run, tenant, n) = (name(r), &row.tenant, row.requests);
        if row.errors > 0 || n == 0 {
            failures.push(format!(
                "{run}: {tenant} had {} errors in {n} requests",
                row.errors
            ));
        }
        if r.memgroup && row.peak > row.max {
            failures.push(format!("{run}: {tenant} peaked over its max"));
        }
    }
    if !r.metrics_ok {
        failures.push(format!("{}: /metrics lacked greedy's usage", name(r)));
    }
    failures
}

fn check_greedy(g: &Row) -> Vec<String> {
    let mut failures = Vec::new();
    let (peak, usage, max) = (mib(g.peak), mib(g.usage), mib(g.max));
    if g.peak > g.max + PEAK_SLACK {
        failures.push(format!("greedy peaked at {peak}, max {max}"));
    }
    if g.usage > g.max {
        failures.push(format!("greedy ended at {usage}, over its max {max}"));
    }
    if g.refused == 0 || g.cancelled == 0 {
        let (refused, cancelled) = (g.refused, g.cancelled);
        failures.push(format!(
            "greedy: {refused} refused, {cancelled} cancelled (want both > 0)"
        ));
    }
    failures
}
