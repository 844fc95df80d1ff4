//! Redirects and the TWN headers: tower-http's `FollowRedirect` over real loopback servers
//! (two ports, two origins), and over a mock client where loopback cannot serve the case
//! (https to http on one host).
//!
//! The tests that use the crate's own policy need `--features tower-http`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::LOCATION;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::util::BoxCloneService;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_http::follow_redirect::{FollowRedirectLayer, RequestUri};
use tower_twn_auth::{
    AccessToken, Error, InstanceKey, Origin, TwnAuthLayer, TwnCredentials, TWN_AUTHENTICATION,
    TWN_INSTANCEKEY,
};

#[cfg(feature = "tower-http")]
use tower_twn_auth::redirect::KeepCredentialsOnOrigin;

const KEY: &str = "ik-redirect-test";
const TOKEN: &str = "tok-redirect-test";

/// The TWN headers a request arrived with.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Twn {
    instance_keys: Vec<String>,
    tokens: Vec<String>,
}

impl Twn {
    fn of(headers: &HeaderMap) -> Self {
        let values = |name| {
            headers
                .get_all(name)
                .iter()
                .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
                .collect()
        };
        Twn {
            instance_keys: values(TWN_INSTANCEKEY),
            tokens: values(TWN_AUTHENTICATION),
        }
    }

    fn pair(key: &str, token: &str) -> Self {
        Twn {
            instance_keys: vec![key.to_owned()],
            tokens: vec![token.to_owned()],
        }
    }

    fn both() -> Self {
        Twn::pair(KEY, TOKEN)
    }

    fn none() -> Self {
        Twn {
            instance_keys: Vec::new(),
            tokens: Vec::new(),
        }
    }
}

/// A request as a server or mock received it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hit {
    path: String,
    twn: Twn,
}

/// An HTTP/1 server on `127.0.0.1` that answers `302` with a `Location` for the paths in its
/// redirect table, `200` otherwise, and records every request it receives.
struct Server {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    redirects: Arc<Mutex<HashMap<String, String>>>,
}

impl Server {
    async fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let hits = Arc::new(Mutex::new(Vec::new()));
        let redirects = Arc::new(Mutex::new(HashMap::new()));
        let (task_hits, task_redirects) = (Arc::clone(&hits), Arc::clone(&redirects));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (hits, redirects) = (Arc::clone(&task_hits), Arc::clone(&task_redirects));
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let path = request.uri().path().to_owned();
                    hits.lock().unwrap().push(Hit {
                        path: path.clone(),
                        twn: Twn::of(request.headers()),
                    });
                    let location = redirects.lock().unwrap().get(&path).cloned();
                    async move {
                        let response = match location {
                            Some(location) => Response::builder()
                                .status(StatusCode::FOUND)
                                .header(LOCATION, location)
                                .body(String::new()),
                            None => Response::builder().body(format!("landed on {path}")),
                        };
                        Ok::<_, Infallible>(response.expect("valid response"))
                    }
                });
                tokio::spawn(async move {
                    let io = TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Server {
            addr,
            hits,
            redirects,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn origin(&self) -> Origin {
        Origin::new(&self.url("")).expect("valid origin")
    }

    fn redirect(&self, path: &str, location: &str) {
        self.redirects
            .lock()
            .unwrap()
            .insert(path.to_owned(), location.to_owned());
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
}

fn hit(path: &str, twn: Twn) -> Hit {
    Hit {
        path: path.to_owned(),
        twn,
    }
}

type Body = Empty<Bytes>;
type HttpClient = Client<HttpConnector, Body>;
type Stack<Res> = BoxCloneService<Request<Body>, Response<Res>, BoxError>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn auth() -> TwnAuthLayer {
    TwnAuthLayer::new(
        InstanceKey::new(KEY).expect("valid key"),
        AccessToken::new(TOKEN).expect("valid token"),
    )
}

/// Where the auth layer sits relative to `FollowRedirect`, and which redirect policy that
/// follows.
#[derive(Debug, Clone, Copy)]
enum Placement {
    /// The placement the crate docs recommend: `FollowRedirect` (standard policy) outside,
    /// the auth layer inside, scoped to the home origin.
    Recommended,
    /// `FollowRedirect` with [`KeepCredentialsOnOrigin`] outside an unscoped auth layer.
    #[cfg(feature = "tower-http")]
    KeepCredentialsOutsideAuth,
    /// An unscoped auth layer outside `FollowRedirect` with [`KeepCredentialsOnOrigin`].
    #[cfg(feature = "tower-http")]
    KeepCredentialsInsideAuth,
    /// A hazard: an unscoped auth layer outside `FollowRedirect` with the standard policy.
    AuthOutsideStandardPolicy,
    /// A hazard: `FollowRedirect` with the standard policy outside an unscoped auth layer.
    UnscopedAuthInsideStandardPolicy,
}

impl Placement {
    /// Builds this placement of `auth` around `inner`. Only the recommended placement uses
    /// `home`, as the origin it scopes `auth` to; the others leave `auth` unscoped.
    fn stack<S, Res>(self, auth: TwnAuthLayer, home: Origin, inner: S) -> Stack<Res>
    where
        S: Service<Request<Body>, Response = Response<Res>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError> + Send + Sync + 'static,
        Res: http_body::Body + Send + 'static,
    {
        let builder = ServiceBuilder::new();
        match self {
            Placement::Recommended => BoxCloneService::new(
                builder
                    .layer(FollowRedirectLayer::new())
                    .layer(auth.scope(home))
                    .service(inner),
            ),
            #[cfg(feature = "tower-http")]
            Placement::KeepCredentialsOutsideAuth => BoxCloneService::new(
                builder
                    .layer(FollowRedirectLayer::with_policy(
                        KeepCredentialsOnOrigin::default(),
                    ))
                    .layer(auth)
                    .service(inner),
            ),
            #[cfg(feature = "tower-http")]
            Placement::KeepCredentialsInsideAuth => BoxCloneService::new(
                builder
                    .layer(auth)
                    .layer(FollowRedirectLayer::with_policy(
                        KeepCredentialsOnOrigin::default(),
                    ))
                    .service(inner),
            ),
            Placement::AuthOutsideStandardPolicy => BoxCloneService::new(
                builder
                    .layer(auth)
                    .layer(FollowRedirectLayer::new())
                    .service(inner),
            ),
            Placement::UnscopedAuthInsideStandardPolicy => BoxCloneService::new(
                builder
                    .layer(FollowRedirectLayer::new())
                    .layer(auth)
                    .service(inner),
            ),
        }
    }
}

/// Sends a GET for `uri` and returns the final response's status and effective URI.
async fn fetch(stack: Stack<Incoming>, uri: &str) -> (StatusCode, String) {
    fetch_request(stack, request(uri)).await
}

async fn fetch_request(stack: Stack<Incoming>, request: Request<Body>) -> (StatusCode, String) {
    let response = stack.oneshot(request).await.expect("request succeeds");
    let final_uri = response
        .extensions()
        .get::<RequestUri>()
        .map(|uri| uri.0.to_string())
        .unwrap_or_default();
    (response.status(), final_uri)
}

fn request(uri: &str) -> Request<Body> {
    Request::get(uri).body(Empty::new()).expect("valid request")
}

/// Two servers, two origins: `a` redirects `/cross` to `b`'s `/landing`, `/same` to its own
/// `/landing`, and `/round-trip` to `b`'s `/back`, which redirects to `a`'s `/landing`.
/// Returns them with `placement` built around a client, `a` being the home origin.
async fn two_origins_behind(placement: Placement) -> (Server, Server, Stack<Incoming>) {
    let (a, b) = (Server::start().await, Server::start().await);
    a.redirect("/cross", &b.url("/landing"));
    a.redirect("/same", "/landing");
    a.redirect("/round-trip", &b.url("/back"));
    b.redirect("/back", &a.url("/landing"));
    let stack = placement.stack(auth(), a.origin(), client());
    (a, b, stack)
}

/// Follows `path` on `a` through `placement`, and checks that the trip ends in `200` at the
/// URL `landing` picks, and that `a` and `b` received exactly `on_a` and `on_b`, in order.
async fn assert_trip(
    placement: Placement,
    path: &str,
    landing: impl FnOnce(&Server, &Server) -> String,
    on_a: &[Hit],
    on_b: &[Hit],
) {
    let (a, b, stack) = two_origins_behind(placement).await;

    let (status, final_uri) = fetch(stack, &a.url(path)).await;

    assert_eq!(status, StatusCode::OK, "{placement:?}");
    assert_eq!(final_uri, landing(&a, &b), "{placement:?}");
    assert_eq!(a.hits(), on_a, "{placement:?}");
    assert_eq!(b.hits(), on_b, "{placement:?}");
}

/// `a`'s `/cross` redirects to `b`'s `/landing`: `a` gets both headers, `b` gets `on_b`.
async fn assert_cross_origin_hop(placement: Placement, on_b: Twn) {
    assert_trip(
        placement,
        "/cross",
        |_, b| b.url("/landing"),
        &[hit("/cross", Twn::both())],
        &[hit("/landing", on_b)],
    )
    .await;
}

/// `a`'s `/same` redirects to its own `/landing`: both hops get both headers, `b` nothing.
async fn assert_same_origin_hop_keeps_twn_headers(placement: Placement) {
    assert_trip(
        placement,
        "/same",
        |a, _| a.url("/landing"),
        &[hit("/same", Twn::both()), hit("/landing", Twn::both())],
        &[],
    )
    .await;
}

/// `a`'s `/round-trip` goes through `b`'s `/back` to `a`'s `/landing`: the first hop gets
/// both headers, `b` none, and the return to `a` gets `on_return`.
async fn assert_round_trip(placement: Placement, on_return: Twn) {
    assert_trip(
        placement,
        "/round-trip",
        |a, _| a.url("/landing"),
        &[hit("/round-trip", Twn::both()), hit("/landing", on_return)],
        &[hit("/back", Twn::none())],
    )
    .await;
}

/// Sends shop B's credentials on requests to `a`'s `/same` and `/cross`: they reach every hop
/// on `a`, and the hop to `b` gets no TWN header at all.
async fn assert_request_credentials_stay_on_their_origin(placement: Placement) {
    let (a, b, stack) = two_origins_behind(placement).await;
    let shop_b = TwnCredentials::new(
        InstanceKey::new("ik-shop-b").unwrap(),
        AccessToken::new("tok-shop-b").unwrap(),
    );

    for path in ["/same", "/cross"] {
        let mut request = request(&a.url(path));
        request.extensions_mut().insert(shop_b.clone());
        let (status, _) = fetch_request(stack.clone(), request).await;
        assert_eq!(status, StatusCode::OK, "{placement:?} {path}");
    }

    let shop = Twn::pair("ik-shop-b", "tok-shop-b");
    assert_eq!(
        a.hits(),
        [
            hit("/same", shop.clone()),
            hit("/landing", shop.clone()),
            hit("/cross", shop),
        ],
        "{placement:?}"
    );
    assert_eq!(b.hits(), [hit("/landing", Twn::none())], "{placement:?}");
}

// The recommended placement: FollowRedirect outside, scoped auth inside.

#[tokio::test]
async fn recommended_placement_sends_cross_origin_302_hop_without_twn_headers() {
    assert_cross_origin_hop(Placement::Recommended, Twn::none()).await;
}

#[tokio::test]
async fn recommended_placement_keeps_twn_headers_on_same_origin_302_hop() {
    assert_same_origin_hop_keeps_twn_headers(Placement::Recommended).await;
}

#[tokio::test]
async fn recommended_placement_authenticates_only_the_hops_on_the_scoped_origin() {
    assert_round_trip(Placement::Recommended, Twn::both()).await;
}

#[tokio::test]
async fn recommended_placement_keeps_request_credentials_on_their_origin() {
    assert_request_credentials_stay_on_their_origin(Placement::Recommended).await;
}

// The crate's policy, in both placements: the tests that loop over
// `KEEP_CREDENTIALS_PLACEMENTS` name the placement in their failure messages.

#[cfg(feature = "tower-http")]
const KEEP_CREDENTIALS_PLACEMENTS: [Placement; 2] = [
    Placement::KeepCredentialsOutsideAuth,
    Placement::KeepCredentialsInsideAuth,
];

#[cfg(feature = "tower-http")]
#[tokio::test]
async fn keep_credentials_policy_sends_cross_origin_302_hop_without_twn_headers() {
    for placement in KEEP_CREDENTIALS_PLACEMENTS {
        assert_cross_origin_hop(placement, Twn::none()).await;
    }
}

#[cfg(feature = "tower-http")]
#[tokio::test]
async fn keep_credentials_policy_keeps_twn_headers_on_same_origin_302_hop() {
    for placement in KEEP_CREDENTIALS_PLACEMENTS {
        assert_same_origin_hop_keeps_twn_headers(placement).await;
    }
}

#[cfg(feature = "tower-http")]
#[tokio::test]
async fn keep_credentials_policy_does_not_restore_twn_headers_on_return_to_first_origin() {
    for placement in KEEP_CREDENTIALS_PLACEMENTS {
        assert_round_trip(placement, Twn::none()).await;
    }
}

#[cfg(feature = "tower-http")]
#[tokio::test]
async fn keep_credentials_policy_outside_auth_drops_request_credentials_on_cross_origin_hop() {
    assert_request_credentials_stay_on_their_origin(Placement::KeepCredentialsOutsideAuth).await;
}

// The hazards the docs warn about.

#[tokio::test]
async fn standard_policy_alone_forwards_twn_headers_cross_origin_when_auth_is_outside() {
    // tower-http's standard policy removes `Authorization` and `Cookie`, not the TWN
    // headers: the credentials reach the other origin. This is why the docs recommend a
    // scoped auth layer inside `FollowRedirect`, or `KeepCredentialsOnOrigin`.
    assert_cross_origin_hop(Placement::AuthOutsideStandardPolicy, Twn::both()).await;
}

#[tokio::test]
async fn standard_policy_with_unscoped_auth_inside_authenticates_the_cross_origin_hop() {
    // Without a scope the layer cannot tell the hop from a request meant for `b`, and
    // authenticates it: this is why the recommended placement needs the scope.
    assert_cross_origin_hop(Placement::UnscopedAuthInsideStandardPolicy, Twn::both()).await;
}

// HTTPS to HTTP on the same host, over a mock client.

/// A mock client: an `https` request is answered with `302` to the same host and path over
/// plain `http`; every other request gets `200`. Records what each hop carried.
#[derive(Clone, Default)]
struct Downgrader {
    hits: Arc<Mutex<Vec<(String, Twn)>>>,
    calls: Arc<AtomicUsize>,
}

impl Downgrader {
    fn service(
        &self,
    ) -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl std::future::Future<Output = Result<Response<Body>, Infallible>> + Send,
    > + Clone
           + Send
           + 'static {
        let (hits, calls) = (Arc::clone(&self.hits), Arc::clone(&self.calls));
        tower::service_fn(move |request: Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let uri = request.uri().clone();
            hits.lock()
                .unwrap()
                .push((uri.to_string(), Twn::of(request.headers())));
            let mut response = Response::new(Empty::new());
            if uri.scheme_str() == Some("https") {
                let location = format!("http://{}{}", uri.authority().unwrap(), uri.path());
                *response.status_mut() = StatusCode::FOUND;
                response
                    .headers_mut()
                    .insert(LOCATION, location.parse().unwrap());
            }
            async move { Ok::<_, Infallible>(response) }
        })
    }

    fn hits(&self) -> Vec<(String, Twn)> {
        self.hits.lock().unwrap().clone()
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn hop(uri: &str, twn: Twn) -> (String, Twn) {
    (uri.to_owned(), twn)
}

async fn status_of(stack: Stack<Body>, uri: &str) -> Result<StatusCode, BoxError> {
    stack
        .oneshot(request(uri))
        .await
        .map(|response| response.status())
}

/// Sends a GET for `https://{host}/stats` through `placement` of `auth` over a fresh
/// [`Downgrader`], with `https://{host}` as the home origin; returns the final status and
/// the mock.
async fn downgrade(
    placement: Placement,
    auth: TwnAuthLayer,
    host: &str,
) -> (Result<StatusCode, BoxError>, Downgrader) {
    let mock = Downgrader::default();
    let home = Origin::new(&format!("https://{host}")).expect("valid origin");
    let stack = placement.stack(auth, home, mock.service());
    let status = status_of(stack, &format!("https://{host}/stats")).await;
    (status, mock)
}

/// Checks that the downgrade of `https://{host}/stats` ends in `200` after exactly two hops:
/// the https one with both headers, the plain http one with `on_http`.
async fn assert_downgrade(placement: Placement, auth: TwnAuthLayer, host: &str, on_http: Twn) {
    let (status, mock) = downgrade(placement, auth, host).await;

    assert_eq!(
        status.expect("request succeeds"),
        StatusCode::OK,
        "{placement:?}"
    );
    assert_eq!(
        mock.hits(),
        [
            hop(&format!("https://{host}/stats"), Twn::both()),
            hop(&format!("http://{host}/stats"), on_http),
        ],
        "{placement:?}"
    );
    assert_eq!(mock.calls(), 2, "{placement:?}");
}

#[cfg(feature = "tower-http")]
#[tokio::test]
async fn keep_credentials_policy_inside_auth_drops_twn_headers_on_https_to_http_downgrade() {
    let placement = Placement::KeepCredentialsInsideAuth;
    assert_downgrade(placement, auth(), "api.example.test", Twn::none()).await;
}

#[cfg(feature = "tower-http")]
#[tokio::test]
async fn keep_credentials_policy_outside_auth_drops_twn_headers_on_https_to_http_downgrade() {
    // The hop has left the origin, so it goes without credentials: nothing is left for the
    // scheme check to refuse, on loopback or not.
    let placement = Placement::KeepCredentialsOutsideAuth;
    for host in ["127.0.0.1", "api.example.test"] {
        assert_downgrade(placement, auth(), host, Twn::none()).await;
    }
}

#[cfg(feature = "tower-http")]
#[tokio::test]
async fn keep_credentials_policy_outside_auth_with_plain_http_allowed_drops_downgrade_headers() {
    let placement = Placement::KeepCredentialsOutsideAuth;
    let auth = auth().allow_plain_http();
    assert_downgrade(placement, auth, "api.example.test", Twn::none()).await;
}

#[tokio::test]
async fn recommended_placement_drops_twn_headers_on_https_to_http_downgrade() {
    let placement = Placement::Recommended;
    assert_downgrade(placement, auth(), "api.example.test", Twn::none()).await;
}

#[tokio::test]
async fn unscoped_auth_inside_follow_redirect_refuses_downgrade_hop_to_remote_plain_http() {
    let placement = Placement::UnscopedAuthInsideStandardPolicy;

    let (status, mock) = downgrade(placement, auth(), "api.example.test").await;

    let err = status.expect_err("the plain http hop must be refused");
    match err.downcast_ref::<Error>() {
        Some(Error::InsecureDestination { host, .. }) => assert_eq!(host, "api.example.test"),
        other => panic!("expected InsecureDestination, got {other:?} ({err})"),
    }
    assert_eq!(
        mock.hits(),
        [hop("https://api.example.test/stats", Twn::both())]
    );
    assert_eq!(mock.calls(), 1);
}

#[tokio::test]
async fn standard_policy_alone_forwards_twn_headers_on_https_to_http_downgrade_when_auth_is_outside(
) {
    // The hazard again: the credentials go out in clear text on the downgraded hop.
    let placement = Placement::AuthOutsideStandardPolicy;
    assert_downgrade(placement, auth(), "api.example.test", Twn::both()).await;
}

/// Every hop of a redirect chain: its URI, and its `TWN-InstanceKey` and `TWN-Authentication`.
#[cfg(feature = "tower-http")]
type Hops = Arc<Mutex<Vec<(String, Option<String>, Option<String>)>>>;

/// A mock origin server for redirect chains: records every hop's URI and TWN headers, and
/// answers `/export` with a 302 to `location`, `/login` with 401, anything else with 200.
#[cfg(feature = "tower-http")]
fn chain(
    location: &'static str,
    hops: Hops,
) -> impl Service<
    Request<String>,
    Response = Response<String>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |request: Request<String>| {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .map(|value| value.to_str().unwrap().to_owned())
        };
        hops.lock().unwrap().push((
            request.uri().to_string(),
            header("twn-instancekey"),
            header("twn-authentication"),
        ));
        let mut response = Response::new(String::new());
        match request.uri().path() {
            "/export" => {
                *response.status_mut() = StatusCode::FOUND;
                let location = http::HeaderValue::from_static(location);
                response
                    .headers_mut()
                    .insert(http::header::LOCATION, location);
            }
            "/login" => *response.status_mut() = StatusCode::UNAUTHORIZED,
            _ => {}
        }
        async move { Ok(response) }
    })
}

#[cfg(feature = "tower-http")]
#[tokio::test]
async fn rejection_by_another_origin_after_a_redirect_keeps_the_token() {
    let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&fetches);
    let source = move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { Ok(tower_twn_auth::Token::new(AccessToken::new("tok-good")?)) }
    };
    let auth =
        TwnAuthLayer::with_token_source(InstanceKey::new("ik").unwrap(), source).detect_rotation();
    let hops = Arc::default();
    let stack = ServiceBuilder::new()
        .layer(auth.retry_layer())
        .layer(auth)
        .layer(FollowRedirectLayer::with_policy(
            KeepCredentialsOnOrigin::default(),
        ))
        .service(chain("https://other.example.test/login", Arc::clone(&hops)));

    for _ in 0..3 {
        let request = Request::get("https://navigator-api.tweakwise.com/export")
            .body(String::new())
            .unwrap();
        let response = stack.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }

    // The 401 came from a hop that carried no token: nothing was dropped or replayed.
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
    let hops = hops.lock().unwrap().clone();
    assert_eq!(hops.len(), 6, "{hops:?}");
    for pair in hops.chunks(2) {
        assert_eq!(pair[0].2.as_deref(), Some("tok-good"));
        assert_eq!(pair[1].0, "https://other.example.test/login");
        assert_eq!((pair[1].1.as_deref(), pair[1].2.as_deref()), (None, None));
    }
}

#[cfg(feature = "tower-http")]
#[tokio::test]
async fn request_credentials_follow_same_origin_hops_when_extensions_are_not_preserved() {
    let auth = TwnAuthLayer::new(
        InstanceKey::new("ik-layer").unwrap(),
        AccessToken::new("tok-layer").unwrap(),
    );
    let hops = Arc::default();
    let redirects = FollowRedirectLayer::with_policy(KeepCredentialsOnOrigin::default())
        .preserve_extensions(false);
    let stack = ServiceBuilder::new()
        .layer(redirects)
        .layer(auth)
        .service(chain(
            "https://navigator-api.tweakwise.com/landing",
            Arc::clone(&hops),
        ));

    let own = TwnCredentials::new(
        InstanceKey::new("ik-own").unwrap(),
        AccessToken::new("tok-own").unwrap(),
    );
    let request = Request::get("https://navigator-api.tweakwise.com/export")
        .extension(own)
        .body(String::new())
        .unwrap();
    let response = stack.oneshot(request).await.unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let hops = hops.lock().unwrap().clone();
    assert_eq!(hops.len(), 2, "{hops:?}");
    for (uri, key, token) in &hops {
        assert_eq!(
            (key.as_deref(), token.as_deref()),
            (Some("ik-own"), Some("tok-own")),
            "{uri}"
        );
    }
}

/// Each hop's URI and the token it carried.
#[cfg(feature = "tower-http")]
type TokenHops = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// `/export` on the home origin redirects to another origin, which redirects back to
/// `/login` on the home origin; `/login` answers 401 to a request without a token, 200 with
/// one. Anything else answers 200. Records each hop's URI and token.
#[cfg(feature = "tower-http")]
fn bounce_through_another_origin(
    hops: TokenHops,
) -> BoxCloneService<Request<String>, Response<String>, Infallible> {
    BoxCloneService::new(tower::service_fn(move |request: Request<String>| {
        let token = request
            .headers()
            .get("twn-authentication")
            .map(|value| value.to_str().unwrap().to_owned());
        hops.lock()
            .unwrap()
            .push((request.uri().to_string(), token.clone()));
        let mut response = Response::new(String::new());
        let location = match request.uri().path() {
            "/export" => Some("https://sso.example.test/bounce"),
            "/bounce" => Some("https://navigator-api.tweakwise.com/login"),
            _ => None,
        };
        if let Some(location) = location {
            *response.status_mut() = StatusCode::FOUND;
            let location = http::HeaderValue::from_static(location);
            response.headers_mut().insert(LOCATION, location);
        } else if request.uri().path() == "/login" && token.is_none() {
            *response.status_mut() = StatusCode::UNAUTHORIZED;
        }
        std::future::ready(Ok(response))
    }))
}

/// With the layer inside `FollowRedirect`, the 401 of a hop that came back to the origin
/// without credentials (they stay off once the chain left the origin) drops no token and
/// replays nothing.
#[cfg(feature = "tower-http")]
#[tokio::test]
async fn rejection_of_a_hop_sent_without_credentials_keeps_the_token_with_the_layer_inside() {
    let fetches = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&fetches);
    let source = move || {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            Ok(tower_twn_auth::Token::new(AccessToken::new(&format!(
                "tok-{n}"
            ))?))
        }
    };
    let auth =
        TwnAuthLayer::with_token_source(InstanceKey::new("ik").unwrap(), source).detect_rotation();
    let hops: TokenHops = Arc::default();
    let stack = ServiceBuilder::new()
        .layer(auth.retry_layer())
        .layer(FollowRedirectLayer::with_policy(
            KeepCredentialsOnOrigin::default(),
        ))
        .layer(auth)
        .service(bounce_through_another_origin(Arc::clone(&hops)));
    let get = |path: &str| {
        Request::get(format!("https://navigator-api.tweakwise.com{path}"))
            .body(String::new())
            .unwrap()
    };

    for _ in 0..3 {
        let response = stack.clone().oneshot(get("/api")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let response = stack.clone().oneshot(get("/export")).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }

    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    let hops = hops.lock().unwrap().clone();
    let expected: Vec<_> = (0..3)
        .flat_map(|_| {
            [
                ("/api", Some("tok-1")),
                ("/export", Some("tok-1")),
                ("https://sso.example.test/bounce", None),
                ("/login", None),
            ]
        })
        .map(|(path, token)| {
            let uri = if path.starts_with("https://") {
                path.to_owned()
            } else {
                format!("https://navigator-api.tweakwise.com{path}")
            };
            (uri, token.map(str::to_owned))
        })
        .collect();
    assert_eq!(hops, expected);
}
