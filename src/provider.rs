//! Where the token of a request comes from: [`StaticToken`] or [`CachedToken`].

// `Provide` is public only so that `TokenProvider` can name it; it lives in a private module,
// so the crate-private types in its signature are unreachable from outside all the same.
#![allow(private_interfaces)]

use std::convert::Infallible;

use http::HeaderValue;

use crate::cache::{CachedToken, Lookup};
use crate::credentials::StaticToken;
use crate::future::sealed::{Report, Watching};

/// How a [`TwnAuth`](crate::TwnAuth) service gets its token: [`StaticToken`] for a layer built
/// with [`TwnAuthLayer::new`](crate::TwnAuthLayer::new), [`CachedToken`] for one built with a
/// token source.
///
/// Use it to write code that takes either kind of layer:
///
/// ```
/// use tower_twn_auth::{TokenProvider, TwnAuthLayer};
///
/// fn describe<P: TokenProvider>(layer: &TwnAuthLayer<P>) -> String {
///     format!("{layer:?}")
/// }
/// ```
///
/// The trait is sealed: other tokens come in through a [`TokenSource`](crate::TokenSource).
pub trait TokenProvider: sealed::Provide {}

impl TokenProvider for StaticToken {}
impl TokenProvider for CachedToken {}

pub(crate) mod sealed {
    use super::*;

    pub trait Provide: Clone + Send + Sync + std::fmt::Debug + 'static {
        /// What a response future keeps to report the server's answer to the token.
        type Report: Report + Send + Sync + 'static;

        /// `()` if the token can be missing, so that a request may wait for it or fail;
        /// uninhabited if it never is, so that response futures have no room for either.
        type Waits: Copy + Send + Sync + std::fmt::Debug + 'static;

        /// Returns the token for a request if it is at hand, the path nearly every request
        /// takes, inlined into the service's `call`; `Err` sends the request to
        /// [`lookup`](Self::lookup), and cannot be made for a fixed token.
        fn ready(&mut self) -> Result<(HeaderValue, Self::Report), Self::Waits>;

        /// Returns the token for a request that [`ready`](Self::ready) had none for.
        fn lookup(&mut self) -> Lookup<Self::Report, Self::Waits>;
    }
}

impl sealed::Provide for StaticToken {
    type Report = ();
    type Waits = Infallible;

    #[inline]
    fn ready(&mut self) -> Result<(HeaderValue, ()), Infallible> {
        Ok((self.0.header_value().clone(), ()))
    }

    fn lookup(&mut self) -> Lookup<(), Infallible> {
        Lookup::Ready(self.0.header_value().clone(), ())
    }
}

impl sealed::Provide for CachedToken {
    type Report = Watching;
    type Waits = ();

    #[inline]
    fn ready(&mut self) -> Result<(HeaderValue, Watching), ()> {
        CachedToken::ready(self).ok_or(())
    }

    fn lookup(&mut self) -> Lookup {
        CachedToken::lookup(self)
    }
}
