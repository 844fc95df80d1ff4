//! The service that attaches the credentials: [`TwnAuth`].

use std::fmt;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use tower::BoxError;
use tower_layer::Layer;
use tower_service::Service;

use crate::credentials::{InstanceKey, TwnCredentials, TWN_AUTHENTICATION, TWN_INSTANCEKEY};
use crate::destination::{Destinations, Verdict};
use crate::future::ResponseFuture;
use crate::layer::TwnAuthLayer;
use crate::provider::{StaticToken, TokenProvider};

/// What every clone of a layer's services shares, fixed when the layer is built.
#[derive(Clone, Debug)]
pub(crate) struct Shared {
    pub(crate) instance_key: InstanceKey,
    pub(crate) destinations: Destinations,
}

/// Marks a request that a redirect has taken away from the origin it was first sent to, so
/// that no credentials are attached to it again.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LeftOrigin;

/// Adds `TWN-InstanceKey` and `TWN-Authentication` to every request, then calls the inner
/// service.
///
/// Made by [`TwnAuthLayer`]; see the [crate docs](crate) for what it does to each request.
/// `P` is where the token comes from: [`StaticToken`] for a layer made with
/// [`TwnAuthLayer::new`], [`CachedToken`](crate::CachedToken) for one made with a token
/// source.
pub struct TwnAuth<S, P = StaticToken> {
    inner: S,
    shared: Arc<Shared>,
    /// Holds what `poll_ready` reserved for the next `call`.
    token: P,
}

impl<S, P> TwnAuth<S, P> {
    pub(crate) fn from_parts(inner: S, shared: Arc<Shared>, token: P) -> Self {
        TwnAuth {
            inner,
            shared,
            token,
        }
    }

    /// Returns a layer that wraps services the way this one is wrapped.
    pub fn layer(&self) -> TwnAuthLayer<P>
    where
        P: Clone,
    {
        TwnAuthLayer::from_parts(Arc::clone(&self.shared), self.token.clone())
    }

    /// Returns a reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Returns a mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Returns the inner service, dropping the credentials.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, P, B, ResB> Service<Request<B>> for TwnAuth<S, P>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    P: TokenProvider,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The token first: a service that waits for a fetch should not hold on to whatever
        // the inner service reserved for it (a concurrency permit, a buffer slot).
        ready!(self.token.poll_token(cx));
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let verdict = self.shared.destinations.verdict(request.uri());
        let extensions = request.extensions();
        let own = extensions.get::<TwnCredentials>();
        let attach = matches!(verdict, Verdict::Attach) && extensions.get::<LeftOrigin>().is_none();
        let reserved = self.token.take(attach && own.is_none());

        let (key, token, watch) = match (verdict, own) {
            (Verdict::Refuse(error), _) => return ResponseFuture::refused(error),
            _ if !attach => {
                let headers = request.headers_mut();
                headers.remove(TWN_INSTANCEKEY);
                headers.remove(TWN_AUTHENTICATION);
                return ResponseFuture::called(self.inner.call(request), None);
            }
            (_, Some(own)) => (
                own.instance_key.header_value().clone(),
                own.access_token.header_value().clone(),
                None,
            ),
            (_, None) => match reserved {
                Ok((token, watch)) => (
                    self.shared.instance_key.header_value().clone(),
                    token,
                    watch,
                ),
                Err(error) => return ResponseFuture::refused(error),
            },
        };

        // `insert` replaces every value already there, so each header leaves exactly once.
        let headers = request.headers_mut();
        headers.insert(TWN_INSTANCEKEY, key);
        headers.insert(TWN_AUTHENTICATION, token);
        ResponseFuture::called(self.inner.call(request), watch)
    }
}

impl<S: Clone, P: Clone> Clone for TwnAuth<S, P> {
    fn clone(&self) -> Self {
        TwnAuth {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
            token: self.token.clone(),
        }
    }
}

impl<S: fmt::Debug, P: fmt::Debug> fmt::Debug for TwnAuth<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TwnAuth")
            .field("inner", &self.inner)
            .field("instance_key", &self.shared.instance_key)
            .field("token", &self.token)
            .field("destinations", &self.shared.destinations)
            .finish()
    }
}

impl<S, P: TokenProvider> Layer<S> for TwnAuthLayer<P> {
    type Service = TwnAuth<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        let (shared, token) = self.parts();
        TwnAuth::from_parts(inner, Arc::clone(shared), token.clone())
    }
}
