//! Errors: a credential that fails validation, a credential that cannot be loaded, and a
//! request that cannot be authenticated.
//!
//! None of these types holds or prints a credential. They name the header, the variable or
//! the file involved and the reason, so that a message can be logged as it is.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Which credential a value was meant to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CredentialKind {
    /// The instance key, sent as `TWN-InstanceKey`.
    InstanceKey,
    /// The access token, sent as `TWN-Authentication`.
    AccessToken,
}

impl CredentialKind {
    /// Returns the name of the header that carries this credential, in its documented
    /// spelling (`TWN-InstanceKey` or `TWN-Authentication`).
    pub const fn header(self) -> &'static str {
        match self {
            CredentialKind::InstanceKey => "TWN-InstanceKey",
            CredentialKind::AccessToken => "TWN-Authentication",
        }
    }
}

/// Why a value is not a valid credential.
///
/// Positions count bytes from zero. They locate the problem without repeating any of the
/// value. For a value read from the environment or a file, they count from the first byte
/// after the surrounding whitespace, which is trimmed before the check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum InvalidReason {
    /// The value is empty (after trimming, for values read from the environment or a file).
    Empty,
    /// The value starts with a space or a tab.
    LeadingWhitespace,
    /// The value ends with a space or a tab, which starts at `position`.
    TrailingWhitespace {
        /// Offset of the first trailing whitespace byte.
        position: usize,
    },
    /// A space or a tab inside the value.
    InnerWhitespace {
        /// Offset of the whitespace byte.
        position: usize,
    },
    /// A control byte (`0x00`–`0x1f` other than tab, or `0x7f`), such as `\r` or `\n`.
    ControlByte {
        /// Offset of the control byte.
        position: usize,
    },
    /// A byte outside ASCII (`0x80`–`0xff`).
    NonAscii {
        /// Offset of the byte.
        position: usize,
    },
}

impl fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidReason::Empty => f.write_str("the value is empty"),
            InvalidReason::LeadingWhitespace => f.write_str("whitespace at the start"),
            InvalidReason::TrailingWhitespace { position } => {
                write!(f, "whitespace at the end, from byte {position}")
            }
            InvalidReason::InnerWhitespace { position } => {
                write!(f, "whitespace at byte {position}")
            }
            InvalidReason::ControlByte { position } => {
                write!(f, "control byte at byte {position}")
            }
            InvalidReason::NonAscii { position } => write!(f, "non-ASCII byte at byte {position}"),
        }
    }
}

/// A value that cannot be used as an instance key or access token.
///
/// Returned by [`InstanceKey::new`](crate::InstanceKey::new) and
/// [`AccessToken::new`](crate::AccessToken::new). The message names the header and the reason
/// and never contains the value.
///
/// ```
/// use tower_twn_auth::{AccessToken, InvalidReason};
///
/// let err = AccessToken::new("secret\r\nX-Injected: 1").unwrap_err();
/// assert_eq!(err.reason(), InvalidReason::ControlByte { position: 6 });
/// assert_eq!(err.to_string(), "invalid TWN-Authentication value: control byte at byte 6");
/// assert!(!format!("{err:?}").contains("secret"));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct InvalidCredential {
    kind: CredentialKind,
    reason: InvalidReason,
}

impl InvalidCredential {
    pub(crate) const fn new(kind: CredentialKind, reason: InvalidReason) -> Self {
        InvalidCredential { kind, reason }
    }

    /// Returns which credential the value was meant to be.
    pub fn kind(&self) -> CredentialKind {
        self.kind
    }

    /// Returns why the value was rejected.
    pub fn reason(&self) -> InvalidReason {
        self.reason
    }
}

impl fmt::Debug for InvalidCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InvalidCredential")
            .field("header", &self.kind.header())
            .field("reason", &self.reason)
            .finish()
    }
}

impl fmt::Display for InvalidCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {} value: {}", self.kind.header(), self.reason)
    }
}

impl StdError for InvalidCredential {}

/// Where a credential was read from: an environment variable or a file.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LoadedFrom {
    /// The environment variable of that name.
    Env(String),
    /// The file at that path.
    File(PathBuf),
}

impl fmt::Display for LoadedFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadedFrom::Env(name) => write!(f, "environment variable {name}"),
            LoadedFrom::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

/// A credential could not be loaded from the environment or a file.
///
/// Returned by [`TwnAuthLayer::from_env`](crate::TwnAuthLayer::from_env) and the loaders on
/// [`InstanceKey`](crate::InstanceKey) and [`AccessToken`](crate::AccessToken), and reported
/// by the built-in token sources. The message names the variable or file and never contains
/// what was read.
#[derive(Debug)]
#[non_exhaustive]
pub enum LoadError {
    /// The variable is not set.
    Missing {
        /// The variable that was looked up.
        variable: String,
    },
    /// The variable is set to something that is not Unicode.
    NotUnicode {
        /// The variable that was looked up.
        variable: String,
    },
    /// Neither way of giving the access token is set: the variable that holds it, or the one
    /// that names a file holding it.
    MissingToken {
        /// The variable that holds the token itself.
        value_variable: String,
        /// The variable that names a file holding the token.
        file_variable: String,
    },
    /// The variable that names a file is set, but to nothing but whitespace.
    EmptyPath {
        /// The variable that was looked up.
        variable: String,
    },
    /// Both ways of giving the access token are set, and only one may be.
    Conflict {
        /// The variable that holds the token itself.
        value_variable: String,
        /// The variable that names a file holding the token.
        file_variable: String,
    },
    /// The file could not be read.
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system reported.
        source: io::Error,
    },
    /// The value read is not a valid credential; an empty value is reported this way with
    /// [`InvalidReason::Empty`].
    Invalid {
        /// Where the value came from.
        origin: LoadedFrom,
        /// What is wrong with it.
        source: InvalidCredential,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Missing { variable } => {
                write!(f, "environment variable {variable} is not set")
            }
            LoadError::NotUnicode { variable } => {
                write!(f, "environment variable {variable} is not valid Unicode")
            }
            LoadError::MissingToken {
                value_variable,
                file_variable,
            } => write!(
                f,
                "neither {value_variable} nor {file_variable} is set; set one of them"
            ),
            LoadError::EmptyPath { variable } => write!(
                f,
                "environment variable {variable} is empty; set it to the path of a file"
            ),
            LoadError::Conflict {
                value_variable,
                file_variable,
            } => write!(
                f,
                "both {value_variable} and {file_variable} are set; set only one of them"
            ),
            LoadError::Io { path, .. } => write!(f, "cannot read file {}", path.display()),
            LoadError::Invalid { origin, source } => write!(f, "{origin}: {source}"),
        }
    }
}

impl StdError for LoadError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            LoadError::Io { source, .. } => Some(source),
            LoadError::Invalid { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The cause of a failed fetch, shared by every request that waited on that fetch.
pub(crate) type SharedCause = Arc<dyn StdError + Send + Sync>;

/// A request could not be authenticated, so the inner service was not called.
///
/// The service returns it boxed, as [`tower::BoxError`]; downcast to inspect it:
///
/// ```
/// # fn inspect(err: tower::BoxError) {
/// use tower_twn_auth::Error;
///
/// match err.downcast_ref::<Error>() {
///     Some(Error::InsecureDestination { host, .. }) => eprintln!("refused plain http to {host}"),
///     Some(other) => eprintln!("not authenticated: {other}"),
///     None => eprintln!("the inner service failed: {err}"),
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Error {
    /// The request would not go over https: it is plain `http` to a host that is not
    /// loopback, and the layer was not told to allow that with
    /// [`allow_plain_http`](crate::TwnAuthLayer::allow_plain_http); or its scheme is neither
    /// `https` nor `http` (`ws`, `ftp`, ...), or it names a host with no scheme at all (the
    /// authority-form of `CONNECT`), to any host, loopback included, whatever the options.
    ///
    /// With a [scope](crate::TwnAuthLayer::scope), every request to an origin outside it is
    /// sent without either header instead, those of the second kind included; only plain
    /// `http` to a scoped origin that is not loopback is refused.
    #[non_exhaustive]
    InsecureDestination {
        /// The host the request was for. A host longer than 64 bytes is cut to its first 61
        /// and `...`, so that a refused request's future holds it without an allocation.
        host: String,
    },
    /// The request URI has neither scheme nor authority (`/stats/totalproducts`, `*`), or
    /// its authority names no host, or its path starts with `//`, so the layer cannot tell
    /// where the credentials would go. See
    /// [`allow_relative_uris`](crate::TwnAuthLayer::allow_relative_uris).
    ///
    /// Not every URI without a host gets this error:
    ///
    /// * The check looks only at the first byte of the authority, so that it stays cheap on
    ///   every request. An empty host behind user info passes it: without a scope, an `https`
    ///   request to `https://user@:443/` is sent with both headers.
    /// * With [`allow_plain_http`](crate::TwnAuthLayer::allow_plain_http) and no scope, a
    ///   plain `http` request with an empty host (`http://:80/`) is sent with both headers.
    /// * With a [scope](crate::TwnAuthLayer::scope), an absolute URI with an empty host is
    ///   outside it: the request is sent without either header rather than refused.
    ///
    /// Such a URI names no server. A client that connects to the URI's host, as hyper-util's
    /// does, fails to resolve it and sends nothing; an inner service that sends over a
    /// connection it already holds sends the request there.
    #[non_exhaustive]
    UnknownDestination,
    /// The token source failed and no usable token was at hand.
    #[non_exhaustive]
    Fetch {
        /// The source's [`name`](crate::TokenSource::name).
        source_name: Arc<str>,
        /// What the source reported.
        cause: SharedCause,
        /// Set when the source is backing off after this failure: the next fetch starts once
        /// this much time has passed, and requests until then fail with this error.
        retry_in: Option<Duration>,
    },
    /// The task that was fetching the token ended without a result, because its Tokio
    /// runtime shut down, or still had none a second past its timeout (twice), because
    /// that runtime no longer makes progress. The next request starts a new fetch.
    ///
    /// A stuck fetch that another one replaced (see [`TokenSource`](crate::TokenSource))
    /// gives this error to no one when its runtime shuts down: the fetch that replaced it
    /// answers the waiting requests.
    #[non_exhaustive]
    FetchAbandoned {
        /// The source's [`name`](crate::TokenSource::name).
        source_name: Arc<str>,
    },
    /// A token had to be fetched, but the request was not made inside a Tokio runtime.
    #[non_exhaustive]
    NoRuntime,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InsecureDestination { host } => write!(
                f,
                "refusing to send Tweakwise credentials to {host} without https"
            ),
            Error::UnknownDestination => f.write_str(
                "refusing to send Tweakwise credentials to a request with no scheme or host",
            ),
            Error::Fetch {
                source_name,
                cause,
                retry_in,
            } => {
                write!(f, "{source_name} failed: {cause}")?;
                if let Some(delay) = retry_in {
                    write!(f, " (next attempt in {} ms)", delay.as_millis())?;
                }
                Ok(())
            }
            Error::FetchAbandoned { source_name } => write!(
                f,
                "{source_name}: the fetch was abandoned; its runtime shut down or stopped"
            ),
            Error::NoRuntime => {
                f.write_str("fetching a token needs a Tokio runtime, and none is running")
            }
        }
    }
}

/// Why a request was refused from its URI alone, kept in its response future until polled.
///
/// It is `Copy`, so that the future has nothing to drop for it: dropping a response future
/// then comes down to dropping the inner future, whatever the request's fate.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Refusal {
    /// [`Error::InsecureDestination`], for this host.
    Insecure(Host),
    /// [`Error::UnknownDestination`].
    Unknown,
    /// The error was returned already.
    Returned,
}

/// How many bytes of a refused host a [`Refusal`] keeps.
const HOST_KEPT: usize = 64;

/// A host, or its first bytes when it is longer than [`HOST_KEPT`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Host {
    len: u8,
    cut: bool,
    bytes: [u8; HOST_KEPT],
}

impl Host {
    pub(crate) fn new(host: &str) -> Self {
        let cut = host.len() > HOST_KEPT;
        let kept = if cut { HOST_KEPT - 3 } else { host.len() };
        let mut bytes = [0; HOST_KEPT];
        bytes[..kept].copy_from_slice(&host.as_bytes()[..kept]);
        Host {
            len: kept as u8, // at most `HOST_KEPT`, which fits
            cut,
            bytes,
        }
    }

    fn into_string(self) -> String {
        // `Uri` hosts are ASCII, so cutting at any byte leaves valid UTF-8; the lossy
        // conversion only keeps that from being a promise this code relies on.
        let kept = String::from_utf8_lossy(&self.bytes[..usize::from(self.len)]);
        if self.cut {
            format!("{kept}...")
        } else {
            kept.into_owned()
        }
    }
}

impl Refusal {
    /// Returns the error, or `None` for a refusal whose error was returned already.
    #[cold]
    #[inline(never)]
    pub(crate) fn into_error(self) -> Option<Error> {
        match self {
            Refusal::Insecure(host) => Some(Error::InsecureDestination {
                host: host.into_string(),
            }),
            Refusal::Unknown => Some(Error::UnknownDestination),
            Refusal::Returned => None,
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Error::Fetch { cause, .. } => Some(&**cause),
            _ => None,
        }
    }
}
