//! A redirect policy for `tower_http::follow_redirect` that keeps the credentials on their
//! origin (feature `tower-http`).
//!
//! [`KeepCredentialsOnOrigin`] wraps another policy (tower-http's `Standard` by default) and
//! follows the same redirects. From the first hop that leaves the origin of the request
//! before it (another scheme, host or port; https to http on the same host counts), it
//! removes both TWN headers and marks the request, so that a [`TwnAuth`](crate::TwnAuth)
//! service further in does not attach them again. Removal is final: a later redirect back
//! to the first origin does not restore them. A request's own
//! [`TwnCredentials`] go with it to every hop on its origin, even
//! when the redirect layer is told not to preserve extensions.
//!
//! ```
//! use tower::ServiceBuilder;
//! use tower_http::follow_redirect::FollowRedirectLayer;
//! use tower_twn_auth::{redirect::KeepCredentialsOnOrigin, AccessToken, InstanceKey, TwnAuthLayer};
//!
//! let auth = TwnAuthLayer::new(InstanceKey::new("3f8c1a2b")?, AccessToken::new("tw-1")?);
//! let service = ServiceBuilder::new()
//!     .layer(FollowRedirectLayer::with_policy(KeepCredentialsOnOrigin::default()))
//!     .layer(auth)
//!     .service_fn(|_: http::Request<String>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//!     });
//! # Ok::<(), tower::BoxError>(())
//! ```

use http::uri::Scheme;
use http::{Request, Uri};
use tower_http::follow_redirect::policy::{Action, Attempt, Policy, Standard};

use crate::credentials::{TwnCredentials, TWN_AUTHENTICATION, TWN_INSTANCEKEY};
use crate::service::LeftOrigin;

/// Redirect policy that strips the TWN headers once a redirect leaves the origin.
#[derive(Clone, Debug)]
pub struct KeepCredentialsOnOrigin<P = Standard> {
    inner: P,
    left_origin: bool,
    /// The first request's own credentials, carried to later hops on its origin even when
    /// the redirect layer does not preserve extensions.
    own: Option<TwnCredentials>,
    first: bool,
}

impl<P> KeepCredentialsOnOrigin<P> {
    /// Wraps `inner`, which decides which redirects are followed.
    pub fn new(inner: P) -> Self {
        KeepCredentialsOnOrigin {
            inner,
            left_origin: false,
            own: None,
            first: true,
        }
    }
}

impl Default for KeepCredentialsOnOrigin {
    /// Wraps tower-http's `Standard` policy: at most 20 redirects and, on a hop to another
    /// origin, `Authorization`, `Cookie` and `Proxy-Authorization` removed and the request's
    /// extensions dropped as well.
    fn default() -> Self {
        KeepCredentialsOnOrigin::new(Standard::default())
    }
}

impl<P, B, E> Policy<B, E> for KeepCredentialsOnOrigin<P>
where
    P: Policy<B, E>,
{
    fn redirect(&mut self, attempt: &Attempt<'_>) -> Result<Action, E> {
        let action = self.inner.redirect(attempt)?;
        if action.is_follow() && !same_origin(attempt.previous(), attempt.location()) {
            self.left_origin = true;
        }
        Ok(action)
    }

    fn on_request(&mut self, request: &mut Request<B>) {
        if std::mem::take(&mut self.first) {
            self.own = request.extensions().get::<TwnCredentials>().cloned();
        }
        self.inner.on_request(request);
        if self.left_origin {
            let headers = request.headers_mut();
            headers.remove(TWN_INSTANCEKEY);
            headers.remove(TWN_AUTHENTICATION);
            request.extensions_mut().insert(LeftOrigin);
        } else if let Some(own) = &self.own {
            // Still on the origin: the hop belongs to the same instance as the request.
            request.extensions_mut().insert(own.clone());
        }
    }

    fn clone_body(&self, body: &B) -> Option<B> {
        self.inner.clone_body(body)
    }
}

/// Whether `a` and `b` have the same scheme, host (in any case) and port.
pub(crate) fn same_origin(a: &Uri, b: &Uri) -> bool {
    let port = |uri: &Uri| {
        uri.port_u16().or(match uri.scheme() {
            Some(s) if *s == Scheme::HTTPS => Some(443),
            Some(s) if *s == Scheme::HTTP => Some(80),
            _ => None,
        })
    };
    a.scheme() == b.scheme()
        && a.host()
            .zip(b.host())
            .is_some_and(|(x, y)| x.eq_ignore_ascii_case(y))
        && port(a) == port(b)
}
