//! Rotation: a rejected token is dropped (compare-and-invalidate) and the request is sent once
//! more, through tower's `Retry` with the `RetryRejected` policy.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use tower::retry::Retry;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_twn_auth::{
    AccessToken, CachedToken, FileSource, InstanceKey, ReplayBody, RetryRejected, Token,
    TokenSource, TwnAuth, TwnAuthLayer,
};

const URL: &str = "https://navigator-api.tweakwise.com/catalog/products";

fn key() -> InstanceKey {
    InstanceKey::new("rotation-test-key").unwrap()
}

/// Returns `tok-1`, `tok-2`, … and counts the fetches.
#[derive(Clone, Default)]
struct Numbered {
    fetches: Arc<AtomicUsize>,
}

impl Numbered {
    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl TokenSource for Numbered {
    async fn fetch(&self) -> Result<Token, BoxError> {
        let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Token::new(AccessToken::new(&format!("tok-{n}"))?))
    }
}

/// What the inner service received.
#[derive(Clone, Debug)]
struct Received {
    token: String,
    method: Method,
    uri: String,
    headers: HeaderMap,
    body: Bytes,
}

/// An inner service that rejects the tokens in `rejected` with `rejection` (401 unless told
/// otherwise) and records every call.
#[derive(Clone)]
struct Backend {
    rejected: Arc<Mutex<Vec<String>>>,
    rejection: Arc<Mutex<StatusCode>>,
    received: Arc<Mutex<Vec<Received>>>,
    /// Requests carrying `tok-1` wait here before they are answered.
    barrier: Option<Arc<tokio::sync::Barrier>>,
    /// A request with this body waits for the notification before it is answered.
    hold: Option<(&'static str, Arc<tokio::sync::Notify>)>,
}

impl Backend {
    fn rejecting(tokens: &[&str]) -> Self {
        Backend {
            rejected: Arc::new(Mutex::new(tokens.iter().map(|t| t.to_string()).collect())),
            rejection: Arc::new(Mutex::new(StatusCode::UNAUTHORIZED)),
            received: Arc::default(),
            barrier: None,
            hold: None,
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    fn tokens_received(&self) -> Vec<String> {
        self.received().into_iter().map(|r| r.token).collect()
    }

    /// From now on, rejects `token` too, and answers every rejection with `status`.
    fn reject_with(&self, token: &str, status: StatusCode) {
        self.rejected.lock().unwrap().push(token.to_owned());
        *self.rejection.lock().unwrap() = status;
    }

    fn service<B>(
        &self,
    ) -> impl tower::Service<
        Request<B>,
        Response = Response<String>,
        Error = BoxError,
        Future = impl Send,
    > + Clone
           + Send
           + Sync
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let backend = self.clone();
        tower::service_fn(move |request: Request<B>| {
            let backend = backend.clone();
            async move {
                let (parts, body) = request.into_parts();
                let body = body.collect().await.map_err(Into::into)?.to_bytes();
                // A request without the header is recorded with an empty token.
                let token = match parts.headers.get("twn-authentication") {
                    Some(value) => value.to_str()?.to_owned(),
                    None => String::new(),
                };
                if let Some(barrier) = backend.barrier.as_ref().filter(|_| token == "tok-1") {
                    barrier.wait().await;
                }
                if let Some((_, notify)) = backend.hold.as_ref().filter(|(b, _)| body == b) {
                    notify.notified().await;
                }
                let rejected = backend.rejected.lock().unwrap().contains(&token);
                let rejection = *backend.rejection.lock().unwrap();
                backend.received.lock().unwrap().push(Received {
                    token,
                    method: parts.method,
                    uri: parts.uri.to_string(),
                    headers: parts.headers,
                    body,
                });
                let status = if rejected { rejection } else { StatusCode::OK };
                let mut response = Response::new(format!("{status}"));
                *response.status_mut() = status;
                Ok::<_, BoxError>(response)
            }
        })
    }
}

fn auth(source: &Numbered) -> TwnAuthLayer<CachedToken> {
    TwnAuthLayer::with_token_source(key(), source.clone()).detect_rotation()
}

/// `auth` over `inner`, with its retry layer outside it, as the docs place them.
fn retrying<S>(
    auth: TwnAuthLayer<CachedToken>,
    inner: S,
) -> Retry<RetryRejected, TwnAuth<S, CachedToken>> {
    ServiceBuilder::new()
        .layer(auth.retry_layer())
        .layer(auth)
        .service(inner)
}

fn post(body: &'static str) -> Request<Full<Bytes>> {
    Request::post(URL)
        .header("content-type", "application/json")
        .header("x-request-id", "42")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

#[tokio::test]
async fn rejected_token_is_replaced_and_request_replayed_with_identical_body() {
    let source = Numbered::default();
    let backend = Backend::rejecting(&["tok-1"]);
    let auth = auth(&source);
    let service = retrying(auth, backend.service::<Full<Bytes>>());

    let response = service.oneshot(post(r#"{"sku":"A-1"}"#)).await.unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.into_body(), "200 OK");
    let received = backend.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].token, "tok-1");
    assert_eq!(received[1].token, "tok-2");
    for attempt in &received {
        assert_eq!(attempt.method, Method::POST);
        assert_eq!(attempt.uri, URL);
        assert_eq!(attempt.body, r#"{"sku":"A-1"}"#);
        assert_eq!(attempt.headers["content-type"], "application/json");
        assert_eq!(attempt.headers["x-request-id"], "42");
        assert_eq!(
            attempt.headers.get_all("twn-authentication").iter().count(),
            1
        );
    }
    assert_eq!(source.fetches(), 2);
}

#[tokio::test]
async fn streaming_body_is_sent_once_and_next_request_carries_new_token() {
    let source = Numbered::default();
    let backend = Backend::rejecting(&["tok-1"]);
    let auth = auth(&source);
    let service = retrying(auth, backend.service::<BoxBody<Bytes, Infallible>>());

    let stream = futures_stream(vec!["chunk-1", "chunk-2"]);
    let request = Request::post(URL).body(stream).unwrap();
    let response = service.clone().oneshot(request).await.unwrap();

    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(
        response.extensions().is_empty(),
        "the response carries a trace"
    );
    assert_eq!(backend.received().len(), 1);
    assert_eq!(backend.received()[0].body, "chunk-1chunk-2");

    let request = Request::post(URL)
        .body(futures_stream(vec!["again"]))
        .unwrap();
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let received = backend.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].token, "tok-2");
    assert_eq!(source.fetches(), 2);
}

/// A body that is a stream of frames, which cannot be replayed.
fn futures_stream(chunks: Vec<&'static str>) -> BoxBody<Bytes, Infallible> {
    BoxBody::new(Chunks(
        chunks
            .into_iter()
            .map(|chunk| Bytes::from_static(chunk.as_bytes()))
            .collect(),
    ))
}

struct Chunks(std::collections::VecDeque<Bytes>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(
            self.0
                .pop_front()
                .map(|chunk| Ok(http_body::Frame::data(chunk))),
        )
    }
}

#[tokio::test]
async fn ten_concurrent_rejections_of_one_token_cause_one_fetch() {
    let source = Numbered::default();
    // Every tok-1 request is held until all ten are in flight with it.
    let mut backend = Backend::rejecting(&["tok-1"]);
    backend.barrier = Some(Arc::new(tokio::sync::Barrier::new(10)));
    let auth = auth(&source);
    let service = retrying(auth, backend.service::<String>());

    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..10 {
        let service = service.clone();
        tasks.spawn(async move {
            let request = Request::post(URL).body(format!("order {n}")).unwrap();
            service.oneshot(request).await
        });
    }
    while let Some(result) = tasks.join_next().await {
        assert_eq!(result.unwrap().unwrap().status(), StatusCode::OK);
    }

    assert_eq!(source.fetches(), 2);
    let received = backend.received();
    assert_eq!(received.len(), 20);
    assert_eq!(received.iter().filter(|r| r.token == "tok-1").count(), 10);
    assert_eq!(received.iter().filter(|r| r.token == "tok-2").count(), 10);
}

#[tokio::test]
async fn replacement_rejected_too_returns_second_401_after_exactly_two_calls() {
    let source = Numbered::default();
    let backend = Backend::rejecting(&["tok-1", "tok-2"]);
    // A backoff far longer than the test, so that no clock decides its outcome.
    let auth = auth(&source).backoff(Duration::from_secs(600), Duration::from_secs(600));
    let service = retrying(auth, backend.service::<String>());

    let request = Request::post(URL).body("payload".to_owned()).unwrap();
    let response = service.clone().oneshot(request).await.unwrap();

    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let received = backend.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].token, "tok-2");
    assert_eq!(source.fetches(), 2);

    // The cache is not hammered: the replacement that never worked is kept for the backoff.
    for _ in 0..5 {
        let request = Request::get(URL).body(String::new()).unwrap();
        let response = service.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(source.fetches(), 2);
}

#[tokio::test]
async fn configured_403_drops_token_and_is_retried_once_while_401_no_longer_is() {
    let source = Numbered::default();
    let backend = Backend::rejecting(&[]);
    backend.reject_with("tok-1", StatusCode::FORBIDDEN);
    let auth = TwnAuthLayer::with_token_source(key(), source.clone())
        .detect_rotation_on([StatusCode::FORBIDDEN]);
    let service = retrying(auth, backend.service::<String>());
    let request = |body: &str| Request::post(URL).body(body.to_owned()).unwrap();

    // The 403 drops tok-1, and the retry carries the freshly fetched tok-2.
    let response = service.clone().oneshot(request("first")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(backend.tokens_received(), ["tok-1", "tok-2"]);
    assert_eq!(source.fetches(), 2);

    // 401 is not among the statuses given: it is neither retried nor drops tok-2.
    backend.reject_with("tok-2", StatusCode::UNAUTHORIZED);
    let response = service.clone().oneshot(request("second")).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(backend.tokens_received(), ["tok-1", "tok-2", "tok-2"]);
    assert_eq!(source.fetches(), 2);

    let response = service.oneshot(request("third")).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        backend.tokens_received(),
        ["tok-1", "tok-2", "tok-2", "tok-2"]
    );
    assert_eq!(source.fetches(), 2);
}

#[tokio::test]
async fn late_rejection_of_replaced_token_does_not_drop_new_one() {
    let source = Numbered::default();
    let release = Arc::new(tokio::sync::Notify::new());
    let mut backend = Backend::rejecting(&["tok-1"]);
    backend.hold = Some(("slow", Arc::clone(&release)));
    let auth = auth(&source);
    let service = ServiceBuilder::new()
        .layer(auth)
        .service(backend.service::<String>());

    // Both requests carry tok-1; the slow one's 401 arrives after tok-2 is in place.
    let slow = tokio::spawn(
        service
            .clone()
            .oneshot(Request::post(URL).body("slow".to_owned()).unwrap()),
    );
    tokio::task::yield_now().await;
    let fast = service
        .clone()
        .oneshot(Request::post(URL).body("fast".to_owned()).unwrap())
        .await
        .unwrap();
    assert_eq!(fast.status(), StatusCode::UNAUTHORIZED);
    let next = service
        .clone()
        .oneshot(Request::get(URL).body(String::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(next.status(), StatusCode::OK);
    assert_eq!(source.fetches(), 2);

    release.notify_one();
    assert_eq!(
        slow.await.unwrap().unwrap().status(),
        StatusCode::UNAUTHORIZED
    );

    let after = service
        .oneshot(Request::get(URL).body(String::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(after.status(), StatusCode::OK);
    assert_eq!(backend.received().last().unwrap().token, "tok-2");
    assert_eq!(source.fetches(), 2);
}

#[tokio::test]
async fn without_detect_rotation_a_rejection_keeps_the_token() {
    let source = Numbered::default();
    let backend = Backend::rejecting(&["tok-1"]);
    let service = ServiceBuilder::new()
        .layer(TwnAuthLayer::with_token_source(key(), source.clone()))
        .service(backend.service::<String>());

    for _ in 0..3 {
        let request = Request::get(URL).body(String::new()).unwrap();
        let response = service.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(source.fetches(), 1);
}

#[test]
fn buffered_bodies_replay_and_streams_do_not() {
    assert!(().replay().is_some());
    assert_eq!(String::from("x").replay().as_deref(), Some("x"));
    assert!(Full::new(Bytes::from_static(b"x")).replay().is_some());
    assert!(http_body_util::Empty::<Bytes>::new().replay().is_some());
    assert!(futures_stream(vec!["x"]).replay().is_none());
}

#[tokio::test]
async fn json_post_to_loopback_server_survives_rotation() {
    use wiremock::matchers::{any, body_json, header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let server = MockServer::start().await;
    let accept = |token: &'static str| {
        Mock::given(method("POST"))
            .and(path("/catalog/products"))
            .and(header("TWN-InstanceKey", "rotation-test-key"))
            .and(header("TWN-Authentication", token))
            .and(body_json(serde_json::json!({"sku": "A-1", "stock": 3})))
            .respond_with(ResponseTemplate::new(201))
    };
    let reject = || {
        Mock::given(any())
            .respond_with(ResponseTemplate::new(401))
            .with_priority(u8::MAX)
    };
    accept("tok-file-1").mount(&server).await;
    reject().mount(&server).await;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, "tok-file-1\n").unwrap();
    let auth = TwnAuthLayer::with_token_source(key(), FileSource::new(&path)).detect_rotation();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let service = retrying(auth, client);
    let request = || {
        Request::post(format!("{}/catalog/products", server.uri()))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"sku":"A-1","stock":3}"#)))
            .unwrap()
    };

    let response = service.clone().oneshot(request()).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);

    // Rotate: the new token is written first, then the old one stops working.
    let staging = dir.path().join("token.new");
    std::fs::write(&staging, "tok-file-2\n").unwrap();
    std::fs::rename(&staging, &path).unwrap();
    server.reset().await;
    accept("tok-file-2").mount(&server).await;
    reject().mount(&server).await;

    let response = service.oneshot(request()).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 2, "one rejected attempt, one replay");
    assert_eq!(requests[0].headers["twn-authentication"], "tok-file-1");
    assert_eq!(requests[1].headers["twn-authentication"], "tok-file-2");
    assert_eq!(requests[0].body, requests[1].body);
}

/// Sends `request` through the retry layer and an auth layer shaped by `configure`, over a
/// backend that rejects `rejected`; checks that the 401 came back untouched after exactly one
/// inner call, and returns how many times the source was asked for a token.
async fn assert_sent_once(
    rejected: &str,
    configure: impl FnOnce(TwnAuthLayer<CachedToken>) -> TwnAuthLayer<CachedToken>,
    request: Request<String>,
) -> usize {
    let source = Numbered::default();
    let backend = Backend::rejecting(&[rejected]);
    let auth = configure(TwnAuthLayer::with_token_source(key(), source.clone()));
    let service = retrying(auth, backend.service::<String>());

    let response = service.oneshot(request).await.unwrap();

    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(
        response.extensions().is_empty(),
        "the response carries a trace"
    );
    assert_eq!(backend.received().len(), 1, "the request was replayed");
    source.fetches()
}

#[tokio::test]
async fn rejection_of_request_outside_scope_is_not_replayed() {
    let scoped = |auth: TwnAuthLayer<CachedToken>| {
        auth.detect_rotation()
            .scope("https://navigator-api.tweakwise.com".parse().unwrap())
    };
    // The backend records a request without a token with an empty one, and rejects it.
    let request = Request::post("https://third-party.example.test/charge")
        .body("once".to_owned())
        .unwrap();
    assert_eq!(assert_sent_once("", scoped, request).await, 0);
}

#[tokio::test]
async fn rejection_of_request_with_its_own_credentials_is_not_replayed() {
    let own = tower_twn_auth::TwnCredentials::new(
        InstanceKey::new("other-shop").unwrap(),
        AccessToken::new("tok-own").unwrap(),
    );
    let request = Request::post(URL)
        .extension(own)
        .body("once".to_owned())
        .unwrap();
    let fetches = assert_sent_once("tok-own", TwnAuthLayer::detect_rotation, request).await;
    assert_eq!(fetches, 0);
}

#[tokio::test]
async fn retry_layer_without_detect_rotation_does_not_resend_the_same_token() {
    let request = Request::post(URL).body("once".to_owned()).unwrap();
    assert_eq!(assert_sent_once("tok-1", |auth| auth, request).await, 1);
}

#[tokio::test]
async fn rejected_response_without_retry_layer_reaches_caller_untouched() {
    let source = Numbered::default();
    let backend = Backend::rejecting(&["tok-1"]);
    let service = ServiceBuilder::new()
        .layer(auth(&source))
        .service(backend.service::<String>());

    let request = Request::post(URL).body("once".to_owned()).unwrap();
    let response = service.clone().oneshot(request).await.unwrap();

    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(
        response.extensions().is_empty(),
        "the response carries a trace"
    );
    assert_eq!(response.into_body(), "401 Unauthorized");

    // The token was still dropped: the next request carries a new one.
    let request = Request::get(URL).body(String::new()).unwrap();
    assert_eq!(
        service.oneshot(request).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(backend.received()[1].token, "tok-2");
}
