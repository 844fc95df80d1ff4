//! The layer: [`TwnAuthLayer`], and how to build one.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tower::retry::RetryLayer;

use crate::cache::{Cache, CacheOptions, CachedToken};
use crate::credentials::{AccessToken, InstanceKey, StaticToken};
use crate::destination::{Destinations, Origin, Scope};
use crate::error::LoadError;
use crate::retry::RetryRejected;
use crate::service::Shared;
use crate::source::{EnvSource, FileSource, Token, TokenSource};

/// Variable holding the instance key, read by [`TwnAuthLayer::from_env`].
pub const ENV_INSTANCE_KEY: &str = "TWN_INSTANCE_KEY";
/// Variable holding the access token, read by [`TwnAuthLayer::from_env`].
pub const ENV_ACCESS_TOKEN: &str = "TWN_ACCESS_TOKEN";
/// Variable naming a file that holds the access token, read by [`TwnAuthLayer::from_env`].
pub const ENV_ACCESS_TOKEN_FILE: &str = "TWN_ACCESS_TOKEN_FILE";

/// Authenticates every request to the Tweakwise Backend API.
///
/// Wraps any `Service<http::Request<B>>` in a [`TwnAuth`](crate::TwnAuth) that sets
/// `TWN-InstanceKey` and `TWN-Authentication` on each request. Applying the layer never fails.
///
/// `P` says where the token comes from. With a fixed token ([`TwnAuthLayer::new`]) it is the
/// default and need not be written; with a [`TokenSource`] ([`with_token_source`],
/// [`from_env`]) it is [`CachedToken`].
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_twn_auth::{AccessToken, InstanceKey, TwnAuthLayer};
///
/// let layer: TwnAuthLayer = TwnAuthLayer::new(
///     InstanceKey::new("3f8c1a2b")?,
///     AccessToken::new("tw-0123456789abcdef")?,
/// );
/// let service = ServiceBuilder::new()
///     .layer(layer)
///     .service_fn(|request: http::Request<()>| async move {
///         Ok::<_, std::convert::Infallible>(http::Response::new(()))
///     });
/// # Ok::<(), tower::BoxError>(())
/// ```
///
/// [`with_token_source`]: TwnAuthLayer::with_token_source
/// [`from_env`]: TwnAuthLayer::from_env
pub struct TwnAuthLayer<P = StaticToken> {
    shared: Arc<Shared>,
    token: P,
}

impl TwnAuthLayer {
    /// Returns a layer that sends `instance_key` and `access_token` with every request.
    ///
    /// Both values were validated when they were made, so this cannot fail.
    ///
    /// ```
    /// use tower_twn_auth::{AccessToken, InstanceKey, TwnAuthLayer};
    ///
    /// let layer = TwnAuthLayer::new(InstanceKey::new("3f8c1a2b")?, AccessToken::new("tw-1")?);
    /// assert!(!format!("{layer:?}").contains("tw-1"));
    ///
    /// // Invalid values are refused before a layer exists.
    /// assert!(AccessToken::new("tw-1\n").is_err());
    /// # Ok::<(), tower_twn_auth::InvalidCredential>(())
    /// ```
    pub fn new(instance_key: InstanceKey, access_token: AccessToken) -> Self {
        TwnAuthLayer::from_parts(shared(instance_key), StaticToken(access_token))
    }
}

impl TwnAuthLayer<CachedToken> {
    /// Returns a layer whose access tokens come from `source`, through a cache.
    ///
    /// # The cache
    ///
    /// * **Single flight.** However many requests find no usable token at once, the source is
    ///   called once, and all of them are sent with the token it returns. The one exception,
    ///   a fetch stuck on a runtime that no longer makes progress, is described on
    ///   [`TokenSource`].
    /// * **Refresh ahead.** A token within the [refresh-ahead window](Self::refresh_ahead) of
    ///   its expiry is still sent, and the first request to see it starts a fetch in the
    ///   background; no request waits for it. A cached token within the
    ///   [expiry margin](Self::expiry_margin) counts as expired: requests wait for a fresh one.
    ///   So that a token shorter-lived than these windows does not cause fetch after fetch, at
    ///   least the first half of its usable lifetime never triggers a refresh.
    /// * **Tokens fetched inside the margin.** A token that arrives already inside its expiry
    ///   margin, but not yet expired, is given to the requests that waited for that fetch and
    ///   is not cached. Each later request that finds no usable token waits for a fetch of its
    ///   own (requests that arrive while one runs share it): a source that only returns such
    ///   tokens is called once per request, and never while no request comes. A token that
    ///   arrives already expired is a failed fetch.
    /// * **Cancellation.** The fetch runs in a task of its own. Dropping the request that
    ///   started it, or any that wait for it, neither cancels it nor keeps the others waiting;
    ///   its token is stored, unless the fetch got stuck, another replaced it, and that one
    ///   stored a newer token first (see [`TokenSource`]).
    /// * **Failure.** A failed fetch never replaces a token that is still usable; that token
    ///   keeps being sent, and the source is asked again after a [backoff](Self::backoff).
    ///   Without a usable token, the requests waiting for the fetch get
    ///   [`Error::Fetch`](crate::Error::Fetch), and so does every request until the backoff has
    ///   passed; the first request after it starts a new fetch.
    /// * **Configuring.** Each builder call below gives the layer a new, empty cache. Make every
    ///   call before cloning the layer, making services from it or taking its
    ///   [`retry_layer`](Self::retry_layer): those made earlier keep the old cache, and fetch
    ///   and rotate on their own.
    ///
    /// A request waits for a token in its response future, after `poll_ready`: it holds
    /// whatever the inner service reserved for it (a concurrency permit, a buffer slot) while
    /// it waits. Requests that need no token from the layer (those refused, outside the
    /// scope, or carrying their own [`TwnCredentials`](crate::TwnCredentials)) never wait.
    /// The fetch and the timers that track expiry run on the Tokio runtime of the request
    /// that needs them; it must have timers enabled (`#[tokio::main]` and `Runtime::new` do).
    /// Requests rely on those timers for the refresh-ahead window, and read the clock only
    /// for a token that expires, so that no cached token is sent inside its expiry margin,
    /// even when the timers run late. Should that runtime stay alive but stop being driven (a
    /// current-thread runtime outside `block_on`, say) while another one sends the requests,
    /// refreshes ahead of expiry stop, and so may a fetch started there, until a second past
    /// the [fetch timeout](Self::fetch_timeout), when a request that needs a token starts
    /// another on its own runtime; a runtime that shuts down is noticed, and the next request
    /// starts over on its own runtime (a lost refresh ahead of expiry, after the
    /// [backoff](Self::backoff), so that a runtime made for each request, which drops every
    /// refresh it starts, does not have the source called for each request). A request sent
    /// outside any runtime can wait for a fetch under way, but has no timer to give up on one
    /// that is stuck: it waits until that fetch's runtime runs again.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_twn_auth::{AccessToken, InstanceKey, Token, TwnAuthLayer};
    ///
    /// let layer = TwnAuthLayer::with_token_source(InstanceKey::new("3f8c1a2b")?, || async {
    ///     let token = AccessToken::new("tw-0123456789abcdef")?;
    ///     Ok(Token::new(token).valid_for(Duration::from_secs(900)))
    /// })
    /// .refresh_ahead(Duration::from_secs(120))
    /// .expiry_margin(Duration::from_secs(15));
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn with_token_source(instance_key: InstanceKey, source: impl TokenSource) -> Self {
        let cache = Cache::new(Arc::new(source), CacheOptions::default(), None);
        TwnAuthLayer::from_parts(shared(instance_key), CachedToken::new(Arc::new(cache)))
    }

    /// Returns a layer configured from the environment.
    ///
    /// Reads the instance key from `TWN_INSTANCE_KEY`, and the access token from either
    /// `TWN_ACCESS_TOKEN` or the file named by `TWN_ACCESS_TOKEN_FILE`. Both are read now
    /// (the file with a brief blocking read), so that a mistake shows at start-up, and the
    /// token is read again every 30 seconds (by an [`EnvSource`] or a [`FileSource`]) so
    /// that a rotated secret is picked up without a restart. Surrounding whitespace is
    /// trimmed, from the values and from the path alike.
    ///
    /// `TWN_ACCESS_TOKEN_FILE` is a path, and paths appear in error messages and `tracing`
    /// events; a token put there by mistake would be printed with them.
    ///
    /// # Errors
    ///
    /// Returns [`LoadError`] if a variable is missing, empty or not Unicode, if neither or
    /// both token variables are set, if the file cannot be read, or if a value is not a
    /// valid credential. The error names the variable or file, never the value.
    ///
    /// ```
    /// use tower_twn_auth::{LoadError, TwnAuthLayer};
    ///
    /// # std::env::remove_var("TWN_INSTANCE_KEY");
    /// match TwnAuthLayer::from_env() {
    ///     Ok(layer) => { /* use it */ }
    ///     Err(LoadError::Missing { variable }) => assert_eq!(variable, "TWN_INSTANCE_KEY"),
    ///     Err(other) => panic!("{other}"),
    /// }
    /// ```
    pub fn from_env() -> Result<Self, LoadError> {
        let instance_key = InstanceKey::from_env(ENV_INSTANCE_KEY)?;
        let value = std::env::var_os(ENV_ACCESS_TOKEN);
        let file = std::env::var_os(ENV_ACCESS_TOKEN_FILE);
        let (source, token): (Arc<dyn crate::source::DynSource>, Token) = match (value, file) {
            (Some(_), Some(_)) => {
                return Err(LoadError::Conflict {
                    value_variable: ENV_ACCESS_TOKEN.into(),
                    file_variable: ENV_ACCESS_TOKEN_FILE.into(),
                })
            }
            (None, None) => {
                return Err(LoadError::MissingToken {
                    value_variable: ENV_ACCESS_TOKEN.into(),
                    file_variable: ENV_ACCESS_TOKEN_FILE.into(),
                })
            }
            (Some(_), None) => {
                let source = EnvSource::new(ENV_ACCESS_TOKEN);
                let token = source.read()?;
                (Arc::new(source), token)
            }
            (None, Some(path)) => {
                let path = path.into_string().map_err(|_| LoadError::NotUnicode {
                    variable: ENV_ACCESS_TOKEN_FILE.into(),
                })?;
                let path = path.trim_matches([' ', '\t', '\r', '\n']);
                if path.is_empty() {
                    return Err(LoadError::EmptyPath {
                        variable: ENV_ACCESS_TOKEN_FILE.into(),
                    });
                }
                let source = FileSource::new(path);
                let token = source.read_blocking()?;
                (Arc::new(source), token)
            }
        };
        let cache = Cache::new(source, CacheOptions::default(), Some(token));
        Ok(TwnAuthLayer::from_parts(
            shared(instance_key),
            CachedToken::new(Arc::new(cache)),
        ))
    }

    /// Sets how long before a token's expiry a background refresh starts. Defaults to 60 s.
    ///
    /// A token that expires at 12:15:00, with the default window, is refreshed by the first
    /// request from 12:14:00 on, while requests keep using it.
    pub fn refresh_ahead(self, window: Duration) -> Self {
        self.with_options(|options| options.refresh_ahead = window)
    }

    /// Sets how long before its expiry a cached token stops being sent. Defaults to 10 s.
    ///
    /// A token could expire while a request is in flight, or earlier than this machine's clock
    /// says; within the margin a cached token counts as expired and requests wait for a new
    /// one. A token that expires at 12:15:00 is last taken from the cache at 12:14:49.999 with
    /// the default margin.
    ///
    /// A fetch that brings a token already inside the margin (the source returned it at
    /// 12:14:55, say) still hands it to the requests that waited for that fetch, since it has
    /// not expired; it is not cached, so the next request waits for another fetch.
    pub fn expiry_margin(self, margin: Duration) -> Self {
        self.with_options(|options| options.expiry_margin = margin)
    }

    /// Sets the backoff after a failed fetch: `min` after the first failure, doubling with
    /// each further one up to `max`, plus up to half as much again of random jitter (never
    /// beyond `max`). Defaults to 1 s and 30 s.
    ///
    /// The third failure in a row with the defaults waits 4 to 6 s.
    ///
    /// A wait too long to add to the current time as an `Instant` (a `max` near
    /// `Duration::MAX`, say) is cut to one year (365 days).
    pub fn backoff(self, min: Duration, max: Duration) -> Self {
        self.with_options(|options| {
            options.backoff_min = min;
            options.backoff_max = max;
        })
    }

    /// Sets how long a fetch may take before it counts as failed. Defaults to 30 s.
    ///
    /// A source that never answers (a hung network mount, a secret store that accepts the
    /// connection and says nothing) would otherwise keep every request that needs a token
    /// waiting; past the timeout they get [`Error::Fetch`](crate::Error::Fetch) and the
    /// source is backed off like any failing one. A timeout longer than a year counts as one
    /// year.
    pub fn fetch_timeout(self, timeout: Duration) -> Self {
        self.with_options(|options| options.fetch_timeout = timeout)
    }

    /// Turns on rotation detection: a `401 Unauthorized` response drops the token the
    /// request carried, so that the next request uses a freshly fetched one.
    ///
    /// Only that token is dropped: when several requests are rejected with the same token,
    /// one fetch replaces it, and a rejection of a token that was already replaced changes
    /// nothing. A replacement that is itself rejected before any request succeeded with it is
    /// kept until its hold time has passed, so a server that refuses every token does not make
    /// the cache fetch for each request.
    ///
    /// The hold time is drawn like the [`backoff`](Self::backoff) after a failed fetch, with
    /// the same settings, and counts from the rejection that dropped the token before it: 1 to
    /// 1.5 s with the defaults (the minimum, plus up to half as much again of jitter). Each
    /// further replacement rejected in a row doubles it, up to the maximum; a token that gets
    /// an answer other than a rejection starts it over.
    ///
    /// That protection has a cost: two rotations closer together than the requests in flight
    /// take to come back look exactly like a server that refuses fresh tokens. The token
    /// fetched after the first rotation is then rejected before any request succeeded with
    /// it, and is kept for its hold time; requests sent meanwhile get the server's `401`.
    /// Tokens rotated in the Tweakwise app are minutes apart, far from this.
    ///
    /// To send a rejected request once more with the new token, add
    /// [`retry_layer`](Self::retry_layer) outside this layer.
    ///
    /// Behind tower-http's `FollowRedirect` (feature `tower-http`), the answer of another
    /// origin says nothing about the token and is not counted. With this layer **outside**
    /// `FollowRedirect` and `redirect::KeepCredentialsOnOrigin`, one case is counted wrongly:
    /// a redirect chain that leaves the origin and comes back to it ends on a hop sent without
    /// credentials, and a `401` there drops the token anyway (one needless fetch, bounded by
    /// the hold time above). With this layer **inside** `FollowRedirect`, every hop passes
    /// through it and only hops that carried the token are counted.
    ///
    /// Each response future then keeps a reference to the cache until the answer arrives:
    /// one reference count raised and lowered per request, shared by every thread that uses
    /// the layer. Without rotation detection, requests that find a token write no memory
    /// shared between threads.
    pub fn detect_rotation(self) -> Self {
        self.detect_rotation_on([StatusCode::UNAUTHORIZED])
    }

    /// Turns on rotation detection for the given statuses instead of `401` alone.
    pub fn detect_rotation_on(self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        let statuses: Arc<[StatusCode]> = statuses.into_iter().collect();
        self.with_options(|options| options.reject_statuses = Some(statuses))
    }

    /// Returns the retry layer that sends a rejected request once more, with a fresh token.
    ///
    /// It is [`tower::retry::RetryLayer`] with the [`RetryRejected`] policy, retrying on the
    /// statuses [`detect_rotation`](Self::detect_rotation) watches; without rotation
    /// detection it retries nothing.
    ///
    /// Take it from the finished layer, after every builder call: each one
    /// (`detect_rotation`, `refresh_ahead` and the others) gives the layer a cache of its own,
    /// and a retry layer taken before it works with the cache the layer no longer uses. One
    /// taken before `detect_rotation`, say, retries nothing. It must sit **outside** the
    /// authentication layer, so that the retried request passes through it again, and
    /// directly outside it: the policy notes which token a request will carry as it passes,
    /// and a layer between the two that holds requests back (a rate limit, an async filter)
    /// lets that token be replaced in the meantime, so that a rejected request may be sent
    /// again with the same token:
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower::ServiceBuilder;
    /// use tower_twn_auth::{FileSource, InstanceKey, TwnAuthLayer};
    ///
    /// # type Client = tower::util::BoxCloneService<
    /// #     http::Request<String>, http::Response<()>, tower::BoxError>;
    /// # fn client() -> Client { unimplemented!() }
    /// let auth = TwnAuthLayer::with_token_source(
    ///     InstanceKey::new("3f8c1a2b")?,
    ///     FileSource::new("/run/secrets/twn-token"),
    /// )
    /// .detect_rotation();
    ///
    /// # let _ = || {
    /// let service = ServiceBuilder::new()
    ///     .layer(auth.retry_layer()) // replays a rejected request once
    ///     .layer(auth)               // attaches the token, drops a rejected one
    ///     .service(client());
    /// # };
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn retry_layer(&self) -> RetryLayer<RetryRejected> {
        let policy = RetryRejected::new(Arc::clone(self.token.cache()), Arc::clone(&self.shared));
        RetryLayer::new(policy)
    }

    fn with_options(mut self, change: impl FnOnce(&mut CacheOptions)) -> Self {
        // The cache is rebuilt rather than changed in place, since clones of this layer (and
        // services made from it) may share the old one; it holds no fetched token yet.
        let old = self.token.cache();
        let mut options = old.options().clone();
        change(&mut options);
        let cache = Cache::new(old.source(), options, old.initial());
        self.token = CachedToken::new(Arc::new(cache));
        self
    }
}

impl<P> TwnAuthLayer<P> {
    pub(crate) fn from_parts(shared: Arc<Shared>, token: P) -> Self {
        TwnAuthLayer { shared, token }
    }

    pub(crate) fn parts(&self) -> (&Arc<Shared>, &P) {
        (&self.shared, &self.token)
    }

    /// Allows credentials on plain `http` requests to any host.
    ///
    /// By default a plain `http` request to a host other than `localhost`, `127.0.0.0/8` or
    /// `[::1]` fails with [`Error::InsecureDestination`](crate::Error::InsecureDestination)
    /// and the inner service is not called. Allow it only for a hop you control, such as a
    /// proxy on a private network that forwards over https.
    pub fn allow_plain_http(mut self) -> Self {
        Arc::make_mut(&mut self.shared)
            .destinations
            .allow_plain_http = true;
        self
    }

    /// Allows credentials on requests whose URI has neither scheme nor authority, such as
    /// `/stats/totalproducts`.
    ///
    /// Such requests go to wherever the connection beneath was opened, which the layer cannot
    /// see; by default they fail with
    /// [`Error::UnknownDestination`](crate::Error::UnknownDestination), whose docs list the
    /// URIs without a host that the check lets through. Allow them when the
    /// inner service sends over a connection you opened to the Tweakwise API yourself (for
    /// example a `Service` around hyper's `client::conn` sender, over TLS). The
    /// [scope](Self::scope) does not apply to them.
    ///
    /// A URI that names a host without a scheme (`api.example.test:443`, the authority-form
    /// of `CONNECT`) is not one of them: a client connects to that host, and not over https,
    /// so it is refused with
    /// [`Error::InsecureDestination`](crate::Error::InsecureDestination), or sent without
    /// either header under a scope, with this option or without. Nor is a path that starts
    /// with `//`, which names a host once resolved against a base URL: it is refused with
    /// [`Error::UnknownDestination`](crate::Error::UnknownDestination).
    pub fn allow_relative_uris(mut self) -> Self {
        Arc::make_mut(&mut self.shared).destinations.allow_relative = true;
        self
    }

    /// Restricts the credentials to `origin`; call it again to allow more origins.
    ///
    /// A request to any other origin is sent without either TWN header: the layer removes
    /// any that the request already carried, so that nothing downstream re-sends them to a
    /// host they were not meant for. Scoping is also what keeps credentials on their origin
    /// when a redirect-following layer sits outside this one; see the crate docs.
    ///
    /// An origin is a scheme, a host and a port, compared without case and with default
    /// ports filled in; user info in a URI plays no part. So once a layer is scoped, a plain
    /// `http` request, even to a scoped host, is a request to another origin: it is sent
    /// without the headers rather than refused, and the layer stays out of the way of the
    /// client's other traffic.
    ///
    /// ```
    /// use tower_twn_auth::{AccessToken, InstanceKey, Origin, TwnAuthLayer};
    ///
    /// let layer = TwnAuthLayer::new(InstanceKey::new("3f8c1a2b")?, AccessToken::new("tw-1")?)
    ///     .scope(Origin::new("https://navigator-api.tweakwise.com")?);
    /// # Ok::<(), tower::BoxError>(())
    /// ```
    pub fn scope(mut self, origin: Origin) -> Self {
        let destinations = &mut Arc::make_mut(&mut self.shared).destinations;
        let mut origins: Vec<Origin> = destinations
            .scope
            .as_ref()
            .map(|scope| scope.origins().to_vec())
            .unwrap_or_default();
        if !origins.contains(&origin) {
            origins.push(origin);
        }
        destinations.scope = Some(Scope::new(origins));
        self
    }
}

fn shared(instance_key: InstanceKey) -> Arc<Shared> {
    Arc::new(Shared {
        instance_key,
        destinations: Destinations::default(),
    })
}

impl<P: Clone> Clone for TwnAuthLayer<P> {
    fn clone(&self) -> Self {
        TwnAuthLayer {
            shared: Arc::clone(&self.shared),
            token: self.token.clone(),
        }
    }
}

impl<P: fmt::Debug> fmt::Debug for TwnAuthLayer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TwnAuthLayer")
            .field("instance_key", &self.shared.instance_key)
            .field("token", &self.token)
            .field("destinations", &self.shared.destinations)
            .finish()
    }
}
