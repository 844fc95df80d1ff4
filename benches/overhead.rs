//! What `TwnAuthLayer` costs a request, measured against what the same job costs without it.
//!
//! One run measures four things and ends with a summary table:
//!
//! 1. **Time per call** (criterion) on an inner service that is always ready and answers at
//!    once: the bare service; the floor, a `tower::util::MapRequest` doing two
//!    `HeaderMap::insert`s of prebuilt `'static` values; tower-http's
//!    `SetRequestHeaderLayer::overriding` applied twice; the static layer; the static layer
//!    with a scope; the layer over a token source whose token is cached and never expires.
//!    Every iteration builds the request, so the table reports each variant's cost *added* to
//!    the bare service's, and ratios of added costs.
//! 2. **Allocations per call**, with a counting global allocator.
//! 3. **Scaling across two threads**: each thread calls its own clone of one service; calls
//!    per second on two threads divided by calls per second on one, compared with the bare
//!    service's scaling in the same run.
//! 4. **Refresh under load**: tokens that live 300 ms, a source that takes 50 ms, a
//!    refresh-ahead window of 150 ms and an expiry margin of 20 ms; 10,000 requests, one
//!    every 100 µs, each timed through the layer.
//!
//! `cargo bench --bench overhead` runs everything (about a minute on two idle cores).
//! `cargo test --benches` runs each part once, on small counts, and prints no table.
//! `benches/instructions.sh` counts instructions per call with valgrind, through
//! `--calls VARIANT N`, which makes `N` calls through one variant and nothing else.

// Tests and benchmarks need Rust 1.88, as their dev-dependencies do; the `rust-version`
// that Clippy checks API use against is what the library alone needs.
#![allow(clippy::incompatible_msrv)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::fmt::Debug;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::Criterion;
use http::{HeaderName, HeaderValue, Request, Response, Uri};
use tokio::runtime::{Handle, Runtime};
use tower::util::MapRequest;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_http::set_header::SetRequestHeaderLayer;
use tower_twn_auth::{AccessToken, InstanceKey, Origin, Token, TwnAuthLayer};

const URL: &str = "https://navigator-api.tweakwise.com/stats/totalproducts";
const ORIGIN: &str = "https://navigator-api.tweakwise.com";
const KEY: &str = "3f8c1a2b";
const TOKEN: &str = "tw-0123456789abcdef";

/// Criterion samples per variant; the table takes the median of these.
const SAMPLE_SIZE: usize = 100;

// ---------------------------------------------------------------------------------------------
// Counting allocator

/// Counts allocations made by the current thread.
///
/// The counters are thread-local, so that counting writes no memory shared between threads
/// and leaves the scaling measurement alone; they are read only in the allocation phase.
struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    static BYTES: Cell<u64> = const { Cell::new(0) };
}

fn count(size: usize) {
    // `try_with` and a `const`-initialised `Cell` never allocate, so this cannot recurse.
    let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
    let _ = BYTES.try_with(|n| n.set(n.get() + size as u64));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> (u64, u64) {
    (ALLOCS.with(Cell::get), BYTES.with(Cell::get))
}

// ---------------------------------------------------------------------------------------------
// The services under test

/// An inner service that is always ready and answers at once.
#[derive(Clone, Copy, Debug)]
struct Ready;

impl Service<Request<()>> for Ready {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<()>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<()>) -> Self::Future {
        black_box(request);
        std::future::ready(Ok(Response::new(())))
    }
}

/// A service of the kind every variant is.
trait Variant:
    Service<Request<()>, Response = Response<()>, Error: Debug, Future: Send> + Clone + Send
{
}

impl<S> Variant for S where
    S: Service<Request<()>, Response = Response<()>, Error: Debug, Future: Send> + Clone + Send
{
}

/// The header names, built at compile time as the crate's own are.
const INSTANCE_KEY: HeaderName = HeaderName::from_static("twn-instancekey");
const AUTHENTICATION: HeaderName = HeaderName::from_static("twn-authentication");

fn bare() -> impl Variant {
    Ready
}

/// The floor: two inserts of prebuilt values whose bytes are `'static`.
fn floor() -> impl Variant {
    two_inserts(
        HeaderValue::from_static(KEY),
        HeaderValue::from_static(TOKEN),
    )
}

/// `MapRequest` inserting clones of `key` and `token` into every request.
fn two_inserts(key: HeaderValue, token: HeaderValue) -> impl Variant {
    MapRequest::new(Ready, move |mut request: Request<()>| {
        let headers = request.headers_mut();
        headers.insert(INSTANCE_KEY, key.clone());
        headers.insert(AUTHENTICATION, token.clone());
        request
    })
}

/// A control for the scaling measurement: the floor with reference-counted values, whose
/// every clone and drop writes one counter shared by all threads. The measurement is only
/// trusted if this scales visibly worse than the floor.
fn floor_shared() -> impl Variant {
    let key = HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(KEY.as_bytes()));
    let token = HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(TOKEN.as_bytes()));
    two_inserts(
        key.expect("KEY is a header value"),
        token.expect("TOKEN too"),
    )
}

fn tower_http_twice() -> impl Variant {
    ServiceBuilder::new()
        .layer(SetRequestHeaderLayer::overriding(
            INSTANCE_KEY,
            HeaderValue::from_static(KEY),
        ))
        .layer(SetRequestHeaderLayer::overriding(
            AUTHENTICATION,
            HeaderValue::from_static(TOKEN),
        ))
        .service(Ready)
}

fn static_layer() -> TwnAuthLayer {
    let key = InstanceKey::new(KEY).expect("KEY is a valid instance key");
    let token = AccessToken::new(TOKEN).expect("TOKEN is a valid access token");
    TwnAuthLayer::new(key, token)
}

fn twn_static() -> impl Variant {
    static_layer().layer(Ready)
}

fn twn_scoped() -> impl Variant {
    let origin = Origin::new(ORIGIN).expect("ORIGIN is a valid origin");
    static_layer().scope(origin).layer(Ready)
}

/// The layer over a source whose token never expires, with the token already cached.
///
/// The first call spawns the fetch, so it runs on `rt`; later calls find the token through
/// one atomic load and need no runtime, though the measurements enter one anyway.
fn twn_cached(rt: &Runtime) -> impl Variant {
    let key = InstanceKey::new(KEY).expect("KEY is a valid instance key");
    let layer = TwnAuthLayer::with_token_source(key, || async {
        let token = AccessToken::new(TOKEN)?;
        Ok::<_, BoxError>(Token::new(token))
    });
    let mut service = layer.layer(Ready);
    rt.block_on(async {
        let ready = service.ready().await.expect("the warm-up fetch succeeds");
        ready
            .call(request())
            .await
            .expect("the warm-up request succeeds");
    });
    service
}

/// Builds the request every iteration sends: the URI is parsed once and cloned, which copies
/// pointers to `'static` bytes.
fn request() -> Request<()> {
    static URI: std::sync::OnceLock<Uri> = std::sync::OnceLock::new();
    let uri = URI.get_or_init(|| Uri::from_static(URL)).clone();
    let mut request = Request::new(());
    *request.uri_mut() = uri;
    request
}

/// Calls `service` once, as a client would: `poll_ready`, `call`, then the response future,
/// all polled with a no-op waker. Every variant is ready and answers on the first poll.
#[inline(always)]
fn drive<S: Variant>(service: &mut S, request: Request<()>) -> Response<()> {
    let mut cx = Context::from_waker(Waker::noop());
    match service.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        Poll::Ready(Err(error)) => panic!("poll_ready failed: {error:?}"),
        Poll::Pending => panic!("the service under test must always be ready"),
    }
    let mut future = pin!(service.call(request));
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(response)) => response,
        Poll::Ready(Err(error)) => panic!("call failed: {error:?}"),
        Poll::Pending => panic!("the service under test must answer at once"),
    }
}

fn call_n<S: Variant>(service: &mut S, n: u64) {
    for _ in 0..n {
        black_box(drive(service, black_box(request())));
    }
}

// ---------------------------------------------------------------------------------------------
// Part 1: time per call (criterion)

const BARE: &str = "bare inner service";
const FLOOR: &str = "floor: MapRequest, 2 inserts";
const TOWER_HTTP: &str = "tower-http SetRequestHeader x2";
const STATIC: &str = "TwnAuthLayer::new (static)";
const SCOPED: &str = "static + scope(origin)";
const CACHED: &str = "with_token_source (cached)";
const CONTROL: &str = "control: floor, ref-counted values";

/// Per-iteration times criterion asked for, by variant, in the order it asked.
static RECORDED: Mutex<Vec<(&'static str, f64)>> = Mutex::new(Vec::new());

fn bench_variant<S: Variant>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &'static str,
    mut service: S,
) {
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            call_n(&mut service, iters);
            let elapsed = start.elapsed();
            let per_call = elapsed.as_nanos() as f64 / iters as f64;
            RECORDED
                .lock()
                .expect("no panic while recording")
                .push((name, per_call));
            elapsed
        })
    });
}

/// Which statistic of criterion's samples the table reports.
#[derive(Clone, Copy)]
enum Stat {
    /// The median sample: what a typical stretch of calls cost.
    Median,
    /// The fastest sample: the least disturbed by other processes on a busy machine.
    Min,
}

/// Returns a statistic of the per-call times in the last `SAMPLE_SIZE` samples of `name`:
/// criterion's measurement samples, after its warm-up.
fn ns(name: &str, stat: Stat) -> Option<f64> {
    let recorded = RECORDED.lock().expect("no panic while recording");
    let all: Vec<f64> = recorded
        .iter()
        .filter(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .collect();
    let mut samples = all[all.len().saturating_sub(SAMPLE_SIZE)..].to_vec();
    samples.sort_by(f64::total_cmp);
    match stat {
        Stat::Median => samples.get(samples.len() / 2).copied(),
        Stat::Min => samples.first().copied(),
    }
}

fn per_call(c: &mut Criterion, rt: &Runtime) {
    let mut group = c.benchmark_group("per_call");
    bench_variant(&mut group, BARE, bare());
    bench_variant(&mut group, FLOOR, floor());
    bench_variant(&mut group, TOWER_HTTP, tower_http_twice());
    bench_variant(&mut group, STATIC, twn_static());
    bench_variant(&mut group, SCOPED, twn_scoped());
    let cached = twn_cached(rt);
    let _entered = rt.enter();
    bench_variant(&mut group, CACHED, cached);
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// Part 2: allocations per call

/// Returns allocations and bytes allocated per call, over `calls` calls after a warm-up.
fn allocations_per_call<S: Variant>(mut service: S, calls: u64) -> (f64, f64) {
    call_n(&mut service, 1_000);
    let (allocs_before, bytes_before) = allocations();
    call_n(&mut service, calls);
    let (allocs_after, bytes_after) = allocations();
    let per_call = |n: u64| n as f64 / calls as f64;
    (
        per_call(allocs_after - allocs_before),
        per_call(bytes_after - bytes_before),
    )
}

// ---------------------------------------------------------------------------------------------
// Part 3: scaling across two threads

/// Returns calls per second of `threads` threads, each calling its own clone of `service`
/// `calls` times; the time is from the first thread's start to the last one's end.
fn throughput<S: Variant>(service: &S, threads: usize, calls: u64, handle: &Handle) -> f64 {
    let barrier = Barrier::new(threads);
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let mut service = service.clone();
                let barrier = &barrier;
                scope.spawn(move || {
                    let _entered = handle.enter();
                    call_n(&mut service, 1_000);
                    barrier.wait();
                    let start = Instant::now();
                    call_n(&mut service, calls);
                    (start, Instant::now())
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a bench thread panicked"))
            .collect()
    });

    let start = spans
        .iter()
        .map(|s| s.0)
        .min()
        .expect("at least one thread");
    let end = spans
        .iter()
        .map(|s| s.1)
        .max()
        .expect("at least one thread");
    (threads as u64 * calls) as f64 / (end - start).as_secs_f64()
}

struct Scaling {
    name: &'static str,
    /// Best calls per second over the repetitions, on one and on two threads.
    one: f64,
    two: f64,
    /// `two / one` of each repetition.
    each: Vec<f64>,
}

impl Scaling {
    /// The best two-thread throughput over the best one-thread throughput.
    fn best(&self) -> f64 {
        self.two / self.one
    }

    /// The median of the repetitions' own ratios, each taken from two measurements made
    /// back to back.
    fn median(&self) -> f64 {
        let mut each = self.each.clone();
        each.sort_by(f64::total_cmp);
        each.get(each.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

fn scaling(rt: &Runtime, calls: u64, repetitions: usize) -> Vec<Scaling> {
    fn measure<S: Variant>(s: &S, calls: u64, h: &Handle, row: &mut Scaling) {
        let one = throughput(s, 1, calls, h);
        let two = throughput(s, 2, calls, h);
        row.one = row.one.max(one);
        row.two = row.two.max(two);
        row.each.push(two / one);
    }

    let handle = rt.handle();
    let (bare, floor, twn_static, scoped) = (bare(), floor(), twn_static(), twn_scoped());
    let (cached, control) = (twn_cached(rt), floor_shared());
    let mut rows: Vec<Scaling> = [BARE, FLOOR, STATIC, SCOPED, CACHED, CONTROL]
        .into_iter()
        .map(|name| Scaling {
            name,
            one: 0.0,
            two: 0.0,
            each: Vec::new(),
        })
        .collect();

    // Interleaved, so that a burst of load from elsewhere hits one repetition of every
    // variant rather than every repetition of one.
    for _ in 0..repetitions {
        measure(&bare, calls, handle, &mut rows[0]);
        measure(&floor, calls, handle, &mut rows[1]);
        measure(&twn_static, calls, handle, &mut rows[2]);
        measure(&scoped, calls, handle, &mut rows[3]);
        measure(&cached, calls, handle, &mut rows[4]);
        measure(&control, calls, handle, &mut rows[5]);
    }
    rows
}

// ---------------------------------------------------------------------------------------------
// Part 4: refresh under load

struct Refresh {
    first: Duration,
    latencies: Vec<Duration>,
    /// Latencies of the requests sent while a fetch was under way.
    during_fetch: Vec<Duration>,
    fetches: usize,
    span: Duration,
}

fn refresh(requests: usize, interval: Duration) -> Refresh {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let fetches = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(AtomicBool::new(false));

    let source = {
        let (fetches, in_flight) = (Arc::clone(&fetches), Arc::clone(&in_flight));
        move || {
            let (fetches, in_flight) = (Arc::clone(&fetches), Arc::clone(&in_flight));
            async move {
                fetches.fetch_add(1, Ordering::SeqCst);
                in_flight.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                in_flight.store(false, Ordering::SeqCst);
                let token = AccessToken::new(TOKEN)?;
                Ok::<_, BoxError>(Token::new(token).valid_for(Duration::from_millis(300)))
            }
        }
    };
    let key = InstanceKey::new(KEY).expect("KEY is a valid instance key");
    let layer = TwnAuthLayer::with_token_source(key, source)
        .refresh_ahead(Duration::from_millis(150))
        .expiry_margin(Duration::from_millis(20));
    let mut service = layer.layer(Ready);

    // The requests come from this thread, inside `block_on` but not on a worker, as from an
    // application thread; the two workers run the fetches and the timers. Pacing spins, so
    // that requests are spread evenly over several token lifetimes.
    rt.block_on(async {
        let first = timed(&mut service).await;
        let mut latencies = Vec::with_capacity(requests);
        let mut during_fetch = Vec::new();
        let start = Instant::now();
        for i in 0..requests {
            let due = start + interval * i as u32;
            while Instant::now() < due {
                std::hint::spin_loop();
            }
            let fetching = in_flight.load(Ordering::SeqCst);
            let latency = timed(&mut service).await;
            latencies.push(latency);
            if fetching {
                during_fetch.push(latency);
            }
        }
        Refresh {
            first,
            latencies,
            during_fetch,
            fetches: fetches.load(Ordering::SeqCst),
            span: start.elapsed(),
        }
    })
}

/// Returns how long one request took through `service`, from `poll_ready` to its response.
async fn timed<S: Variant>(service: &mut S) -> Duration {
    let request = request();
    let start = Instant::now();
    let ready = service.ready().await.expect("the service gets a token");
    ready.call(request).await.expect("the request succeeds");
    start.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

// ---------------------------------------------------------------------------------------------
// The run and its summary

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let listing = has("--list") || args.iter().any(|a| a.starts_with("--profile-time"));
    // The same rule criterion applies: `cargo bench` passes `--bench`, `cargo test` does not.
    let full = has("--bench") && !has("--test");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");

    if let Some(at) = args.iter().position(|a| a == "--calls") {
        let variant = args.get(at + 1).map(String::as_str).unwrap_or_default();
        let calls = args.get(at + 2).and_then(|n| n.parse().ok()).unwrap_or(0);
        only_calls(&rt, variant, calls);
        return;
    }

    let mut c = Criterion::default()
        .sample_size(SAMPLE_SIZE)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .without_plots()
        .configure_from_args();
    per_call(&mut c, &rt);
    c.final_summary();
    if listing {
        return;
    }

    let (alloc_calls, scaling_calls, repetitions, requests) = if full {
        (10_000, 2_000_000, 10, 10_000)
    } else {
        (100, 10_000, 1, 200)
    };

    eprintln!("measuring allocations per call ...");
    let allocs = vec![
        (BARE, allocations_per_call(bare(), alloc_calls)),
        (FLOOR, allocations_per_call(floor(), alloc_calls)),
        (
            TOWER_HTTP,
            allocations_per_call(tower_http_twice(), alloc_calls),
        ),
        (STATIC, allocations_per_call(twn_static(), alloc_calls)),
        (SCOPED, allocations_per_call(twn_scoped(), alloc_calls)),
        (CACHED, {
            let service = twn_cached(&rt);
            let _entered = rt.enter();
            allocations_per_call(service, alloc_calls)
        }),
    ];

    eprintln!("measuring scaling across two threads ({repetitions} repetitions) ...");
    let scaling = scaling(&rt, scaling_calls, repetitions);

    eprintln!("measuring latency while tokens are refreshed ...");
    let refresh = refresh(requests, Duration::from_micros(100));

    if full {
        summary(&allocs, &scaling, refresh);
    }
}

/// Makes `calls` calls through one variant and nothing else, for an instruction counter to
/// measure: `benches/instructions.sh` runs this under valgrind with two counts and divides
/// the difference, so that start-up and set-up cancel out.
fn only_calls(rt: &Runtime, variant: &str, calls: u64) {
    match variant {
        "bare" => call_n(&mut bare(), calls),
        "floor" => call_n(&mut floor(), calls),
        "tower-http" => call_n(&mut tower_http_twice(), calls),
        "static" => call_n(&mut twn_static(), calls),
        "scoped" => call_n(&mut twn_scoped(), calls),
        "cached" => {
            let mut service = twn_cached(rt);
            let _entered = rt.enter();
            call_n(&mut service, calls)
        }
        other => {
            eprintln!(
                "--calls takes a variant (bare, floor, tower-http, static, scoped, cached) \
                 and a count; got {other:?}"
            );
            std::process::exit(2);
        }
    }
}

fn summary(allocs: &[(&str, (f64, f64))], scaling: &[Scaling], refresh: Refresh) {
    let added = |name, stat| Some(ns(name, stat)? - ns(BARE, stat)?);
    let ratio = |a, b, stat| Some(added(a, stat)? / added(b, stat)?);
    let fmt = |v: Option<f64>, digits: usize| match v {
        Some(v) => format!("{v:.digits$}"),
        None => "n/a".to_owned(),
    };
    let verdict = |met: Option<bool>| match met {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "n/a",
    };

    println!();
    println!("### Per call, on a ready inner service");
    println!();
    println!("Every call builds its request; \"added\" is the variant's time minus the bare");
    println!("service's. Median and fastest of {SAMPLE_SIZE} criterion samples.");
    println!();
    println!(
        "| variant | ns/call median | ns/call min | added median | added min \
         | allocs/call | bytes/call |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, (count, bytes)) in allocs {
        let (added_median, added_min) = if *name == BARE {
            ("-".to_owned(), "-".to_owned())
        } else {
            (
                fmt(added(name, Stat::Median), 1),
                fmt(added(name, Stat::Min), 1),
            )
        };
        println!(
            "| {name} | {} | {} | {added_median} | {added_min} | {count:.2} | {bytes:.0} |",
            fmt(ns(name, Stat::Median), 1),
            fmt(ns(name, Stat::Min), 1),
        );
    }

    let allocs_of = |name| allocs.iter().find(|(n, _)| *n == name).map(|(_, a)| a.0);
    let floor_allocs = allocs_of(FLOOR);
    let targets = [
        ("static / floor", STATIC, FLOOR, "<= 1.05", 1.05),
        ("scoped static / floor", SCOPED, FLOOR, "<= 1.10", 1.10),
        ("cached / static", CACHED, STATIC, "<= 1.15", 1.15),
        ("static / tower-http x2", STATIC, TOWER_HTTP, "< 1.00", 1.0),
    ];
    println!();
    println!("| ratio of added cost | from medians | from mins | target | met (medians, mins) |");
    println!("|---|---:|---:|---|---|");
    for (label, a, b, target, limit) in targets {
        let within = |v: f64| if limit == 1.0 { v < limit } else { v <= limit };
        let (median, min) = (ratio(a, b, Stat::Median), ratio(a, b, Stat::Min));
        println!(
            "| {label} | {} | {} | {target} | {}, {} |",
            fmt(median, 2),
            fmt(min, 2),
            verdict(median.map(within)),
            verdict(min.map(within)),
        );
    }
    for name in [STATIC, SCOPED, CACHED] {
        let met = allocs_of(name)
            .zip(floor_allocs)
            .map(|(own, floor)| own <= floor);
        println!(
            "| allocs/call, {name} vs floor | {} vs {} | | <= floor | {} |",
            fmt(allocs_of(name), 2),
            fmt(floor_allocs, 2),
            verdict(met)
        );
    }

    println!();
    println!("### Scaling across two threads");
    println!();
    println!("Each thread calls its own clone of one service. \"best\": the best two-thread");
    println!("throughput over the best one-thread throughput of all repetitions; \"median\": the");
    println!("median of each repetition's own ratio. The control is not a target: it shows what");
    println!("one counter written by both threads does to the measurement.");
    println!();
    println!(
        "| variant | 1 thread, Mcalls/s | 2 threads, Mcalls/s | scaling best | scaling median \
         | vs bare best | vs bare median | met >= 0.90 (best, median) | each run |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|---|");
    let bare = scaling.iter().find(|s| s.name == BARE);
    let (bare_best, bare_median) = (bare.map(Scaling::best), bare.map(Scaling::median));
    for row in scaling {
        let best = bare_best.map(|bare| row.best() / bare);
        let median = bare_median.map(|bare| row.median() / bare);
        let each: Vec<String> = row.each.iter().map(|s| format!("{s:.2}")).collect();
        let met = if row.name == BARE || row.name == CONTROL {
            "-".to_owned()
        } else {
            let met = |v: Option<f64>| verdict(v.map(|v| v >= 0.9));
            format!("{}, {}", met(best), met(median))
        };
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {met} | {} |",
            row.name,
            row.one / 1e6,
            row.two / 1e6,
            row.best(),
            row.median(),
            fmt(best, 2),
            fmt(median, 2),
            each.join(" "),
        );
    }

    let mut sorted = refresh.latencies.clone();
    sorted.sort();
    let mut during = refresh.during_fetch.clone();
    during.sort();
    let us = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e6);
    let p99 = percentile(&sorted, 0.99);
    println!();
    println!("### Refresh under load");
    println!();
    println!(
        "Source takes 50 ms, tokens valid 300 ms, refresh ahead 150 ms, margin 20 ms; {} requests",
        sorted.len()
    );
    println!(
        "one every 100 us over {:.2} s, each timed through poll_ready + call + response. The",
        refresh.span.as_secs_f64()
    );
    println!(
        "first request, which waits for the first fetch, took {:.1} ms and is not counted.",
        refresh.first.as_secs_f64() * 1e3
    );
    println!();
    println!("| requests | p50 us | p99 us | p99.9 us | max us | fetches | p99 < 1 ms |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    println!(
        "| all {} | {} | {} | {} | {} | {} | {} |",
        sorted.len(),
        us(percentile(&sorted, 0.5)),
        us(p99),
        us(percentile(&sorted, 0.999)),
        us(percentile(&sorted, 1.0)),
        refresh.fetches,
        verdict(Some(p99 < Duration::from_millis(1)))
    );
    println!(
        "| {} sent during a fetch | {} | {} | {} | {} | | |",
        during.len(),
        us(percentile(&during, 0.5)),
        us(percentile(&during, 0.99)),
        us(percentile(&during, 0.999)),
        us(percentile(&during, 1.0)),
    );
}
