//! Where credentials may go: the scheme check, the scope, and per-request credentials, for
//! layers with a fixed token and with a token source.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Request, Response};
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_twn_auth::{
    AccessToken, CachedToken, Error, InstanceKey, Origin, Token, TokenProvider, TwnAuthLayer,
    TwnCredentials, TWN_AUTHENTICATION, TWN_INSTANCEKEY,
};

const LAYER_KEY: &str = "ik-layer";
const LAYER_TOKEN: &str = "tok-layer";
const SOURCE_TOKEN: &str = "tok-from-source";
const REQUEST_KEY: &str = "ik-b";
const REQUEST_TOKEN: &str = "tok-b";

/// What the inner service found on a request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    instance_keys: Vec<String>,
    tokens: Vec<String>,
    all_sensitive: bool,
}

impl Seen {
    fn from_headers(headers: &HeaderMap) -> Self {
        let values = |name| {
            headers
                .get_all(name)
                .iter()
                .map(|value| value.to_str().expect("visible ASCII").to_owned())
                .collect::<Vec<_>>()
        };
        let all_sensitive = [TWN_INSTANCEKEY, TWN_AUTHENTICATION]
            .iter()
            .flat_map(|name| headers.get_all(name))
            .all(|value| value.is_sensitive());
        Seen {
            instance_keys: values(TWN_INSTANCEKEY),
            tokens: values(TWN_AUTHENTICATION),
            all_sensitive,
        }
    }

    /// Exactly one value of each header, both sensitive.
    fn pair(key: &str, token: &str) -> Self {
        Seen {
            instance_keys: vec![key.to_owned()],
            tokens: vec![token.to_owned()],
            all_sensitive: true,
        }
    }

    fn none() -> Self {
        Seen {
            instance_keys: Vec::new(),
            tokens: Vec::new(),
            all_sensitive: true,
        }
    }
}

/// An inner service that answers with what it found on the request, counting its calls.
fn recorder(
    calls: Arc<AtomicUsize>,
) -> impl Service<
    Request<()>,
    Response = Response<Seen>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Seen>, Infallible>> + Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |request: Request<()>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let seen = Seen::from_headers(request.headers());
        async move {
            // Give other requests a chance to run in between, so that concurrent requests
            // interleave inside the stack.
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            Ok::<_, Infallible>(Response::new(seen))
        }
    })
}

/// What became of one request sent through a layer over a fresh recorder. Each variant holds
/// only with the inner call count it names, so comparing outcomes compares the counts too.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The inner service was called exactly once and found these headers.
    Sent(Seen),
    /// Refused with `InsecureDestination` for this host, without calling the inner service.
    Insecure(String),
    /// Refused with `UnknownDestination`, without calling the inner service.
    Unknown,
    /// Refused because the token source failed, without calling the inner service.
    FetchFailed,
    /// Anything else, described.
    Unexpected(String),
}

impl Outcome {
    fn new(result: Result<Seen, BoxError>, calls: usize) -> Self {
        match (result, calls) {
            (Ok(seen), 1) => Outcome::Sent(seen),
            (Err(err), 0) => match err.downcast_ref::<Error>() {
                Some(Error::InsecureDestination { host, .. }) => Outcome::Insecure(host.clone()),
                Some(Error::UnknownDestination { .. }) => Outcome::Unknown,
                Some(Error::Fetch { .. }) => Outcome::FetchFailed,
                _ => Outcome::Unexpected(format!("refused with {err:?}")),
            },
            (result, calls) => Outcome::Unexpected(format!("{result:?} after {calls} inner calls")),
        }
    }

    /// Sent with exactly one value of each header, both sensitive.
    fn pair(key: &str, token: &str) -> Self {
        Outcome::Sent(Seen::pair(key, token))
    }

    /// Sent with the layer's key and its fixed token.
    fn layer_pair() -> Self {
        Outcome::pair(LAYER_KEY, LAYER_TOKEN)
    }

    /// Sent with the layer's key and the token from its source.
    fn source_pair() -> Self {
        Outcome::pair(LAYER_KEY, SOURCE_TOKEN)
    }

    /// Sent with the pair [`with_request_credentials`] adds.
    fn request_pair() -> Self {
        Outcome::pair(REQUEST_KEY, REQUEST_TOKEN)
    }

    /// Sent on without any TWN header.
    fn stripped() -> Self {
        Outcome::Sent(Seen::none())
    }

    fn insecure(host: &str) -> Self {
        Outcome::Insecure(host.to_owned())
    }
}

/// Sends `request` through `layer` over a fresh recorder and returns what became of it.
async fn send<P: TokenProvider>(layer: &TwnAuthLayer<P>, request: Request<()>) -> Outcome {
    let calls = Arc::new(AtomicUsize::new(0));
    let service = layer.layer(recorder(Arc::clone(&calls)));
    let result = service.oneshot(request).await.map(Response::into_body);
    Outcome::new(result, calls.load(Ordering::SeqCst))
}

/// Sends each request through `layer` and checks its outcome; a failure names the URI.
async fn assert_outcomes<P: TokenProvider>(
    layer: &TwnAuthLayer<P>,
    cases: impl IntoIterator<Item = (Request<()>, Outcome)>,
) {
    for (request, expected) in cases {
        let uri = request.uri().clone();
        assert_eq!(send(layer, request).await, expected, "{uri}");
    }
}

/// Sends each request through `layer` and checks that each comes to `expected`; a failure
/// names the URI.
async fn assert_all<P: TokenProvider>(
    layer: &TwnAuthLayer<P>,
    requests: impl IntoIterator<Item = Request<()>>,
    expected: Outcome,
) {
    let cases = requests
        .into_iter()
        .map(|request| (request, expected.clone()));
    assert_outcomes(layer, cases).await;
}

fn get(uri: &str) -> Request<()> {
    Request::get(uri).body(()).expect("valid request")
}

fn with_stale_headers(uri: &str) -> Request<()> {
    Request::get(uri)
        .header("TWN-InstanceKey", "stale")
        .header("TWN-Authentication", "stale")
        .header("TWN-Authentication", "stale-too")
        .body(())
        .expect("valid request")
}

fn with_credentials(mut request: Request<()>, credentials: TwnCredentials) -> Request<()> {
    request.extensions_mut().insert(credentials);
    request
}

/// Adds the per-request pair `REQUEST_KEY`, `REQUEST_TOKEN` to `request`.
fn with_request_credentials(request: Request<()>) -> Request<()> {
    with_credentials(request, credentials(REQUEST_KEY, REQUEST_TOKEN))
}

fn credentials(key: &str, token: &str) -> TwnCredentials {
    TwnCredentials::new(
        InstanceKey::new(key).expect("valid key"),
        AccessToken::new(token).expect("valid token"),
    )
}

fn static_layer() -> TwnAuthLayer {
    TwnAuthLayer::new(
        InstanceKey::new(LAYER_KEY).expect("valid key"),
        AccessToken::new(LAYER_TOKEN).expect("valid token"),
    )
}

/// A layer whose token comes from a source that never expires it; returns the fetch count.
fn cached_layer() -> (TwnAuthLayer<CachedToken>, Arc<AtomicUsize>) {
    let fetches = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&fetches);
    let layer = TwnAuthLayer::with_token_source(
        InstanceKey::new(LAYER_KEY).expect("valid key"),
        move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok(Token::new(AccessToken::new(SOURCE_TOKEN)?)) }
        },
    );
    (layer, fetches)
}

fn origin(uri: &str) -> Origin {
    Origin::new(uri).expect("valid origin")
}

// The scheme check.

#[tokio::test]
async fn plain_http_to_remote_host_is_refused_without_calling_inner() {
    let outcome = send(&static_layer(), get("http://api.example.test/")).await;

    assert_eq!(outcome, Outcome::insecure("api.example.test"));
}

#[tokio::test]
async fn plain_http_to_remote_host_is_refused_even_with_explicit_port_or_ip() {
    let cases = [
        ("http://api.example.test:8080/stats", "api.example.test"),
        ("http://10.0.0.1/", "10.0.0.1"),
        ("http://128.0.0.1/", "128.0.0.1"),
        ("http://[::2]:8080/", "[::2]"),
        ("http://localhost.example.test/", "localhost.example.test"),
    ];
    assert_outcomes(
        &static_layer(),
        cases.map(|(uri, host)| (get(uri), Outcome::insecure(host))),
    )
    .await;
}

#[tokio::test]
async fn refused_host_of_64_bytes_is_named_whole_and_a_longer_one_by_its_first_61() {
    let whole = format!("{}.test", "a".repeat(59));
    let long = format!("{}.test", "b".repeat(60));
    assert_eq!((whole.len(), long.len()), (64, 65));
    let cut = format!("{}...", &long[..61]);

    let cases = [
        (get(&format!("http://{whole}/")), Outcome::insecure(&whole)),
        (
            get(&format!("http://{long}:8080/")),
            Outcome::insecure(&cut),
        ),
    ];
    assert_outcomes(&static_layer(), cases).await;
}

#[tokio::test]
async fn https_and_loopback_http_destinations_carry_both_headers() {
    let uris = [
        "http://127.0.0.1:8080/stats/totalproducts",
        "http://127.9.8.7/",
        "http://localhost/",
        "http://LOCALHOST:3000/",
        "http://[::1]:8080/",
        "https://api.example.test/",
        "https://api.example.test:8443/stats",
    ];
    assert_all(&static_layer(), uris.map(get), Outcome::layer_pair()).await;
}

#[tokio::test]
async fn allow_plain_http_lets_plain_http_to_remote_host_through_with_both_headers() {
    let layer = static_layer().allow_plain_http();

    let outcome = send(&layer, get("http://api.example.test/")).await;

    assert_eq!(outcome, Outcome::layer_pair());
}

#[tokio::test]
async fn relative_uri_is_refused_with_unknown_destination_without_calling_inner() {
    let uris = ["/stats/totalproducts", "*"];
    assert_all(&static_layer(), uris.map(get), Outcome::Unknown).await;
}

#[tokio::test]
async fn relative_uri_is_refused_even_with_allow_plain_http() {
    let layer = static_layer().allow_plain_http();

    let outcome = send(&layer, get("/stats/totalproducts")).await;

    assert_eq!(outcome, Outcome::Unknown);
}

#[tokio::test]
async fn allow_relative_uris_lets_relative_uri_through_with_both_headers() {
    let layer = static_layer().allow_relative_uris();

    let outcome = send(&layer, get("/stats/totalproducts")).await;

    assert_eq!(outcome, Outcome::layer_pair());
}

#[tokio::test]
async fn allow_relative_uris_still_refuses_plain_http_to_remote_host() {
    let layer = static_layer().allow_relative_uris();

    let outcome = send(&layer, get("http://api.example.test/")).await;

    assert_eq!(outcome, Outcome::insecure("api.example.test"));
}

fn connect(authority: &str) -> Request<()> {
    Request::connect(authority).body(()).expect("valid request")
}

#[tokio::test]
async fn authority_form_uri_is_refused_as_insecure_whatever_the_options() {
    // It names a host but not https; a client such as hyper-util's connects to that host in
    // plain text, so no option for relative URIs or plain http lets credentials go with it.
    for (label, layer) in [
        ("default layer", static_layer()),
        ("allow_relative_uris", static_layer().allow_relative_uris()),
        (
            "allow_plain_http, allow_relative_uris",
            static_layer().allow_plain_http().allow_relative_uris(),
        ),
    ] {
        for (authority, host) in [
            ("api.example.test:443", "api.example.test"),
            (
                "navigator-api.tweakwise.com:443",
                "navigator-api.tweakwise.com",
            ),
            ("127.0.0.1:8080", "127.0.0.1"),
        ] {
            let outcome = send(&layer, connect(authority)).await;
            assert_eq!(outcome, Outcome::insecure(host), "{label}: {authority}");
        }
        // An authority with no host in it names no destination at all.
        for authority in ["user@:443", ":443"] {
            let outcome = send(&layer, connect(authority)).await;
            assert_eq!(outcome, Outcome::Unknown, "{label}: {authority}");
        }
    }
}

#[tokio::test]
async fn path_starting_with_two_slashes_is_refused_even_with_allow_relative_uris() {
    // Resolved against a base URL, `//evil.example.test/x` names another host.
    for (label, layer) in [
        ("default layer", static_layer()),
        ("allow_relative_uris", static_layer().allow_relative_uris()),
        (
            "scoped, allow_relative_uris",
            scoped_to_tweakwise(static_layer()).allow_relative_uris(),
        ),
    ] {
        let outcome = send(&layer, get("//evil.example.test/x")).await;
        assert_eq!(outcome, Outcome::Unknown, "{label}");
    }
}

#[tokio::test]
async fn scoped_layer_sends_authority_form_uri_without_twn_headers() {
    let layer = scoped_to_tweakwise(static_layer()).allow_relative_uris();
    let mut request = with_stale_headers("/");
    *request.method_mut() = http::Method::CONNECT;
    *request.uri_mut() = "navigator-api.tweakwise.com:443"
        .parse()
        .expect("a valid URI");

    let outcome = send(&layer, request).await;

    assert_eq!(outcome, Outcome::stripped());
}

#[tokio::test]
async fn other_schemes_are_refused_without_calling_inner_even_with_allow_plain_http() {
    for (label, layer) in [
        ("default layer", static_layer()),
        ("allow_plain_http", static_layer().allow_plain_http()),
    ] {
        for (uri, host) in [
            ("ftp://api.example.test/", "api.example.test"),
            ("ws://127.0.0.1:8080/", "127.0.0.1"),
            ("wss://api.example.test/", "api.example.test"),
        ] {
            let outcome = send(&layer, get(uri)).await;
            assert_eq!(outcome, Outcome::insecure(host), "{label}: {uri}");
        }
    }
}

#[tokio::test]
async fn header_values_already_on_the_request_are_replaced_by_exactly_one_each() {
    let request = with_stale_headers("https://api.example.test/");

    let outcome = send(&static_layer(), request).await;

    assert_eq!(outcome, Outcome::layer_pair());
}

// The scope.

fn scoped_to_tweakwise(layer: TwnAuthLayer) -> TwnAuthLayer {
    layer.scope(origin("https://navigator-api.tweakwise.com"))
}

#[tokio::test]
async fn scoped_layer_sends_request_to_other_origin_without_any_twn_header() {
    let layer = scoped_to_tweakwise(static_layer());

    let outcome = send(&layer, with_stale_headers("https://other.example.test/")).await;

    assert_eq!(outcome, Outcome::stripped());
}

#[tokio::test]
async fn scoped_layer_attaches_both_headers_to_scoped_origin_in_any_spelling() {
    let layer = scoped_to_tweakwise(static_layer());

    let uris = [
        "https://navigator-api.tweakwise.com/stats/totalproducts",
        "https://navigator-api.tweakwise.com:443/stats/totalproducts",
        "https://NAVIGATOR-API.Tweakwise.COM/stats/totalproducts",
        "https://navigator-api.tweakwise.com",
    ];
    assert_all(&layer, uris.map(with_stale_headers), Outcome::layer_pair()).await;
}

#[tokio::test]
async fn scope_given_with_upper_case_host_and_default_port_matches_lower_case_requests() {
    let layer = static_layer().scope(origin("HTTPS://Navigator-API.tweakwise.com:443/"));

    let uri = "https://navigator-api.tweakwise.com/stats/totalproducts";
    let outcome = send(&layer, get(uri)).await;

    assert_eq!(outcome, Outcome::layer_pair());
}

#[tokio::test]
async fn scope_treats_other_scheme_or_port_on_same_host_as_other_origin() {
    let layer = static_layer()
        .allow_plain_http()
        .scope(origin("https://api.example.test"));

    let uris = [
        "http://api.example.test/",
        "http://api.example.test:443/",
        "https://api.example.test:8443/",
        "https://api.example.test.evil.test/",
        "https://example.test/",
    ];
    assert_all(&layer, uris.map(with_stale_headers), Outcome::stripped()).await;
}

#[tokio::test]
async fn scope_on_loopback_treats_other_port_and_https_as_other_origin() {
    let layer = static_layer().scope(origin("http://127.0.0.1:8080"));

    let outcome = send(&layer, get("http://127.0.0.1:8080/x")).await;
    assert_eq!(outcome, Outcome::layer_pair());

    let other = [
        "http://127.0.0.1:8081/x",
        "https://127.0.0.1:8080/x",
        "http://127.0.0.1/x",
        "http://localhost:8080/x",
    ];
    assert_all(&layer, other.map(with_stale_headers), Outcome::stripped()).await;
}

#[tokio::test]
async fn scope_called_twice_allows_both_origins_and_no_other() {
    let layer = static_layer()
        .scope(origin("https://navigator-api.tweakwise.com"))
        .scope(origin("https://gateway.tweakwise.test:8443"));

    let scoped = [
        "https://navigator-api.tweakwise.com/a",
        "https://gateway.tweakwise.test:8443/b",
    ];
    assert_all(&layer, scoped.map(get), Outcome::layer_pair()).await;

    let outcome = send(&layer, get("https://gateway.tweakwise.test/b")).await;
    assert_eq!(outcome, Outcome::stripped());
}

#[tokio::test]
async fn scoped_plain_http_origin_is_still_refused_without_allow_plain_http() {
    let layer = static_layer().scope(origin("http://api.example.test"));
    let outcome = send(&layer, get("http://api.example.test/")).await;
    assert_eq!(outcome, Outcome::insecure("api.example.test"));

    let layer = layer.allow_plain_http();
    let outcome = send(&layer, get("http://api.example.test/")).await;
    assert_eq!(outcome, Outcome::layer_pair());
}

#[tokio::test]
async fn scoped_layer_passes_other_scheme_through_without_twn_headers() {
    let layer = scoped_to_tweakwise(static_layer());

    let outcome = send(&layer, with_stale_headers("ftp://files.example.test/")).await;

    assert_eq!(outcome, Outcome::stripped());
}

#[tokio::test]
async fn scoped_layer_still_refuses_relative_uri_unless_allowed() {
    let layer = scoped_to_tweakwise(static_layer());
    let outcome = send(&layer, get("/stats/totalproducts")).await;
    assert_eq!(outcome, Outcome::Unknown);

    let layer = layer.allow_relative_uris();
    let outcome = send(&layer, get("/stats/totalproducts")).await;
    assert_eq!(outcome, Outcome::layer_pair());
}

#[test]
fn origin_rejects_paths_queries_user_info_and_other_schemes() {
    for uri in [
        "https://api.example.test/v1",
        "https://api.example.test/?q=1",
        "https://user@api.example.test",
        "ftp://api.example.test",
        "api.example.test",
        "/relative",
        "",
        "https://api.example.test:65536",
        "https://api.example.test:99999",
        "https://api.example.test:0",
        "https://api.example.test:",
        "https://api.example.test#fragment",
        "https://:443",
    ] {
        assert!(Origin::new(uri).is_err(), "{uri}");
    }
    assert_eq!(
        origin("HTTPS://Navigator-API.tweakwise.com").to_string(),
        "https://navigator-api.tweakwise.com:443"
    );
    assert_eq!(
        origin("http://127.0.0.1").to_string(),
        "http://127.0.0.1:80"
    );
}

#[tokio::test]
async fn request_with_empty_host_is_refused_as_unknown_destination() {
    for uri in ["https://:443/stats", "http://:80/stats"] {
        assert_eq!(
            send(&static_layer(), get(uri)).await,
            Outcome::Unknown,
            "{uri}"
        );
    }
}

/// The host check of a request looks at the first byte of its authority only, so an empty
/// host behind user info passes it; the docs of `Error::UnknownDestination` say so.
#[tokio::test]
async fn https_request_with_user_info_and_empty_host_is_sent_with_both_headers_without_scope() {
    let uri = "https://user@:443/stats";
    assert_eq!(send(&static_layer(), get(uri)).await, Outcome::layer_pair());

    let (layer, fetches) = cached_layer();
    assert_eq!(send(&layer, get(uri)).await, Outcome::source_pair());
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn plain_http_request_with_empty_host_is_sent_with_both_headers_once_plain_http_allowed() {
    let layer = static_layer().allow_plain_http();

    for uri in ["http://:80/stats", "http://user@:80/stats"] {
        assert_eq!(send(&layer, get(uri)).await, Outcome::layer_pair(), "{uri}");
    }
}

#[tokio::test]
async fn scoped_layer_sends_request_with_empty_host_without_any_twn_header() {
    let layer = scoped_to_tweakwise(static_layer());

    let uris = ["https://user@:443/stats", "https://:443/stats"];
    assert_all(&layer, uris.map(with_stale_headers), Outcome::stripped()).await;
}

// Per-request credentials.

#[tokio::test]
async fn request_credentials_replace_the_layer_pair_for_that_request_only() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut service = static_layer().layer(recorder(Arc::clone(&calls)));

    for (label, request, expected) in [
        (
            "request credentials",
            with_request_credentials(get("https://api.example.test/")),
            Seen::pair(REQUEST_KEY, REQUEST_TOKEN),
        ),
        (
            "layer pair afterwards",
            with_stale_headers("https://api.example.test/"),
            Seen::pair(LAYER_KEY, LAYER_TOKEN),
        ),
    ] {
        let service = service.ready().await.expect(label);
        let seen = service.call(request).await.expect(label).into_body();
        assert_eq!(seen, expected, "{label}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn request_credentials_replace_header_values_already_on_the_request() {
    let request = with_request_credentials(with_stale_headers("https://api.example.test/"));

    let outcome = send(&static_layer(), request).await;

    assert_eq!(outcome, Outcome::request_pair());
}

/// Fires `total` requests at one shared service from many tasks, cycling through the layer's
/// own pair and two instances' pairs, and checks each response against what its request
/// carried.
async fn assert_pairs_never_mix<P>(layer: TwnAuthLayer<P>, layer_token: &str, total: usize)
where
    P: TokenProvider,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let service = layer.layer(recorder(Arc::clone(&calls)));
    let shop_a = credentials("ik-shop-a", "tok-shop-a");
    let shop_b = credentials("ik-shop-b", "tok-shop-b");

    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let uri = format!("https://navigator-api.tweakwise.com/request/{i}");
        let (request, expected) = match i % 3 {
            0 => (
                with_credentials(get(&uri), shop_a.clone()),
                Seen::pair("ik-shop-a", "tok-shop-a"),
            ),
            1 => (
                with_credentials(get(&uri), shop_b.clone()),
                Seen::pair("ik-shop-b", "tok-shop-b"),
            ),
            _ => (get(&uri), Seen::pair(LAYER_KEY, layer_token)),
        };
        let service = service.clone();
        tasks.push(tokio::spawn(async move {
            (i, expected, service.oneshot(request).await)
        }));
    }

    for task in tasks {
        let (i, expected, result) = task.await.expect("task did not panic");
        let seen = result.expect("request succeeds").into_body();
        assert_eq!(seen, expected, "request {i}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_two_instances_each_arrive_with_their_own_pair() {
    assert_pairs_never_mix(static_layer(), LAYER_TOKEN, 240).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_two_instances_through_cached_layer_never_mix_pairs() {
    let (layer, fetches) = cached_layer();

    assert_pairs_never_mix(layer, SOURCE_TOKEN, 240).await;

    assert_eq!(fetches.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn request_credentials_to_plain_http_remote_host_are_refused_without_calling_inner() {
    let request = with_request_credentials(get("http://api.example.test/"));

    let outcome = send(&static_layer(), request).await;

    assert_eq!(outcome, Outcome::insecure("api.example.test"));
}

#[tokio::test]
async fn request_credentials_on_relative_uri_are_refused_unless_allowed() {
    for (label, layer, expected) in [
        ("default layer", static_layer(), Outcome::Unknown),
        (
            "allow_relative_uris",
            static_layer().allow_relative_uris(),
            Outcome::request_pair(),
        ),
    ] {
        let request = with_request_credentials(get("/stats/totalproducts"));
        assert_eq!(send(&layer, request).await, expected, "{label}");
    }
}

#[tokio::test]
async fn request_credentials_to_loopback_http_and_https_are_sent() {
    let requests = ["http://127.0.0.1:8080/", "https://api.example.test/"]
        .map(|uri| with_request_credentials(get(uri)));
    assert_all(&static_layer(), requests, Outcome::request_pair()).await;
}

#[tokio::test]
async fn request_credentials_to_origin_outside_scope_are_not_sent() {
    let layer = scoped_to_tweakwise(static_layer());
    let request = with_request_credentials(with_stale_headers("https://other.example.test/"));

    let outcome = send(&layer, request).await;

    assert_eq!(outcome, Outcome::stripped());
}

#[tokio::test]
async fn request_credentials_to_scoped_origin_are_sent() {
    let layer = scoped_to_tweakwise(static_layer());
    let uri = "https://navigator-api.tweakwise.com/stats/totalproducts";
    let request = with_request_credentials(get(uri));

    let outcome = send(&layer, request).await;

    assert_eq!(outcome, Outcome::request_pair());
}

// The same rules for a layer with a token source.

#[tokio::test]
async fn cached_layer_refuses_plain_http_to_remote_host_without_calling_inner() {
    let (layer, _fetches) = cached_layer();

    let outcome = send(&layer, get("http://api.example.test/")).await;

    assert_eq!(outcome, Outcome::insecure("api.example.test"));
}

#[tokio::test]
async fn cached_layer_sends_source_token_to_https_and_loopback_http() {
    let (layer, fetches) = cached_layer();

    let uris = [
        "https://api.example.test/",
        "http://127.0.0.1:8080/",
        "http://[::1]:8080/",
        "http://localhost/",
    ];
    assert_all(&layer, uris.map(get), Outcome::source_pair()).await;
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn cached_layer_with_allow_plain_http_sends_source_token_to_remote_host() {
    let (layer, _fetches) = cached_layer();
    let layer = layer.allow_plain_http();

    let outcome = send(&layer, get("http://api.example.test/")).await;

    assert_eq!(outcome, Outcome::source_pair());
}

#[tokio::test]
async fn cached_layer_refuses_relative_uri_and_other_schemes_without_calling_inner() {
    let (layer, _fetches) = cached_layer();
    let outcome = send(&layer, get("/stats/totalproducts")).await;
    assert_eq!(outcome, Outcome::Unknown);
    let outcome = send(&layer, get("ftp://api.example.test/")).await;
    assert_eq!(outcome, Outcome::insecure("api.example.test"));

    let layer = layer.allow_relative_uris();
    let outcome = send(&layer, get("/stats/totalproducts")).await;
    assert_eq!(outcome, Outcome::source_pair());
    let outcome = send(&layer, connect("api.example.test:443")).await;
    assert_eq!(outcome, Outcome::insecure("api.example.test"));
}

#[tokio::test]
async fn scoped_cached_layer_strips_twn_headers_to_other_origin_and_attaches_to_scoped_one() {
    let (layer, _fetches) = cached_layer();
    let layer = layer.scope(origin("https://navigator-api.tweakwise.com"));

    let other = [
        "https://other.example.test/",
        "http://navigator-api.tweakwise.com/stats",
        "https://navigator-api.tweakwise.com:8443/stats",
    ];
    assert_all(&layer, other.map(with_stale_headers), Outcome::stripped()).await;

    let ours = [
        "https://navigator-api.tweakwise.com/stats",
        "https://navigator-api.tweakwise.com:443/stats",
        "https://NAVIGATOR-API.TWEAKWISE.COM/stats",
    ];
    assert_all(&layer, ours.map(with_stale_headers), Outcome::source_pair()).await;
}

#[tokio::test]
async fn cached_layer_sends_request_credentials_instead_of_source_token() {
    let (layer, _fetches) = cached_layer();
    let request = with_request_credentials(get("https://api.example.test/"));

    let outcome = send(&layer, request).await;

    assert_eq!(outcome, Outcome::request_pair());
}

#[tokio::test]
async fn cached_layer_request_credentials_obey_scheme_check_and_scope() {
    let (layer, _fetches) = cached_layer();
    let request = with_request_credentials(get("http://api.example.test/"));
    let outcome = send(&layer, request).await;
    assert_eq!(outcome, Outcome::insecure("api.example.test"));

    let layer = layer.scope(origin("https://navigator-api.tweakwise.com"));
    let request = with_request_credentials(get("https://other.example.test/"));
    let outcome = send(&layer, request).await;
    assert_eq!(outcome, Outcome::stripped());
}

/// A source whose fetches never finish, counting how often it was asked.
fn never_answering_source() -> (impl tower_twn_auth::TokenSource, Arc<AtomicUsize>) {
    let fetches = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&fetches);
    let source =
        move || -> std::pin::Pin<Box<dyn Future<Output = Result<Token, BoxError>> + Send>> {
            counter.fetch_add(1, Ordering::SeqCst);
            Box::pin(std::future::pending())
        };
    (source, fetches)
}

/// `TwnCredentials` are documented as: "the token source is not consulted for that request".
#[tokio::test(start_paused = true)]
async fn request_credentials_neither_wait_for_nor_call_the_layer_token_source() {
    let (source, fetches) = never_answering_source();
    let layer = TwnAuthLayer::with_token_source(InstanceKey::new(LAYER_KEY).unwrap(), source);
    let request = with_request_credentials(get("https://api.example.test/"));

    let sent = tokio::time::timeout(Duration::from_secs(60), send(&layer, request)).await;

    let outcome = sent.expect("the request must not wait for the layer's source");
    assert_eq!(outcome, Outcome::request_pair());
    assert_eq!(fetches.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn request_credentials_are_sent_while_the_layer_token_source_fails() {
    let fetches = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&fetches);
    let layer = TwnAuthLayer::with_token_source(InstanceKey::new(LAYER_KEY).unwrap(), move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Err::<Token, BoxError>("secret store unavailable".into()) }
    });

    let request = with_request_credentials(get("https://api.example.test/"));
    let outcome = send(&layer, request).await;
    assert_eq!(outcome, Outcome::request_pair(), "with request credentials");

    let outcome = send(&layer, get("https://api.example.test/")).await;
    assert_eq!(outcome, Outcome::FetchFailed, "with the layer's own pair");
}
