//! Real round trips over loopback: hyper-util's client wrapped in `TwnAuthLayer`, against a
//! hyper server started in each test that checks the headers it receives.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_twn_auth::{
    AccessToken, CredentialKind, InstanceKey, InvalidCredential, InvalidReason, TwnAuth,
    TwnAuthLayer,
};

const KEY: &str = "3f8c1a2b";
const TOKEN: &str = "tw-0123456789abcdef";

/// What the server saw, counted exactly.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    requests: AtomicUsize,
    authenticated: AtomicUsize,
    injected: AtomicUsize,
}

struct Server {
    addr: SocketAddr,
    seen: Arc<Seen>,
}

impl Server {
    fn uri(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn requests(&self) -> usize {
        self.seen.requests.load(Ordering::SeqCst)
    }
}

/// Starts a server on `127.0.0.1:0` that speaks HTTP/1.1 and HTTP/2 (prior knowledge).
///
/// It answers 200 with a body naming the HTTP version when the request carries exactly one
/// `TWN-InstanceKey` of `KEY` and one `TWN-Authentication` of `TOKEN`, and 401 with the list
/// of failed checks otherwise. The listener is bound before this returns, so connections made
/// afterwards wait in its backlog until the accept loop runs.
async fn start_server() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());

    let state = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            state.connections.fetch_add(1, Ordering::SeqCst);
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let state = Arc::clone(&state);
                    async move { Ok::<_, Infallible>(answer(&state, request)) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });

    Server { addr, seen }
}

fn answer(seen: &Seen, request: Request<Incoming>) -> Response<Full<Bytes>> {
    seen.requests.fetch_add(1, Ordering::SeqCst);
    let headers = request.headers();
    if headers.contains_key("x-injected") {
        seen.injected.fetch_add(1, Ordering::SeqCst);
    }

    let failures = header_failures(headers);
    if !failures.is_empty() {
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .body(Full::new(Bytes::from(failures.join("; "))))
            .unwrap();
    }
    seen.authenticated.fetch_add(1, Ordering::SeqCst);
    let body = format!("authenticated over {:?}", request.version());
    Response::new(Full::new(Bytes::from(body)))
}

/// Returns every check the headers fail: each name, in both spellings, must have exactly
/// one value, the expected one.
fn header_failures(headers: &HeaderMap) -> Vec<String> {
    let checks = [
        ("TWN-InstanceKey", KEY),
        ("twn-instancekey", KEY),
        ("TWN-Authentication", TOKEN),
        ("twn-authentication", TOKEN),
    ];
    let mut failures = Vec::new();
    for (name, expected) in checks {
        let values: Vec<_> = headers.get_all(name).iter().collect();
        if values.len() != 1 {
            failures.push(format!("{name}: {} values", values.len()));
        } else if values[0] != expected {
            failures.push(format!("{name}: wrong value"));
        }
    }
    failures
}

type HyperClient = Client<HttpConnector, Full<Bytes>>;

fn http1_client() -> HyperClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn http2_client() -> HyperClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

fn authenticated(client: HyperClient) -> TwnAuth<HyperClient> {
    let layer = TwnAuthLayer::new(
        InstanceKey::new(KEY).unwrap(),
        AccessToken::new(TOKEN).unwrap(),
    );
    wrap(layer, client)
}

fn wrap(layer: TwnAuthLayer, client: HyperClient) -> TwnAuth<HyperClient> {
    ServiceBuilder::new().layer(layer).service(client)
}

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::default()).unwrap()
}

/// Sends `request` and returns the status and the body as text.
async fn send<S>(service: S, request: Request<Full<Bytes>>) -> (StatusCode, String)
where
    S: Service<Request<Full<Bytes>>, Response = Response<Incoming>, Error = BoxError>,
{
    let response = service.oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn server_refuses_a_request_sent_without_the_layer() {
    // The server's checks must be able to fail, or the round trips below prove nothing.
    let server = start_server().await;

    let response = http1_client()
        .oneshot(get(&server.uri("/stats/totalproducts")))
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(server.requests(), 1);
    assert_eq!(server.seen.authenticated.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn server_refuses_other_credentials() {
    let server = start_server().await;
    let layer = TwnAuthLayer::new(
        InstanceKey::new(KEY).unwrap(),
        AccessToken::new("tw-other").unwrap(),
    );
    let service = wrap(layer, http1_client());

    let (status, body) = send(service, get(&server.uri("/"))).await;

    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        body,
        "TWN-Authentication: wrong value; twn-authentication: wrong value"
    );
}

/// Sends one request through `client` wrapped in the layer, and checks that the server got
/// it once, authenticated, over `version`.
async fn assert_authenticated_round_trip(client: HyperClient, version: &str) {
    let server = start_server().await;

    let request = get(&server.uri("/stats/totalproducts"));
    let (status, body) = send(authenticated(client), request).await;

    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, format!("authenticated over {version}"));
    assert_eq!(server.requests(), 1);
    assert_eq!(server.seen.authenticated.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn http1_round_trip_delivers_both_headers_and_returns_the_body() {
    assert_authenticated_round_trip(http1_client(), "HTTP/1.1").await;
}

#[tokio::test]
async fn http2_prior_knowledge_round_trip_delivers_both_headers_and_returns_the_body() {
    assert_authenticated_round_trip(http2_client(), "HTTP/2.0").await;
}

#[tokio::test]
async fn preexisting_headers_are_replaced_on_the_wire_over_both_protocols() {
    let server = start_server().await;

    for (client, version) in [(http1_client(), "HTTP/1.1"), (http2_client(), "HTTP/2.0")] {
        let request = Request::post(server.uri("/"))
            .header("TWN-InstanceKey", "stale-key")
            .header("TWN-Authentication", "stale-1")
            .header("twn-authentication", "stale-2")
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap();

        let (status, body) = send(authenticated(client), request).await;

        assert_eq!(status, StatusCode::OK, "{version}: {body}");
        assert_eq!(body, format!("authenticated over {version}"));
    }
    assert_eq!(server.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_one_http2_connection_each_carry_the_headers() {
    let server = start_server().await;
    let service = authenticated(http2_client());
    // One request first opens the connection: requests that all find the pool empty at once
    // may each start one, which is the client's business, not the layer's.
    let response = service
        .clone()
        .oneshot(get(&server.uri("/items/first")))
        .await;
    assert_eq!(response.unwrap().status(), StatusCode::OK);

    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let request = get(&server.uri(&format!("/items/{i}")));
            tokio::spawn(service.clone().oneshot(request))
        })
        .collect();
    for task in tasks {
        let response = task.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }

    assert_eq!(server.requests(), 11);
    assert_eq!(server.seen.authenticated.load(Ordering::SeqCst), 11);
    assert_eq!(server.seen.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn sequential_requests_through_one_http1_service_each_carry_the_headers() {
    let server = start_server().await;
    let mut service = authenticated(http1_client());

    for _ in 0..3 {
        let ready = service.ready().await.unwrap();
        let response = ready.call(get(&server.uri("/"))).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.into_body().collect().await.unwrap();
    }

    assert_eq!(server.requests(), 3);
    assert_eq!(server.seen.authenticated.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn spawned_oneshot_through_hyper_client_completes() {
    let server = start_server().await;
    let service = authenticated(http1_client());

    let response = tokio::spawn(service.oneshot(get(&server.uri("/"))))
        .await
        .unwrap()
        .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
}

/// Builds the credentials from `key` and `token`, and only then a client, and sends one
/// request: an invalid credential stops it before anything is sent.
async fn send_with(server: &Server, key: &str, token: &str) -> Result<StatusCode, BoxError> {
    let layer = TwnAuthLayer::new(InstanceKey::new(key)?, AccessToken::new(token)?);
    let service = wrap(layer, http1_client());
    let response = service.oneshot(get(&server.uri("/"))).await?;
    Ok(response.status())
}

fn assert_rejected(error: BoxError, kind: CredentialKind, reason: InvalidReason) {
    let error = error
        .downcast::<InvalidCredential>()
        .expect("the error is the credential's");
    assert_eq!((error.kind(), error.reason()), (kind, reason));
}

#[tokio::test]
async fn instance_key_with_crlf_header_injection_is_rejected_before_any_request() {
    let server = start_server().await;

    let error = send_with(&server, "ik\r\nX-Injected: 1", TOKEN)
        .await
        .unwrap_err();

    assert_rejected(
        error,
        CredentialKind::InstanceKey,
        InvalidReason::ControlByte { position: 2 },
    );
    assert_eq!(server.requests(), 0);
    assert_eq!(server.seen.connections.load(Ordering::SeqCst), 0);

    // The same server does count a request that is sent.
    assert_eq!(
        send_with(&server, KEY, TOKEN).await.unwrap(),
        StatusCode::OK
    );
    assert_eq!(server.requests(), 1);
    assert_eq!(server.seen.injected.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn token_with_newline_is_rejected_before_any_request() {
    let server = start_server().await;

    for (token, position) in [("a\nb", 1), ("tw-1\r\nX-Injected: 1", 4), ("a\rb", 1)] {
        let error = send_with(&server, KEY, token).await.unwrap_err();
        assert_rejected(
            error,
            CredentialKind::AccessToken,
            InvalidReason::ControlByte { position },
        );
    }

    assert_eq!(server.requests(), 0);
    assert_eq!(server.seen.connections.load(Ordering::SeqCst), 0);
    assert_eq!(
        send_with(&server, KEY, TOKEN).await.unwrap(),
        StatusCode::OK
    );
    assert_eq!(server.requests(), 1);
    assert_eq!(server.seen.injected.load(Ordering::SeqCst), 0);
}
