//! Where access tokens come from when they are not fixed: the [`TokenSource`] trait, the
//! [`Token`] it returns, and the built-in sources that read the environment or a file.
//!
//! ```
//! use std::time::Duration;
//! use tower_twn_auth::{AccessToken, Token, TokenSource};
//!
//! struct Vault;
//!
//! impl TokenSource for Vault {
//!     async fn fetch(&self) -> Result<Token, tower::BoxError> {
//!         let secret = "tw-0123456789abcdef"; // a call to the secret store goes here
//!         Ok(Token::new(AccessToken::new(secret)?).valid_for(Duration::from_secs(3600)))
//!     }
//!
//!     fn name(&self) -> &str {
//!         "vault"
//!     }
//! }
//! ```
//!
//! A closure returning such a future is a source too:
//!
//! ```
//! # use tower_twn_auth::{AccessToken, InstanceKey, Token, TwnAuthLayer};
//! let layer = TwnAuthLayer::with_token_source(InstanceKey::new("3f8c1a2b")?, || async {
//!     Ok(Token::new(AccessToken::new("tw-0123456789abcdef")?))
//! });
//! # Ok::<(), tower::BoxError>(())
//! ```
//!
//! Sources are called by the layer's cache, in a task of their own, one fetch at a time
//! unless a fetch gets stuck (see [`TokenSource`]); see
//! [`TwnAuthLayer::with_token_source`](crate::TwnAuthLayer::with_token_source) for when.

mod env;
mod file;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::Instant;
use tower::BoxError;

use crate::credentials::AccessToken;

pub use self::env::EnvSource;
pub use self::file::FileSource;

/// How often the built-in sources re-read their variable or file unless told otherwise.
pub(crate) const DEFAULT_REREAD: Duration = Duration::from_secs(30);

/// Produces access tokens on demand.
///
/// Implement it with a plain `async fn fetch` (the future must be `Send`), or pass a closure
/// that returns such a future. The cache in front of the source decides when to call it:
/// never for a request that already has a usable token, not again before a backoff after a
/// failure, and one fetch at a time, with one exception.
///
/// A fetch that has not answered a second past its
/// [fetch timeout](crate::TwnAuthLayer::fetch_timeout) is taken to run on a runtime that no
/// longer makes progress, since its own timeout would have ended it otherwise. The next
/// request that needs a token, or one already waiting, then starts another fetch on its own
/// runtime, which takes over the waiting requests. The first fetch is not cancelled, so
/// should its runtime run again, the source may be called twice at once. If the first fetch
/// brings a token before the second does, the waiting requests get it, and the second's
/// token is stored too when it comes, being newer; a token from the first that comes after
/// the second's is ignored. A failure of the first fetch, or its runtime shutting down,
/// changes nothing while the second one runs.
pub trait TokenSource: Send + Sync + 'static {
    /// Fetches a token.
    ///
    /// # Errors
    ///
    /// Any error; it reaches the requests that were waiting for this fetch as
    /// [`Error::Fetch`](crate::Error::Fetch), and the cache backs off before asking again.
    fn fetch(&self) -> impl Future<Output = Result<Token, BoxError>> + Send;

    /// Returns a short name for the source, used in errors and `tracing` events.
    ///
    /// It must not contain a secret. Defaults to `"token source"`.
    fn name(&self) -> &str {
        "token source"
    }
}

impl<F, Fut> TokenSource for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Token, BoxError>> + Send,
{
    fn fetch(&self) -> impl Future<Output = Result<Token, BoxError>> + Send {
        self()
    }
}

/// An access token together with how long it may be used.
///
/// ```
/// use std::time::Duration;
/// use tower_twn_auth::{AccessToken, Token};
///
/// let token = Token::new(AccessToken::new("tw-0123456789abcdef")?);
/// assert_eq!(token.expires_in(), None);
///
/// let token = token.valid_for(Duration::from_secs(60));
/// assert!(token.expires_in() <= Some(Duration::from_secs(60)));
/// # Ok::<(), tower_twn_auth::InvalidCredential>(())
/// ```
#[derive(Clone, Debug)]
pub struct Token {
    pub(crate) value: AccessToken,
    pub(crate) expires_at: Option<Instant>,
    pub(crate) refresh_after: Option<Instant>,
}

impl Token {
    /// Returns a token that never expires.
    pub fn new(value: AccessToken) -> Self {
        Token {
            value,
            expires_at: None,
            refresh_after: None,
        }
    }

    /// Sets the token to expire `lifetime` from now.
    ///
    /// A lifetime too long to represent counts as never expiring.
    pub fn valid_for(mut self, lifetime: Duration) -> Self {
        self.expires_at = Instant::now().checked_add(lifetime);
        self
    }

    /// Asks the cache to fetch again in the background once `interval` has passed, without
    /// the token expiring.
    ///
    /// The built-in sources use it to re-read their variable or file: if the re-read fails,
    /// the token keeps being used.
    pub fn refresh_after(mut self, interval: Duration) -> Self {
        self.refresh_after = Instant::now().checked_add(interval);
        self
    }

    /// Returns how long until the token expires, or `None` if it never does.
    pub fn expires_in(&self) -> Option<Duration> {
        self.expires_at
            .map(|at| at.saturating_duration_since(Instant::now()))
    }
}

/// A boxed fetch, so that the cache can hold any source behind one type.
pub(crate) type FetchFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Token, BoxError>> + Send + 'a>>;

/// [`TokenSource`] made object-safe.
pub(crate) trait DynSource: Send + Sync + 'static {
    fn fetch_boxed(&self) -> FetchFuture<'_>;
    fn source_name(&self) -> &str;
}

impl<T: TokenSource> DynSource for T {
    fn fetch_boxed(&self) -> FetchFuture<'_> {
        Box::pin(self.fetch())
    }

    fn source_name(&self) -> &str {
        self.name()
    }
}
