//! A multi-tenant HTTP server (tokio, axum) where each tenant is a memgroup group, and a load
//! generator on loopback with one tenant misbehaving.
//!
//!     cargo run --release --example server              # until Ctrl-C (or --secs N, 600)
//!     cargo run --release --example server -- --smoke   # the short comparison CI runs
//!     cargo run --release --example server -- --compare 10   # the same, runs of 10 s
//!
//! A request names its tenant by path (`POST /t/alpha/items`) or by header (`POST /items` with
//! `x-tenant: alpha`). Each tenant is a child of the `tenants` group with its own `max` and
//! `high`, and a cache of computed answers with a shrinker that evicts its oldest entries when
//! memgroup asks. `POST .../items` reads a JSON body (its buffer reserved inside
//! `memgroup::fallible`: a body over the tenant's limit is refused with 413, before it is read),
//! parses it with serde_json, answers a summary and keeps it in the cache. `POST .../work?kib=N`
//! builds N KiB in 64 KiB steps, awaiting between steps, under `Group::guard`: work that takes
//! its tenant over `max` is cancelled and answered with 503. `GET /metrics` serves
//! `memgroup::export::prometheus`. Every request's future runs `in_group` of its tenant.
//!
//! The load generator (a hyper client, 56 connections) drives alpha, beta and gamma with small
//! requests, and `greedy` with 16 MiB bodies and work that never stops growing. It prints a
//! table per tenant: client-side requests, rps and p50/p99 latency, the group's usage and peak,
//! and how many requests the server refused (413) and cancelled (503).
//!
//! `--smoke` (3 s runs) and `--compare SECS` run the binary again as child processes, four
//! ways: with memgroup's allocator and with the plain system allocator (the
//! `#[global_allocator]` below chooses on `SERVER_ALLOC` at the first allocation), each with
//! greedy active and idle; 3 interleaved rounds, so a machine busy with other work weighs on
//! all four alike. They print the four tables, a summary and its ratios: what memgroup costs,
//! and what a greedy tenant costs the others with and without it, in rps, p99, the server's
//! CPU time per request (its threads' own, whatever CPU the process got) and peak RSS. Under
//! the system allocator nothing is charged, so no limit can bind. Both exit non-zero if greedy
//! was not held at its limit or a well-behaved tenant saw an error.

use axum::body::{Body, Bytes};
use axum::extract::{Extension, Query, Request};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use memgroup::{Group, GroupFutureExt, Shrinker, ShrinkerHandle};
use serde::{Deserialize, Serialize};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::CStr;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// The allocator: memgroup's, or the plain system allocator, chosen once.

/// memgroup's `GroupAlloc` or `System`, as `SERVER_ALLOC` says (`system`; anything else or
/// unset: memgroup). Decided at the first allocation, before any block exists, and never
/// changed: a block is always freed by the allocator that made it.
struct Switch;

static MEMGROUP: memgroup::GroupAlloc = memgroup::GroupAlloc::system();
/// 0: not decided yet, 1: memgroup, 2: System.
static MODE: AtomicU8 = AtomicU8::new(0);

#[inline]
fn memgroup_on() -> bool {
    match MODE.load(Relaxed) {
        0 => decide(),
        mode => mode == 1,
    }
}

#[cold]
fn decide() -> bool {
    // SAFETY: getenv reads the environment without allocating, and nothing in this program
    // writes the environment (children get theirs through `Command::env`). Two threads
    // deciding at once read the same value.
    let system = unsafe {
        let value = libc::getenv(c"SERVER_ALLOC".as_ptr());
        !value.is_null() && CStr::from_ptr(value) == c"system"
    };
    MODE.store(if system { 2 } else { 1 }, Relaxed);
    !system
}

/// `$method` of the allocator this run uses.
macro_rules! either {
    ($method:ident($($arg:expr),*)) => {
        // SAFETY: the caller's contract, passed on; a block given back (dealloc, realloc)
        // came from this same allocator, since the choice never changes.
        unsafe {
            match memgroup_on() {
                true => MEMGROUP.$method($($arg),*),
                false => System.$method($($arg),*),
            }
        }
    };
}

// SAFETY: every call goes to one of two allocators, the same one for the whole run (`MODE`
// never changes once decided), so each block is freed and resized by the allocator that made
// it; both uphold `GlobalAlloc`'s contract.
unsafe impl GlobalAlloc for Switch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        either!(alloc(layout))
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        either!(alloc_zeroed(layout))
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        either!(dealloc(ptr, layout))
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        either!(realloc(ptr, layout, new_size))
    }
}

#[global_allocator]
static ALLOC: Switch = Switch;

// ---------------------------------------------------------------------------------------------
// Configuration.

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// The tenants: name, max, high. alpha, beta and gamma behave; greedy does not.
const TENANTS: [(&str, usize, usize); 4] = [
    ("alpha", 24 * MIB, 16 * MIB),
    ("beta", 24 * MIB, 16 * MIB),
    ("gamma", 24 * MIB, 16 * MIB),
    ("greedy", 8 * MIB, 6 * MIB),
];
const GREEDY: usize = 3;
/// Entries a tenant's cache keeps at most (about 1 KiB each), whatever the allocator.
const CACHE_ENTRIES: usize = 4096;
/// Distinct keys a tenant asks for: about half its requests hit the cache.
const KEYS: u64 = 8192;
/// Refused whatever the allocator: a body or a piece of work larger than this.
const BODY_CAP: usize = 64 * MIB;
const WORK_CAP_KIB: usize = 64 * 1024;
/// One step of work, between two awaits.
const STEP: usize = 64 * KIB;
/// Connections per well-behaved tenant, and greedy's.
const CONNECTIONS: usize = 16;
const GREEDY_CONNECTIONS: usize = 8;
/// greedy's body, larger than its whole `max`, and the work it asks for (1 GiB).
const HUGE_BODY: usize = 16 * MIB;
const RUNAWAY_KIB: usize = 1 << 20;
/// How far above its `max` greedy's peak may go for `--smoke` to count it held: per-CPU stock
/// and per-thread pocket slack, and one 64 KiB step per guarded future between two checks.
const PEAK_SLACK: usize = 2 * MIB;

// ---------------------------------------------------------------------------------------------
// The server's tenants and their caches.

struct Tenant {
    name: &'static str,
    group: Group,
    cache: Arc<Cache>,
    _shrinker: ShrinkerHandle,
    refused: AtomicU64,
    cancelled: AtomicU64,
}

/// Computed answers by key, oldest first; the memory is the tenant's (kernel memory: the
/// server keeps it on the tenant's behalf).
#[derive(Default)]
struct Cache {
    inner: Mutex<Entries>,
    evicted: AtomicU64,
}

#[derive(Default)]
struct Entries {
    map: HashMap<String, Bytes>,
    order: VecDeque<String>,
    bytes: usize,
}

impl Cache {
    fn get(&self, key: &str) -> Option<Bytes> {
        self.inner.lock().unwrap().map.get(key).cloned()
    }

    /// Allocates under the lock only while the map and queue grow (up to `CACHE_ENTRIES`): a
    /// charge at `max` then waits for direct reclaim, whose shrinker needs this lock, 10 ms at
    /// most (see the README's "Direct reclaim").
    fn insert(&self, key: String, value: Bytes) {
        let (queued, len) = (key.clone(), key.len() + value.len());
        let mut e = self.inner.lock().unwrap();
        if e.map.len() >= CACHE_ENTRIES {
            e.evict(1);
        }
        e.bytes += len;
        match e.map.insert(key, value) {
            Some(old) => e.bytes -= queued.len() + old.len(),
            None => e.order.push_back(queued),
        }
    }

    fn clear(&self) {
        *self.inner.lock().unwrap() = Entries::default();
    }
}

impl Entries {
    fn evict(&mut self, n: usize) -> usize {
        let n = n.min(self.order.len());
        for key in self.order.drain(..n) {
            let value = self.map.remove(&key).unwrap();
            self.bytes -= key.len() + value.len();
        }
        n
    }
}

/// The cache's shrinker: memgroup calls it on its notifier thread when the tenant goes above
/// `high` (background reclaim) or a charge is about to pass `max` (direct reclaim).
struct Evict(Arc<Cache>);

impl Shrinker for Evict {
    fn chunk_size(&self) -> usize {
        let e = self.0.inner.lock().unwrap();
        (e.bytes / e.map.len().max(1)).max(64) + 64 // the entry, its key twice, the map slot
    }

    fn count(&self) -> usize {
        self.0.inner.lock().unwrap().map.len()
    }

    fn shrink(&self, chunks: usize) -> usize {
        let n = self.0.inner.lock().unwrap().evict(chunks);
        self.0.evicted.fetch_add(n as u64, Relaxed);
        n
    }
}

fn tenants() -> Result<Vec<Arc<Tenant>>, memgroup::Error> {
    let parent = Group::new("tenants")?;
    parent.set_max(Some(128 * MIB));
    let mut list = Vec::new();
    for (name, max, high) in TENANTS {
        let group = parent.child(name)?;
        group.set_max(Some(max));
        group.set_high(Some(high));
        let cache = Arc::new(Cache::default());
        let shrinker = group.register_shrinker(Evict(cache.clone()));
        list.push(Arc::new(Tenant {
            name,
            group,
            cache,
            _shrinker: shrinker,
            refused: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
        }));
    }
    Ok(list)
}

// ---------------------------------------------------------------------------------------------
// The server.

fn router(tenants: Arc<Vec<Arc<Tenant>>>) -> Router {
    let per_tenant = Router::new()
        .route("/t/{tenant}/items", post(items))
        .route("/items", post(items))
        .route("/t/{tenant}/work", post(work))
        .route("/work", post(work))
        .route_layer(middleware::from_fn(move |req, next| {
            in_tenant(tenants.clone(), req, next)
        }));
    Router::new()
        .merge(per_tenant)
        .route("/metrics", get(metrics))
}

/// Finds the request's tenant (`/t/{tenant}/...` or the `x-tenant` header) and runs the rest
/// of the request, the handler's future, in its group.
async fn in_tenant(tenants: Arc<Vec<Arc<Tenant>>>, mut req: Request, next: Next) -> Response {
    let name = match req.uri().path().strip_prefix("/t/") {
        Some(rest) => rest.split('/').next(),
        None => req.headers().get("x-tenant").and_then(|v| v.to_str().ok()),
    };
    let Some(tenant) = tenants.iter().find(|t| Some(t.name) == name).cloned() else {
        return (StatusCode::NOT_FOUND, "no such tenant\n").into_response();
    };
    let group = tenant.group.clone();
    req.extensions_mut().insert(tenant);
    next.run(req).in_group(&group).await
}

/// What `POST .../items` reads.
#[derive(Serialize, Deserialize)]
struct Item {
    key: String,
    values: Vec<f64>,
    text: String,
}

/// What it answers, and keeps in the cache.
#[derive(Serialize)]
struct Summary<'a> {
    tenant: &'a str,
    key: &'a str,
    count: usize,
    mean: f64,
    median: f64,
    top: Vec<f64>,
    words: usize,
    distinct_words: Vec<&'a str>,
}

async fn items(Extension(t): Extension<Arc<Tenant>>, headers: HeaderMap, body: Body) -> Response {
    let body = match read_body(&headers, body).await {
        Ok(body) => body,
        Err(status) => {
            let refused = status == StatusCode::PAYLOAD_TOO_LARGE;
            t.refused.fetch_add(u64::from(refused), Relaxed);
            let why = if refused {
                "over the tenant's memory limit\n"
            } else {
                "bad body\n"
            };
            let close = [(header::CONNECTION, "close")]; // the rest of the body is not read
            return (status, close, why).into_response();
        }
    };
    let item: Item = match serde_json::from_slice(&body) {
        Ok(item) => item,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    drop(body);
    let answer = match t.cache.get(&item.key) {
        Some(hit) => hit,
        None => {
            let answer = memgroup::kernel(|| Bytes::from(summarize(t.name, &item)));
            t.cache.insert(item.key, answer.clone());
            answer
        }
    };
    ([(header::CONTENT_TYPE, "application/json")], answer).into_response()
}

/// Reads a body into a buffer reserved inside `fallible`: over the tenant's limit (or past
/// `BODY_CAP`) it is refused with 413, by its declared length before any of it is read.
async fn read_body(headers: &HeaderMap, mut body: Body) -> Result<Vec<u8>, StatusCode> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .unwrap_or(0);
    let mut buf = Vec::new();
    reserve(&mut buf, declared)?;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| StatusCode::BAD_REQUEST)?;
        if let Ok(data) = frame.into_data() {
            reserve(&mut buf, data.len())?;
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf)
}

fn reserve(buf: &mut Vec<u8>, more: usize) -> Result<(), StatusCode> {
    if buf.len().saturating_add(more) > BODY_CAP {
        return Err(StatusCode::PAYLOAD_TOO_LARGE);
    }
    memgroup::fallible(|| buf.try_reserve(more)).map_err(|_| StatusCode::PAYLOAD_TOO_LARGE)
}

fn summarize(tenant: &str, item: &Item) -> Vec<u8> {
    let mut sorted = item.values.clone();
    sorted.sort_by(f64::total_cmp);
    let count = sorted.len();
    let mean = sorted.iter().sum::<f64>() / count.max(1) as f64;
    let median = sorted.get(count / 2).copied().unwrap_or(0.0);
    let words: Vec<&str> = item.text.split_whitespace().collect();
    let mut seen = HashSet::new();
    let distinct_words = words.iter().copied().filter(|w| seen.insert(*w)).collect();
    let top = sorted.iter().rev().take(8).copied().collect();
    let summary = Summary {
        tenant,
        key: &item.key,
        count,
        mean,
        median,
        top,
        words: words.len(),
        distinct_words,
    };
    serde_json::to_vec(&summary).unwrap()
}

#[derive(Deserialize)]
struct WorkQuery {
    kib: usize,
}

/// Work that grows in 64 KiB steps, awaiting between them, cancelled by `guard` once the
/// tenant is over its `max`.
async fn work(Extension(t): Extension<Arc<Tenant>>, Query(q): Query<WorkQuery>) -> Response {
    let steps = q.kib.min(WORK_CAP_KIB) * KIB / STEP;
    match t.group.guard(grow(steps)).await {
        Ok(sum) => format!("{{\"steps\":{steps},\"sum\":{sum}}}\n").into_response(),
        Err(_) => {
            t.cancelled.fetch_add(1, Relaxed);
            let msg = "cancelled: over the tenant's memory limit\n";
            (StatusCode::SERVICE_UNAVAILABLE, msg).into_response()
        }
    }
}

async fn grow(steps: usize) -> u64 {
    let mut held = Vec::new();
    for i in 0..steps {
        held.push(std::hint::black_box(vec![i as u8; STEP]));
        tokio::task::yield_now().await;
    }
    held.iter().map(|step| u64::from(step[STEP - 1])).sum()
}

async fn metrics() -> Response {
    let mut out = String::new();
    Group::root().flush(); // exact figures
    memgroup::export::prometheus(&mut out);
    let kind = [(header::CONTENT_TYPE, "text/plain; version=0.0.4")];
    (kind, out).into_response()
}

// ---------------------------------------------------------------------------------------------
// The load generator.

/// One tenant's figures, as the client sees them.
struct Load {
    total: Mutex<Histogram<u64>>,
    /// Since the last progress line.
    recent: Mutex<Histogram<u64>>,
    /// Responses not expected of the tenant, and transport errors.
    errors: AtomicU64,
}

impl Load {
    fn new() -> Load {
        let hist = || Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap());
        Load {
            total: hist(),
            recent: hist(),
            errors: AtomicU64::new(0),
        }
    }

    fn record(&self, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, 60_000_000);
        self.total.lock().unwrap().record(us).unwrap();
        self.recent.lock().unwrap().record(us).unwrap();
    }
}

/// What a client sends next.
enum Ask {
    Item,
    Work(usize),
    Huge,
}

/// What a client shares with the others: greedy's body, the stop flag, and its own seed.
struct Env {
    huge: Bytes,
    stop: Arc<AtomicBool>,
    seed: u64,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One connection's closed loop: send, wait for the whole answer, record, repeat, until
/// `stop`. A connection the server closed (after a 413) is opened again.
async fn client(addr: SocketAddr, tenant: &'static str, load: Arc<Load>, env: Env) {
    let (huge, stop, mut seed) = (env.huge, env.stop, env.seed);
    let greedy = tenant == TENANTS[GREEDY].0;
    let mut sender: Option<Sender> = None;
    for n in 0u64.. {
        if stop.load(Relaxed) {
            break;
        }
        let ask = match (greedy, n % 3, rand(&mut seed) % 16) {
            (true, 0, _) => Ask::Huge,
            (true, 1, _) => Ask::Work(RUNAWAY_KIB),
            (false, _, 0) => Ask::Work(512),
            _ => Ask::Item,
        };
        let mut s = match sender.take() {
            Some(s) if !s.is_closed() => s,
            _ => match connect(addr).await {
                Ok(s) => s,
                Err(_) => {
                    load.errors.fetch_add(1, Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let start = Instant::now();
        let status = send(&mut s, request(tenant, &ask, &huge, &mut seed)).await;
        load.record(start.elapsed());
        // greedy's bodies are refused and its work cancelled (a refused body may close the
        // connection while it is still being sent); anything but 200 is an error for the others.
        let expected = match (status, greedy) {
            (Ok(StatusCode::OK), _) => true,
            (Ok(StatusCode::PAYLOAD_TOO_LARGE | StatusCode::SERVICE_UNAVAILABLE), true) => true,
            (Err(_), true) => matches!(ask, Ask::Huge),
            _ => false,
        };
        if !expected {
            load.errors.fetch_add(1, Relaxed);
        }
        if status.is_ok_and(|s| s != StatusCode::PAYLOAD_TOO_LARGE) {
            sender = Some(s); // the server closes the connection after a 413
        }
    }
}

async fn connect(addr: SocketAddr) -> Result<Sender, Box<dyn std::error::Error + Send + Sync>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move { drop(conn.await) });
    Ok(sender)
}

async fn send(s: &mut Sender, req: hyper::Request<Full<Bytes>>) -> Result<StatusCode, ()> {
    s.ready().await.map_err(drop)?;
    let resp = s.send_request(req).await.map_err(drop)?;
    let status = resp.status();
    resp.into_body().collect().await.map_err(drop)?;
    Ok(status)
}

fn request(tenant: &str, ask: &Ask, huge: &Bytes, seed: &mut u64) -> hyper::Request<Full<Bytes>> {
    // gamma names itself by header, the others by path.
    let by_header = tenant == "gamma";
    let (path, body) = match ask {
        Ask::Item => ("items".to_string(), Bytes::from(item_body(seed))),
        Ask::Work(kib) => (format!("work?kib={kib}"), Bytes::new()),
        Ask::Huge => ("items".to_string(), huge.clone()),
    };
    let uri = match by_header {
        true => format!("/{path}"),
        false => format!("/t/{tenant}/{path}"),
    };
    hyper::Request::post(uri)
        .header(header::HOST, "127.0.0.1")
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-tenant", tenant)
        .body(Full::new(body))
        .unwrap()
}

const WORDS: [&str; 16] = [
    "memory", "cgroup", "tenant", "limit", "charge", "stock", "pocket", "page", "slab", "shrink",
    "pressure", "reclaim", "group", "batch", "peak", "usage",
];

fn item_body(seed: &mut u64) -> Vec<u8> {
    let key = format!("k{}", rand(seed) % KEYS);
    let values = (0..64)
        .map(|_| (rand(seed) % 100_000) as f64 / 100.0)
        .collect();
    let text = (0..48)
        .map(|_| WORDS[rand(seed) as usize % WORDS.len()])
        .collect::<Vec<_>>()
        .join(" ");
    serde_json::to_vec(&Item { key, values, text }).unwrap()
}

/// greedy's body: a valid item of `HUGE_BODY` bytes, numbers mostly.
fn huge_body() -> Vec<u8> {
    let mut body = br#"{"key":"huge","text":"greedy","values":[1.5"#.to_vec();
    while body.len() < HUGE_BODY - 8 {
        body.extend_from_slice(b",12345.5");
    }
    body.extend_from_slice(b"]}");
    body
}

fn rand(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Scrapes `/metrics` every second, as Prometheus would; true if greedy's usage was there
/// every time.
async fn scrape(addr: SocketAddr, stop: Arc<AtomicBool>) -> bool {
    let mut ok = true;
    while !stop.load(Relaxed) {
        let text = async {
            let mut s = connect(addr).await.ok()?;
            let req = hyper::Request::get("/metrics")
                .header(header::HOST, "127.0.0.1")
                .body(Full::new(Bytes::new()))
                .ok()?;
            let body = s.send_request(req).await.ok()?.into_body().collect().await;
            String::from_utf8(body.ok()?.to_bytes().to_vec()).ok()
        };
        let needle = "memgroup_usage_bytes{group=\"tenants/greedy\"}";
        ok &= text.await.is_some_and(|t| t.contains(needle));
        for _ in 0..10 {
            if !stop.load(Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    ok
}

// ---------------------------------------------------------------------------------------------
// One run: the server and its load, for a time or until Ctrl-C.

/// A run's figures, printed as a table and passed from a child to its parent as JSON.
#[derive(Clone, Serialize, Deserialize)]
struct Report {
    memgroup: bool,
    greedy: bool,
    secs: f64,
    /// CPU time of the server's threads (its runtime's workers, memgroup's notifier).
    cpu_s: f64,
    rss_peak: usize,
    metrics_ok: bool,
    rows: Vec<Row>,
    /// memgroup only: what stays charged to each tenant once its cache is emptied.
    residue: String,
}

#[derive(Clone, Serialize, Deserialize)]
struct Row {
    tenant: String,
    requests: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    usage: usize,
    peak: usize,
    max: usize,
    refused: u64,
    cancelled: u64,
    evicted: u64,
}

struct Run {
    tenants: Arc<Vec<Arc<Tenant>>>,
    loads: Vec<Arc<Load>>,
    greedy: bool,
}

/// Serves on one runtime and loads it from another (so the server's CPU time is its own),
/// for `secs` or until Ctrl-C.
fn run(secs: u64, greedy: bool, interactive: bool) -> Report {
    let (server_rt, load_rt) = (runtime("server"), runtime("load"));
    let tenants = Arc::new(tenants().expect("tenant groups"));
    let port = if interactive { 3000 } else { 0 };
    let listener = server_rt.block_on(async {
        match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => l,
            Err(_) => tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    });
    let addr = listener.local_addr().unwrap();
    let (shut_down, until) = tokio::sync::oneshot::channel::<()>();
    let app = router(tenants.clone());
    let server = server_rt.spawn(async move {
        let until = async { drop(until.await) };
        axum::serve(listener, app)
            .with_graceful_shutdown(until)
            .await
    });
    if interactive {
        println!("serving on http://{addr} (try: curl http://{addr}/metrics); Ctrl-C stops");
        println!("every 5 s: each tenant's rps, p99 latency and usage; greedy's 413s and 503s");
    }
    let run = Run {
        loads: TENANTS.iter().map(|_| Arc::new(Load::new())).collect(),
        tenants,
        greedy,
    };
    let (secs, cpu_s, metrics_ok) = load_rt.block_on(drive(&run, addr, secs, interactive));
    shut_down.send(()).ok();
    server_rt.block_on(server).unwrap().unwrap();
    report(&run, secs, cpu_s, metrics_ok)
}

/// Runs the clients and the scraper; returns the seconds they ran, the server's CPU seconds
/// meanwhile, and whether every scrape of /metrics had greedy's usage.
async fn drive(run: &Run, addr: SocketAddr, secs: u64, interactive: bool) -> (f64, f64, bool) {
    let stop = Arc::new(AtomicBool::new(false));
    let (start, cpu) = (Instant::now(), server_cpu());
    let clients = start_clients(run, addr, &stop);
    let scraper = tokio::spawn(scrape(addr, stop.clone()));
    wait(run, start, secs, interactive).await;
    // The clients stop first, so that no request meets a server shutting down.
    stop.store(true, Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (secs, cpu) = (start.elapsed().as_secs_f64(), server_cpu() - cpu);
    (secs, cpu, scraper.await.unwrap())
}

fn runtime(name: &str) -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .thread_name(name)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// CPU seconds of the server's threads: its runtime's workers (named `server`) and
/// memgroup's notifier, which runs the shrinkers.
fn server_cpu() -> f64 {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let read = |file| std::fs::read_to_string(task.path().join(file)).unwrap_or_default();
        let comm = read("comm");
        if !(comm.starts_with("server") || comm.starts_with("memgroup")) {
            continue;
        }
        // Fields after the command's closing parenthesis, from the 3rd: utime is the 14th.
        let stat = read("stat");
        let fields = stat.rsplit_once(") ").map_or("", |(_, f)| f).split(' ');
        ticks += fields
            .skip(11)
            .take(2)
            .filter_map(|f| f.parse::<u64>().ok())
            .sum::<u64>();
    }
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Starts every client connection's loop (greedy's only if it is active).
fn start_clients(
    run: &Run,
    addr: SocketAddr,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut clients = Vec::new();
    let huge = Bytes::from(if run.greedy { huge_body() } else { Vec::new() });
    for (i, (name, ..)) in TENANTS.iter().enumerate() {
        let n = match i {
            GREEDY if !run.greedy => 0,
            GREEDY => GREEDY_CONNECTIONS,
            _ => CONNECTIONS,
        };
        for c in 0..n {
            let seed = 0x9e37_79b9_7f4a_7c15 ^ ((i * 64 + c) as u64);
            let (huge, stop) = (huge.clone(), stop.clone());
            let env = Env { huge, stop, seed };
            clients.push(tokio::spawn(client(addr, name, run.loads[i].clone(), env)));
        }
    }
    clients
}

/// Waits `secs` (or for Ctrl-C), printing a progress line every 5 s when interactive.
async fn wait(run: &Run, start: Instant, secs: u64, interactive: bool) {
    let end = start + Duration::from_secs(secs);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let tick = Instant::now() + Duration::from_secs(5);
        tokio::select! {
            _ = &mut ctrl_c => return,
            _ = tokio::time::sleep_until(tick.min(end).into()) => {}
        }
        if Instant::now() >= end {
            return;
        }
        if interactive {
            println!("{}", progress(run, start.elapsed()));
        }
    }
}

/// Every tenant's rps and p99 over the last 5 s, and its usage; greedy's 413s and 503s so far.
fn progress(run: &Run, elapsed: Duration) -> String {
    let mut line = format!("{:>4.0} s", elapsed.as_secs_f64());
    for (t, load) in run.tenants.iter().zip(&run.loads) {
        let mut recent = load.recent.lock().unwrap();
        let (rps, p99) = (
            recent.len() / 5,
            recent.value_at_quantile(0.99) as f64 / 1e3,
        );
        recent.reset();
        let usage = mib(t.group.stat().usage);
        line += &format!(" | {} {rps}/s {p99:.0} ms {usage}", t.name);
    }
    let g = &run.tenants[GREEDY];
    let (refused, cancelled) = (g.refused.load(Relaxed), g.cancelled.load(Relaxed));
    line + &format!(", 413 x{refused}, 503 x{cancelled}")
}

/// The run's figures. Then, with every cache emptied, each tenant's usage (what the server
/// and runtime keep charged to a tenant whose caches are gone).
fn report(run: &Run, secs: f64, cpu_s: f64, metrics_ok: bool) -> Report {
    let mut rows = Vec::new();
    for (t, load) in run.tenants.iter().zip(&run.loads) {
        t.group.flush();
        let s = t.group.stat();
        let total = load.total.lock().unwrap();
        let ms = |q| total.value_at_quantile(q) as f64 / 1e3;
        rows.push(Row {
            tenant: t.name.to_string(),
            requests: total.len(),
            rps: total.len() as f64 / secs,
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            errors: load.errors.load(Relaxed),
            usage: s.usage,
            peak: s.peak,
            max: s.max.unwrap_or(0),
            refused: t.refused.load(Relaxed),
            cancelled: t.cancelled.load(Relaxed),
            evicted: t.cache.evicted.load(Relaxed),
        });
    }
    Report {
        memgroup: memgroup_on(),
        greedy: run.greedy,
        secs,
        cpu_s,
        rss_peak: rss_peak(),
        metrics_ok,
        rows,
        residue: residue(&run.tenants),
    }
}

/// Each tenant's usage once its cache is emptied: what stays charged to it.
fn residue(tenants: &[Arc<Tenant>]) -> String {
    let mut line = String::from("caches emptied, usage left:");
    for t in tenants {
        t.cache.clear();
        t.group.flush();
        line += &format!(" {} {} B", t.name, t.group.stat().usage);
    }
    line
}

/// The process's peak resident set (VmHWM), in bytes.
fn rss_peak() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with("VmHWM:"));
    let kib = line.and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok());
    kib.unwrap_or(0) * KIB
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

// ---------------------------------------------------------------------------------------------

/// The tables, and the comparison of four runs in child processes.
#[path = "server/compare.rs"]
mod compare;
use compare::{compare, print_table};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    let number = |i: usize, default| arg(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    match arg(0) {
        Some("--smoke") => finish(compare(3, 3)),
        Some("--compare") => finish(compare(number(1, 10), 3)),
        Some("--child") => {
            let greedy = std::env::var("SERVER_GREEDY").as_deref() != Ok("0");
            let report = run(number(1, 3), greedy, false);
            println!("REPORT {}", serde_json::to_string(&report).unwrap());
        }
        None | Some("--secs") => {
            let alloc = if memgroup_on() { "memgroup" } else { "System" };
            println!("memgroup server example ({alloc} allocator), greedy active");
            print_table(&run(number(1, 600), true, true));
        }
        Some(other) => {
            eprintln!("unknown argument {other}: use --smoke, --compare SECS or --secs SECS");
            std::process::exit(2);
        }
    }
}

fn finish(failures: Vec<String>) {
    if failures.is_empty() {
        println!("\nsmoke: greedy held at its limit, no errors for alpha, beta, gamma");
        return;
    }
    for f in &failures {
        eprintln!("FAILED: {f}");
    }
    std::process::exit(1);
}
