//! The token cache: single flight, the two windows, cancellation, failure and backoff, file
//! rotation, and concurrency on a multi-thread runtime.
//!
//! Time-dependent tests run on Tokio's paused clock: `advance` moves it, and the cache's
//! timers fire as they would in real time.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_twn_auth::{
    AccessToken, CachedToken, Error, FileSource, InstanceKey, Token, TokenSource, TwnAuth,
    TwnAuthLayer,
};

const URL: &str = "https://navigator-api.tweakwise.com/stats/totalproducts";

fn request() -> Request<()> {
    Request::get(URL).body(()).unwrap()
}

fn token(name: &str) -> Token {
    Token::new(AccessToken::new(name).unwrap())
}

/// Records the token each request reached the inner service with.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    fn last(&self) -> String {
        self.0.lock().unwrap().last().cloned().unwrap_or_default()
    }
}

type Inner = tower::util::BoxCloneSyncService<Request<()>, Response<()>, Infallible>;

fn inner(seen: &Seen) -> Inner {
    let seen = seen.clone();
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |req: Request<()>| {
        let value = req.headers()["twn-authentication"]
            .to_str()
            .unwrap()
            .to_owned();
        seen.0.lock().unwrap().push(value);
        async { Ok::<_, Infallible>(Response::new(())) }
    }))
}

/// Returns `tok-1`, `tok-2`, … after `delay`, each valid for `lifetime` if given.
#[derive(Clone)]
struct Counting {
    fetches: Arc<AtomicUsize>,
    delay: Duration,
    lifetime: Option<Duration>,
}

impl Counting {
    fn new(delay: Duration, lifetime: Option<Duration>) -> Self {
        Counting {
            fetches: Arc::default(),
            delay,
            lifetime,
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl TokenSource for Counting {
    async fn fetch(&self) -> Result<Token, BoxError> {
        let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(self.delay).await;
        let token = token(&format!("tok-{n}"));
        Ok(match self.lifetime {
            Some(lifetime) => token.valid_for(lifetime),
            None => token,
        })
    }
}

fn service(layer: &TwnAuthLayer<CachedToken>, seen: &Seen) -> TwnAuth<Inner, CachedToken> {
    ServiceBuilder::new()
        .layer(layer.clone())
        .service(inner(seen))
}

async fn send(service: &TwnAuth<Inner, CachedToken>) -> Result<Response<()>, BoxError> {
    service.clone().oneshot(request()).await
}

/// Sends a request that must fail with this crate's [`Error`], and returns the error.
async fn send_failing(service: &TwnAuth<Inner, CachedToken>) -> Error {
    let error = send(service).await.expect_err("the request fails");
    error
        .downcast_ref::<Error>()
        .expect("a tower_twn_auth::Error")
        .clone()
}

/// Moves the paused clock, then lets the cache's timer and fetch tasks run.
async fn advance(by: Duration) {
    tokio::time::advance(by).await;
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

fn key() -> InstanceKey {
    InstanceKey::new("cache-test-key").unwrap()
}

#[tokio::test(start_paused = true)]
async fn hundred_concurrent_requests_on_empty_cache_cause_one_fetch() {
    let source = Counting::new(Duration::from_millis(50), Some(Duration::from_secs(300)));
    let layer = TwnAuthLayer::with_token_source(key(), source.clone());
    let seen = Seen::default();
    let service = service(&layer, &seen);

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let service = service.clone();
        tasks.spawn(async move { service.oneshot(request()).await });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap().unwrap();
    }

    assert_eq!(source.fetches(), 1);
    assert_eq!(seen.all(), vec!["tok-1".to_owned(); 100]);

    // 300 s lifetime, 10 s default margin: expired for the cache at 290 s.
    advance(Duration::from_secs(290)).await;
    send(&service).await.unwrap();
    assert_eq!(source.fetches(), 2);
    assert_eq!(seen.last(), "tok-2");
}

/// Margin 30 s, refresh-ahead 60 s, tokens valid 200 s: refresh due at 140 s, expired at
/// 170 s (both boundaries inside), and half the usable span (85 s) is shorter than 140 s, so
/// the refresh-ahead window alone decides.
///
/// Returns the source, what the inner service saw, and a service that has sent one request,
/// with `tok-1`.
async fn windowed() -> (Counting, Seen, TwnAuth<Inner, CachedToken>) {
    let source = Counting::new(Duration::from_millis(50), Some(Duration::from_secs(200)));
    let layer = TwnAuthLayer::with_token_source(key(), source.clone())
        .expiry_margin(Duration::from_secs(30))
        .refresh_ahead(Duration::from_secs(60));
    let seen = Seen::default();
    let service = service(&layer, &seen);
    send(&service).await.unwrap();
    (source, seen, service)
}

/// Checks that `after` the first fetch, a request waits for the 50 ms fetch of `tok-2`.
async fn assert_waits_for_fresh_token(after: Duration) {
    let (source, seen, service) = windowed().await;

    advance(after).await;
    let before = Instant::now();
    send(&service).await.unwrap();

    assert_eq!(Instant::now() - before, Duration::from_millis(50));
    assert_eq!(seen.all(), ["tok-1", "tok-2"]);
    assert_eq!(source.fetches(), 2);
}

#[tokio::test(start_paused = true)]
async fn token_120s_from_expiry_is_sent_without_fetch() {
    let (source, seen, service) = windowed().await;

    advance(Duration::from_secs(80)).await;
    let before = Instant::now();
    send(&service).await.unwrap();
    advance(Duration::from_millis(100)).await;

    assert_eq!(Instant::now() - before, Duration::from_millis(100));
    assert_eq!(source.fetches(), 1);
    assert_eq!(seen.all(), ["tok-1", "tok-1"]);
}

#[tokio::test(start_paused = true)]
async fn token_50s_from_expiry_is_sent_at_once_while_one_background_fetch_starts() {
    let (source, seen, service) = windowed().await;

    advance(Duration::from_secs(150)).await;
    let before = Instant::now();
    for _ in 0..5 {
        send(&service).await.unwrap();
    }
    assert_eq!(Instant::now(), before, "requests waited for the refresh");
    assert_eq!(seen.all(), vec!["tok-1"; 6]);
    advance(Duration::ZERO).await;
    assert_eq!(source.fetches(), 2);

    advance(Duration::from_millis(50)).await;
    send(&service).await.unwrap();
    assert_eq!(seen.last(), "tok-2");
    assert_eq!(source.fetches(), 2);
}

#[tokio::test(start_paused = true)]
async fn token_exactly_60s_from_expiry_counts_as_inside_refresh_window() {
    let (source, seen, service) = windowed().await;

    advance(Duration::from_secs(139)).await;
    send(&service).await.unwrap();
    assert_eq!(source.fetches(), 1);

    advance(Duration::from_secs(1)).await;
    let before = Instant::now();
    send(&service).await.unwrap();
    assert_eq!(Instant::now(), before);
    assert_eq!(seen.last(), "tok-1");
    advance(Duration::ZERO).await;
    assert_eq!(source.fetches(), 2);
}

#[tokio::test(start_paused = true)]
async fn token_20s_from_expiry_makes_request_wait_for_fresh_one() {
    assert_waits_for_fresh_token(Duration::from_secs(180)).await;
}

#[tokio::test(start_paused = true)]
async fn token_exactly_30s_from_expiry_counts_as_expired() {
    // No request comes during the refresh-ahead window, so nothing refreshes tok-1 early.
    assert_waits_for_fresh_token(Duration::from_secs(170)).await;
}

#[tokio::test(start_paused = true)]
async fn tokens_shorter_lived_than_windows_do_not_cause_back_to_back_fetches() {
    // Valid 40 s with a 60 s refresh-ahead window and a 10 s margin: usable for 30 s, and no
    // refresh during the first 15 s.
    let source = Counting::new(Duration::ZERO, Some(Duration::from_secs(40)));
    let layer = TwnAuthLayer::with_token_source(key(), source.clone());
    let seen = Seen::default();
    let service = service(&layer, &seen);

    for _ in 0..50 {
        send(&service).await.unwrap();
    }
    assert_eq!(source.fetches(), 1);

    advance(Duration::from_secs(14)).await;
    send(&service).await.unwrap();
    assert_eq!(source.fetches(), 1);

    advance(Duration::from_secs(1)).await;
    for _ in 0..50 {
        send(&service).await.unwrap();
    }
    advance(Duration::ZERO).await;
    assert_eq!(source.fetches(), 2);
}

#[tokio::test(start_paused = true)]
async fn source_returning_tokens_inside_margin_fetches_once_per_request_without_spinning() {
    // Valid 5 s with the default 10 s margin: already expired for the cache on arrival.
    let source = Counting::new(Duration::from_millis(10), Some(Duration::from_secs(5)));
    let layer = TwnAuthLayer::with_token_source(key(), source.clone());
    let seen = Seen::default();
    let service = service(&layer, &seen);

    for n in 1..=3 {
        send(&service).await.unwrap();
        assert_eq!(source.fetches(), n);
        assert_eq!(seen.last(), format!("tok-{n}"));
    }

    // Nothing fetches while no request comes.
    advance(Duration::from_secs(60)).await;
    assert_eq!(source.fetches(), 3);
}

/// Blocks each fetch until the test adds a permit.
#[derive(Clone)]
struct Gated {
    gate: Arc<Semaphore>,
    fetches: Arc<AtomicUsize>,
    completed: Arc<AtomicUsize>,
    refresh_at_once: bool,
}

impl Gated {
    fn new(refresh_at_once: bool) -> Self {
        Gated {
            gate: Arc::new(Semaphore::new(0)),
            fetches: Arc::default(),
            completed: Arc::default(),
            refresh_at_once,
        }
    }
}

impl TokenSource for Gated {
    async fn fetch(&self) -> Result<Token, BoxError> {
        let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
        self.gate.acquire().await?.forget();
        self.completed.fetch_add(1, Ordering::SeqCst);
        let token = token(&format!("tok-{n}"));
        Ok(if self.refresh_at_once {
            token.refresh_after(Duration::ZERO)
        } else {
            token
        })
    }
}

#[tokio::test(start_paused = true)]
async fn dropped_leader_hands_fetch_to_waiters() {
    let source = Gated::new(false);
    let layer = TwnAuthLayer::with_token_source(key(), source.clone());
    let seen = Seen::default();
    let service = service(&layer, &seen);

    let a = tokio::spawn(send_owned(service.clone()));
    advance(Duration::ZERO).await;
    assert_eq!(source.fetches.load(Ordering::SeqCst), 1);
    let b = tokio::spawn(send_owned(service.clone()));
    let c = tokio::spawn(send_owned(service.clone()));
    advance(Duration::ZERO).await;

    a.abort();
    assert!(a.await.unwrap_err().is_cancelled());
    source.gate.add_permits(1);

    for waiter in [b, c] {
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("waiter still waiting a second after the fetch finished")
            .unwrap()
            .unwrap();
    }
    assert_eq!(seen.all(), ["tok-1", "tok-1"]);
    assert_eq!(source.fetches.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn dropping_every_waiter_keeps_fetched_token_for_next_request() {
    let source = Gated::new(false);
    let layer = TwnAuthLayer::with_token_source(key(), source.clone());
    let seen = Seen::default();
    let service = service(&layer, &seen);

    let waiters: Vec<_> = (0..5)
        .map(|_| tokio::spawn(send_owned(service.clone())))
        .collect();
    advance(Duration::ZERO).await;
    for waiter in &waiters {
        waiter.abort();
    }
    for waiter in waiters {
        assert!(waiter.await.unwrap_err().is_cancelled());
    }
    source.gate.add_permits(1);
    advance(Duration::ZERO).await;
    assert_eq!(source.completed.load(Ordering::SeqCst), 1);

    let before = Instant::now();
    send(&service).await.unwrap();
    assert_eq!(Instant::now(), before);
    assert_eq!(seen.all(), ["tok-1"]);
    assert_eq!(source.fetches.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn dropped_waiting_request_releases_its_request_and_readied_service_at_once() {
    let source = Gated::new(false);
    let layer = TwnAuthLayer::with_token_source(key(), source.clone());
    let service_alive = Arc::new(());
    let body_alive = Arc::new(());
    let held = Arc::clone(&service_alive);
    let mut service = layer.layer(tower::service_fn(move |_: Request<Arc<()>>| {
        let _held = &held;
        async { Ok::<_, Infallible>(Response::new(())) }
    }));

    let request = Request::get(URL).body(Arc::clone(&body_alive)).unwrap();
    let waiting = service.ready().await.unwrap().call(request);
    // The readied service went into the future and a clone took its place.
    assert_eq!(Arc::strong_count(&service_alive), 3);
    assert_eq!(Arc::strong_count(&body_alive), 2);

    drop(waiting);
    assert_eq!(Arc::strong_count(&service_alive), 2);
    assert_eq!(Arc::strong_count(&body_alive), 1);
    advance(Duration::ZERO).await;
    assert_eq!(source.fetches.load(Ordering::SeqCst), 1);
}

async fn send_owned(service: TwnAuth<Inner, CachedToken>) -> Result<Response<()>, BoxError> {
    service.oneshot(request()).await
}

/// Plays back a list of results, one per fetch.
#[derive(Clone)]
struct Script {
    results: Arc<Mutex<VecDeque<Result<Token, String>>>>,
    fetches: Arc<AtomicUsize>,
}

impl Script {
    fn new(results: Vec<Result<Token, &str>>) -> Self {
        let results = results
            .into_iter()
            .map(|r| r.map_err(str::to_owned))
            .collect();
        Script {
            results: Arc::new(Mutex::new(results)),
            fetches: Arc::default(),
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl TokenSource for Script {
    async fn fetch(&self) -> Result<Token, BoxError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let next = self.results.lock().unwrap().pop_front();
        match next {
            Some(result) => result.map_err(Into::into),
            None => Err("script exhausted".into()),
        }
    }

    fn name(&self) -> &str {
        "script"
    }
}

/// Captures `tracing` output of the current thread while the guard lives.
fn capture_logs() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
    #[derive(Clone)]
    struct Writer(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Writer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let writer = Writer(Arc::clone(&buffer));
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (buffer, tracing::subscriber::set_default(subscriber))
}

#[tokio::test(start_paused = true)]
async fn failed_refresh_keeps_valid_token_and_retries_after_backoff() {
    let (logs, _guard) = capture_logs();
    let source = Script::new(vec![
        Ok(token("tok-1").valid_for(Duration::from_secs(60))),
        Err("secret store unavailable"),
        Ok(token("tok-2").valid_for(Duration::from_secs(60))),
    ]);
    // Margin 5 s, window 20 s: tok-1 is refreshed from 40 s on. The backoff is exactly 2 s.
    let layer = TwnAuthLayer::with_token_source(key(), source.clone())
        .expiry_margin(Duration::from_secs(5))
        .refresh_ahead(Duration::from_secs(20))
        .backoff(Duration::from_secs(2), Duration::from_secs(2));
    let seen = Seen::default();
    let service = service(&layer, &seen);
    send(&service).await.unwrap();

    advance(Duration::from_secs(40)).await;
    send(&service).await.unwrap();
    advance(Duration::ZERO).await;
    assert_eq!(source.fetches(), 2, "the refresh-ahead fetch failed");
    let logged = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let failures: Vec<_> = logged
        .lines()
        .filter(|line| line.contains("token fetch failed"))
        .collect();
    assert_eq!(failures.len(), 1, "{logged}");
    assert!(failures[0].contains("secret store unavailable"), "{logged}");

    // During the backoff tok-1 keeps flowing and the source is left alone.
    for _ in 0..10 {
        send(&service).await.unwrap();
    }
    advance(Duration::from_millis(1999)).await;
    send(&service).await.unwrap();
    assert_eq!(source.fetches(), 2);
    assert!(seen.all().iter().all(|token| token == "tok-1"));

    advance(Duration::from_millis(1)).await;
    send(&service).await.unwrap();
    advance(Duration::ZERO).await;
    assert_eq!(source.fetches(), 3);
    send(&service).await.unwrap();
    assert_eq!(seen.last(), "tok-2");
}

#[tokio::test(start_paused = true)]
async fn failed_fetch_without_token_fails_waiters_then_next_request_retries_after_backoff() {
    let source = Script::new(vec![Err("secret store unavailable"), Ok(token("tok-1"))]);
    let layer = TwnAuthLayer::with_token_source(key(), source.clone())
        .backoff(Duration::from_secs(2), Duration::from_secs(2));
    let seen = Seen::default();
    let service = service(&layer, &seen);

    let error = send_failing(&service).await;
    assert!(matches!(error, Error::Fetch { .. }));
    assert!(error.to_string().contains("script"), "{error}");
    assert!(
        error.to_string().contains("secret store unavailable"),
        "{error}"
    );
    assert!(std::error::Error::source(&error).is_some());

    // Within the backoff: fail fast, no fetch.
    let error = send(&service).await.unwrap_err();
    assert!(matches!(
        error.downcast_ref::<Error>(),
        Some(Error::Fetch {
            retry_in: Some(_),
            ..
        })
    ));
    assert_eq!(source.fetches(), 1);
    assert!(seen.all().is_empty(), "the inner service was called");

    advance(Duration::from_secs(2)).await;
    send(&service).await.unwrap();
    assert_eq!(source.fetches(), 2);
    assert_eq!(seen.all(), ["tok-1"]);
}

/// Polls `future` to its end, then once more, and returns both results.
async fn poll_twice<F>(
    future: F,
) -> (
    Result<Response<()>, BoxError>,
    Result<Response<()>, BoxError>,
)
where
    F: std::future::Future<Output = Result<Response<()>, BoxError>>,
{
    let mut future = std::pin::pin!(future);
    let first = std::future::poll_fn(|cx| future.as_mut().poll(cx)).await;
    let again = std::future::poll_fn(|cx| future.as_mut().poll(cx)).await;
    (first, again)
}

#[tokio::test(start_paused = true)]
async fn failed_futures_return_their_error_once_then_an_error_not_a_panic() {
    let source = Script::new(vec![Err("secret store unavailable")]);
    let layer = TwnAuthLayer::with_token_source(key(), source.clone())
        .backoff(Duration::from_secs(2), Duration::from_secs(2));
    let seen = Seen::default();
    let mut service = service(&layer, &seen);

    // One request waits for the fetch, which fails; the next finds the failure in backoff.
    for waited in [true, false] {
        let future = service.ready().await.unwrap().call(request());
        let waiting = format!("{future:?}").contains("waiting for a token");
        assert_eq!(waiting, waited, "{future:?}");
        let (first, again) = poll_twice(future).await;
        let first = first.expect_err("no token, no request");
        assert!(
            matches!(first.downcast_ref::<Error>(), Some(Error::Fetch { .. })),
            "{first}"
        );
        let again = again.expect_err("a finished future fails again");
        assert!(again.downcast_ref::<Error>().is_none(), "{again}");
        assert!(again.to_string().contains("after completion"), "{again}");
    }
    assert_eq!(source.fetches(), 1);
    assert!(seen.all().is_empty(), "the inner service was called");
}

/// Returns the `N` of the " (next attempt in N ms)" that ends `message`.
fn next_attempt_ms(message: &str) -> u128 {
    let (_, rest) = message
        .split_once(" (next attempt in ")
        .unwrap_or_else(|| panic!("no next attempt in {message:?}"));
    let millis = rest
        .strip_suffix(" ms)")
        .expect("the suffix ends the message");
    millis.parse().expect("a whole number of milliseconds")
}

#[tokio::test(start_paused = true)]
async fn fetch_error_message_counts_down_to_the_next_attempt() {
    let source = Script::new(vec![Err("secret store unavailable")]);
    // The default backoff: 1 s after the first failure, plus up to 0.5 s of jitter.
    let layer = TwnAuthLayer::with_token_source(key(), source.clone());
    let seen = Seen::default();
    let service = service(&layer, &seen);

    let message = send_failing(&service).await.to_string();
    let first = next_attempt_ms(&message);
    assert!((1000..1500).contains(&first), "{message}");
    assert_eq!(
        message,
        format!("script failed: secret store unavailable (next attempt in {first} ms)")
    );

    // A request during the backoff fails at once, with the time that is left.
    advance(Duration::from_millis(400)).await;
    let message = send_failing(&service).await.to_string();
    assert_eq!(next_attempt_ms(&message), first - 400, "{message}");
    assert_eq!(source.fetches(), 1);
    assert!(seen.all().is_empty(), "the inner service was called");
}

#[tokio::test(start_paused = true)]
async fn invalid_token_from_source_is_an_error_never_a_header() {
    let source = || async { Ok(Token::new(AccessToken::new("bad\ntoken")?)) };
    let layer = TwnAuthLayer::with_token_source(key(), source);
    let seen = Seen::default();
    let service = service(&layer, &seen);

    let error = send_failing(&service).await;
    assert!(error.to_string().contains("TWN-Authentication"), "{error}");
    assert!(!error.to_string().contains("bad"), "{error}");
    assert!(seen.all().is_empty());
}

#[tokio::test(start_paused = true)]
async fn source_panicking_in_its_future_is_a_failure_backed_off_like_any_other() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let source = move || {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                panic!("source bug");
            }
            Ok(token("tok-after-panic"))
        }
    };
    assert_panic_is_backed_off(TwnAuthLayer::with_token_source(key(), source), &calls).await;
}

#[tokio::test(start_paused = true)]
async fn source_panicking_before_it_returns_a_future_is_a_failure_backed_off_too() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let source = move || {
        if counter.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("source bug");
        }
        async { Ok(token("tok-after-panic")) }
    };
    assert_panic_is_backed_off(TwnAuthLayer::with_token_source(key(), source), &calls).await;
}

/// Checks that the first fetch of `layer`, whose source panics once, fails the request with
/// `Error::Fetch` and that the source is not asked again until the backoff has passed.
async fn assert_panic_is_backed_off(layer: TwnAuthLayer<CachedToken>, calls: &AtomicUsize) {
    let layer = layer.backoff(Duration::from_secs(2), Duration::from_secs(2));
    let seen = Seen::default();
    let service = service(&layer, &seen);

    let error = send_failing(&service).await;
    assert!(matches!(error, Error::Fetch { .. }), "{error:?}");
    assert!(error.to_string().contains("panicked"), "{error}");

    // Twenty requests during the backoff fail at once and ask the source nothing.
    for _ in 0..20 {
        assert!(send(&service).await.is_err());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    advance(Duration::from_secs(2)).await;
    send(&service).await.unwrap();
    assert_eq!(seen.all(), ["tok-after-panic"]);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn hanging_source_times_out_and_is_backed_off_instead_of_wedging_requests() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let source = move || {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 1 {
                std::future::pending::<()>().await;
            }
            Ok(token(&format!("tok-{}", n + 1)).valid_for(Duration::from_secs(60)))
        }
    };
    let layer = TwnAuthLayer::with_token_source(key(), source)
        .fetch_timeout(Duration::from_secs(5))
        .backoff(Duration::from_secs(2), Duration::from_secs(2));
    let seen = Seen::default();
    let service = service(&layer, &seen);
    send(&service).await.unwrap();

    // Past expiry the second fetch hangs: the request waiting for it fails at the timeout.
    advance(Duration::from_secs(60)).await;
    let before = Instant::now();
    let error = send(&service).await.unwrap_err();
    assert_eq!(Instant::now() - before, Duration::from_secs(5));
    assert!(
        error.to_string().contains("no token within 5000 ms"),
        "{error}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    advance(Duration::from_secs(2)).await;
    send(&service).await.unwrap();
    assert_eq!(seen.all(), ["tok-1", "tok-3"]);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn source_returning_expired_token_fails_instead_of_sending_it() {
    let source = Script::new(vec![
        Ok(token("tok-expired").valid_for(Duration::ZERO)),
        Ok(token("tok-good")),
    ]);
    let layer = TwnAuthLayer::with_token_source(key(), source.clone())
        .backoff(Duration::from_secs(1), Duration::from_secs(1));
    let seen = Seen::default();
    let service = service(&layer, &seen);

    let error = send(&service).await.unwrap_err();
    assert!(error.to_string().contains("already expired"), "{error}");
    assert!(seen.all().is_empty(), "an expired token was sent");

    advance(Duration::from_secs(1)).await;
    send(&service).await.unwrap();
    assert_eq!(seen.all(), ["tok-good"]);
    assert_eq!(source.fetches(), 2);
}

#[tokio::test(start_paused = true)]
async fn backoff_too_long_to_represent_still_leaves_failing_source_alone() {
    let source = Script::new(vec![Err("down")]);
    let layer = TwnAuthLayer::with_token_source(key(), source.clone())
        .backoff(Duration::MAX, Duration::MAX);
    let seen = Seen::default();
    let service = service(&layer, &seen);

    for _ in 0..10 {
        assert!(send(&service).await.is_err());
    }
    assert_eq!(source.fetches(), 1);
}

/// Counts the reads of a [`FileSource`].
#[derive(Clone)]
struct CountingFile {
    inner: FileSource,
    reads: Arc<AtomicUsize>,
}

impl TokenSource for CountingFile {
    async fn fetch(&self) -> Result<Token, BoxError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.fetch().await
    }
}

fn replace(path: &std::path::Path, content: &str) {
    let staging = path.with_extension("new");
    std::fs::write(&staging, content).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

/// Sends requests until the inner service sees `expected`, a bounded number of times.
async fn send_until(service: &TwnAuth<Inner, CachedToken>, seen: &Seen, expected: &str) {
    for _ in 0..200 {
        send(service).await.unwrap();
        if seen.last() == expected {
            return;
        }
        // The re-read runs on the blocking pool; give it a moment of paused time.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("never saw {expected}; saw {:?}", seen.all());
}

#[tokio::test(start_paused = true)]
async fn file_replaced_by_rename_is_picked_up_at_next_reread_and_empty_file_keeps_last_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, "tok-file-1\n").unwrap();
    let source = CountingFile {
        inner: FileSource::new(&path).reread_every(Duration::from_secs(10)),
        reads: Arc::default(),
    };
    let layer = TwnAuthLayer::with_token_source(key(), source.clone());
    let seen = Seen::default();
    let service = service(&layer, &seen);

    send(&service).await.unwrap();
    assert_eq!(seen.last(), "tok-file-1");

    replace(&path, "tok-file-2\r\n");
    send(&service).await.unwrap();
    assert_eq!(seen.last(), "tok-file-1", "re-read before the interval");
    assert_eq!(source.reads.load(Ordering::SeqCst), 1);

    advance(Duration::from_secs(10)).await;
    send_until(&service, &seen, "tok-file-2").await;
    assert_eq!(source.reads.load(Ordering::SeqCst), 2);

    // Rotation to an empty file: the last good token stays, and no empty header is sent.
    replace(&path, "");
    advance(Duration::from_secs(10)).await;
    for _ in 0..20 {
        send(&service).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(source.reads.load(Ordering::SeqCst), 3);
    assert!(seen.all().iter().all(|token| !token.is_empty()));
    assert_eq!(seen.last(), "tok-file-2");

    // Once the file is good again, the read after the backoff picks it up.
    replace(&path, "tok-file-3");
    advance(Duration::from_secs(30)).await;
    send_until(&service, &seen, "tok-file-3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_tasks_hammering_during_background_refreshes_see_exact_fetch_counts() {
    // Every token asks for a refresh at once, so each release of the gate ends one fetch and
    // the next request starts the next. Single flight means: never more than one at a time.
    let source = Gated::new(true);
    let layer = TwnAuthLayer::with_token_source(key(), source.clone());
    let seen = Seen::default();
    let service = service(&layer, &seen);

    source.gate.add_permits(1);
    send(&service).await.unwrap();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let service = service.clone();
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut sent = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let mut service = service.clone();
                service
                    .ready()
                    .await
                    .unwrap()
                    .call(request())
                    .await
                    .unwrap();
                sent += 1;
                tokio::task::yield_now().await;
            }
            sent
        }));
    }

    const RELEASES: usize = 5;
    // Waits for a count, failing the test instead of hanging if it never comes.
    let reach = |counter: Arc<AtomicUsize>, target: usize| async move {
        let wait = async {
            while counter.load(Ordering::SeqCst) < target {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .unwrap_or_else(|_| panic!("counter never reached {target}"));
    };
    for release in 1..=RELEASES {
        // Wait until the requests started the next refresh, then let it finish.
        reach(Arc::clone(&source.fetches), release + 1).await;
        source.gate.add_permits(1);
        reach(Arc::clone(&source.completed), release + 1).await;
    }
    // Let requests see the last token, and start (exactly) one more fetch.
    reach(Arc::clone(&source.fetches), RELEASES + 2).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }

    assert_eq!(source.completed.load(Ordering::SeqCst), RELEASES + 1);
    assert_eq!(source.fetches.load(Ordering::SeqCst), RELEASES + 2);
    let seen = seen.all();
    assert_eq!(seen.len(), total + 1);
    let last = format!("tok-{}", RELEASES + 1);
    assert!(seen.contains(&last), "no request carried {last}");
    assert!(seen
        .iter()
        .all(|token| (1..=RELEASES + 1).any(|n| *token == format!("tok-{n}"))));
    source.gate.add_permits(1);
}

#[tokio::test]
async fn cached_layer_service_and_future_are_send_and_can_be_spawned() {
    fn send_sync_clone<T: Send + Sync + Clone>(_: &T) {}
    fn send<T: Send>(_: &T) {}

    let source = Counting::new(Duration::ZERO, None);
    let layer = TwnAuthLayer::with_token_source(key(), source.clone());
    send_sync_clone(&layer);
    let seen = Seen::default();
    let mut service = service(&layer, &seen);
    send_sync_clone(&service);
    service.ready().await.unwrap();
    let future = service.call(request());
    send(&future);

    let handle = tokio::spawn(service.clone().oneshot(request()));
    handle.await.unwrap().unwrap();
    future.await.unwrap();
    assert_eq!(seen.all(), ["tok-1", "tok-1"]);
    assert_eq!(source.fetches(), 1);
}

#[test]
fn expired_token_is_never_sent_while_the_runtime_is_too_busy_to_run_timers() {
    // A current-thread runtime whose only thread is blocked past the token's usable time:
    // the timer that would mark the token expired cannot have run, and the request that
    // follows must not send it anyway.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let source = Counting::new(Duration::ZERO, Some(Duration::from_millis(300)));
    let layer = TwnAuthLayer::with_token_source(key(), source.clone())
        .expiry_margin(Duration::from_millis(100))
        .refresh_ahead(Duration::from_millis(150));
    let seen = Seen::default();
    let service = service(&layer, &seen);

    runtime.block_on(async {
        send(&service).await.unwrap();
        // Blocks the runtime's thread: this creates the condition, it asserts nothing.
        std::thread::sleep(Duration::from_millis(400));
        send(&service).await.unwrap();
    });

    assert_eq!(seen.all(), ["tok-1", "tok-2"]);
    assert_eq!(source.fetches(), 2);
}

#[test]
fn fetch_stuck_on_an_idle_runtime_is_started_again_by_its_waiter() {
    // The first request starts the fetch on a current-thread runtime and gives up; that
    // runtime then stays alive but idle, so the fetch never finishes there.
    let source = Counting::new(Duration::from_millis(50), None);
    let layer = TwnAuthLayer::with_token_source(key(), source.clone())
        .fetch_timeout(Duration::from_millis(200));
    let seen = Seen::default();
    let service = service(&layer, &seen);
    let idle = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    idle.block_on(async {
        let first = tokio::time::timeout(Duration::from_millis(10), send(&service)).await;
        assert!(first.is_err(), "the fetch cannot have finished in 10 ms");
    });

    let busy = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    busy.block_on(async {
        // The waiter gives up on the stuck fetch a second past its timeout, and has the
        // cache start another on this runtime instead of failing or waiting forever.
        tokio::time::timeout(Duration::from_secs(10), send(&service))
            .await
            .expect("the waiter gave up on the stuck fetch")
            .unwrap();
        send(&service).await.unwrap();
    });

    assert_eq!(seen.all(), ["tok-2", "tok-2"]);
    assert_eq!(source.fetches(), 2);
    drop(idle);
}
