//! Rotation detection and the retry policy when a rejection races with a re-read of the
//! source or with a held replacement token.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_twn_auth::{
    AccessToken, CachedToken, InstanceKey, RetryRejected, Token, TokenSource, TwnAuth, TwnAuthLayer,
};

const URL: &str = "https://navigator-api.tweakwise.com/catalog/products";

fn key() -> InstanceKey {
    InstanceKey::new("3f8c1a2b").unwrap()
}

/// `tok-1`, `tok-2`, …; re-read every 30 s like the built-in sources.
#[derive(Clone, Default)]
struct Rereading(Arc<AtomicUsize>);

impl TokenSource for Rereading {
    async fn fetch(&self) -> Result<Token, BoxError> {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Token::new(AccessToken::new(&format!("tok-{n}"))?)
            .refresh_after(Duration::from_secs(30)))
    }
}

type Inner =
    tower::util::BoxCloneSyncService<Request<String>, Response<()>, std::convert::Infallible>;

/// Rejects tokens in `rejected`; a request whose body is "hold" and that carries `tok-1` waits
/// for `hold` first.
fn backend(
    rejected: Arc<Mutex<Vec<String>>>,
    calls: Arc<Mutex<Vec<String>>>,
    hold: Arc<tokio::sync::Notify>,
) -> Inner {
    backend_with(rejected, calls, hold, None)
}

/// Rejects tokens in `rejected`, and holds no request.
fn backend_without_hold(
    rejected: Arc<Mutex<Vec<String>>>,
    calls: Arc<Mutex<Vec<String>>>,
) -> Inner {
    backend(rejected, calls, Arc::new(tokio::sync::Notify::new()))
}

fn backend_with(
    rejected: Arc<Mutex<Vec<String>>>,
    calls: Arc<Mutex<Vec<String>>>,
    hold: Arc<tokio::sync::Notify>,
    barrier: Option<Arc<tokio::sync::Barrier>>,
) -> Inner {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |req: Request<String>| {
        let (rejected, calls, hold) = (rejected.clone(), calls.clone(), hold.clone());
        let barrier = barrier.clone();
        async move {
            let token = req.headers()["twn-authentication"]
                .to_str()
                .unwrap()
                .to_owned();
            if let Some(barrier) = barrier.filter(|_| token == "tok-1") {
                barrier.wait().await;
            }
            if req.body() == "hold" && token == "tok-1" {
                hold.notified().await;
            }
            calls.lock().unwrap().push(token.clone());
            let mut response = Response::new(());
            if rejected.lock().unwrap().contains(&token) {
                *response.status_mut() = StatusCode::UNAUTHORIZED;
            }
            Ok::<_, std::convert::Infallible>(response)
        }
    }))
}

/// The retry layer outside the layer outside `backend`, as the docs place them.
fn retrying(
    auth: TwnAuthLayer<CachedToken>,
    backend: Inner,
) -> tower::retry::Retry<RetryRejected, TwnAuth<Inner, CachedToken>> {
    ServiceBuilder::new()
        .layer(auth.retry_layer())
        .layer(auth)
        .service(backend)
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// A request rejected because its token was just rotated is sent once more with the new
/// token, even when the source brought that token before the rejection came.
///
/// Here the periodic re-read picks up the rotated token (tok-2) while a request carrying
/// tok-1 is in flight; the server then rejects tok-1.
#[tokio::test(start_paused = true)]
async fn request_rejected_after_a_background_reread_already_replaced_its_token_is_retried() {
    let source = Rereading::default();
    let auth = TwnAuthLayer::with_token_source(key(), source.clone()).detect_rotation();
    let rejected = Arc::new(Mutex::new(Vec::new()));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let hold = Arc::new(tokio::sync::Notify::new());
    let service = retrying(auth, backend(rejected.clone(), calls.clone(), hold.clone()));

    let post = |body: &str| Request::post(URL).body(body.to_owned()).unwrap();
    assert_eq!(
        service.clone().oneshot(post("a")).await.unwrap().status(),
        StatusCode::OK
    );

    // A request goes out with tok-1 and is slow to come back.
    let slow = tokio::spawn(service.clone().oneshot(post("hold")));
    settle().await;

    // The re-read is due; the next request starts it and tok-2 is cached.
    tokio::time::advance(Duration::from_secs(30)).await;
    settle().await;
    assert_eq!(
        service.clone().oneshot(post("b")).await.unwrap().status(),
        StatusCode::OK
    );
    settle().await;
    assert_eq!(source.0.load(Ordering::SeqCst), 2);
    assert_eq!(
        service.clone().oneshot(post("c")).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(calls.lock().unwrap().last().unwrap(), "tok-2");

    // The token was rotated: the server now rejects tok-1, and the slow request comes back.
    rejected.lock().unwrap().push("tok-1".into());
    hold.notify_one();
    let status = slow.await.unwrap().unwrap().status();
    let calls = calls.lock().unwrap().clone();
    assert_eq!(
        (
            status,
            calls
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .as_slice()
        ),
        (
            StatusCode::OK,
            &["tok-1", "tok-1", "tok-2", "tok-1", "tok-2"][..]
        ),
        "the rejected request should be sent once more, with tok-2"
    );
}

/// Ten concurrent 401s on token 1, on a multi-thread runtime: one fetch, ten retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_rejections_on_multi_thread_runtime_cause_one_fetch() {
    for round in 0..20 {
        let source = Rereading::default();
        let auth = TwnAuthLayer::with_token_source(key(), source.clone()).detect_rotation();
        let rejected = Arc::new(Mutex::new(vec!["tok-1".to_string()]));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let hold = Arc::new(tokio::sync::Notify::new());
        let service = retrying(
            auth,
            backend_with(
                rejected,
                calls.clone(),
                hold,
                Some(Arc::new(tokio::sync::Barrier::new(10))),
            ),
        );
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..10 {
            let service = service.clone();
            tasks.spawn(async move {
                service
                    .oneshot(Request::post(URL).body(format!("{n}")).unwrap())
                    .await
            });
        }
        while let Some(r) = tasks.join_next().await {
            assert_eq!(
                r.unwrap().unwrap().status(),
                StatusCode::OK,
                "round {round}"
            );
        }
        let calls = calls.lock().unwrap().clone();
        assert_eq!(
            source.0.load(Ordering::SeqCst),
            2,
            "round {round}: {calls:?}"
        );
        assert_eq!(calls.len(), 20, "round {round}");
        assert_eq!(
            calls.iter().filter(|t| *t == "tok-2").count(),
            10,
            "round {round}"
        );
    }
}

/// A server that rejects every token: only the first request is retried, and the cache
/// does not fetch once per rejected request.
#[tokio::test(start_paused = true)]
async fn server_rejecting_every_token_gets_one_retry_in_all_and_two_fetches() {
    let source = Rereading::default();
    let auth = TwnAuthLayer::with_token_source(key(), source.clone())
        .backoff(Duration::from_secs(1), Duration::from_secs(1))
        .detect_rotation();
    let rejected = Arc::new(Mutex::new((1..100).map(|n| format!("tok-{n}")).collect()));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let service = retrying(auth, backend_without_hold(rejected, calls.clone()));
    for n in 0..50 {
        let response = service
            .clone()
            .oneshot(Request::post(URL).body(format!("{n}")).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    // The first request is sent with tok-1 and again with tok-2, its replacement; tok-2 is
    // held for the backoff, so the 49 others are each sent once, with tok-2.
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 51, "{calls:?}");
    assert_eq!(calls.iter().filter(|t| *t == "tok-2").count(), 50);
    // No time passed: the replacement is held for the whole backoff.
    assert_eq!(source.0.load(Ordering::SeqCst), 2);
}

/// A request is retried only when the retry would carry another token than the first
/// attempt. B sets off while tok-1 is already dropped and tok-2 is being fetched; tok-2 is rejected
/// too (a held replacement, not dropped). B must not be resent with the same tok-2.
#[tokio::test(start_paused = true)]
async fn request_carrying_a_held_replacement_is_not_resent_with_the_same_token() {
    #[derive(Clone, Default)]
    struct SlowSecond(Arc<AtomicUsize>);
    impl TokenSource for SlowSecond {
        async fn fetch(&self) -> Result<Token, BoxError> {
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            if n == 2 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok(Token::new(AccessToken::new(&format!("tok-{n}"))?))
        }
    }
    let source = SlowSecond::default();
    let auth = TwnAuthLayer::with_token_source(key(), source.clone()).detect_rotation();
    let rejected = Arc::new(Mutex::new(vec!["tok-1".to_string(), "tok-2".to_string()]));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let service = retrying(auth, backend_without_hold(rejected, calls.clone()));

    let a = tokio::spawn(
        service
            .clone()
            .oneshot(Request::post(URL).body("a".to_string()).unwrap()),
    );
    settle().await;
    assert_eq!(calls.lock().unwrap().clone(), ["tok-1"]);
    assert_eq!(source.0.load(Ordering::SeqCst), 2, "tok-2 is being fetched");
    let b = tokio::spawn(
        service
            .clone()
            .oneshot(Request::post(URL).body("b".to_string()).unwrap()),
    );
    settle().await;
    tokio::time::advance(Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(a.await.unwrap().unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(b.await.unwrap().unwrap().status(), StatusCode::UNAUTHORIZED);
    let calls = calls.lock().unwrap().clone();
    // tok-1 (A), then tok-2 for A's retry and B's first attempt: three calls.
    assert_eq!(
        calls,
        ["tok-1", "tok-2", "tok-2"],
        "B was resent with the same held tok-2"
    );
}
