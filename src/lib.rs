//! Tower middleware that authenticates requests to the Tweakwise Backend API.
//!
//! The Backend API (`https://navigator-api.tweakwise.com`) wants two headers on every
//! request: `TWN-InstanceKey`, the instance key, and `TWN-Authentication`, an access token
//! created in the Tweakwise app. [`TwnAuthLayer`] wraps any `Service<http::Request<B>>` (a
//! hyper-util client, a stack of tower-http layers) and sets both.
//!
//! ```
//! use http::Request;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_twn_auth::{AccessToken, InstanceKey, TwnAuthLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let auth = TwnAuthLayer::new(
//!     InstanceKey::new("3f8c1a2b")?,
//!     AccessToken::new("tw-0123456789abcdef")?,
//! );
//!
//! // Any service of `http::Request`s; here, one that echoes what it received.
//! let client = ServiceBuilder::new().layer(auth).service_fn(|request: Request<()>| async move {
//!     let seen = request.headers()["TWN-InstanceKey"].clone();
//!     Ok::<_, std::convert::Infallible>(http::Response::new(seen))
//! });
//!
//! let request = Request::get("https://navigator-api.tweakwise.com/stats/totalproducts")
//!     .body(())?;
//! let response = client.oneshot(request).await?;
//! assert_eq!(response.body(), "3f8c1a2b");
//! # Ok(())
//! # }
//! ```
//!
//! # What the layer does to each request
//!
//! * It sets exactly one `TWN-InstanceKey` and one `TWN-Authentication`, replacing any value
//!   the request already had. Both are marked [sensitive](http::HeaderValue::is_sensitive):
//!   `Debug` output hides them and HTTP/2 sends them never-indexed.
//! * It refuses plain `http` to any host but loopback, other schemes (`ws`, `ftp`, or none
//!   before a host), and requests with neither scheme nor host, with an [`Error`] and
//!   without calling the inner service (see
//!   [`allow_plain_http`](TwnAuthLayer::allow_plain_http) and
//!   [`allow_relative_uris`](TwnAuthLayer::allow_relative_uris)). One kind of host-less URI
//!   is not refused: an empty host behind user info, as in `https://user@:443/`, which the
//!   per-request check does not look for; without a scope such a request is sent with both
//!   headers. See [`Error::UnknownDestination`] for this and the other exceptions.
//! * With a [scope](TwnAuthLayer::scope), a request to any other origin leaves with neither
//!   header.
//! * A request carrying [`TwnCredentials`] in its extensions is sent with those instead, for
//!   clients that talk to several Tweakwise instances.
//!
//! Credentials come from a fixed pair ([`TwnAuthLayer::new`]), the environment
//! ([`TwnAuthLayer::from_env`]), or any [`TokenSource`] behind a cache that fetches once for
//! any number of waiting requests, refreshes ahead of expiry in the background, and backs off
//! when the source fails ([`TwnAuthLayer::with_token_source`]). With
//! [`detect_rotation`](TwnAuthLayer::detect_rotation) and
//! [`retry_layer`](TwnAuthLayer::retry_layer), a request rejected because its token was just
//! rotated is sent once more with the new token.
//!
//! # Where the layer goes
//!
//! Put it **inside** anything that re-sends requests (retries, redirects), so that every
//! attempt passes through it and is checked again, and **outside** the client itself.
//!
//! Redirects deserve care: a redirect-following layer copies the request's headers to the
//! next hop, wherever it points. Two arrangements keep the credentials on their origin:
//!
//! * The layer inside `FollowRedirect`, with a [scope](TwnAuthLayer::scope): each hop passes
//!   through the layer, which removes the headers from hops outside the scope. Without a
//!   scope the layer cannot know which origin was meant, and would authenticate the hop too.
//! * `FollowRedirect` with the `redirect::KeepCredentialsOnOrigin` policy (feature
//!   `tower-http`), in either position: it strips the headers from the first hop that leaves
//!   the origin on.
//!
//! tower-http's standard policy alone is not enough. On a hop to another origin it removes
//! `Authorization`, `Cookie` and `Proxy-Authorization` and drops the request's extensions
//! (a request's own [`TwnCredentials`] among them), but it leaves the TWN headers alone: with
//! the layer outside `FollowRedirect` they travel to the new origin, and an unscoped layer
//! inside attaches its own credentials to that hop.
//!
//! # Costs
//!
//! With a fixed token, or a cached token that is still usable, a request costs two header
//! inserts, a check of the URI's scheme (and authority, with a scope), an atomic load or two,
//! and no lock, allocation or write to memory shared between threads: credential bytes are
//! interned (see [`credentials`]) and the cache's refresh-ahead window is tracked by a timer.
//! A cached token that expires adds one clock read, to check its expiry margin.
//! [`detect_rotation`](TwnAuthLayer::detect_rotation) adds a reference count per request,
//! since the response must find its way back to the cache.
//!
//! # Secrets
//!
//! No type of this crate prints a credential: [`InstanceKey`], [`AccessToken`],
//! [`TwnCredentials`], the layer and the service have hand-written `Debug` output that shows
//! a marker, errors name the header, variable or file and the reason, and `tracing` events
//! carry token lifetimes and generations, never values.

#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms,
    clippy::unwrap_used,
    clippy::expect_used
)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]
#![forbid(unsafe_code)]

mod cache;
pub mod credentials;
mod destination;
mod error;
pub mod future;
mod layer;
mod provider;
#[cfg(feature = "tower-http")]
pub mod redirect;
mod retry;
mod service;
pub mod source;

pub use self::cache::CachedToken;
pub use self::credentials::{
    AccessToken, InstanceKey, StaticToken, TwnCredentials, TWN_AUTHENTICATION, TWN_INSTANCEKEY,
};
pub use self::destination::{InvalidOrigin, Origin};
pub use self::error::{
    CredentialKind, Error, InvalidCredential, InvalidReason, LoadError, LoadedFrom,
};
pub use self::future::ResponseFuture;
pub use self::layer::{TwnAuthLayer, ENV_ACCESS_TOKEN, ENV_ACCESS_TOKEN_FILE, ENV_INSTANCE_KEY};
pub use self::provider::TokenProvider;
pub use self::retry::{ReplayBody, RetryRejected};
pub use self::service::TwnAuth;
pub use self::source::{EnvSource, FileSource, Token, TokenSource};

/// The README's examples, run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
