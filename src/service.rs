//! The service that attaches the credentials: [`TwnAuth`].

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderValue, Request, Response};
use tower::BoxError;
use tower_layer::Layer;
use tower_service::Service;

use crate::cache::Lookup;
use crate::credentials::{
    InstanceKey, StaticToken, TwnCredentials, TWN_AUTHENTICATION, TWN_INSTANCEKEY,
};
use crate::destination::{Destinations, Verdict};
use crate::error::{Host, Refusal};
use crate::future::sealed::Report;
use crate::future::{ResponseFuture, TokenWait};
use crate::layer::TwnAuthLayer;
use crate::provider::TokenProvider;

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
/// `poll_ready` is the inner service's readiness, and `call` uses the instance it readied.
///
/// The inner service must be `Clone`, as hyper-util's client and most tower stacks are (wrap
/// one that is not in `tower::buffer::Buffer`): a request that has to wait for a token takes
/// the readied instance into its response future and leaves a clone behind, the way
/// tower-http's `FollowRedirect` does.
///
/// `P` is where the token comes from: [`StaticToken`] for a layer made with
/// [`TwnAuthLayer::new`], [`CachedToken`](crate::CachedToken) for one made with a token
/// source.
pub struct TwnAuth<S, P = StaticToken> {
    inner: S,
    shared: Arc<Shared>,
    /// The fixed token, or this clone's handle on the cache.
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

/// What the destination rules and the request's own credentials leave for the layer to do.
enum Route {
    /// Fail the request without calling the inner service.
    Refuse(Refusal),
    /// The request's headers are settled (stripped, or its own credentials set): send it.
    Send,
    /// Attach the layer's credentials.
    Attach,
}

impl<S, P> TwnAuth<S, P> {
    /// Applies the destination rules and any per-request credentials to `request`.
    #[inline(never)]
    fn route<B>(&self, request: &mut Request<B>) -> Route {
        let verdict = self.shared.destinations.verdict(request.uri());
        let left_origin = request.extensions().get::<LeftOrigin>().is_some();

        match verdict {
            // A redirect took the request away from its origin: whatever the destination, it
            // goes without credentials, so there is nothing to refuse.
            _ if left_origin => {
                strip(request.headers_mut());
                Route::Send
            }
            Verdict::Insecure => Route::Refuse(Refusal::Insecure(Host::new(
                request.uri().host().unwrap_or_default(),
            ))),
            Verdict::Unknown => Route::Refuse(Refusal::Unknown),
            Verdict::Attach => {
                let own = request.extensions().get::<TwnCredentials>().map(|own| {
                    (
                        own.instance_key.header_value().clone(),
                        own.access_token.header_value().clone(),
                    )
                });
                match own {
                    Some((key, token)) => {
                        attach(request.headers_mut(), key, token);
                        Route::Send
                    }
                    None => Route::Attach,
                }
            }
            Verdict::Strip => {
                strip(request.headers_mut());
                Route::Send
            }
        }
    }
}

/// Removes both headers, whatever put them there.
fn strip(headers: &mut HeaderMap) {
    headers.remove(TWN_INSTANCEKEY);
    headers.remove(TWN_AUTHENTICATION);
}

/// Sets both headers; `insert` replaces every value already there, so each leaves once.
#[inline(always)]
fn attach(headers: &mut HeaderMap, key: HeaderValue, token: HeaderValue) {
    headers.insert(TWN_INSTANCEKEY, key);
    headers.insert(TWN_AUTHENTICATION, token);
}

impl<S, P, B, ResB> Service<Request<B>> for TwnAuth<S, P>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    P: TokenProvider,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, TokenWait<S, B>, P>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    /// Sends the request with its token, or waits for one in the response future.
    ///
    /// A request that must wait (only with a token source) takes the inner service this
    /// instance readied with it and leaves a clone in its place, since the wait may outlive
    /// this call.
    #[inline]
    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // Nearly every request carries no extensions and goes where the credentials may: it
        // needs nothing more than the two inserts.
        let outright = request.extensions().is_empty()
            && self.shared.destinations.attach_outright(request.uri());
        if !outright {
            match self.route(&mut request) {
                Route::Refuse(refusal) => return ResponseFuture::refused(refusal),
                Route::Send => {
                    return ResponseFuture::called(self.inner.call(request), Default::default())
                }
                Route::Attach => {}
            }
        }

        // The key goes in first, so that nothing is held across its insert; a request that
        // must wait for its token takes the key along in its headers.
        let key = self.shared.instance_key.header_value().clone();
        request.headers_mut().insert(TWN_INSTANCEKEY, key);
        match self.token.ready() {
            Ok((token, report)) => {
                request.headers_mut().insert(TWN_AUTHENTICATION, token);
                let report = report.sent_to(request.uri());
                ResponseFuture::called(self.inner.call(request), report)
            }
            Err(_) => self.call_without_token(request),
        }
    }
}

impl<S, P> TwnAuth<S, P>
where
    P: TokenProvider,
{
    /// Sends a request whose token was not at hand, or has it wait for one.
    #[inline(never)]
    fn call_without_token<B, ResB>(
        &mut self,
        mut request: Request<B>,
    ) -> ResponseFuture<S::Future, TokenWait<S, B>, P>
    where
        S: Service<Request<B>, Response = Response<ResB>> + Clone,
    {
        match self.token.lookup() {
            Lookup::Ready(token, report) => {
                request.headers_mut().insert(TWN_AUTHENTICATION, token);
                let report = report.sent_to(request.uri());
                ResponseFuture::called(self.inner.call(request), report)
            }
            Lookup::Failed(error, waits) => ResponseFuture::failed(error, waits),
            Lookup::Wait(rx, handle, waits) => {
                let clone = self.inner.clone();
                let readied = std::mem::replace(&mut self.inner, clone);
                let wait = TokenWait::new(rx, readied, request, handle);
                ResponseFuture::waiting(wait, waits)
            }
        }
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
