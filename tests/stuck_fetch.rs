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

/// A fetch stuck on an idle runtime, replaced by the documented "stuck" restart, later
/// gets dropped with its runtime. Its FetchGuard must not touch the flight of a fetch that
/// is alive and well on another runtime.
#[test]
fn abandoning_a_replaced_stuck_fetch_does_not_fail_the_waiters_of_a_live_fetch() {
    let source = Scripted::default();
    let layer = TwnAuthLayer::with_token_source(key(), source.clone())
        .fetch_timeout(Duration::from_secs(2))
        .detect_rotation();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(inner(seen.clone(), "tok-2"));

    // 1. Fetch 1 starts on an idle current-thread runtime and never finishes there.
    let idle = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    idle.block_on(async {
        assert!(
            tokio::time::timeout(Duration::from_millis(10), send(&service))
                .await
                .is_err()
        );
    });

    let busy = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // 2. A waiter gives up on it and fetch 2 runs here; tok-2 is rejected, so rotation
    //    detection starts fetch 3 (held at the gate).
    let status = busy.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), send(&service))
            .await
            .unwrap()
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

    // 3. A request waits for fetch 3.
    let waiter = {
        let service = service.clone();
        busy.spawn(async move { send(&service).await })
    };
    std::thread::sleep(Duration::from_millis(100));

    // 4. The idle runtime goes away, and with it the long-replaced fetch 1.
    drop(idle);
    // From here on, count concurrency afresh (fetch 1 is gone with its runtime).
    source
        .max_running
        .store(source.running.load(Ordering::SeqCst), Ordering::SeqCst);

    // 5. Another request while fetch 3 is still under way must join it, not start fetch 4.
    let second = {
        let service = service.clone();
        busy.spawn(async move { send(&service).await })
    };
    std::thread::sleep(Duration::from_millis(100));
    source.gate.add_permits(10);

    let (first, second) = busy.block_on(async { (waiter.await.unwrap(), second.await.unwrap()) });
    let fetches = source.fetches.load(Ordering::SeqCst);
    let max_running = source.max_running.load(Ordering::SeqCst);
    let first = first.map(|r| r.status()).map_err(|e| e.to_string());
    let second = second.map(|r| r.status()).map_err(|e| e.to_string());
    assert_eq!(
        (first, second, fetches, max_running),
        (Ok(StatusCode::OK), Ok(StatusCode::OK), 3, 1),
        "(waiter, second request, fetches, fetches at once after the idle runtime went away)"
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
/// calling `block_on` now and then): the long-replaced fetch 1 times out there, and its
/// failure is handed to the waiters of fetch 3, which is alive and would succeed.
#[test]
fn timeout_of_a_replaced_stuck_fetch_does_not_fail_the_waiters_of_a_live_fetch() {
    let source = Scripted::default();
    let layer = TwnAuthLayer::with_token_source(key(), source.clone())
        .fetch_timeout(Duration::from_secs(2))
        .detect_rotation();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(inner(seen.clone(), "tok-2"));

    let idle = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    idle.block_on(async {
        assert!(
            tokio::time::timeout(Duration::from_millis(10), send(&service))
                .await
                .is_err()
        );
    });
    let busy = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let status = busy.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), send(&service))
            .await
            .unwrap()
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
    assert_eq!(source.fetches.load(Ordering::SeqCst), 3);

    let waiter = {
        let service = service.clone();
        busy.spawn(async move { send(&service).await })
    };
    std::thread::sleep(Duration::from_millis(100));

    // The idle runtime runs for a moment: fetch 1's 200 ms timeout has long passed.
    idle.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });

    // A request while fetch 3 is still under way (gate closed) should join it.
    let after = {
        let service = service.clone();
        busy.spawn(async move { send(&service).await })
    };
    std::thread::sleep(Duration::from_millis(100));
    source.gate.add_permits(10);
    let first = busy
        .block_on(waiter)
        .unwrap()
        .map(|r| r.status())
        .map_err(|e| e.to_string());
    let after = busy
        .block_on(after)
        .unwrap()
        .map(|r| r.status())
        .map_err(|e| e.to_string());
    assert_eq!(
        (first, after),
        (Ok(StatusCode::OK), Ok(StatusCode::OK)),
        "(waiter of fetch 3, next request)"
    );
    assert_eq!(seen.lock().unwrap().last().unwrap(), "tok-3");
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
