//! Asks the Tweakwise Backend API how many products an instance has, through `TwnAuthLayer`.
//!
//! With no configuration, it starts a mock Backend on 127.0.0.1 that answers only requests
//! carrying the right `TWN-InstanceKey` and `TWN-Authentication`, and calls that:
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! With credentials in the environment, it calls the real Backend API over https instead
//! (`TWN_API_URL` sets another origin, such as `http://127.0.0.1:8080`):
//!
//! ```text
//! TWN_INSTANCE_KEY=... TWN_ACCESS_TOKEN_FILE=/run/secrets/twn-token \
//!     cargo run --example quickstart
//! ```
//!
//! Plain hyper-util cannot speak https, so the client uses `hyper-rustls` as its connector.

use std::error::Error;
use std::process::ExitCode;

use bytes::Bytes;
use http::{header::ACCEPT, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_twn_auth::{
    AccessToken, InstanceKey, Origin, TokenProvider, TwnAuthLayer, ENV_ACCESS_TOKEN,
    ENV_ACCESS_TOKEN_FILE, ENV_INSTANCE_KEY,
};
use wiremock::matchers::{any, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const ENV_API_URL: &str = "TWN_API_URL";
const DEFAULT_API_URL: &str = "https://navigator-api.tweakwise.com";

// The mock's credentials. Real ones come from the environment and are never printed.
const MOCK_INSTANCE_KEY: &str = "3f8c1a2b";
const MOCK_ACCESS_TOKEN: &str = "tw-mock-0123456789abcdef";

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn Error>> {
    let configured = [ENV_INSTANCE_KEY, ENV_ACCESS_TOKEN, ENV_ACCESS_TOKEN_FILE]
        .iter()
        .any(|variable| std::env::var_os(variable).is_some());

    if !configured {
        let mock = start_mock_backend().await;
        println!(
            "No {ENV_INSTANCE_KEY} set: calling a mock Backend at {}",
            mock.uri()
        );
        let auth = TwnAuthLayer::new(
            InstanceKey::new(MOCK_INSTANCE_KEY)?,
            AccessToken::new(MOCK_ACCESS_TOKEN)?,
        );
        return total_products(auth, &mock.uri()).await;
    }

    let base = match std::env::var(ENV_API_URL) {
        Ok(url) => url.trim().trim_end_matches('/').to_owned(),
        Err(std::env::VarError::NotPresent) => DEFAULT_API_URL.to_owned(),
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(format!("{ENV_API_URL} is not valid Unicode").into())
        }
    };
    let origin = Origin::new(&base).map_err(|error| {
        format!("{ENV_API_URL}: {error}; expected an origin such as {DEFAULT_API_URL}")
    })?;
    let auth = TwnAuthLayer::from_env().map_err(|error| {
        format!(
            "{}. Set {ENV_INSTANCE_KEY} and one of {ENV_ACCESS_TOKEN} or \
             {ENV_ACCESS_TOKEN_FILE}, or unset all three to call the mock Backend",
            with_causes(&error)
        )
    })?;
    println!("Calling the Backend API at {base}");
    // Credentials go to that origin only, whatever else the stack does with a request.
    total_products(auth.scope(origin), &base).await
}

/// Sends `GET {base}/stats/totalproducts` through `auth` and prints the answer.
async fn total_products<P: TokenProvider>(
    auth: TwnAuthLayer<P>,
    base: &str,
) -> Result<(), Box<dyn Error>> {
    let connector = HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    let client = ServiceBuilder::new()
        .layer(auth)
        .service(Client::builder(TokioExecutor::new()).build(connector));

    let url = format!("{base}/stats/totalproducts");
    let request = Request::get(&url)
        .header(ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())?;
    let response = client
        .oneshot(request)
        .await
        .map_err(|error| explain(&url, error))?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();

    println!("status: {status}");
    match status {
        StatusCode::OK => match product_count(&body) {
            Some(count) => println!("total products: {count}"),
            None => println!("body: {}", String::from_utf8_lossy(&body)),
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            return Err(format!(
                "the Backend API rejected the credentials ({status}). Check that \
                 {ENV_INSTANCE_KEY} is the key of the instance the token was created for, and \
                 that the token was not deleted or rotated in the Tweakwise app"
            )
            .into())
        }
        _ => return Err(format!("unexpected answer from {url}: {status}").into()),
    }
    Ok(())
}

/// Returns the product count from a body such as `{"totalproducts": 1234}` or `1234`.
fn product_count(body: &[u8]) -> Option<u64> {
    match serde_json::from_slice(body).ok()? {
        serde_json::Value::Number(count) => count.as_u64(),
        serde_json::Value::Object(fields) => fields
            .iter()
            .find(|(name, _)| name.to_ascii_lowercase().contains("total"))
            .and_then(|(_, count)| count.as_u64()),
        _ => None,
    }
}

/// Turns a failed call into a message naming what to change.
fn explain(url: &str, error: BoxError) -> Box<dyn Error> {
    match error.downcast_ref::<tower_twn_auth::Error>() {
        Some(refused @ tower_twn_auth::Error::InsecureDestination { .. }) => {
            return format!("{refused}; {ENV_API_URL} must be https, or http to localhost").into()
        }
        Some(other) => return with_causes(other).into(),
        None => {}
    }
    format!("cannot reach {url}: {}", with_causes(&*error)).into()
}

/// Returns `error`'s message followed by those of its causes that it does not already include.
fn with_causes(error: &dyn Error) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let text = inner.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        cause = inner.source();
    }
    message
}

/// Starts a mock Backend that answers 200 only to the mock's own credentials.
async fn start_mock_backend() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/stats/totalproducts"))
        .and(header("TWN-InstanceKey", MOCK_INSTANCE_KEY))
        .and(header("TWN-Authentication", MOCK_ACCESS_TOKEN))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "totalproducts": 1234
        })))
        .mount(&server)
        .await;
    // Everything else, including a missing or wrong header, is unauthorized.
    Mock::given(any())
        .respond_with(ResponseTemplate::new(401))
        .with_priority(u8::MAX)
        .mount(&server)
        .await;
    server
}
