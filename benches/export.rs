//! `memgroup::export::prometheus` over many groups: 100 tenants with 99 children each (10,000
//! groups), each holding a small block; the median time of several exports, with the size of
//! the output. `EXPORT_QUICK=1` makes it a smoke run (1,000 groups, 1 export). With feature
//! `prometheus-client`, the same for `export::Collector` through a registry's OpenMetrics
//! encoding (`cargo bench --features prometheus-client --bench export`).

use memgroup::{export, Group};
use std::hint::black_box;
use std::time::Instant;

#[global_allocator]
static ALLOC: memgroup::GroupAlloc = memgroup::GroupAlloc::system();

fn main() {
    let quick = std::env::var("EXPORT_QUICK").is_ok_and(|v| v == "1");
    let (groups, runs) = if quick { (1_000, 1) } else { (10_000, 11) };
    let tenants = 100;
    let per = groups / tenants - 1;
    let mut all = Vec::with_capacity(groups);
    let mut held = Vec::with_capacity(groups);
    for t in 0..tenants {
        let tenant = Group::new(&format!("bench-tenant-{t}")).expect("tenant");
        for c in 0..per {
            let child = tenant.child(&format!("part-{c}")).expect("child");
            held.push(child.run(|| black_box(vec![0u8; 256])));
            all.push(child);
        }
        all.push(tenant);
    }
    Group::root().flush();
    let mut times = Vec::with_capacity(runs);
    let mut bytes = 0;
    for _ in 0..runs {
        let mut out = String::new();
        let t = Instant::now();
        export::prometheus(&mut out);
        times.push(t.elapsed());
        bytes = black_box(&out).len();
    }
    times.sort();
    let median = times[times.len() / 2];
    println!(
        "export: {} groups, median of {runs}: {:.2} ms, {bytes} bytes of output",
        all.len() + 1,
        median.as_secs_f64() * 1e3
    );
    // The same figures through a prometheus_client registry (OpenMetrics text).
    #[cfg(feature = "prometheus-client")]
    {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(export::Collector));
        let mut times = Vec::with_capacity(runs);
        let mut bytes = 0;
        for _ in 0..runs {
            let mut out = String::new();
            let t = Instant::now();
            prometheus_client::encoding::text::encode(&mut out, &registry).expect("encoding");
            times.push(t.elapsed());
            bytes = black_box(&out).len();
        }
        times.sort();
        println!(
            "collector: {} groups, median of {runs}: {:.2} ms, {bytes} bytes of output",
            all.len() + 1,
            times[times.len() / 2].as_secs_f64() * 1e3
        );
    }
}
