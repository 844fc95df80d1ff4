//! Sending a rejected request once more, with a fresh token, through tower's retry layer.
//!
//! [`RetryRejected`] is a [`tower::retry::Policy`]: it keeps a copy of each request whose
//! body can be replayed, and when the response has a rejection status (`401` by default) it
//! has [`tower::retry::Retry`] send the copy once more. Together with
//! [`TwnAuthLayer::detect_rotation`](crate::TwnAuthLayer::detect_rotation), which drops the
//! rejected token, the second attempt carries a freshly fetched one. Get both from the layer;
//! see [`TwnAuthLayer::retry_layer`](crate::TwnAuthLayer::retry_layer) for where they go.
//!
//! # Which bodies are replayed
//!
//! A request is retried only if its body type implements [`ReplayBody`] and
//! [`ReplayBody::replay`] returns a copy. Buffered bodies do: `()`, `String`, `Vec<u8>`,
//! `Bytes`, `&'static str`, `&'static [u8]`, `http_body_util::Full`, `Empty`, and `Either`
//! of two such bodies. Streams such as `http_body_util::combinators::BoxBody` return `None`:
//! the request is sent once and the caller gets the rejection; the token is still dropped,
//! so the next request carries a new one. Implement the trait for your own body type to
//! choose; for a body type of another crate, which the orphan rule keeps you from
//! implementing it for, wrap the body in a type of your own.

use std::future::{ready, Ready};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
use http_body_util::{Either, Empty, Full};
use tower::retry::Policy;

use crate::cache::Cache;
use crate::credentials::TwnCredentials;
use crate::destination::Verdict;
use crate::service::{LeftOrigin, Shared};

/// A request body that may be sent again.
///
/// ```
/// use tower_twn_auth::ReplayBody;
///
/// // A body that replays only while it is small.
/// #[derive(Clone)]
/// struct Upload(Vec<u8>);
///
/// impl ReplayBody for Upload {
///     fn replay(&self) -> Option<Self> {
///         (self.0.len() <= 1 << 20).then(|| self.clone())
///     }
/// }
///
/// assert!(Upload(vec![0; 10]).replay().is_some());
/// assert!(Upload(vec![0; 2 << 20]).replay().is_none());
/// ```
pub trait ReplayBody: Sized {
    /// Returns a copy of the body to send again, or `None` if it cannot be sent twice.
    fn replay(&self) -> Option<Self>;
}

macro_rules! replay_by_clone {
    ($($ty:ty),* $(,)?) => {
        $(impl ReplayBody for $ty {
            fn replay(&self) -> Option<Self> {
                Some(self.clone())
            }
        })*
    };
}

replay_by_clone!((), String, Vec<u8>, Bytes, &'static str, &'static [u8]);

impl<D: Clone> ReplayBody for Full<D> {
    fn replay(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl<D> ReplayBody for Empty<D> {
    fn replay(&self) -> Option<Self> {
        Some(Empty::new())
    }
}

impl<L: ReplayBody, R: ReplayBody> ReplayBody for Either<L, R> {
    fn replay(&self) -> Option<Self> {
        match self {
            Either::Left(body) => body.replay().map(Either::Left),
            Either::Right(body) => body.replay().map(Either::Right),
        }
    }
}

impl<D, E> ReplayBody for BoxBody<D, E> {
    fn replay(&self) -> Option<Self> {
        None
    }
}

impl<D, E> ReplayBody for UnsyncBoxBody<D, E> {
    fn replay(&self) -> Option<Self> {
        None
    }
}

/// Retry policy that sends a request once more after its token was rejected.
///
/// Made by [`TwnAuthLayer::retry_layer`](crate::TwnAuthLayer::retry_layer). A request is
/// retried only when the layer attached its own token to it, the response has one of the
/// rejection statuses given to
/// [`detect_rotation_on`](crate::TwnAuthLayer::detect_rotation_on), and the cache has moved
/// past the token the request carried, so that the retry carries another one: rotation
/// detection dropped it, or the source had already brought a newer one (a re-read of a
/// rotated secret, say) when the rejection came.
/// Requests outside the scope, with their own [`TwnCredentials`], or through a layer
/// without [`detect_rotation`](crate::TwnAuthLayer::detect_rotation) are never retried. Each
/// request is retried at most once: if the second attempt is rejected too, the caller gets
/// that second response as the server sent it. Errors of the inner service are not retried.
#[derive(Clone, Debug)]
pub struct RetryRejected {
    cache: Arc<Cache>,
    shared: Arc<Shared>,
    /// The generation of the token the request is expected to carry: the cached one when it
    /// set off, or the next one if that was already dropped.
    generation: u64,
    retried: bool,
}

impl RetryRejected {
    pub(crate) fn new(cache: Arc<Cache>, shared: Arc<Shared>) -> Self {
        RetryRejected {
            cache,
            shared,
            generation: 0,
            retried: false,
        }
    }

    /// Whether the layer attaches its own token to `request`, as `TwnAuth` decides it.
    fn signs<B>(&self, request: &Request<B>) -> bool {
        let extensions = request.extensions();
        matches!(
            self.shared.destinations.verdict(request.uri()),
            Verdict::Attach
        ) && extensions.get::<TwnCredentials>().is_none()
            && extensions.get::<LeftOrigin>().is_none()
    }
}

impl<B, ResB, E> Policy<Request<B>, Response<ResB>, E> for RetryRejected
where
    B: ReplayBody,
{
    type Future = Ready<()>;

    fn retry(
        &mut self,
        request: &mut Request<B>,
        result: &mut Result<Response<ResB>, E>,
    ) -> Option<Self::Future> {
        let status = result.as_ref().ok()?.status();
        if self.retried || !self.cache.rejects(status) || !self.signs(request) {
            return None;
        }
        // The request carried the token it was expected to, or (rarely, when a fetch ended
        // just as it set off) a later one. Unless the rejection found that token dropped or
        // replaced, a second attempt would carry the same token (a replacement held for the
        // backoff, or one rejected by another origin after a redirect) and fare no better.
        if !self.cache.dropped_since(self.generation) {
            return None;
        }
        self.retried = true;
        tracing::debug!(%status, "request rejected; sending it once more with a fresh token");
        Some(ready(()))
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        let body = request.body().replay()?;
        // A request that finds its generation dropped waits for the next one.
        let generation = self.cache.generation();
        self.generation = if self.cache.dropped_since(generation) {
            generation + 1
        } else {
            generation
        };
        let mut copy = Request::new(body);
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        *copy.extensions_mut() = request.extensions().clone();
        Some(copy)
    }
}
