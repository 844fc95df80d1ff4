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
use http::{Request, Response, StatusCode};
use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
use http_body_util::{Either, Empty, Full};
use tower::retry::Policy;

use crate::future::Replaceable;

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
/// retried only when the layer attached its own token, the response has one of the
/// rejection statuses, and rotation detection has dropped that token, so that the retry
/// carries another one; requests outside the scope, with their own
/// [`TwnCredentials`](crate::TwnCredentials), or through a layer without
/// [`detect_rotation`](crate::TwnAuthLayer::detect_rotation) are never retried. Each request
/// is retried at most once: if the second attempt is rejected too, the caller gets that
/// second response as the server sent it. Errors of the inner service are not retried.
#[derive(Clone, Debug)]
pub struct RetryRejected {
    statuses: Arc<[StatusCode]>,
    retried: bool,
}

impl RetryRejected {
    /// Returns a policy retrying responses with any of `statuses`.
    ///
    /// ```
    /// use http::StatusCode;
    /// use tower_twn_auth::RetryRejected;
    ///
    /// let policy = RetryRejected::new([StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN]);
    /// ```
    pub fn new(statuses: impl Into<Arc<[StatusCode]>>) -> Self {
        RetryRejected {
            statuses: statuses.into(),
            retried: false,
        }
    }
}

impl<B, ResB, E> Policy<Request<B>, Response<ResB>, E> for RetryRejected
where
    B: ReplayBody,
{
    type Future = Ready<()>;

    fn retry(
        &mut self,
        _request: &mut Request<B>,
        result: &mut Result<Response<ResB>, E>,
    ) -> Option<Self::Future> {
        let response = result.as_mut().ok()?;
        // Set only on a response that rejected the layer's own token, once that token is
        // gone: a request the layer did not authenticate, or one whose token the cache keeps,
        // would only be rejected again.
        let replaceable = response.extensions_mut().remove::<Replaceable>().is_some();
        let status = response.status();
        if self.retried || !replaceable || !self.statuses.contains(&status) {
            return None;
        }
        self.retried = true;
        tracing::debug!(%status, "request rejected; sending it once more with a fresh token");
        Some(ready(()))
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        let body = request.body().replay()?;
        let mut copy = Request::new(body);
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        *copy.extensions_mut() = request.extensions().clone();
        Some(copy)
    }
}
