//! Durations that put a deadline near the last instant the clock can hold: nothing panics,
//! neither a request nor the cache's timer tasks.
//!
//! This binary installs a panic hook that counts panics, so it holds only these tests.

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::task::Poll;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tower::{BoxError, ServiceExt};
use tower_layer::Layer;
use tower_twn_auth::{AccessToken, InstanceKey, Token, TwnAuthLayer};

const URL: &str = "https://navigator-api.tweakwise.com/stats/totalproducts";

/// Panics seen by the hook, from any thread, timer tasks included.
static PANICS: AtomicUsize = AtomicUsize::new(0);
/// Installs the hook that counts panics; any panic fails every test running at the time,
/// which is what each asserts anyway.
fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            eprintln!("panic: {info}");
        }));
    });
}

/// Returns the longest duration that can be added to now, less `slack`.
fn near_the_end_of_time(slack: Duration) -> Duration {
    let now = tokio::time::Instant::now();
    let (mut lo, mut hi) = (Duration::ZERO, Duration::MAX);
    while hi - lo > Duration::from_nanos(1) {
        let mid = lo + (hi - lo) / 2;
        if now.checked_add(mid).is_some() {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo.saturating_sub(slack)
}

/// Polls `future` to its end, turning a panic into an `Err`.
async fn no_panic<F: Future>(future: F) -> Result<F::Output, ()> {
    let mut future = Box::pin(future);
    std::future::poll_fn(move |cx| {
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => Poll::Ready(Err(())),
        }
    })
    .await
}

fn ok_inner(_request: Request<()>) -> std::future::Ready<Result<Response<()>, Infallible>> {
    std::future::ready(Ok(Response::new(())))
}

/// Sends three requests through `layer` and lets its timer tasks run after each.
async fn three_requests(layer: TwnAuthLayer<tower_twn_auth::CachedToken>) {
    let service = layer.layer(tower::service_fn(ok_inner));
    for _ in 0..3 {
        let request = Request::get(URL).body(()).unwrap();
        let response = no_panic(service.clone().oneshot(request)).await;
        let status = response.expect("no panic").expect("a response").status();
        assert_eq!(status, StatusCode::OK);
        for _ in 0..5 {
            tokio::task::yield_now().await;
        }
    }
}

fn source_with(
    shape: fn(Token) -> Token,
) -> impl Fn() -> std::future::Ready<Result<Token, BoxError>> + Clone + Send + Sync + 'static {
    move || {
        std::future::ready(
            AccessToken::new("tw-1")
                .map(Token::new)
                .map(shape)
                .map_err(Into::into),
        )
    }
}

#[tokio::test(flavor = "current_thread")]
async fn fetch_timeout_near_the_end_of_time_does_not_panic() {
    count_panics();
    let before = PANICS.load(Ordering::SeqCst);
    // Half a millisecond short of the end, for the fetch's own timeout and for a waiting
    // request's, which is a second longer.
    let half_ms = Duration::from_micros(500);
    for slack in [half_ms, Duration::from_secs(1) + half_ms] {
        let timeout = near_the_end_of_time(slack);
        let key = InstanceKey::new("ik-1").unwrap();
        let layer = TwnAuthLayer::with_token_source(key, source_with(|t| t)).fetch_timeout(timeout);
        three_requests(layer).await;
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), before);
}

#[tokio::test(flavor = "current_thread")]
async fn token_deadlines_near_the_end_of_time_do_not_panic_the_timers() {
    count_panics();
    let before = PANICS.load(Ordering::SeqCst);
    let fetches = Arc::new(AtomicUsize::new(0));
    let shapes: [fn(Token) -> Token; 3] = [
        |t| t.refresh_after(near_the_end_of_time(Duration::from_micros(500))),
        |t| t.valid_for(near_the_end_of_time(Duration::from_micros(500))),
        |t| t.valid_for(near_the_end_of_time(Duration::ZERO)),
    ];
    for shape in shapes {
        let key = InstanceKey::new("ik-1").unwrap();
        let counter = Arc::clone(&fetches);
        let source = move || {
            counter.fetch_add(1, Ordering::SeqCst);
            source_with(shape)()
        };
        let layer = TwnAuthLayer::with_token_source(key, source)
            .expiry_margin(Duration::ZERO)
            .refresh_ahead(Duration::ZERO);
        three_requests(layer).await;
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), before);
    // Each layer fetched once: a deadline at the end of time never comes.
    assert_eq!(fetches.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn backoff_near_the_end_of_time_is_cut_to_a_year() {
    count_panics();
    let before = PANICS.load(Ordering::SeqCst);
    let fetches = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&fetches);
    let source = move || {
        counter.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Err::<Token, BoxError>("down".into()))
    };
    let huge = near_the_end_of_time(Duration::ZERO);
    let layer = TwnAuthLayer::with_token_source(InstanceKey::new("ik-1").unwrap(), source)
        .backoff(huge, huge);
    let service = layer.layer(tower::service_fn(ok_inner));
    let send = || no_panic(service.clone().oneshot(Request::get(URL).body(()).unwrap()));

    assert!(send().await.expect("no panic").is_err());
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    // Backing off: a day later the source is still left alone.
    tokio::time::advance(Duration::from_secs(24 * 60 * 60)).await;
    assert!(send().await.expect("no panic").is_err());
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    // A year and a day later it is asked again.
    tokio::time::advance(Duration::from_secs(365 * 24 * 60 * 60)).await;
    assert!(send().await.expect("no panic").is_err());
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
    assert_eq!(PANICS.load(Ordering::SeqCst), before);
}
