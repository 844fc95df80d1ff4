//! The layer with a fixed instance key and access token, over in-process inner services.
//!
//! URIs are `https` throughout: plain http to a host that is not loopback is refused by the
//! layer, which is not what these tests are about.

// Tests and benchmarks need Rust 1.88, as their dev-dependencies do; the `rust-version`
// that Clippy checks API use against is what the library alone needs.
#![allow(clippy::incompatible_msrv)]

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::Full;
use tower::buffer::Buffer;
use tower::limit::ConcurrencyLimit;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_test::mock;
use tower_twn_auth::{
    AccessToken, CachedToken, Error, InstanceKey, InvalidCredential, LoadError, ResponseFuture,
    StaticToken, TokenProvider, TwnAuth, TwnAuthLayer, TwnCredentials, TWN_AUTHENTICATION,
    TWN_INSTANCEKEY,
};

const KEY: &str = "ik-3f8c1a2b";
const TOKEN: &str = "tw-0123456789abcdef";
const URI: &str = "https://navigator-api.tweakwise.com/stats/totalproducts";

/// Canaries: values whose distinctive parts must never show up in any `Debug` output.
const CANARY_KEY: &str = "ik-canary-5Qf9Zt";
const CANARY_TOKEN: &str = "tok-canary-8Xw2Lm";
const CANARY_FRAGMENTS: [&str; 3] = ["canary", "5Qf9Zt", "8Xw2Lm"];

fn layer() -> TwnAuthLayer {
    layer_with(KEY, TOKEN)
}

fn layer_with(key: &str, token: &str) -> TwnAuthLayer {
    TwnAuthLayer::new(
        InstanceKey::new(key).unwrap(),
        AccessToken::new(token).unwrap(),
    )
}

fn request() -> Request<()> {
    Request::get(URI).body(()).unwrap()
}

/// Returns every value of the header, in order.
fn values<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a HeaderValue> {
    headers.get_all(name).iter().collect()
}

/// Returns the first canary fragment that `output` shows, ignoring case.
fn leaked_fragment(output: &str) -> Option<&'static str> {
    let output = output.to_ascii_lowercase();
    CANARY_FRAGMENTS
        .into_iter()
        .find(|fragment| output.contains(&fragment.to_ascii_lowercase()))
}

fn assert_no_canary(what: &str, output: &str) {
    if let Some(fragment) = leaked_fragment(output) {
        panic!("{what} shows {fragment:?}: {output}");
    }
}

/// An inner service that answers with the request it received, so tests can inspect it.
fn echo<B>(request: Request<B>) -> std::future::Ready<Result<Response<Request<B>>, Infallible>> {
    std::future::ready(Ok(Response::new(request)))
}

/// Sends `request` through the layer and returns it as the inner service received it.
///
/// `B` has no bounds: this compiles only if the layer needs none.
async fn through<B>(layer: &TwnAuthLayer, request: Request<B>) -> Request<B> {
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service_fn(echo::<B>);
    service.oneshot(request).await.unwrap().into_body()
}

#[derive(Debug, PartialEq, Eq)]
struct InnerError(&'static str);

impl fmt::Display for InnerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "inner failed: {}", self.0)
    }
}

impl std::error::Error for InnerError {}

// ---------------------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn request_without_headers_leaves_with_exactly_one_of_each() {
    let seen = through(&layer(), request()).await;

    let headers = seen.headers();
    assert_eq!(values(headers, "TWN-InstanceKey"), [KEY]);
    assert_eq!(values(headers, "twn-instancekey"), [KEY]);
    assert_eq!(values(headers, "TWN-Authentication"), [TOKEN]);
    assert_eq!(values(headers, "twn-authentication"), [TOKEN]);
    assert_eq!(
        headers.len(),
        2,
        "no other header is added: {:?}",
        headers.keys()
    );
}

#[test]
fn header_name_constants_are_the_lowercase_names() {
    assert_eq!(TWN_INSTANCEKEY.as_str(), "twn-instancekey");
    assert_eq!(TWN_AUTHENTICATION.as_str(), "twn-authentication");
    assert_eq!(
        TWN_INSTANCEKEY,
        http::HeaderName::from_static("twn-instancekey")
    );
}

#[tokio::test]
async fn preexisting_header_is_replaced_not_appended() {
    let mut request = request();
    let headers = request.headers_mut();
    headers.append("TWN-InstanceKey", HeaderValue::from_static("stale-key-1"));
    headers.append("TWN-InstanceKey", HeaderValue::from_static("stale-key-2"));
    headers.append(
        "twn-authentication",
        HeaderValue::from_static("stale-token"),
    );
    headers.insert("x-other", HeaderValue::from_static("kept"));

    let seen = through(&layer(), request).await;

    let headers = seen.headers();
    assert_eq!(values(headers, "TWN-InstanceKey"), [KEY]);
    assert_eq!(values(headers, "TWN-Authentication"), [TOKEN]);
    assert_eq!(values(headers, "x-other"), ["kept"]);
}

#[tokio::test]
async fn preexisting_instance_key_alone_is_replaced_and_token_added() {
    let mut request = request();
    request
        .headers_mut()
        .insert("twn-instancekey", HeaderValue::from_static("stale"));

    let seen = through(&layer(), request).await;

    assert_eq!(values(seen.headers(), "TWN-InstanceKey"), [KEY]);
    assert_eq!(values(seen.headers(), "TWN-Authentication"), [TOKEN]);
}

#[tokio::test]
async fn same_layer_applied_twice_sends_one_value_each() {
    let layer = layer();
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .layer(layer)
        .service_fn(echo::<()>);

    let seen = service.oneshot(request()).await.unwrap().into_body();

    assert_eq!(values(seen.headers(), "TWN-InstanceKey"), [KEY]);
    assert_eq!(values(seen.headers(), "TWN-Authentication"), [TOKEN]);
}

#[tokio::test]
async fn two_different_layers_send_one_value_each_from_the_inner_layer() {
    let service = ServiceBuilder::new()
        .layer(layer_with("outer-key", "outer-token"))
        .layer(layer_with("inner-key", "inner-token"))
        .service_fn(echo::<()>);

    let seen = service.oneshot(request()).await.unwrap().into_body();

    assert_eq!(values(seen.headers(), "TWN-InstanceKey"), ["inner-key"]);
    assert_eq!(
        values(seen.headers(), "TWN-Authentication"),
        ["inner-token"]
    );
}

#[tokio::test]
async fn both_header_values_are_marked_sensitive() {
    let seen = through(&layer(), request()).await;

    assert!(seen.headers()[TWN_INSTANCEKEY].is_sensitive());
    assert!(seen.headers()[TWN_AUTHENTICATION].is_sensitive());
}

#[tokio::test]
async fn replaced_non_sensitive_value_leaves_sensitive() {
    let mut request = request();
    request
        .headers_mut()
        .insert(TWN_AUTHENTICATION, HeaderValue::from_static("stale"));
    assert!(!request.headers()[TWN_AUTHENTICATION].is_sensitive());

    let seen = through(&layer(), request).await;

    assert!(seen.headers()[TWN_AUTHENTICATION].is_sensitive());
}

#[tokio::test]
async fn every_request_of_a_reused_service_gets_the_headers() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let mut service =
        ServiceBuilder::new()
            .layer(layer())
            .service_fn(move |request: Request<()>| {
                counter.fetch_add(1, Ordering::SeqCst);
                echo(request)
            });

    for _ in 0..5 {
        let response = service
            .ready()
            .await
            .unwrap()
            .call(request())
            .await
            .unwrap();
        assert_eq!(values(response.body().headers(), "TWN-InstanceKey"), [KEY]);
        assert_eq!(
            values(response.body().headers(), "TWN-Authentication"),
            [TOKEN]
        );
    }

    assert_eq!(calls.load(Ordering::SeqCst), 5);
}

// ---------------------------------------------------------------------------------------
// Secrets in Debug output
// ---------------------------------------------------------------------------------------

fn canary_layer() -> TwnAuthLayer {
    layer_with(CANARY_KEY, CANARY_TOKEN)
}

#[test]
fn canary_check_detects_a_leak() {
    // The check itself must be able to fail, or the tests below prove nothing.
    assert_eq!(leaked_fragment(&format!("{CANARY_KEY:?}")), Some("canary"));
    assert_eq!(leaked_fragment("x-8XW2LM-y"), Some("8Xw2Lm"));
    assert_eq!(leaked_fragment("InstanceKey(<redacted>)"), None);
}

#[tokio::test]
async fn debug_of_request_after_the_layer_shows_no_secret() {
    let seen = through(&canary_layer(), request()).await;

    assert_no_canary("request", &format!("{seen:?}"));
    assert_no_canary("request (alternate)", &format!("{seen:#?}"));
    assert_no_canary("headers", &format!("{:?}", seen.headers()));
    assert_no_canary(
        "key value",
        &format!("{:?}", seen.headers()[TWN_INSTANCEKEY]),
    );
    assert_no_canary(
        "token value",
        &format!("{:?}", seen.headers()[TWN_AUTHENTICATION]),
    );
}

#[test]
fn debug_of_layer_and_service_shows_no_secret() {
    let layer = canary_layer();
    let service = layer.layer(tower::service_fn(echo::<()>));
    let (mock_service, _handle) = mock::pair::<Request<()>, Response<()>>();
    let mock_service = layer.layer(mock_service);

    assert_no_canary("layer", &format!("{layer:?}"));
    assert_no_canary("layer (alternate)", &format!("{layer:#?}"));
    assert_no_canary("service", &format!("{service:?}"));
    assert_no_canary("service (alternate)", &format!("{service:#?}"));
    assert_no_canary("service over mock", &format!("{mock_service:#?}"));
    assert_no_canary("layer of service", &format!("{:?}", service.layer()));
}

#[test]
fn debug_of_credentials_shows_no_secret() {
    let key = InstanceKey::new(CANARY_KEY).unwrap();
    let token = AccessToken::new(CANARY_TOKEN).unwrap();
    let credentials = TwnCredentials::new(key.clone(), token.clone());

    assert_no_canary("InstanceKey", &format!("{key:?} {key:#?}"));
    assert_no_canary("AccessToken", &format!("{token:?} {token:#?}"));
    assert_no_canary(
        "TwnCredentials",
        &format!("{credentials:?} {credentials:#?}"),
    );
}

#[tokio::test]
async fn debug_of_response_future_shows_no_secret() {
    let mut service = canary_layer().layer(tower::service_fn(echo::<()>));
    let future: ResponseFuture<_, _> = service.ready().await.unwrap().call(request());

    assert_no_canary("response future", &format!("{future:?}"));
    future.await.unwrap();
}

#[tokio::test]
async fn response_future_debug_names_its_state() {
    let mut service = layer().layer(tower::service_fn(echo::<()>));
    let called = service.ready().await.unwrap().call(request());
    assert_eq!(
        format!("{called:?}"),
        r#"ResponseFuture { state: "called" }"#
    );

    let plain = Request::get("http://api.example.test/").body(()).unwrap();
    let refused = service.ready().await.unwrap().call(plain);
    assert_eq!(
        format!("{refused:?}"),
        r#"ResponseFuture { state: "refused" }"#
    );

    // A token source that never answers keeps the request waiting.
    let key = InstanceKey::new(KEY).unwrap();
    let never = || std::future::pending::<Result<tower_twn_auth::Token, BoxError>>();
    let mut service =
        TwnAuthLayer::with_token_source(key, never).layer(tower::service_fn(echo::<()>));
    let waiting: ResponseFuture<_, _, CachedToken> = service.ready().await.unwrap().call(request());
    assert_eq!(
        format!("{waiting:?}"),
        r#"ResponseFuture { state: "waiting for a token" }"#
    );
}

#[tokio::test]
async fn refused_future_returns_its_error_once_then_an_error_not_a_panic() {
    let mut service = layer().layer(tower::service_fn(echo::<()>));
    let plain = Request::get("http://api.example.test/").body(()).unwrap();
    let mut future = service.ready().await.unwrap().call(plain);
    let mut cx = Context::from_waker(std::task::Waker::noop());

    let Poll::Ready(Err(first)) = std::pin::Pin::new(&mut future).poll(&mut cx) else {
        panic!("a refused request fails at once");
    };
    assert!(matches!(
        first.downcast_ref::<Error>(),
        Some(Error::InsecureDestination { .. })
    ));
    let Poll::Ready(Err(again)) = std::pin::Pin::new(&mut future).poll(&mut cx) else {
        panic!("polling a finished refused future fails again");
    };
    assert!(again.downcast_ref::<Error>().is_none());
    assert!(again.to_string().contains("after completion"), "{again}");
}

#[test]
fn debug_and_display_of_credential_errors_show_no_secret() {
    let key_error: InvalidCredential = InstanceKey::new("ik-canary-5Qf9Zt\r\nX: 1").unwrap_err();
    let token_error: InvalidCredential = AccessToken::new("tok-canary 8Xw2Lm").unwrap_err();

    for error in [key_error, token_error] {
        assert_no_canary(
            "InvalidCredential",
            &format!("{error} {error:?} {error:#?}"),
        );
        let boxed: BoxError = error.into();
        assert_no_canary("boxed InvalidCredential", &format!("{boxed} {boxed:?}"));
    }
}

#[test]
fn debug_and_display_of_load_errors_show_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, "tok-canary-8Xw2Lm\u{7f}\n").unwrap();

    let error: LoadError = AccessToken::from_file(&path).unwrap_err();

    assert!(matches!(error, LoadError::Invalid { .. }), "{error:?}");
    assert_no_canary("LoadError", &format!("{error} {error:?} {error:#?}"));
    let source = std::error::Error::source(&error).unwrap();
    assert_no_canary("LoadError source", &format!("{source} {source:?}"));
}

#[tokio::test]
async fn debug_and_display_of_refusal_error_show_no_secret() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let service = canary_layer().layer(tower::service_fn(move |request: Request<()>| {
        counter.fetch_add(1, Ordering::SeqCst);
        echo(request)
    }));
    let request = Request::get("http://api.example.test/").body(()).unwrap();

    let error = service.oneshot(request).await.unwrap_err();

    assert!(error.downcast_ref::<Error>().is_some(), "{error:?}");
    assert_no_canary("Error", &format!("{error} {error:?} {error:#?}"));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------------------
// Errors of the inner service
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn inner_call_error_passes_through_and_downcasts() {
    let service = layer().layer(tower::service_fn(|_: Request<()>| async {
        Err::<Response<()>, _>(InnerError("call"))
    }));

    let error = service.oneshot(request()).await.unwrap_err();

    assert_eq!(
        error.downcast_ref::<InnerError>(),
        Some(&InnerError("call"))
    );
    assert_eq!(error.to_string(), "inner failed: call");
}

#[tokio::test]
async fn inner_response_error_from_mock_passes_through_and_downcasts() {
    let (mut service, mut handle) = mock::spawn_layer::<Request<()>, Response<()>, _>(layer());
    handle.allow(1);

    assert!(service.poll_ready().is_ready());
    let future = service.call(request());
    let (seen, respond) = handle.next_request().await.unwrap();
    respond.send_error(InnerError("response"));
    let error = future.await.unwrap_err();

    assert_eq!(
        error.downcast_ref::<InnerError>(),
        Some(&InnerError("response"))
    );
    assert_eq!(values(seen.headers(), "TWN-InstanceKey"), [KEY]);
    assert_eq!(values(seen.headers(), "TWN-Authentication"), [TOKEN]);
}

#[tokio::test]
async fn inner_poll_ready_error_passes_through_and_downcasts() {
    let (mut service, mut handle) = mock::spawn_layer::<Request<()>, Response<()>, _>(layer());
    handle.send_error(InnerError("ready"));

    let error = match service.poll_ready() {
        Poll::Ready(Err(error)) => error,
        other => panic!("expected the inner readiness error, got {other:?}"),
    };

    assert_eq!(
        error.downcast_ref::<InnerError>(),
        Some(&InnerError("ready"))
    );
}

// ---------------------------------------------------------------------------------------
// Readiness
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn poll_ready_is_pending_while_inner_is_pending_and_ready_once_inner_is() {
    let (mut service, mut handle) = mock::spawn_layer::<Request<()>, Response<()>, _>(layer());
    handle.allow(0);

    assert!(service.poll_ready().is_pending());
    assert!(!service.is_woken());

    handle.allow(1);
    assert!(
        service.is_woken(),
        "the inner service's wake-up reaches the caller"
    );
    assert!(matches!(service.poll_ready(), Poll::Ready(Ok(()))));

    let future = service.call(request());
    let (seen, respond) = handle.next_request().await.unwrap();
    respond.send_response(Response::new(()));
    future.await.unwrap();
    assert_eq!(values(seen.headers(), "TWN-InstanceKey"), [KEY]);
    assert!(handle.next_request().pending_now());
}

/// Polls a future once, for checks that something is pending right now.
trait PendingNow: Future + Sized {
    fn pending_now(self) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut future = std::pin::pin!(self);
        future.as_mut().poll(&mut cx).is_pending()
    }
}

impl<F: Future> PendingNow for F {}

#[tokio::test]
async fn concurrency_limit_inner_blocks_second_clone_until_first_response() {
    let (mock_service, mut handle) = mock::pair::<Request<()>, Response<()>>();
    handle.allow(2);
    let service = layer().layer(ConcurrencyLimit::new(mock_service, 1));
    let mut first = tower_test::mock::Spawn::new(service.clone());
    let mut second = tower_test::mock::Spawn::new(service);

    assert!(matches!(first.poll_ready(), Poll::Ready(Ok(()))));
    let first_response = first.call(request());
    assert!(second.poll_ready().is_pending(), "the only permit is taken");

    let (_, respond) = handle.next_request().await.unwrap();
    respond.send_response(Response::new(()));
    first_response.await.unwrap();

    assert!(
        second.is_woken(),
        "the released permit wakes the waiting clone"
    );
    assert!(matches!(second.poll_ready(), Poll::Ready(Ok(()))));
    let second_response = second.call(request());
    let (seen, respond) = handle.next_request().await.unwrap();
    respond.send_response(Response::new(()));
    second_response.await.unwrap();
    assert_eq!(values(seen.headers(), "TWN-Authentication"), [TOKEN]);
}

/// Tracks calls of an inner service that yields before answering, so that callers overlap.
#[derive(Default)]
struct Tally {
    calls: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    missing_headers: AtomicUsize,
}

impl Tally {
    async fn serve(self: Arc<Self>, request: Request<()>) -> Result<Response<()>, Infallible> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let headers = request.headers();
        if values(headers, "TWN-InstanceKey") != [KEY]
            || values(headers, "TWN-Authentication") != [TOKEN]
        {
            self.missing_headers.fetch_add(1, Ordering::SeqCst);
        }
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        Ok(Response::new(()))
    }
}

async fn send_concurrently<S>(service: S, count: usize)
where
    S: Service<Request<()>, Response = Response<()>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    let tasks: Vec<_> = (0..count)
        .map(|_| tokio::spawn(service.clone().oneshot(request())))
        .collect();
    for task in tasks {
        task.await
            .expect("no task panics")
            .expect("every request succeeds");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_requests_through_concurrency_limit_one_all_complete() {
    let tally = Arc::new(Tally::default());
    let inner = {
        let tally = Arc::clone(&tally);
        tower::service_fn(move |request| Arc::clone(&tally).serve(request))
    };
    let service = ServiceBuilder::new()
        .layer(layer())
        .concurrency_limit(1)
        .service(inner);

    send_concurrently(service, 20).await;

    assert_eq!(tally.calls.load(Ordering::SeqCst), 20);
    assert_eq!(tally.max_in_flight.load(Ordering::SeqCst), 1);
    assert_eq!(tally.missing_headers.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_requests_through_buffer_of_one_all_complete() {
    let tally = Arc::new(Tally::default());
    let inner = {
        let tally = Arc::clone(&tally);
        tower::service_fn(move |request| Arc::clone(&tally).serve(request))
    };
    let service = layer().layer(Buffer::new(inner, 1));

    send_concurrently(service, 20).await;

    assert_eq!(tally.calls.load(Ordering::SeqCst), 20);
    assert_eq!(tally.missing_headers.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_requests_through_buffer_over_concurrency_limit_all_complete() {
    let tally = Arc::new(Tally::default());
    let inner = {
        let tally = Arc::clone(&tally);
        tower::service_fn(move |request| Arc::clone(&tally).serve(request))
    };
    let service = layer().layer(Buffer::new(ConcurrencyLimit::new(inner, 1), 1));

    send_concurrently(service, 20).await;

    assert_eq!(tally.calls.load(Ordering::SeqCst), 20);
    assert_eq!(tally.max_in_flight.load(Ordering::SeqCst), 1);
    assert_eq!(tally.missing_headers.load(Ordering::SeqCst), 0);
}

/// An inner service that fails any `call` on an instance whose `poll_ready` did not return
/// `Ready` since its last call. A clone starts out not ready, like one holding no permit.
struct Probe {
    readied: bool,
    good_calls: Arc<AtomicUsize>,
    unready_calls: Arc<AtomicUsize>,
}

#[derive(Debug, PartialEq, Eq)]
struct NotReadied;

impl fmt::Display for NotReadied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("probe called without poll_ready")
    }
}

impl std::error::Error for NotReadied {}

impl Probe {
    fn new() -> Self {
        Probe {
            readied: false,
            good_calls: Arc::default(),
            unready_calls: Arc::default(),
        }
    }
}

impl Clone for Probe {
    fn clone(&self) -> Self {
        Probe {
            readied: false,
            good_calls: Arc::clone(&self.good_calls),
            unready_calls: Arc::clone(&self.unready_calls),
        }
    }
}

impl<B> Service<Request<B>> for Probe {
    type Response = Response<()>;
    type Error = NotReadied;
    type Future = std::future::Ready<Result<Response<()>, NotReadied>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), NotReadied>> {
        self.readied = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<B>) -> Self::Future {
        if std::mem::take(&mut self.readied) {
            self.good_calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(Response::new(())))
        } else {
            self.unready_calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Err(NotReadied))
        }
    }
}

#[tokio::test]
async fn probe_clone_called_without_poll_ready_fails() {
    // The probe must be able to catch a layer that calls a clone, or the next test proves
    // nothing.
    let mut probe = Probe::new();
    ServiceExt::<Request<()>>::ready(&mut probe).await.unwrap();
    let mut clone = probe.clone();

    assert_eq!(clone.call(request()).await.unwrap_err(), NotReadied);
    assert!(probe.call(request()).await.is_ok());
    assert_eq!(probe.unready_calls.load(Ordering::SeqCst), 1);
    assert_eq!(probe.good_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn call_uses_the_inner_instance_that_poll_ready_readied() {
    let probe = Probe::new();
    let (good, unready) = (
        Arc::clone(&probe.good_calls),
        Arc::clone(&probe.unready_calls),
    );
    let mut service = layer().layer(probe);

    for _ in 0..3 {
        let ready = ServiceExt::<Request<()>>::ready(&mut service)
            .await
            .unwrap();
        ready
            .call(request())
            .await
            .expect("the readied instance answers");
    }
    layer()
        .layer(Probe::new())
        .oneshot(request())
        .await
        .expect("oneshot readies and calls the same instance");

    assert_eq!(good.load(Ordering::SeqCst), 3);
    assert_eq!(unready.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn clone_of_readied_service_is_not_ready_and_its_unready_call_error_passes_through() {
    let probe = Probe::new();
    let unready = Arc::clone(&probe.unready_calls);
    let mut service = layer().layer(probe);
    ServiceExt::<Request<()>>::ready(&mut service)
        .await
        .unwrap();

    let mut clone = service.clone();
    let error = clone.call(request()).await.unwrap_err();

    assert_eq!(error.downcast_ref::<NotReadied>(), Some(&NotReadied));
    assert_eq!(unready.load(Ordering::SeqCst), 1);
    service
        .call(request())
        .await
        .expect("the original stays ready");
}

#[tokio::test]
async fn mock_inner_is_called_on_the_readied_instance() {
    // tower-test's mock panics when `call` reaches an instance that was not readied.
    let (mut service, mut handle) = mock::spawn_layer::<Request<()>, Response<()>, _>(layer());
    handle.allow(3);

    for _ in 0..3 {
        assert!(matches!(service.poll_ready(), Poll::Ready(Ok(()))));
        let future = service.call(request());
        let (_, respond) = handle.next_request().await.unwrap();
        respond.send_response(Response::new(()));
        future.await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// Auto traits, spawning
// ---------------------------------------------------------------------------------------

fn assert_send<T: Send>(_: &T) {}
fn assert_sync<T: Sync>(_: &T) {}
fn assert_clone<T: Clone>(_: &T) {}

fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
fn assert_send_type<T: Send>() {}

/// Holds for every inner service and future with the stated traits, not only one example.
fn auto_traits_follow_the_inner_service<S: Send + Sync + Clone, F: Send, B: Send>() {
    assert_send_sync_clone::<TwnAuthLayer>();
    assert_send_sync_clone::<TwnAuth<S>>();
    assert_send_type::<ResponseFuture<F, tower_twn_auth::future::TokenWait<S, B>>>();
    assert_send_type::<ResponseFuture<F, tower_twn_auth::future::TokenWait<S, B>, CachedToken>>();
    auto_traits_hold_for_any_token_provider::<StaticToken, S, F, B>();
    auto_traits_hold_for_any_token_provider::<CachedToken, S, F, B>();
}

/// Holds in code generic over the token provider too, which knows of `P` only the trait: a
/// future such code spawns is `Send` without naming the provider.
fn auto_traits_hold_for_any_token_provider<P, S, F, B>()
where
    P: TokenProvider,
    S: Send + Sync + Clone,
    F: Send,
    B: Send,
{
    assert_send_sync_clone::<TwnAuthLayer<P>>();
    assert_send_sync_clone::<TwnAuth<S, P>>();
    assert_send_type::<ResponseFuture<F, tower_twn_auth::future::TokenWait<S, B>, P>>();
}

#[tokio::test]
async fn layer_service_and_future_are_send_and_layer_and_service_clone_sync() {
    let layer: TwnAuthLayer = layer();
    let mut service = ServiceBuilder::new()
        .layer(layer.clone())
        .service_fn(echo::<()>);
    assert_send(&layer);
    assert_sync(&layer);
    assert_clone(&layer);
    assert_send(&service);
    assert_sync(&service);
    assert_clone(&service);

    let future = service.ready().await.unwrap().call(request());
    assert_send(&future);
    future.await.unwrap();

    auto_traits_follow_the_inner_service::<Buffer<Request<()>, BoxFuture>, BoxFuture, ()>();
}

type BoxFuture = std::pin::Pin<Box<dyn Future<Output = Result<Response<()>, BoxError>> + Send>>;

#[tokio::test]
async fn oneshot_can_be_spawned_on_tokio() {
    let service = ServiceBuilder::new().layer(layer()).service_fn(echo::<()>);

    let response = tokio::spawn(service.oneshot(request()))
        .await
        .unwrap()
        .unwrap();

    assert_eq!(
        values(response.body().headers(), "TWN-Authentication"),
        [TOKEN]
    );
}

#[tokio::test]
async fn oneshot_over_buffer_and_concurrency_limit_can_be_spawned_on_tokio() {
    let inner = tower::service_fn(echo::<()>);
    let service = ServiceBuilder::new()
        .layer(layer())
        .buffer(1)
        .concurrency_limit(1)
        .service(inner);

    let response = tokio::spawn(service.oneshot(request()))
        .await
        .unwrap()
        .unwrap();

    assert_eq!(values(response.body().headers(), "TWN-InstanceKey"), [KEY]);
}

// ---------------------------------------------------------------------------------------
// Accessors
// ---------------------------------------------------------------------------------------

/// An inner service with state to reach through the accessors.
#[derive(Clone, Debug)]
struct Tagged {
    tag: u32,
}

impl<B> Service<Request<B>> for Tagged {
    type Response = Response<u32>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<u32>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<B>) -> Self::Future {
        std::future::ready(Ok(Response::new(self.tag)))
    }
}

#[tokio::test]
async fn get_ref_get_mut_and_into_inner_reach_the_inner_service() {
    let mut service = layer().layer(Tagged { tag: 1 });
    assert_eq!(service.get_ref().tag, 1);

    service.get_mut().tag = 2;
    let ready = ServiceExt::<Request<()>>::ready(&mut service)
        .await
        .unwrap();
    let response = ready.call(request()).await.unwrap();
    assert_eq!(*response.body(), 2);

    let inner: Tagged = service.into_inner();
    assert_eq!(inner.tag, 2);
}

#[tokio::test]
async fn layer_of_a_service_wraps_another_service_with_the_same_credentials() {
    let service = layer_with("layer-key", "layer-token").layer(tower::service_fn(echo::<()>));

    let again = service.layer().layer(tower::service_fn(echo::<()>));
    let seen = again.oneshot(request()).await.unwrap().into_body();

    assert_eq!(values(seen.headers(), "TWN-InstanceKey"), ["layer-key"]);
    assert_eq!(
        values(seen.headers(), "TWN-Authentication"),
        ["layer-token"]
    );
}

// ---------------------------------------------------------------------------------------
// Body types
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn unit_string_and_full_bodies_pass_through_unchanged() {
    let layer = layer();

    let unit = through(&layer, request()).await;
    let string = through(
        &layer,
        Request::get(URI).body(String::from("text")).unwrap(),
    )
    .await;
    let full = Full::new(Bytes::from_static(b"bytes"));
    let full = through(&layer, Request::post(URI).body(full).unwrap()).await;

    for headers in [unit.headers(), string.headers(), full.headers()] {
        assert_eq!(values(headers, "TWN-InstanceKey"), [KEY]);
        assert_eq!(values(headers, "TWN-Authentication"), [TOKEN]);
    }
    assert_eq!(string.body(), "text");
    let collected = http_body_util::BodyExt::collect(full.into_body())
        .await
        .unwrap();
    assert_eq!(collected.to_bytes(), "bytes");
}

#[tokio::test]
async fn body_that_is_neither_send_nor_a_body_is_accepted() {
    struct NotABody(#[allow(dead_code)] Rc<Mutex<()>>);

    let request = Request::get(URI).body(NotABody(Rc::default())).unwrap();
    let seen = through(&layer(), request).await;

    assert_eq!(values(seen.headers(), "TWN-InstanceKey"), [KEY]);
}
