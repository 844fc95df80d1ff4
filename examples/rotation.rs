//! Rotates the access token five times under load, without a single failed request.
//!
//! A mock Backend on 127.0.0.1 accepts one token at a time and answers 401 to any other. The
//! client reads its token from a file through a [`FileSource`], with
//! [`detect_rotation`](TwnAuthLayer::detect_rotation) and
//! [`retry_layer`](TwnAuthLayer::retry_layer), and sends 10,000 POST requests with a small
//! JSON body, 32 at a time. Now and then the example rotates the token the way a deployment
//! would: first it replaces the token file (write a new file, rename it over the old one),
//! then it makes the Backend accept only the new token. Requests in flight with the old token
//! get 401; the layer drops that token, reads the file once, and each rejected request is
//! sent once more with the new token.
//!
//! ```text
//! cargo run --example rotation
//! RUST_LOG=tower_twn_auth=debug cargo run --example rotation   # to watch each rotation
//! ```
//!
//! It exits non-zero if any request failed. No token is printed.

use std::error::Error;
use std::hash::{BuildHasher, RandomState};
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tower::retry::Retry;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_twn_auth::{
    CachedToken, FileSource, InstanceKey, RetryRejected, Token, TokenSource, TwnAuth, TwnAuthLayer,
};

const REQUESTS: u64 = 10_000;
const IN_FLIGHT: usize = 32;
const ROTATIONS: u64 = 5;
const INSTANCE_KEY: &str = "3f8c1a2b";

/// The client stack: retry outside, authentication inside, hyper-util's client beneath.
type Stack = Retry<RetryRejected, TwnAuth<Client<HttpConnector, Full<Bytes>>, CachedToken>>;

#[tokio::main]
async fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the demonstration; returns whether every request succeeded.
async fn run() -> Result<bool, Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("twn-token");
    let backend = Arc::new(Backend::new(&new_token()));
    replace_token_file(&token_file, &backend.accepted())?;
    let address = Arc::clone(&backend).serve().await?;

    let fetches = Arc::new(AtomicU64::new(0));
    let source = CountingSource {
        inner: FileSource::new(&token_file),
        fetches: Arc::clone(&fetches),
    };
    let auth =
        TwnAuthLayer::with_token_source(InstanceKey::new(INSTANCE_KEY)?, source).detect_rotation();
    let client: Stack = ServiceBuilder::new()
        .layer(auth.retry_layer())
        .layer(auth)
        .service(Client::builder(TokioExecutor::new()).build_http());

    println!("mock Backend at http://{address}, token file in a temporary directory");
    println!(
        "sending {REQUESTS} requests, {IN_FLIGHT} in flight, rotating the token {ROTATIONS} times"
    );
    let url = format!("http://{address}/product");
    let started = Instant::now();
    let outcome = Arc::new(Outcome::default());
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let rotate_every = REQUESTS / (ROTATIONS + 1);
    let mut tasks = JoinSet::new();
    for n in 0..REQUESTS {
        if n > 0 && n % rotate_every == 0 && n / rotate_every <= ROTATIONS {
            // The order matters: the file holds the new token before the Backend starts
            // refusing the old one, as when a secret is updated before the old one is deleted.
            let token = new_token();
            replace_token_file(&token_file, &token)?;
            backend.accept_only(token);
            println!("rotation {} after {n} requests sent", n / rotate_every);
        }
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let (client, url, outcome) = (client.clone(), url.clone(), Arc::clone(&outcome));
        tasks.spawn(async move {
            let result = send(client, &url, n).await;
            drop(permit);
            outcome.record(result.map_err(|error| format!("request {n}: {error}")));
        });
    }
    while let Some(joined) = tasks.join_next().await {
        if let Err(error) = joined {
            outcome.record(Err(format!("a request task failed: {error}")));
        }
    }

    let succeeded = outcome.succeeded.load(Ordering::Relaxed);
    let failed = outcome.failed.load(Ordering::Relaxed);
    println!("requests sent:  {REQUESTS}");
    println!("succeeded:      {succeeded}");
    println!("failed:         {failed}");
    println!(
        "retries:        {} (401 answers from the Backend)",
        backend.rejected.load(Ordering::Relaxed)
    );
    println!(
        "fetches:        {} (reads of the token file)",
        fetches.load(Ordering::Relaxed)
    );
    println!("elapsed:        {:.1} s", started.elapsed().as_secs_f64());
    let first = outcome
        .first_failures
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    for failure in first.iter() {
        eprintln!("failed: {failure}");
    }
    Ok(failed == 0 && succeeded == REQUESTS)
}

/// Sends request `n` and checks that the Backend got its body intact.
async fn send(client: Stack, url: &str, n: u64) -> Result<(), BoxError> {
    let body = Bytes::from(format!(
        r#"{{"articlenumber":"A-{n:05}","stock":{}}}"#,
        n % 50
    ));
    let request = Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body.clone()))?;
    let response = client.oneshot(request).await?;
    let status = response.status();
    let echoed = response.into_body().collect().await?.to_bytes();
    if status != StatusCode::OK {
        return Err(format!("answered {status}").into());
    }
    if echoed != body {
        return Err("the Backend received another body".into());
    }
    Ok(())
}

/// Counts the outcomes of requests, keeping the first few failures to show.
#[derive(Default)]
struct Outcome {
    succeeded: AtomicU64,
    failed: AtomicU64,
    first_failures: Mutex<Vec<String>>,
}

impl Outcome {
    fn record(&self, result: Result<(), String>) {
        let Err(error) = result else {
            self.succeeded.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut first = self
            .first_failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if first.len() < 5 {
            first.push(error);
        }
    }
}

/// A [`TokenSource`] that counts fetches and hands them to a [`FileSource`].
struct CountingSource {
    inner: FileSource,
    fetches: Arc<AtomicU64>,
}

impl TokenSource for CountingSource {
    async fn fetch(&self) -> Result<Token, BoxError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        self.inner.fetch().await
    }

    fn name(&self) -> &str {
        self.inner.name()
    }
}

/// Replaces the token file atomically: a reader sees the old token or the new one, never a
/// half-written file.
fn replace_token_file(path: &Path, token: &str) -> Result<(), Box<dyn Error>> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    writeln!(file, "{token}")?;
    file.persist(path)?;
    Ok(())
}

/// Returns a new, unpredictable token.
fn new_token() -> String {
    let bits = RandomState::new().hash_one(Instant::now());
    format!("tw-{bits:016x}")
}

/// The mock Backend: one instance, one accepted token at a time.
struct Backend {
    accepted: RwLock<String>,
    rejected: AtomicU64,
}

impl Backend {
    fn new(token: &str) -> Self {
        Backend {
            accepted: RwLock::new(token.to_owned()),
            rejected: AtomicU64::new(0),
        }
    }

    fn accepted(&self) -> String {
        self.accepted
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes `token` the only one accepted from now on.
    fn accept_only(&self, token: String) {
        *self
            .accepted
            .write()
            .unwrap_or_else(PoisonError::into_inner) = token;
    }

    /// Whether the request carries exactly one instance key and one token, both accepted.
    fn authorizes(&self, headers: &HeaderMap) -> bool {
        let only = |name: &str| {
            let mut values = headers.get_all(name).iter();
            values.next().filter(|_| values.next().is_none())
        };
        let accepted = self.accepted.read().unwrap_or_else(PoisonError::into_inner);
        only("TWN-InstanceKey").is_some_and(|key| key == INSTANCE_KEY)
            && only("TWN-Authentication").is_some_and(|token| token == accepted.as_str())
    }

    /// Answers an authorized request with its own body, anything else with 401.
    async fn handle(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, hyper::Error> {
        let authorized = self.authorizes(request.headers());
        let body = request.into_body().collect().await?.to_bytes();
        if authorized {
            return Ok(Response::new(Full::new(body)));
        }
        self.rejected.fetch_add(1, Ordering::Relaxed);
        let mut response = Response::new(Full::new(Bytes::from_static(
            b"{\"error\":\"unauthorized\"}",
        )));
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        Ok(response)
    }

    /// Listens on a free loopback port, serving every connection in a task of its own.
    async fn serve(self: Arc<Self>) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let backend = Arc::clone(&self);
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let backend = Arc::clone(&backend);
                        async move { backend.handle(request).await }
                    });
                    // A connection the client closes ends here; the next one is unaffected.
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(address)
    }
}
