//! Where the token for a request comes from: fixed when the layer was built, or from a
//! [`TokenSource`](crate::TokenSource) through the cache.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, StatusCode};

use crate::cache::{Cache, CachedToken};
use crate::credentials::AccessToken;
use crate::error::Error;

/// The token of a layer built with [`TwnAuthLayer::new`](crate::TwnAuthLayer::new): the same
/// value for every request.
#[derive(Clone)]
pub struct StaticToken(pub(crate) AccessToken);

impl fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StaticToken").field(&self.0).finish()
    }
}

/// How a [`TwnAuth`](crate::TwnAuth) service obtains its token: [`StaticToken`] or
/// [`CachedToken`].
///
/// This trait is sealed: it names the two kinds of layer and cannot be implemented outside
/// this crate. Custom tokens come in through [`TokenSource`](crate::TokenSource).
pub trait TokenProvider: sealed::Provide {}

impl TokenProvider for StaticToken {}
impl TokenProvider for CachedToken {}

pub(crate) use self::sealed::Watch;

pub(crate) mod sealed {
    use super::*;

    /// What the response future needs to report how the server answered a token.
    #[derive(Debug)]
    pub struct Watch {
        pub(crate) cache: Arc<Cache>,
        pub(crate) generation: u64,
        pub(crate) statuses: Arc<[StatusCode]>,
    }

    pub trait Provide: Clone + Send + Sync + 'static {
        /// Readies a token for the next call; `Ready` also when the attempt failed, in which
        /// case `take` returns the error.
        fn poll_token(&mut self, cx: &mut Context<'_>) -> Poll<()>;

        /// Returns the token for this call, and what to watch in its response.
        fn take(&mut self, watch: bool) -> Result<(HeaderValue, Option<Watch>), Error>;
    }
}

impl sealed::Provide for StaticToken {
    fn poll_token(&mut self, _cx: &mut Context<'_>) -> Poll<()> {
        Poll::Ready(())
    }

    fn take(&mut self, _watch: bool) -> Result<(HeaderValue, Option<Watch>), Error> {
        Ok((self.0.header_value().clone(), None))
    }
}

impl sealed::Provide for CachedToken {
    fn poll_token(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        CachedToken::poll_token(self, cx)
    }

    fn take(&mut self, watch: bool) -> Result<(HeaderValue, Option<Watch>), Error> {
        let snapshot = CachedToken::take(self)?;
        let value = snapshot.value.clone();
        let generation = snapshot.generation;
        let watch = match (&self.cache().options().reject_statuses, watch) {
            (Some(statuses), true) => Some(Watch {
                cache: Arc::clone(self.cache()),
                generation,
                statuses: Arc::clone(statuses),
            }),
            _ => None,
        };
        Ok((value, watch))
    }
}
