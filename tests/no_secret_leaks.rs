//! The whole-crate canary test: canary credentials go down every path of the crate, and
//! neither they nor any 6-character piece of them appear in any `Debug` or `Display` output,
//! in any error or its sources, in `Debug` of a request after the layer, or in anything the
//! crate logs through `tracing` at TRACE.
//!
//! It is one test on purpose: a global subscriber captures everything the process logs, and
//! the environment variables `from_env` reads are process-wide.

// Tests and benchmarks need Rust 1.88, as their dev-dependencies do; the `rust-version`
// that Clippy checks API use against is what the library alone needs.
#![allow(clippy::incompatible_msrv)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt::{Debug, Display};
use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use tokio::runtime::Runtime;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_twn_auth::{
    AccessToken, CredentialKind, EnvSource, Error, FileSource, InstanceKey, InvalidReason,
    LoadError, LoadedFrom, Origin, Token, TokenProvider, TokenSource, TwnAuthLayer, TwnCredentials,
    ENV_ACCESS_TOKEN, ENV_ACCESS_TOKEN_FILE, ENV_INSTANCE_KEY, TWN_AUTHENTICATION, TWN_INSTANCEKEY,
};
use tracing_subscriber::fmt::MakeWriter;

const IK: &str = "CANARY-IK-7f3a9c41e2";
const IK_2: &str = "CANARY-IK-2-93d0c1f5b7";
const TOKEN_1: &str = "CANARY-TOKEN-1-b8d04e6f19";
const TOKEN_2: &str = "CANARY-TOKEN-2-5c7e1a93d2";
const TOKEN_3: &str = "CANARY-TOKEN-3-e41f07b6a8";
const CANARIES: [&str; 5] = [IK, IK_2, TOKEN_1, TOKEN_2, TOKEN_3];

/// Longest piece of a canary that may appear anywhere.
const MAX_PIECE: usize = 5;

// Capture.

/// Where the subscriber writes: one buffer for the whole process.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Buffer {
    type Writer = Buffer;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Buffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Everything the crate printed during the test, labelled by where it came from.
#[derive(Default)]
struct Outputs(Vec<(String, String)>);

impl Outputs {
    fn debug(&mut self, label: &str, value: &impl Debug) {
        self.0
            .push((format!("{label} (Debug)"), format!("{value:?}")));
        self.0
            .push((format!("{label} (Debug, alternate)"), format!("{value:#?}")));
    }

    fn display(&mut self, label: &str, value: &impl Display) {
        self.0
            .push((format!("{label} (Display)"), value.to_string()));
    }

    fn both(&mut self, label: &str, value: &(impl Debug + Display)) {
        self.debug(label, value);
        self.display(label, value);
    }

    /// Records an error and every error in its `source()` chain.
    fn error(&mut self, label: &str, error: &(dyn StdError + 'static)) {
        let mut next = Some(error);
        let mut depth = 0;
        while let Some(error) = next {
            let label = format!("{label} / source {depth}");
            self.debug(&label, &error);
            self.display(&label, &error);
            next = error.source();
            depth += 1;
        }
    }

    fn boxed(&mut self, label: &str, error: &BoxError) {
        self.debug(&format!("{label} (BoxError)"), error);
        self.error(label, &**error);
    }

    fn text(&mut self, label: &str, text: String) {
        self.0.push((label.to_owned(), text));
    }
}

/// The leaks found: which output, which piece of which canary.
fn leaks(outputs: &[(String, String)]) -> Vec<String> {
    let mut found = Vec::new();
    for (label, text) in outputs {
        for canary in CANARIES {
            let piece = canary
                .as_bytes()
                .windows(MAX_PIECE + 1)
                .map(|window| std::str::from_utf8(window).expect("ASCII canary"))
                .find(|piece| text.contains(piece));
            if let Some(piece) = piece {
                found.push(format!(
                    "{label}: contains {piece:?} of {canary:?}:\n{text}"
                ));
            }
        }
    }
    found
}

// Helpers.

fn paused_runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime")
}

fn key(value: &str) -> InstanceKey {
    InstanceKey::new(value).expect("valid canary key")
}

fn token(value: &str) -> AccessToken {
    AccessToken::new(value).expect("valid canary token")
}

fn get(uri: &str) -> Request<()> {
    Request::get(uri).body(()).expect("valid request")
}

/// An inner service that records `Debug` of each request it receives (the request as the
/// layer left it) and answers `401` to requests carrying `reject`, `200` otherwise.
#[derive(Clone)]
struct Inner {
    seen: Arc<Mutex<Vec<String>>>,
    calls: Arc<AtomicUsize>,
    /// Which canary token each request carried, if any.
    tokens: Arc<Mutex<Vec<Option<&'static str>>>>,
    reject: Option<&'static str>,
}

impl Inner {
    fn new() -> Self {
        Inner {
            seen: Arc::default(),
            calls: Arc::default(),
            tokens: Arc::default(),
            reject: None,
        }
    }

    fn rejecting(token: &'static str) -> Self {
        Inner {
            reject: Some(token),
            ..Inner::new()
        }
    }

    fn tokens(&self) -> Vec<Option<&'static str>> {
        self.tokens.lock().unwrap().clone()
    }

    fn drain_into(&self, outputs: &mut Outputs, label: &str) {
        for (i, text) in self.seen.lock().unwrap().drain(..).enumerate() {
            outputs.text(
                &format!("{label}: request {i} after the layer (Debug)"),
                text,
            );
        }
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("calls", &self.calls)
            .finish_non_exhaustive()
    }
}

impl<B> Service<Request<B>> for Inner {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<String>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let request = request.map(|_| ());
        let headers = request.headers();
        let sent = headers.get(TWN_AUTHENTICATION).map(|value| {
            assert!(value.is_sensitive());
            assert!(headers[TWN_INSTANCEKEY].is_sensitive());
            [TOKEN_1, TOKEN_2, TOKEN_3]
                .into_iter()
                .find(|canary| value == canary)
                .expect("a canary token")
        });
        self.tokens.lock().unwrap().push(sent);
        let mut seen = self.seen.lock().unwrap();
        seen.push(format!("{request:?}"));
        seen.push(format!("{headers:?}"));
        let rejected = self
            .reject
            .zip(headers.get(TWN_AUTHENTICATION))
            .is_some_and(|(reject, sent)| sent == reject);
        let status = if rejected {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::OK
        };
        let mut response = Response::new(String::from("ok"));
        *response.status_mut() = status;
        std::future::ready(Ok(response))
    }
}

/// Sends `request` through `service`, recording the response or the error.
async fn send<S>(outputs: &mut Outputs, label: &str, service: S, request: Request<()>)
where
    S: Service<Request<()>, Response = Response<String>, Error = BoxError>,
{
    match service.oneshot(request).await {
        Ok(response) => outputs.debug(&format!("{label}: response"), &response),
        Err(error) => outputs.boxed(&format!("{label}: error"), &error),
    }
}

type Fetch = Pin<Box<dyn Future<Output = Result<Token, BoxError>> + Send>>;

/// One answer of a scripted source.
#[derive(Clone)]
enum Step {
    Valid(&'static str, Duration),
    /// The source builds the token with `AccessToken::new` and `?`, and it is invalid.
    Invalid(String),
    Fail(&'static str),
    Hang,
}

/// A source that answers with `steps` in order, then fails; counts its fetches.
#[derive(Clone)]
struct Script {
    steps: Arc<Mutex<VecDeque<Step>>>,
    fetches: Arc<AtomicUsize>,
}

impl Script {
    fn new(steps: impl IntoIterator<Item = Step>) -> Self {
        Script {
            steps: Arc::new(Mutex::new(steps.into_iter().collect())),
            fetches: Arc::default(),
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    fn remaining(&self) -> usize {
        self.steps.lock().unwrap().len()
    }
}

impl TokenSource for Script {
    fn fetch(&self) -> impl Future<Output = Result<Token, BoxError>> + Send {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let step = self.steps.lock().unwrap().pop_front();
        let fetch: Fetch = Box::pin(async move {
            match step {
                Some(Step::Valid(value, lifetime)) => {
                    Ok(Token::new(AccessToken::new(value)?).valid_for(lifetime))
                }
                Some(Step::Invalid(value)) => Ok(Token::new(AccessToken::new(&value)?)),
                Some(Step::Fail(message)) => Err(message.into()),
                Some(Step::Hang) => std::future::pending().await,
                None => Err("script exhausted".into()),
            }
        });
        fetch
    }

    fn name(&self) -> &str {
        "scripted vault"
    }
}

/// Runs `future` until it is done, polled with a waker that does nothing, outside any
/// runtime; returns `None` if it is still pending after one poll.
fn poll_once<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}

/// Moves the paused clock by `by` and lets the timer tasks that came due run.
async fn advance(by: Duration) {
    tokio::time::advance(by).await;
    settle().await;
}

/// Lets spawned tasks (fetches, timers) run until the runtime is idle.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

fn set_env(variables: &[(&str, Option<&str>)]) {
    for (name, value) in variables {
        match value {
            Some(value) => std::env::set_var(name, value),
            None => std::env::remove_var(name),
        }
    }
}

// The paths.

/// Credentials, their validation errors, and the small public types.
fn credentials_and_values(out: &mut Outputs) {
    for canary in [IK, IK_2] {
        out.debug("InstanceKey::new", &key(canary));
        out.debug(
            "InstanceKey::from_str",
            &canary.parse::<InstanceKey>().unwrap(),
        );
        out.debug(
            "InstanceKey::try_from(String)",
            &InstanceKey::try_from(canary.to_owned()),
        );
    }
    for canary in [TOKEN_1, TOKEN_2, TOKEN_3] {
        out.debug("AccessToken::new", &token(canary));
        out.debug(
            "AccessToken::from_str",
            &canary.parse::<AccessToken>().unwrap(),
        );
        out.debug(
            "AccessToken::try_from(&str)",
            &AccessToken::try_from(canary),
        );
    }
    out.debug(
        "TwnCredentials",
        &TwnCredentials::new(key(IK_2), token(TOKEN_3)),
    );
    let token_1 = Token::new(token(TOKEN_1))
        .valid_for(Duration::from_secs(900))
        .refresh_after(Duration::from_secs(30));
    out.debug("Token", &token_1);
    out.debug("Token::expires_in", &token_1.expires_in());

    for canary in CANARIES {
        let (head, tail) = canary.split_at(canary.len() / 2);
        let invalid = [
            format!("{canary}\r\nX-Injected: 1"),
            format!("{canary}\n"),
            format!(" {canary}"),
            format!("\t{canary}"),
            format!("{canary} "),
            format!("{canary} \t"),
            format!("{head} {tail}"),
            format!("{head}\x01{tail}"),
            format!("{canary}\x7f"),
            format!("{canary}\0"),
            format!("{head}é{tail}"),
        ];
        for value in &invalid {
            for error in [
                InstanceKey::new(value).map(drop).unwrap_err(),
                AccessToken::new(value).map(drop).unwrap_err(),
                value.parse::<AccessToken>().map(drop).unwrap_err(),
                InstanceKey::try_from(value.clone()).map(drop).unwrap_err(),
            ] {
                out.error("InvalidCredential", &error);
                out.debug("InvalidCredential::kind", &error.kind());
                out.both("InvalidCredential::reason", &error.reason());
            }
        }
    }

    out.debug("CredentialKind", &CredentialKind::AccessToken);
    out.display(
        "CredentialKind::header",
        &CredentialKind::InstanceKey.header(),
    );
    out.both("InvalidReason", &InvalidReason::ControlByte { position: 3 });
    out.both("LoadedFrom::Env", &LoadedFrom::Env(ENV_ACCESS_TOKEN.into()));
    out.both(
        "LoadedFrom::File",
        &LoadedFrom::File("/run/secrets/twn".into()),
    );

    // Origins never hold credentials, but a user could paste one in by mistake.
    for bad in [
        format!("https://{IK}@api.example.test"),
        format!("https://{IK}:{TOKEN_1}@api.example.test"),
        format!("https://api.example.test/{TOKEN_1}"),
        format!("https://api.example.test/?token={TOKEN_2}"),
        format!("ftp://api.example.test/{TOKEN_3}"),
        TOKEN_1.to_owned(),
        format!("{TOKEN_1}\n"),
    ] {
        let error = Origin::new(&bad).unwrap_err();
        out.error("InvalidOrigin", &error);
        out.error(
            "InvalidOrigin via FromStr",
            &bad.parse::<Origin>().unwrap_err(),
        );
    }
    out.both(
        "Origin",
        &Origin::new("https://navigator-api.tweakwise.com").unwrap(),
    );
}

/// The loaders: environment variables, files, and `from_env`.
fn loaders(out: &mut Outputs, dir: &Path) {
    let bad_key = format!("{IK}\x01");
    let bad_token = format!("{TOKEN_1} tail");

    std::env::set_var("TWN_LEAKTEST_BAD_KEY", &bad_key);
    std::env::set_var("TWN_LEAKTEST_BAD_TOKEN", &bad_token);
    std::env::set_var("TWN_LEAKTEST_EMPTY", " \r\n");
    for variable in [
        "TWN_LEAKTEST_BAD_KEY",
        "TWN_LEAKTEST_EMPTY",
        "TWN_LEAKTEST_UNSET",
    ] {
        out.error(
            "InstanceKey::from_env",
            &InstanceKey::from_env(variable).unwrap_err(),
        );
    }
    for variable in [
        "TWN_LEAKTEST_BAD_TOKEN",
        "TWN_LEAKTEST_EMPTY",
        "TWN_LEAKTEST_UNSET",
    ] {
        out.error(
            "AccessToken::from_env",
            &AccessToken::from_env(variable).unwrap_err(),
        );
    }
    std::env::set_var("TWN_LEAKTEST_GOOD_TOKEN", format!("  {TOKEN_2}\r\n"));
    out.debug(
        "AccessToken::from_env",
        &AccessToken::from_env("TWN_LEAKTEST_GOOD_TOKEN"),
    );

    let bad_file = dir.join("bad-token");
    std::fs::write(&bad_file, format!("{TOKEN_1}\x00{TOKEN_2}\n")).unwrap();
    let empty_file = dir.join("empty-token");
    std::fs::write(&empty_file, "\n").unwrap();
    let good_file = dir.join("good-token");
    std::fs::write(&good_file, format!("{TOKEN_2}\n")).unwrap();
    for path in [&bad_file, &empty_file, &dir.join("missing")] {
        out.error(
            "AccessToken::from_file",
            &AccessToken::from_file(path).unwrap_err(),
        );
    }
    out.debug(
        "AccessToken::from_file",
        &AccessToken::from_file(&good_file),
    );

    let good_key = format!("{IK}\n");
    let good_token = format!("{TOKEN_1}\r\n");
    let bad_path = bad_file.to_str().unwrap();
    let missing_path = dir.join("missing").to_str().unwrap().to_owned();
    let good_path = good_file.to_str().unwrap();
    let cases: [[Option<&str>; 3]; 8] = [
        [Some(&bad_key), Some(&good_token), None],
        [Some(&good_key), Some(&bad_token), None],
        [Some(&good_key), Some(&good_token), Some(good_path)],
        [Some(&good_key), None, Some(bad_path)],
        [Some(&good_key), None, Some(&missing_path)],
        [Some(&good_key), None, Some(" \n")],
        [Some(&good_key), None, None],
        [None, Some(&good_token), None],
    ];
    for [instance_key, access_token, file] in cases {
        set_env(&[
            (ENV_INSTANCE_KEY, instance_key),
            (ENV_ACCESS_TOKEN, access_token),
            (ENV_ACCESS_TOKEN_FILE, file),
        ]);
        let error: LoadError = TwnAuthLayer::from_env().unwrap_err();
        out.error("TwnAuthLayer::from_env", &error);
    }

    for source in [
        EnvSource::new("TWN_LEAKTEST_BAD_TOKEN"),
        EnvSource::new("TWN_LEAKTEST_UNSET"),
    ] {
        out.debug("EnvSource", &source);
        let rt = paused_runtime();
        let error = rt.block_on(source.fetch()).unwrap_err();
        out.boxed("EnvSource::fetch", &error);
    }
    for path in [&bad_file, &empty_file, &dir.join("missing")] {
        let source = FileSource::new(path).reread_every(Duration::from_secs(5));
        out.debug("FileSource", &source);
        let rt = paused_runtime();
        let error = rt.block_on(source.fetch()).unwrap_err();
        out.boxed("FileSource::fetch", &error);
    }
}

/// A layer from the environment, with a file whose token rotates, then turns invalid, then
/// empty: every re-read is logged.
fn from_env_file_rotation(out: &mut Outputs, dir: &Path) {
    let file = dir.join("rotating-token");
    std::fs::write(&file, format!("{TOKEN_1}\n")).unwrap();
    set_env(&[
        (ENV_INSTANCE_KEY, Some(&format!(" {IK}\n"))),
        (ENV_ACCESS_TOKEN, None),
        (ENV_ACCESS_TOKEN_FILE, Some(file.to_str().unwrap())),
    ]);
    let layer = TwnAuthLayer::from_env().expect("valid environment");
    out.debug("TwnAuthLayer::from_env (file)", &layer);

    let rt = paused_runtime();
    let inner = Inner::new();
    let service = layer.layer(inner.clone());
    out.debug("TwnAuth (file)", &service);
    rt.block_on(async {
        let uri = "https://navigator-api.tweakwise.com/stats/totalproducts";
        send(out, "file token", service.clone(), get(uri)).await;
        for content in [
            format!("{TOKEN_2}\n"),
            format!("{TOKEN_3} x\n"),
            String::new(),
        ] {
            std::fs::write(&file, content).unwrap();
            advance(Duration::from_secs(31)).await;
            send(out, "file token", service.clone(), get(uri)).await;
            // Let the background re-read finish, then send again.
            settle().await;
            send(out, "file token", service.clone(), get(uri)).await;
        }
    });
    inner.drain_into(out, "file token");
    let (t1, t2) = (Some(TOKEN_1), Some(TOKEN_2));
    assert_eq!(inner.tokens(), [t1, t1, t2, t2, t2, t2, t2]);

    set_env(&[
        (ENV_INSTANCE_KEY, Some(&format!("{IK}\r\n"))),
        (ENV_ACCESS_TOKEN, Some(&format!("{TOKEN_2}\n"))),
        (ENV_ACCESS_TOKEN_FILE, None),
    ]);
    let layer = TwnAuthLayer::from_env().expect("valid environment");
    out.debug("TwnAuthLayer::from_env (variable)", &layer);
    let inner = Inner::new();
    rt.block_on(async {
        let uri = "https://navigator-api.tweakwise.com/stats/totalproducts";
        send(out, "env token", layer.layer(inner.clone()), get(uri)).await;
        std::env::set_var(ENV_ACCESS_TOKEN, format!("{TOKEN_3}\x01"));
        advance(Duration::from_secs(31)).await;
        send(out, "env token", layer.layer(inner.clone()), get(uri)).await;
        settle().await;
        send(out, "env token", layer.layer(inner.clone()), get(uri)).await;
    });
    inner.drain_into(out, "env token");
    assert_eq!(inner.tokens(), [Some(TOKEN_2); 3]);
    set_env(&[(ENV_INSTANCE_KEY, None), (ENV_ACCESS_TOKEN, None)]);
}

/// A layer with a fixed pair: a request, per-request credentials, refusals and the scope.
fn static_layer(out: &mut Outputs) {
    let layer = TwnAuthLayer::new(key(IK), token(TOKEN_1));
    out.debug("TwnAuthLayer (static)", &layer);
    let scoped = layer
        .clone()
        .scope(Origin::new("https://navigator-api.tweakwise.com").unwrap());
    out.debug("TwnAuthLayer (static, scoped)", &scoped);
    let permissive = layer.clone().allow_plain_http().allow_relative_uris();
    out.debug("TwnAuthLayer (static, permissive)", &permissive);

    let rt = paused_runtime();
    let inner = Inner::new();
    rt.block_on(async {
        exercise(out, "static", &layer, &scoped, &permissive, &inner).await;
    });
    inner.drain_into(out, "static");

    let mut service = layer.layer(inner.clone());
    out.debug("TwnAuth (static)", &service);
    out.debug("TwnAuth::layer (static)", &service.layer());
    out.debug("TwnAuth::get_ref", service.get_ref());
    let ready = poll_once(ServiceExt::<Request<()>>::ready(&mut service));
    assert!(
        matches!(ready, Some(Ok(_))),
        "a static layer is ready at once"
    );
    let future = service.call(get("https://api.example.test/"));
    out.debug("ResponseFuture", &future);
    match rt.block_on(future) {
        Ok(response) => out.debug("ResponseFuture output", &response),
        Err(error) => panic!("{error}"),
    }
    inner.drain_into(out, "static, called directly");
    out.debug("TwnAuth::into_inner", &service.into_inner());
}

/// The request paths common to every kind of layer.
async fn exercise<P: TokenProvider>(
    out: &mut Outputs,
    label: &str,
    layer: &TwnAuthLayer<P>,
    scoped: &TwnAuthLayer<P>,
    permissive: &TwnAuthLayer<P>,
    inner: &Inner,
) {
    let calls = |inner: &Inner| inner.calls.load(Ordering::SeqCst);
    let before = calls(inner);
    let own = TwnCredentials::new(key(IK_2), token(TOKEN_3));

    send(
        out,
        label,
        layer.layer(inner.clone()),
        get("https://api.example.test/"),
    )
    .await;
    let mut request = get("https://api.example.test/");
    request.extensions_mut().insert(own.clone());
    send(out, label, layer.layer(inner.clone()), request).await;
    let loopback = "http://127.0.0.1:8080/stats/totalproducts";
    send(out, label, layer.layer(inner.clone()), get(loopback)).await;
    send(
        out,
        label,
        permissive.layer(inner.clone()),
        get("http://api.example.test/"),
    )
    .await;
    send(
        out,
        label,
        permissive.layer(inner.clone()),
        get("/stats/totalproducts"),
    )
    .await;
    assert_eq!(calls(inner) - before, 5, "{label}: sent requests");

    // Refused: the inner service is not called. A URI with a canary in its user info is
    // the caller's mistake, but the refusal must not repeat it.
    for uri in [
        "http://api.example.test/".to_owned(),
        "/stats/totalproducts".to_owned(),
        "ftp://api.example.test/".to_owned(),
        format!("http://{IK}:{TOKEN_1}@api.example.test/"),
        format!("ws://{TOKEN_2}@api.example.test/"),
    ] {
        send(out, label, layer.layer(inner.clone()), get(&uri)).await;
        let mut request = get(&uri);
        request.extensions_mut().insert(own.clone());
        send(out, label, layer.layer(inner.clone()), request).await;
    }
    assert_eq!(calls(inner) - before, 5, "{label}: refused requests");

    // Outside the scope, carrying canary values the caller set itself: they are removed.
    let mut request = get("https://other.example.test/");
    let headers = request.headers_mut();
    headers.insert(TWN_INSTANCEKEY, HeaderValue::from_static(IK));
    headers.insert(TWN_AUTHENTICATION, HeaderValue::from_static(TOKEN_1));
    request.extensions_mut().insert(own.clone());
    send(out, label, scoped.layer(inner.clone()), request).await;
    let uri = "https://navigator-api.tweakwise.com/stats/totalproducts";
    send(out, label, scoped.layer(inner.clone()), get(uri)).await;
    assert_eq!(calls(inner) - before, 7, "{label}: scoped requests");
}

/// A layer with a token source: first fetch, refresh ahead, failures with and without a
/// usable token, an invalid token from the source, and the errors without a runtime.
fn cached_layer(out: &mut Outputs) {
    let script = Script::new([
        Step::Valid(TOKEN_1, Duration::from_secs(120)),
        Step::Fail("secret store unavailable"),
        Step::Invalid(format!("{TOKEN_2}\n")),
        Step::Valid(TOKEN_2, Duration::from_secs(120)),
    ]);
    let layer = TwnAuthLayer::with_token_source(key(IK), script.clone())
        .refresh_ahead(Duration::from_secs(60))
        .expiry_margin(Duration::from_secs(10))
        .backoff(Duration::from_secs(1), Duration::from_secs(4));
    out.debug("TwnAuthLayer (cached)", &layer);
    let scoped = layer
        .clone()
        .scope(Origin::new("https://navigator-api.tweakwise.com").unwrap());
    let permissive = layer.clone().allow_plain_http().allow_relative_uris();

    let rt = paused_runtime();
    let inner = Inner::new();
    let uri = "https://navigator-api.tweakwise.com/stats/totalproducts";
    rt.block_on(async {
        // First fetch, then every kind of request.
        exercise(out, "cached", &layer, &scoped, &permissive, &inner).await;
        assert_eq!(script.fetches(), 1);

        // Inside the refresh-ahead window: the refresh fails, token 1 keeps flowing.
        advance(Duration::from_secs(65)).await;
        send(out, "cached", layer.layer(inner.clone()), get(uri)).await;
        settle().await;
        assert_eq!(script.fetches(), 2);

        // After the backoff: the refresh gets an invalid token, token 1 keeps flowing.
        advance(Duration::from_secs(5)).await;
        send(out, "cached", layer.layer(inner.clone()), get(uri)).await;
        settle().await;
        assert_eq!(script.fetches(), 3);

        // After the next backoff, token 2 replaces it.
        advance(Duration::from_secs(5)).await;
        send(out, "cached", layer.layer(inner.clone()), get(uri)).await;
        settle().await;
        send(out, "cached", layer.layer(inner.clone()), get(uri)).await;
        assert_eq!(script.fetches(), 4);
        assert_eq!(script.remaining(), 0);

        // Past expiry, with nothing usable: the request waits and gets the failure.
        advance(Duration::from_secs(200)).await;
        send(out, "cached", layer.layer(inner.clone()), get(uri)).await;
        // Within the backoff: fails at once with the time to wait.
        send(out, "cached", layer.layer(inner.clone()), get(uri)).await;
        assert_eq!(script.fetches(), 5);
    });
    inner.drain_into(out, "cached");

    // A source whose only token is invalid, and one that fails, on an empty cache.
    for step in [
        Step::Invalid(format!("{TOKEN_3} {TOKEN_3}")),
        Step::Fail("vault sealed"),
    ] {
        let script = Script::new([step.clone(), step]);
        let layer = TwnAuthLayer::with_token_source(key(IK_2), script.clone());
        let inner = Inner::new();
        rt.block_on(async {
            send(out, "empty cache", layer.layer(inner.clone()), get(uri)).await;
            send(out, "empty cache", layer.layer(inner.clone()), get(uri)).await;
            advance(Duration::from_secs(60)).await;
            send(out, "empty cache", layer.layer(inner.clone()), get(uri)).await;
        });
        assert_eq!(script.fetches(), 2);
        assert_eq!(inner.calls.load(Ordering::SeqCst), 0);
    }

    // No runtime.
    let layer = TwnAuthLayer::with_token_source(key(IK), Script::new([]));
    let mut service = layer.layer(Inner::new());
    out.debug("TwnAuth (cached)", &service);
    let ready = poll_once(ServiceExt::<Request<()>>::ready(&mut service)).expect("inner ready");
    assert!(ready.is_ok());
    let error = poll_once(service.call(get(uri))).unwrap().unwrap_err();
    assert!(matches!(
        error.downcast_ref(),
        Some(Error::NoRuntime { .. })
    ));
    out.boxed("no runtime", &error);

    // The runtime shuts down while a request waits for the fetch.
    let script = Script::new([Step::Hang]);
    let layer = TwnAuthLayer::with_token_source(key(IK), script.clone());
    let mut service = layer.layer(Inner::new());
    let first = paused_runtime();
    let waiting = first.block_on(async {
        ServiceExt::<Request<()>>::ready(&mut service)
            .await
            .unwrap();
        let mut response = Box::pin(service.call(get(uri)));
        out.debug("ResponseFuture (waiting)", &response);
        let waited = tokio::time::timeout(Duration::from_secs(1), &mut response).await;
        assert!(waited.is_err(), "the fetch hangs");
        // Handed out of the runtime on purpose: it is awaited on the next one.
        Some(response)
    });
    let waiting = waiting.expect("a waiting response future");
    drop(first);
    rt.block_on(async {
        let error = waiting.await.unwrap_err();
        assert!(matches!(
            error.downcast_ref(),
            Some(Error::FetchAbandoned { .. })
        ));
        out.boxed("abandoned", &error);
    });
}

/// Rotation detection and the retry layer: a `401` for token 1, then `200` with token 2.
fn rotation(out: &mut Outputs) {
    let script = Script::new([
        Step::Valid(TOKEN_1, Duration::from_secs(3600)),
        Step::Valid(TOKEN_2, Duration::from_secs(3600)),
    ]);
    let auth = TwnAuthLayer::with_token_source(key(IK), script.clone()).detect_rotation();
    let retry = auth.retry_layer();
    out.debug("RetryLayer", &retry);
    let inner = Inner::rejecting(TOKEN_1);
    let service = ServiceBuilder::new()
        .layer(retry)
        .layer(auth)
        .service(inner.clone());
    out.debug("Retry<TwnAuth>", &service);

    let rt = paused_runtime();
    rt.block_on(async {
        let uri = "https://navigator-api.tweakwise.com/catalog/products";
        let response = service.clone().oneshot(get(uri)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        out.debug("rotation: response", &response);
    });
    inner.drain_into(out, "rotation");
    assert_eq!(script.fetches(), 2);
    assert_eq!(inner.calls.load(Ordering::SeqCst), 2);
}

/// The crate's redirect policy, with the auth layer outside `FollowRedirect`.
#[cfg(feature = "tower-http")]
fn redirect_policy(out: &mut Outputs) {
    use tower_http::follow_redirect::FollowRedirectLayer;
    use tower_twn_auth::redirect::KeepCredentialsOnOrigin;

    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let mock = tower::service_fn(move |request: Request<String>| {
        let mut response = Response::new(String::new());
        if request.uri().host() == Some("navigator-api.tweakwise.com") {
            *response.status_mut() = StatusCode::FOUND;
            response.headers_mut().insert(
                http::header::LOCATION,
                HeaderValue::from_static("https://elsewhere.example.test/landing"),
            );
        }
        record.lock().unwrap().push(format!("{request:?}"));
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let policy = KeepCredentialsOnOrigin::default();
    out.debug("KeepCredentialsOnOrigin", &policy);
    let follow = FollowRedirectLayer::with_policy(policy);
    out.debug("FollowRedirectLayer", &follow);
    let service = ServiceBuilder::new()
        .layer(TwnAuthLayer::new(key(IK), token(TOKEN_1)))
        .layer(follow)
        .service(mock);
    out.debug("TwnAuth<FollowRedirect>", &service);

    let rt = paused_runtime();
    rt.block_on(async {
        let request = Request::get("https://navigator-api.tweakwise.com/moved")
            .body(String::new())
            .unwrap();
        let response = service.oneshot(request).await.unwrap();
        out.debug("redirect: response", &response);
    });
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    for (i, text) in seen.iter().enumerate() {
        out.text(&format!("redirect: hop {i} (Debug)"), text.clone());
    }
}

#[cfg(not(feature = "tower-http"))]
fn redirect_policy(_out: &mut Outputs) {}

#[test]
fn canaries_sent_down_every_path_appear_in_no_output_or_trace() {
    let buffer = Buffer::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(buffer.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
    let dir = tempfile::tempdir().unwrap();
    let mut out = Outputs::default();

    credentials_and_values(&mut out);
    loaders(&mut out, dir.path());
    from_env_file_rotation(&mut out, dir.path());
    static_layer(&mut out);
    cached_layer(&mut out);
    rotation(&mut out);
    redirect_policy(&mut out);

    let trace = buffer.text();
    // Not vacuous: the crate logged its fetches, failures, rotation and retry.
    for event in [
        "tower_twn_auth",
        "token fetch started",
        "token fetched",
        "token fetch failed; backing off",
        "token rejected by the server",
        "sending it once more",
    ] {
        assert!(trace.contains(event), "no {event:?} in the trace:\n{trace}");
    }
    assert!(out.0.len() > 500, "only {} outputs captured", out.0.len());
    out.text("tracing at TRACE", trace);

    let found = leaks(&out.0);
    assert!(
        found.is_empty(),
        "{} leaks:\n\n{}",
        found.len(),
        found.join("\n\n")
    );
}
