//! Talks to two Tweakwise instances through one client, with per-request credentials.
//!
//! The layer holds the credentials of shop A. Requests for shop B carry shop B's
//! [`TwnCredentials`] in their extensions, which take precedence for that request only. A mock
//! Backend on 127.0.0.1 knows both instances and answers 200 only when the instance key and
//! the token of a request belong together, with that instance's product count:
//!
//! ```text
//! cargo run --example multi_instance
//! ```
//!
//! The requests for both shops run concurrently; the example exits non-zero if any of them
//! fails or gets the other shop's answer, or if the mock saw a mixed pair.

use std::error::Error;
use std::process::ExitCode;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;
use tower::{ServiceBuilder, ServiceExt};
use tower_twn_auth::{AccessToken, InstanceKey, TwnAuthLayer, TwnCredentials};
use wiremock::matchers::{any, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// A Tweakwise instance as the mock knows it.
struct Shop {
    name: &'static str,
    instance_key: &'static str,
    access_token: &'static str,
    total_products: u64,
}

const SHOP_A: Shop = Shop {
    name: "shop A",
    instance_key: "a1b2c3d4",
    access_token: "tw-shop-a-0123456789",
    total_products: 1234,
};

const SHOP_B: Shop = Shop {
    name: "shop B",
    instance_key: "e5f6a7b8",
    access_token: "tw-shop-b-9876543210",
    total_products: 567,
};

/// Requests sent per shop, all at once.
const REQUESTS_PER_SHOP: usize = 10;

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
    let backend = start_mock_backend(&[&SHOP_A, &SHOP_B]).await;
    println!("mock Backend with two instances at {}", backend.uri());

    // One client for both shops; its own credentials are shop A's.
    let client = ServiceBuilder::new()
        .layer(TwnAuthLayer::new(
            InstanceKey::new(SHOP_A.instance_key)?,
            AccessToken::new(SHOP_A.access_token)?,
        ))
        .service(Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>());
    let shop_b = TwnCredentials::new(
        InstanceKey::new(SHOP_B.instance_key)?,
        AccessToken::new(SHOP_B.access_token)?,
    );

    let url = format!("{}/stats/totalproducts", backend.uri());
    let mut requests = JoinSet::new();
    for i in 0..2 * REQUESTS_PER_SHOP {
        let (shop, builder) = if i % 2 == 0 {
            (&SHOP_A, Request::get(&url))
        } else {
            (&SHOP_B, Request::get(&url).extension(shop_b.clone()))
        };
        let request = builder.body(Empty::new())?;
        let client = client.clone();
        requests.spawn(async move {
            let response = client.oneshot(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            let count = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|value| value["totalproducts"].as_u64());
            Ok::<_, tower::BoxError>((shop, status, count))
        });
    }

    let mut problems = Vec::new();
    let mut answered = [0; 2];
    while let Some(joined) = requests.join_next().await {
        match joined? {
            Ok((shop, status, Some(count))) if status.is_success() => {
                if count == shop.total_products {
                    answered[usize::from(shop.name == SHOP_B.name)] += 1;
                } else {
                    problems.push(format!("{} got another instance's answer", shop.name));
                }
            }
            Ok((shop, status, _)) => problems.push(format!("{}: {status}", shop.name)),
            Err(error) => problems.push(format!("request failed: {error}")),
        }
    }
    for (shop, answered) in [&SHOP_A, &SHOP_B].iter().zip(answered) {
        println!(
            "{}: {answered}/{REQUESTS_PER_SHOP} requests answered 200, total products {}",
            shop.name, shop.total_products
        );
    }

    problems.extend(check_received_pairs(&backend, &[&SHOP_A, &SHOP_B]).await);
    if !problems.is_empty() {
        let list = problems.join("\n  ");
        return Err(format!("{} problems:\n  {list}", problems.len()).into());
    }
    println!("every request arrived with its own instance key and token, never a mixed pair");
    Ok(())
}

/// Starts a mock Backend that answers each shop's matching pair with its product count, and
/// everything else with 401.
async fn start_mock_backend(shops: &[&Shop]) -> MockServer {
    let server = MockServer::start().await;
    for shop in shops {
        Mock::given(method("GET"))
            .and(path("/stats/totalproducts"))
            .and(header("TWN-InstanceKey", shop.instance_key))
            .and(header("TWN-Authentication", shop.access_token))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "totalproducts": shop.total_products
            })))
            .mount(&server)
            .await;
    }
    Mock::given(any())
        .respond_with(ResponseTemplate::new(401))
        .with_priority(u8::MAX)
        .mount(&server)
        .await;
    server
}

/// Checks that every request the mock received carried one instance key and one token, and
/// that they belong to the same shop. Returns what is wrong, without any credential.
async fn check_received_pairs(backend: &MockServer, shops: &[&Shop]) -> Vec<String> {
    let Some(received) = backend.received_requests().await else {
        return vec!["the mock did not record its requests".into()];
    };
    let mut problems = Vec::new();
    for (n, request) in received.iter().enumerate() {
        let values = |name: &str| -> Vec<&[u8]> {
            request
                .headers
                .get_all(name)
                .iter()
                .map(|value| value.as_bytes())
                .collect()
        };
        let pair = match (
            &values("TWN-InstanceKey")[..],
            &values("TWN-Authentication")[..],
        ) {
            ([key], [token]) => (*key, *token),
            _ => {
                problems.push(format!(
                    "request {n} arrived without exactly one of each header"
                ));
                continue;
            }
        };
        let belongs =
            |shop: &&Shop| pair == (shop.instance_key.as_bytes(), shop.access_token.as_bytes());
        if !shops.iter().any(belongs) {
            problems.push(format!("request {n} arrived with a mixed pair"));
        }
    }
    if received.len() != shops.len() * REQUESTS_PER_SHOP {
        problems.push(format!("the mock received {} requests", received.len()));
    }
    problems
}
