//! The README's "Scrape from an existing server" snippets, compiled and served: the three ways
//! to put memgroup's figures on an axum `/metrics` route (the plain text exposition, a
//! `prometheus_client` registry, the `metrics` facade with `metrics-exporter-prometheus`).
//! Each module below holds the README's code as it is printed there; each test serves its
//! router on loopback, scrapes it over HTTP, and checks that a group's `usage` sample is the
//! group's flushed `stat()`.
//!
//!     cargo test --all-features --test readme_snippets
#![cfg(all(feature = "metrics", feature = "prometheus-client"))]

#[global_allocator]
static ALLOC: memgroup::GroupAlloc = memgroup::GroupAlloc::system();

use std::hint::black_box;
use std::io::{Read, Write};

/// README: "The text exposition, no dependency".
mod plain {
    use axum::{http::header, response::IntoResponse, routing::get, Router};

    async fn metrics() -> impl IntoResponse {
        let mut body = String::new();
        memgroup::export::prometheus(&mut body); // every live group, format 0.0.4
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
    }

    pub fn app() -> Router {
        Router::new().route("/metrics", get(metrics))
    }
}

/// README: "Feature `prometheus-client`".
mod client {
    use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};
    use prometheus_client::{encoding::text::encode, registry::Registry};
    use std::sync::Arc;

    async fn metrics(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
        let mut body = String::new();
        encode(&mut body, &registry).unwrap(); // memgroup's figures of this moment, and yours
        let kind = "application/openmetrics-text; version=1.0.0; charset=utf-8";
        ([(header::CONTENT_TYPE, kind)], body)
    }

    pub fn app() -> Router {
        let mut registry = Registry::default(); // the registry the server already has
        registry.register_collector(Box::new(memgroup::export::Collector));
        Router::new()
            .route("/metrics", get(metrics))
            .with_state(Arc::new(registry))
    }
}

/// README: "Feature `metrics`".
mod facade {
    use axum::{extract::State, routing::get, Router};
    use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

    async fn metrics(State(handle): State<PrometheusHandle>) -> String {
        memgroup::export::report(); // record memgroup's figures, then render everything
        handle.render()
    }

    pub fn app() -> Router {
        let handle = PrometheusBuilder::new().install_recorder().unwrap();
        Router::new()
            .route("/metrics", get(metrics))
            .with_state(handle)
    }
}

/// Serves `app` on a loopback port, GETs `/metrics` once over HTTP/1.1 and returns the status
/// line and the body.
fn scrape(app: axum::Router) -> (String, String) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    drop(rt);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("an HTTP response with a body");
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, body.to_string())
}

/// The value of the sample `name{group="<group>"}` in an exposition.
fn sample(body: &str, name: &str, group: &str) -> Option<f64> {
    let key = format!("{name}{{group=\"{group}\"}} ");
    body.lines()
        .find_map(|line| line.strip_prefix(&key))
        .map(|v| v.trim().parse().expect("a number"))
}

/// A group holding one 100,000-byte block, flushed: its `stat()` is exact and stays so while
/// nothing else allocates in it.
fn tenant(name: &str) -> (memgroup::Group, Vec<u8>, usize) {
    let g = memgroup::Group::new(name).unwrap();
    let block = g.run(|| black_box(vec![1u8; 100_000]));
    g.flush();
    let usage = g.stat().usage;
    assert!(usage >= 100_000, "the block is charged: {usage}");
    (g, block, usage)
}

fn check(app: axum::Router, group: &str) {
    let (g, block, usage) = tenant(group);
    let (status, body) = scrape(app);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}\n{body}");
    let got = sample(&body, "memgroup_usage_bytes", group);
    assert_eq!(got, Some(usage as f64), "{group}'s usage in:\n{body}");
    let root = sample(&body, "memgroup_usage_bytes", "/").expect("the root's sample");
    assert!(
        root >= usage as f64,
        "the root includes {group}: {root} < {usage}"
    );
    drop(block);
    g.remove().unwrap();
}

#[test]
fn plain_text_exposition_in_an_axum_handler() {
    check(plain::app(), "snippet-plain");
}

#[test]
fn prometheus_client_registry_in_an_axum_handler() {
    check(client::app(), "snippet-client");
}

#[test]
fn metrics_facade_with_metrics_exporter_prometheus() {
    check(facade::app(), "snippet-facade");
}
