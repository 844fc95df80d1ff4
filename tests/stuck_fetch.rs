//! The cache across runtimes: a fetch stuck on a runtime that stopped and the fetch that
//! replaces it, a runtime shutting down under a fetch, and the backoff kept across runtimes.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tokio::sync::Semaphore;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_twn_auth::{
    AccessToken, CachedToken, Error, InstanceKey, Token, TokenSource, TwnAuth, TwnAuthLayer,
};

const URL: &str = "https://navigator-api.tweakwise.com/stats/totalproducts";

fn key() -> InstanceKey {
    InstanceKey::new("3f8c1a2b").unwrap()
}

type Inner = tower::util::BoxCloneSyncService<Request<()>, Response<()>, Infallible>;

/// Answers 401 to `reject`, 200 otherwise; records tokens.
fn inner(seen: Arc<Mutex<Vec<String>>>, reject: &'static str) -> Inner {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |req: Request<()>| {
        let value = req.headers()["twn-authentication"]
            .to_str()
            .unwrap()
            .to_owned();
        seen.lock().unwrap().push(value.clone());
        async move {
            let mut response = Response::new(());
            if value == reject {
                *response.status_mut() = StatusCode::UNAUTHORIZED;
            }
            Ok::<_, Infallible>(response)
        }
    }))
}

async fn send(service: &TwnAuth<Inner, CachedToken>) -> Result<Response<()>, BoxError> {
    service
        .clone()
        .oneshot(Request::get(URL).body(()).unwrap())
        .await
}

/// fetch 1 hangs forever; fetch 3 waits for `gate`; the others answer at once.
/// Tracks how many fetches run at the same time.
#[derive(Clone)]
struct Scripted {
    fetches: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    max_running: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
}

impl Default for Scripted {
    fn default() -> Self {
        Scripted {
            fetches: Arc::default(),
            running: Arc::default(),
            max_running: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
        }
    }
}

struct Running(Arc<AtomicUsize>);
impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TokenSource for Scripted {
    async fn fetch(&self) -> Result<Token, BoxError> {
        let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        let _running = Running(self.running.clone());
        match n {
            1 => std::future::pending::<()>().await,
            3 => drop(self.gate.acquire().await.unwrap()),
            _ => {}
        }
        Ok(Token::new(AccessToken::new(&format!("tok-{n}")).unwrap()))
    }
}

/// Fetch 1 stuck on an idle runtime, fetch 2 started in its place on a busy one, and fetch
/// 3 under way there (held at the gate) after the server rejected fetch 2's token.
struct StuckThenRotated {
    source: Scripted,
    service: TwnAuth<Inner, CachedToken>,
    seen: Arc<Mutex<Vec<String>>>,
    /// `None` once a test dropped it.
    idle: Option<tokio::runtime::Runtime>,
    busy: tokio::runtime::Runtime,
}

impl StuckThenRotated {
    fn new() -> Self {
        let source = Scripted::default();
        let layer = TwnAuthLayer::with_token_source(key(), source.clone())
            .fetch_timeout(Duration::from_secs(2))
            .detect_rotation();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let service = ServiceBuilder::new()
            .layer(layer)
            .service(inner(seen.clone(), "tok-2"));

        // Fetch 1 starts on a current-thread runtime that is then left idle.
        let idle = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        idle.block_on(async {
            let first = tokio::time::timeout(Duration::from_millis(10), send(&service)).await;
            assert!(first.is_err(), "fetch 1 never answers");
        });

        // A request gives up on it a second past the fetch timeout and starts fetch 2 here;
        // tok-2 is rejected, so rotation detection starts fetch 3.
        let busy = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let status = busy.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), send(&service))
                .await
                .expect("the request gave up on the stuck fetch")
                .unwrap()
                .status()
        });
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        for _ in 0..200 {
            if source.fetches.load(Ordering::SeqCst) == 3 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            source.fetches.load(Ordering::SeqCst),
            3,
            "fetch 3 runs after the rejection"
        );
        StuckThenRotated {
            source,
            service,
            seen,
            idle: Some(idle),
            busy,
        }
    }

    /// Sends a request on the busy runtime and gives it time to join fetch 3.
    fn spawn_request(&self) -> tokio::task::JoinHandle<Result<Response<()>, BoxError>> {
        let service = self.service.clone();
        let request = self.busy.spawn(async move { send(&service).await });
        std::thread::sleep(Duration::from_millis(100));
        request
    }

    /// Opens the gate and returns each request's status, or its error as text.
    fn finish(
        &self,
        requests: Vec<tokio::task::JoinHandle<Result<Response<()>, BoxError>>>,
    ) -> Vec<Result<StatusCode, String>> {
        self.source.gate.add_permits(10);
        requests
            .into_iter()
            .map(|request| {
                let result = self.busy.block_on(request).unwrap();
                result.map(|r| r.status()).map_err(|e| e.to_string())
            })
            .collect()
    }
}

/// A fetch stuck on an idle runtime and replaced by another is later dropped with its
/// runtime: the requests waiting for the fetch that replaced it are not failed, and no
/// further fetch starts while that one runs.
#[test]
fn abandoning_a_replaced_stuck_fetch_does_not_fail_the_waiters_of_a_live_fetch() {
    let mut stuck = StuckThenRotated::new();
    let waiter = stuck.spawn_request();

    // The idle runtime goes away, and with it the long-replaced fetch 1.
    drop(stuck.idle.take());
    let running = stuck.source.running.load(Ordering::SeqCst);
    stuck.source.max_running.store(running, Ordering::SeqCst);

    // Another request while fetch 3 is still under way joins it rather than start fetch 4.
    let second = stuck.spawn_request();
    assert_eq!(
        stuck.finish(vec![waiter, second]),
        [Ok(StatusCode::OK), Ok(StatusCode::OK)],
        "(waiter of fetch 3, next request)"
    );
    assert_eq!(stuck.seen.lock().unwrap().last().unwrap(), "tok-3");
    assert_eq!(stuck.source.fetches.load(Ordering::SeqCst), 3);
    assert_eq!(
        stuck.source.max_running.load(Ordering::SeqCst),
        1,
        "fetches at once after the idle runtime went away"
    );
}

/// Documented: the runtime that ran the fetch shuts down => its waiters get
/// FetchAbandoned, and the next request starts over.
#[test]
fn runtime_shutdown_under_a_fetch_fails_waiters_promptly_and_next_request_refetches() {
    #[derive(Clone, Default)]
    struct Slow(Arc<AtomicUsize>);
    impl TokenSource for Slow {
        async fn fetch(&self) -> Result<Token, BoxError> {
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            if n == 1 {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Ok(Token::new(AccessToken::new(&format!("tok-{n}")).unwrap()))
        }
    }
    let source = Slow::default();
    let layer = TwnAuthLayer::with_token_source(key(), source.clone());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(inner(seen.clone(), "none"));

    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let other = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let leader = {
        let s = service.clone();
        doomed.spawn(async move { send(&s).await })
    };
    std::thread::sleep(Duration::from_millis(50));
    let waiter = {
        let s = service.clone();
        other.spawn(async move { send(&s).await })
    };
    std::thread::sleep(Duration::from_millis(50));
    doomed.shutdown_timeout(Duration::from_secs(1));
    drop(leader);

    let result = other.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("waiter hangs")
            .unwrap()
    });
    let error = result.unwrap_err();
    assert!(
        matches!(
            error.downcast_ref::<Error>(),
            Some(Error::FetchAbandoned { .. })
        ),
        "{error}"
    );
    other.block_on(async { send(&service).await.unwrap() });
    assert_eq!(source.0.load(Ordering::SeqCst), 2);
    assert_eq!(seen.lock().unwrap().clone(), ["tok-2"]);
}

/// Same set-up, but the idle runtime is driven again instead of dropped (a sync wrapper
/// calling `block_on` now and then): fetch 1 times out there, long after it was replaced,
/// and the requests waiting for fetch 3 still get fetch 3's token.
#[test]
fn timeout_of_a_replaced_stuck_fetch_does_not_fail_the_waiters_of_a_live_fetch() {
    let stuck = StuckThenRotated::new();
    let waiter = stuck.spawn_request();

    // The idle runtime runs for a moment: fetch 1's timeout has long passed.
    let idle = stuck.idle.as_ref().expect("not dropped in this test");
    idle.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });

    // A request while fetch 3 is still under way joins it.
    let after = stuck.spawn_request();
    assert_eq!(
        stuck.finish(vec![waiter, after]),
        [Ok(StatusCode::OK), Ok(StatusCode::OK)],
        "(waiter of fetch 3, next request)"
    );
    assert_eq!(stuck.seen.lock().unwrap().last().unwrap(), "tok-3");
    assert_eq!(stuck.source.fetches.load(Ordering::SeqCst), 3);
}

/// After a failed refresh the source is left alone for the backoff. Moving to another
/// runtime (the first one shut down, which the docs say is noticed) must not skip it.
#[test]
fn runtime_change_does_not_skip_the_backoff_after_a_failed_refresh() {
    #[derive(Clone, Default)]
    struct FailAfterFirst(Arc<AtomicUsize>);
    impl TokenSource for FailAfterFirst {
        async fn fetch(&self) -> Result<Token, BoxError> {
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            if n > 1 {
                return Err("down".into());
            }
            Ok(Token::new(AccessToken::new("tok-1").unwrap())
                .refresh_after(Duration::from_millis(100)))
        }
    }
    let source = FailAfterFirst::default();
    let layer = TwnAuthLayer::with_token_source(key(), source.clone())
        .backoff(Duration::from_secs(60), Duration::from_secs(60));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(inner(seen.clone(), "none"));

    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    first.block_on(async {
        send(&service).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        send(&service).await.unwrap(); // starts the refresh, which fails
        tokio::time::sleep(Duration::from_millis(50)).await;
        for _ in 0..10 {
            send(&service).await.unwrap();
        }
    });
    assert_eq!(source.0.load(Ordering::SeqCst), 2);
    drop(first);

    let second = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        for _ in 0..10 {
            send(&service).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    assert!(seen.lock().unwrap().iter().all(|t| t == "tok-1"));
    assert_eq!(
        source.0.load(Ordering::SeqCst),
        2,
        "the source was asked again inside its 60 s backoff"
    );
}

/// A source that re-reads every 200 ms and counts its fetches; fetch `slow` takes 500 ms.
#[derive(Clone, Default)]
struct Rereading {
    fetches: Arc<AtomicUsize>,
    slow: usize,
}

impl TokenSource for Rereading {
    async fn fetch(&self) -> Result<Token, BoxError> {
        let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.slow {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let token = AccessToken::new(&format!("tok-{n}"))?;
        Ok(Token::new(token).refresh_after(Duration::from_millis(200)))
    }
}

fn multi_thread(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

/// Sends requests on `runtime` for `span`, each a little after the last, and returns the
/// tokens the inner service saw meanwhile.
fn keep_sending(
    runtime: &tokio::runtime::Runtime,
    service: &TwnAuth<Inner, CachedToken>,
    seen: &Arc<Mutex<Vec<String>>>,
    span: Duration,
) -> Vec<String> {
    let before = seen.lock().unwrap().len();
    runtime.block_on(async {
        let start = std::time::Instant::now();
        while start.elapsed() < span {
            send(service).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    seen.lock().unwrap()[before..].to_vec()
}

/// A source that blocks its thread for longer than the fetch timeout (a synchronous SDK
/// call) on a runtime that is otherwise alive: the waiters take the fetch for stuck and start
/// another, but the first one's token, when it comes, still serves them.
#[test]
fn slow_fetch_taken_for_stuck_still_serves_the_waiters() {
    #[derive(Clone, Default)]
    struct Blocking(Arc<AtomicUsize>);
    impl TokenSource for Blocking {
        async fn fetch(&self) -> Result<Token, BoxError> {
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            std::thread::sleep(Duration::from_millis(1500));
            Ok(Token::new(AccessToken::new(&format!("tok-{n}"))?))
        }
    }
    let source = Blocking::default();
    // Waiters give up on a fetch 1.2 s after it started; the source answers in 1.5 s.
    let layer = TwnAuthLayer::with_token_source(key(), source.clone())
        .fetch_timeout(Duration::from_millis(200));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(inner(seen.clone(), "none"));

    let runtime = multi_thread(4);
    let results = runtime.block_on(async {
        let mut requests = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let service = service.clone();
            requests.spawn(async move { send(&service).await.map_err(|e| e.to_string()) });
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut statuses = Vec::new();
        while let Some(result) = requests.join_next().await {
            statuses.push(result.unwrap().map(|response| response.status()));
        }
        statuses
    });
    drop(runtime);

    assert_eq!(results, vec![Ok(StatusCode::OK); 10]);
    // The first fetch, and the one started when it was taken for stuck.
    assert_eq!(source.0.load(Ordering::SeqCst), 2);
    assert_eq!(seen.lock().unwrap().as_slice(), ["tok-1"; 10]);
}

/// A request spawns the fetch on a runtime and is dropped before the fetch task first runs;
/// the runtime then shuts down. The fetch counts as abandoned at once, so the next request
/// starts another instead of waiting for the first a second past its timeout.
#[test]
fn fetch_task_dropped_before_it_ever_ran_is_started_again_at_once() {
    let source = Rereading::default();
    let layer = TwnAuthLayer::with_token_source(key(), source.clone())
        .fetch_timeout(Duration::from_secs(30));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(inner(seen.clone(), "none"));

    let doomed = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    doomed.block_on(async {
        let mut request = std::pin::pin!(send(&service));
        let polled = futures_poll_once(request.as_mut()).await;
        assert!(polled.is_pending(), "the request waits for the fetch");
    });
    assert_eq!(
        source.fetches.load(Ordering::SeqCst),
        0,
        "spawned, never run"
    );
    drop(doomed);

    let busy = multi_thread(1);
    let response = busy.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), send(&service))
            .await
            .expect("the next request does not wait for the dropped fetch")
    });
    assert_eq!(response.unwrap().status(), StatusCode::OK);
    assert_eq!(source.fetches.load(Ordering::SeqCst), 1);
    assert_eq!(seen.lock().unwrap().as_slice(), ["tok-1"]);
}

/// Polls `future` once.
async fn futures_poll_once<F: std::future::Future + Unpin>(
    mut future: F,
) -> std::task::Poll<F::Output> {
    std::future::poll_fn(|cx| std::task::Poll::Ready(std::pin::Pin::new(&mut future).poll(cx)))
        .await
}

/// A background re-read starts on a runtime that then shuts down, before the re-read ran or
/// while it runs: it is still due, and a request on another runtime starts it again once
/// the backoff has passed.
#[test]
fn background_refresh_lost_with_its_runtime_is_started_again() {
    for (slow, wait_on_doomed) in [(0, None), (2, Some(Duration::from_millis(50)))] {
        let source = Rereading {
            slow,
            ..Rereading::default()
        };
        let backoff = Duration::from_millis(300);
        let layer =
            TwnAuthLayer::with_token_source(key(), source.clone()).backoff(backoff, backoff);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let service = ServiceBuilder::new()
            .layer(layer)
            .service(inner(seen.clone(), "none"));

        let busy = multi_thread(1);
        busy.block_on(async {
            send(&service).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        });
        // The re-read is due: this request starts it on `doomed`, which shuts down before
        // the re-read runs, or while it sleeps.
        let doomed = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        doomed.block_on(async {
            // The token is at hand, so the request never yields to the re-read's task.
            send(&service).await.unwrap();
            if let Some(wait) = wait_on_doomed {
                tokio::time::sleep(wait).await;
            }
        });
        let started_on_doomed = source.fetches.load(Ordering::SeqCst);
        drop(doomed);

        // Within the backoff, the source is left alone.
        keep_sending(&busy, &service, &seen, Duration::from_millis(150));
        assert_eq!(source.fetches.load(Ordering::SeqCst), started_on_doomed);
        let sent = keep_sending(&busy, &service, &seen, Duration::from_millis(600));
        let fetches = source.fetches.load(Ordering::SeqCst);
        assert!(
            fetches > started_on_doomed,
            "slow fetch {slow}: no re-read after the runtime went away ({fetches} fetches)"
        );
        assert_ne!(
            sent.last().map(String::as_str),
            Some("tok-1"),
            "slow fetch {slow}"
        );
    }
}

/// A synchronous wrapper that makes a runtime for each request: every background re-read it
/// starts is dropped with that runtime. The source is asked again only after a backoff, not
/// for every request, and the token in hand keeps being sent.
#[test]
fn runtime_per_request_does_not_call_the_source_for_every_request() {
    /// Re-read every 200 ms; every fetch after the first takes 500 ms, longer than any of
    /// these runtimes lives.
    #[derive(Clone, Default)]
    struct SlowRereads(Arc<AtomicUsize>);
    impl TokenSource for SlowRereads {
        async fn fetch(&self) -> Result<Token, BoxError> {
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            if n > 1 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let token = AccessToken::new(&format!("tok-{n}"))?;
            Ok(Token::new(token).refresh_after(Duration::from_millis(200)))
        }
    }
    let source = SlowRereads::default();
    let backoff = Duration::from_millis(400);
    let layer = TwnAuthLayer::with_token_source(key(), source.clone()).backoff(backoff, backoff);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(inner(seen.clone(), "none"));
    // Each request on a runtime of its own, which lets the re-read it started begin.
    let send_on_own_runtime = || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            send(&service).await.unwrap();
            tokio::task::yield_now().await;
        });
    };

    send_on_own_runtime();
    std::thread::sleep(Duration::from_millis(250));
    // The re-read is due from here on; 20 requests over about 500 ms.
    for _ in 0..20 {
        send_on_own_runtime();
        std::thread::sleep(Duration::from_millis(25));
    }

    // The first fetch, the re-read the first request after 200 ms started, and at most one
    // more for each 400 ms backoff since; never one per request.
    let fetches = source.0.load(Ordering::SeqCst);
    assert!(
        (2..=4).contains(&fetches),
        "{fetches} fetches for 21 requests"
    );
    assert_eq!(seen.lock().unwrap().as_slice(), ["tok-1"; 21]);
}

/// A runtime holding a fetch is dropped while its thread unwinds from a panic that has
/// nothing to do with the source: the fetch is abandoned, not a failure of the source, so
/// the next request fetches at once instead of failing for the backoff.
#[test]
fn fetch_dropped_while_its_thread_unwinds_is_abandoned_not_failed() {
    #[derive(Clone, Default)]
    struct Never(Arc<AtomicUsize>);
    impl TokenSource for Never {
        async fn fetch(&self) -> Result<Token, BoxError> {
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            if n == 1 {
                std::future::pending::<()>().await;
            }
            Ok(Token::new(AccessToken::new(&format!("tok-{n}"))?))
        }
    }
    let source = Never::default();
    let backoff = Duration::from_secs(60);
    let layer = TwnAuthLayer::with_token_source(key(), source.clone()).backoff(backoff, backoff);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(inner(seen.clone(), "none"));

    let unwinding = {
        let service = service.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let first = tokio::time::timeout(Duration::from_millis(20), send(&service)).await;
                assert!(first.is_err(), "fetch 1 never answers");
            });
            // The runtime, and fetch 1 with it, is dropped while this panic unwinds.
            let _runtime = runtime;
            panic!("unrelated to the source");
        })
    };
    assert!(unwinding.join().is_err());

    let response = multi_thread(1).block_on(send(&service));
    assert_eq!(response.unwrap().status(), StatusCode::OK);
    assert_eq!(source.0.load(Ordering::SeqCst), 2);
    assert_eq!(seen.lock().unwrap().as_slice(), ["tok-2"]);
}
