//! The two credentials, validated once and kept as ready-to-send header values.
//!
//! ```
//! use tower_twn_auth::{AccessToken, InstanceKey};
//!
//! let key = InstanceKey::new("3f8c1a2b")?;
//! let token: AccessToken = "tw-0123456789abcdef".parse()?;
//! assert_eq!(format!("{key:?} {token:?}"), "InstanceKey(<redacted>) AccessToken(<redacted>)");
//! # Ok::<(), tower_twn_auth::InvalidCredential>(())
//! ```
//!
//! # What is accepted
//!
//! A credential is one or more visible ASCII characters (`!` to `~`). Spaces, tabs, control
//! bytes such as `\r` and `\n`, and bytes outside ASCII are refused, so that no value can end
//! a header early or smuggle another one in. Values read from the environment or a file are
//! trimmed of surrounding spaces, tabs, `\r` and `\n` first, since editors and `echo` add a
//! final newline; whitespace inside stays an error.
//!
//! # Memory
//!
//! Values are interned: the bytes of each distinct value are kept for the life of the
//! process, so that attaching them to a request is a copy of a pointer that writes no memory
//! shared between threads, and the first 1,023 distinct values get a place in a table that a
//! token-source layer reads without a lock. Interning stops after 64 KiB of distinct values;
//! later values are reference-counted instead, which is as correct but costs an atomic
//! increment per request (and, for a cached token, the cache's lock). Interned bytes are never
//! overwritten or freed, so a rotated-away token stays in the process's memory (a
//! `HeaderValue` is not zeroized either way).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Mutex, OnceLock, PoisonError};

use bytes::Bytes;
use http::{HeaderName, HeaderValue};

use crate::error::{CredentialKind, InvalidCredential, InvalidReason, LoadError, LoadedFrom};

/// Name of the header that carries the instance key, `TWN-InstanceKey`.
///
/// Header names are case-insensitive and `http` stores them lowercase, so this is
/// `twn-instancekey`.
pub const TWN_INSTANCEKEY: HeaderName = HeaderName::from_static("twn-instancekey");

/// Name of the header that carries the access token, `TWN-Authentication`.
///
/// Header names are case-insensitive and `http` stores them lowercase, so this is
/// `twn-authentication`.
pub const TWN_AUTHENTICATION: HeaderName = HeaderName::from_static("twn-authentication");

/// A Tweakwise instance key, sent as `TWN-InstanceKey`.
///
/// The key is not a password, but it identifies the customer, so it is handled like the
/// token: `Debug` prints a marker and the header value is marked sensitive.
#[derive(Clone)]
pub struct InstanceKey(HeaderValue);

/// A Tweakwise access token, sent as `TWN-Authentication`.
///
/// `Debug` prints a marker, never the token; the header value is marked sensitive, so `http`
/// hides it too and HTTP/2 sends it never-indexed.
#[derive(Clone)]
pub struct AccessToken {
    value: HeaderValue,
    /// Its place in the table of interned values, `0` for none.
    slot: u16,
}

impl InstanceKey {
    /// Returns the instance key, if `value` is a valid one.
    ///
    /// # Errors
    ///
    /// Returns [`InvalidCredential`] if `value` is empty or holds anything but visible ASCII;
    /// see the [module docs](crate::credentials) for the rule.
    ///
    /// ```
    /// use tower_twn_auth::{InstanceKey, InvalidReason};
    ///
    /// assert!(InstanceKey::new("3f8c1a2b").is_ok());
    ///
    /// let err = InstanceKey::new("ik\r\nX-Injected: 1").unwrap_err();
    /// assert_eq!(err.reason(), InvalidReason::ControlByte { position: 2 });
    /// assert!(!err.to_string().contains("ik"));
    /// ```
    pub fn new(value: &str) -> Result<Self, InvalidCredential> {
        header_value(CredentialKind::InstanceKey, value.as_bytes()).map(InstanceKey::validated)
    }

    /// Reads the instance key from the environment variable `variable`, trimming surrounding
    /// whitespace.
    ///
    /// # Errors
    ///
    /// Returns [`LoadError`] if the variable is unset, not Unicode, empty after trimming, or
    /// not a valid instance key.
    ///
    /// ```
    /// use tower_twn_auth::{InstanceKey, LoadError};
    ///
    /// let err = InstanceKey::from_env("TWN_DOCTEST_UNSET_VARIABLE").unwrap_err();
    /// assert!(matches!(err, LoadError::Missing { .. }));
    /// ```
    pub fn from_env(variable: &str) -> Result<Self, LoadError> {
        let raw = read_env(variable)?;
        load(
            CredentialKind::InstanceKey,
            LoadedFrom::Env(variable.into()),
            &raw,
        )
        .map(InstanceKey::validated)
    }

    pub(crate) fn header_value(&self) -> &HeaderValue {
        &self.0
    }
}

impl AccessToken {
    /// Returns the access token, if `value` is a valid one.
    ///
    /// # Errors
    ///
    /// Returns [`InvalidCredential`] if `value` is empty or holds anything but visible ASCII;
    /// see the [module docs](crate::credentials) for the rule.
    ///
    /// ```
    /// use tower_twn_auth::{AccessToken, InvalidReason};
    ///
    /// assert!(AccessToken::new("tw-0123456789abcdef").is_ok());
    ///
    /// let err = AccessToken::new(" tw-0123").unwrap_err();
    /// assert_eq!(err.reason(), InvalidReason::LeadingWhitespace);
    /// ```
    pub fn new(value: &str) -> Result<Self, InvalidCredential> {
        header_value(CredentialKind::AccessToken, value.as_bytes()).map(AccessToken::validated)
    }

    /// Reads the access token from the environment variable `variable`, trimming surrounding
    /// whitespace.
    ///
    /// # Errors
    ///
    /// Returns [`LoadError`] if the variable is unset, not Unicode, empty after trimming, or
    /// not a valid token.
    ///
    /// ```
    /// use tower_twn_auth::{AccessToken, LoadError};
    ///
    /// let err = AccessToken::from_env("TWN_DOCTEST_UNSET_VARIABLE").unwrap_err();
    /// assert_eq!(err.to_string(), "environment variable TWN_DOCTEST_UNSET_VARIABLE is not set");
    /// ```
    pub fn from_env(variable: &str) -> Result<Self, LoadError> {
        let raw = read_env(variable)?;
        Self::from_loaded(LoadedFrom::Env(variable.into()), &raw)
    }

    /// Reads the access token from the file at `path`, trimming surrounding whitespace.
    ///
    /// This blocks while it reads; in async code, [`FileSource`](crate::FileSource) reads
    /// without blocking.
    ///
    /// # Errors
    ///
    /// Returns [`LoadError`] if the file cannot be read, is empty after trimming, or does not
    /// hold a valid token.
    ///
    /// ```
    /// use tower_twn_auth::{AccessToken, LoadError};
    ///
    /// let path = std::env::temp_dir().join("twn-doctest-token");
    /// std::fs::write(&path, "tw-0123456789abcdef\n")?;
    /// assert!(AccessToken::from_file(&path).is_ok());
    ///
    /// std::fs::write(&path, "\n")?;
    /// let err = AccessToken::from_file(&path).unwrap_err();
    /// assert!(matches!(err, LoadError::Invalid { .. }));
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref();
        let raw = std::fs::read(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_loaded(LoadedFrom::File(path.to_path_buf()), &raw)
    }

    /// Trims and validates bytes read from `origin`.
    pub(crate) fn from_loaded(origin: LoadedFrom, raw: &[u8]) -> Result<Self, LoadError> {
        load(CredentialKind::AccessToken, origin, raw).map(AccessToken::validated)
    }

    pub(crate) fn header_value(&self) -> &HeaderValue {
        &self.value
    }

    /// Returns the token's place in the table of interned values, `0` for none.
    pub(crate) fn slot(&self) -> u16 {
        self.slot
    }
}

impl AccessToken {
    fn validated((value, slot): (HeaderValue, u16)) -> Self {
        AccessToken { value, slot }
    }
}

impl InstanceKey {
    fn validated((value, _slot): (HeaderValue, u16)) -> Self {
        InstanceKey(value)
    }
}

impl fmt::Debug for InstanceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InstanceKey(<redacted>)")
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

macro_rules! conversions {
    ($ty:ident) => {
        impl FromStr for $ty {
            type Err = InvalidCredential;

            fn from_str(value: &str) -> Result<Self, Self::Err> {
                $ty::new(value)
            }
        }

        impl TryFrom<&str> for $ty {
            type Error = InvalidCredential;

            fn try_from(value: &str) -> Result<Self, Self::Error> {
                $ty::new(value)
            }
        }

        impl TryFrom<String> for $ty {
            type Error = InvalidCredential;

            fn try_from(value: String) -> Result<Self, Self::Error> {
                $ty::new(&value)
            }
        }
    };
}

conversions!(InstanceKey);
conversions!(AccessToken);

/// The token of a layer built with [`TwnAuthLayer::new`](crate::TwnAuthLayer::new): the same
/// value for every request.
#[derive(Clone)]
pub struct StaticToken(pub(crate) AccessToken);

impl fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StaticToken").field(&self.0).finish()
    }
}

/// Credentials for one request, overriding the layer's.
///
/// Put them in the request's extensions to talk to another Tweakwise instance through the
/// same client. They go through the same destination checks and scope as the layer's own
/// credentials, and the layer's token source is not consulted for that request: it neither
/// waits for a fetch nor fails when the source does.
///
/// They travel in the request's extensions. A redirect layer that drops extensions
/// (tower-http's standard policy does on cross-origin hops) leaves a later hop to an origin
/// the layer accepts with the layer's own credentials; `redirect::KeepCredentialsOnOrigin`
/// (feature `tower-http`) carries them to every hop on their origin and strips all
/// credentials elsewhere.
///
/// ```
/// use tower_twn_auth::{AccessToken, InstanceKey, TwnCredentials};
///
/// let shop_b = TwnCredentials::new(InstanceKey::new("b-key")?, AccessToken::new("b-token")?);
/// let request = http::Request::get("https://navigator-api.tweakwise.com/stats/totalproducts")
///     .extension(shop_b)
///     .body(())
///     .unwrap();
/// assert!(request.extensions().get::<TwnCredentials>().is_some());
/// # Ok::<(), tower_twn_auth::InvalidCredential>(())
/// ```
#[derive(Clone)]
pub struct TwnCredentials {
    pub(crate) instance_key: InstanceKey,
    pub(crate) access_token: AccessToken,
}

impl TwnCredentials {
    /// Returns credentials made of an instance key and an access token.
    pub fn new(instance_key: InstanceKey, access_token: AccessToken) -> Self {
        TwnCredentials {
            instance_key,
            access_token,
        }
    }
}

impl fmt::Debug for TwnCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TwnCredentials(<redacted>)")
    }
}

/// Checks `bytes` against the credential rule, reporting the first offending byte.
fn check(kind: CredentialKind, bytes: &[u8]) -> Result<(), InvalidCredential> {
    let invalid = |reason| Err(InvalidCredential::new(kind, reason));
    if bytes.is_empty() {
        return invalid(InvalidReason::Empty);
    }
    let Some(position) = bytes.iter().position(|b| !matches!(b, 0x21..=0x7e)) else {
        return Ok(());
    };
    let reason = match bytes[position] {
        b' ' | b'\t' if position == 0 => InvalidReason::LeadingWhitespace,
        b' ' | b'\t' if bytes[position..].iter().all(|b| matches!(b, b' ' | b'\t')) => {
            InvalidReason::TrailingWhitespace { position }
        }
        b' ' | b'\t' => InvalidReason::InnerWhitespace { position },
        0x80..=0xff => InvalidReason::NonAscii { position },
        _ => InvalidReason::ControlByte { position },
    };
    invalid(reason)
}

/// Validates `bytes` and returns them as a sensitive header value, with its slot.
fn header_value(
    kind: CredentialKind,
    bytes: &[u8],
) -> Result<(HeaderValue, u16), InvalidCredential> {
    check(kind, bytes)?;

    // `check` admits only visible ASCII, which `HeaderValue` accepts too; the error arm is
    // unreachable but costs nothing to keep honest.
    intern(bytes).ok_or(InvalidCredential::new(kind, InvalidReason::Empty))
}

/// Trims what was read from `origin`, then validates it.
fn load(
    kind: CredentialKind,
    origin: LoadedFrom,
    raw: &[u8],
) -> Result<(HeaderValue, u16), LoadError> {
    header_value(kind, trim(raw)).map_err(|source| LoadError::Invalid { origin, source })
}

/// Strips spaces, tabs, `\r` and `\n` from both ends.
pub(crate) fn trim(raw: &[u8]) -> &[u8] {
    let is_space = |b: &u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let start = raw.iter().position(|b| !is_space(b)).unwrap_or(raw.len());
    let end = raw
        .iter()
        .rposition(|b| !is_space(b))
        .map_or(start, |i| i + 1);
    &raw[start..end]
}

/// Reads an environment variable as bytes that must be Unicode.
fn read_env(variable: &str) -> Result<Vec<u8>, LoadError> {
    match std::env::var(variable) {
        Ok(value) => Ok(value.into_bytes()),
        Err(std::env::VarError::NotPresent) => Err(LoadError::Missing {
            variable: variable.into(),
        }),
        Err(std::env::VarError::NotUnicode(_)) => Err(LoadError::NotUnicode {
            variable: variable.into(),
        }),
    }
}

/// Upper bound on the bytes interned for the life of the process.
const INTERN_BUDGET: usize = 64 * 1024;

/// Number of places in the table of interned values; place `0` means none.
const SLOTS: usize = 1024;

/// Interned values by place, each set once and never changed: a reader needs no lock.
static TABLE: [OnceLock<HeaderValue>; SLOTS] = [const { OnceLock::new() }; SLOTS];

struct Interned {
    /// Each interned value, with its place in [`TABLE`] (`0` once the table is full).
    values: HashMap<&'static [u8], u16>,
    bytes: usize,
}

/// Returns `bytes` as a sensitive header value whose clones write no shared memory, and its
/// place in the table, while the budget lasts.
fn intern(bytes: &[u8]) -> Option<(HeaderValue, u16)> {
    static INTERNED: OnceLock<Mutex<Interned>> = OnceLock::new();
    let interned = INTERNED.get_or_init(|| {
        Mutex::new(Interned {
            values: HashMap::new(),
            bytes: 0,
        })
    });
    let sensitive = |bytes: Bytes| {
        let mut value = HeaderValue::from_maybe_shared(bytes).ok()?;
        value.set_sensitive(true);
        Some(value)
    };

    // Interning only adds entries, so a panic elsewhere cannot leave the map inconsistent.
    let mut interned = interned.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((existing, slot)) = interned.values.get_key_value(bytes) {
        return Some((sensitive(Bytes::from_static(existing))?, *slot));
    }
    if interned.bytes + bytes.len() > INTERN_BUDGET {
        return Some((sensitive(Bytes::copy_from_slice(bytes))?, 0));
    }

    let leaked: &'static [u8] = Box::leak(bytes.to_vec().into_boxed_slice());
    let value = sensitive(Bytes::from_static(leaked))?;
    let slot = u16::try_from(interned.values.len() + 1)
        .ok()
        .filter(|slot| usize::from(*slot) < SLOTS)
        .unwrap_or(0);
    if slot != 0 {
        // Set before the value is handed out, so a published slot is always filled.
        let _ = TABLE[usize::from(slot)].set(value.clone());
    }
    interned.bytes += leaked.len();
    interned.values.insert(leaked, slot);
    Some((value, slot))
}

/// Returns the interned value at `slot`, without taking a lock.
#[inline]
pub(crate) fn interned(slot: u16) -> Option<&'static HeaderValue> {
    TABLE.get(usize::from(slot)).and_then(OnceLock::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trim_strips_only_surrounding_whitespace() {
        assert_eq!(trim(b" \t a b\r\n"), b"a b");
        assert_eq!(trim(b"\r\n"), b"");
        assert_eq!(trim(b""), b"");
        assert_eq!(trim(b"x"), b"x");
    }

    #[test]
    fn check_classifies_first_offending_byte() {
        let reason = |s: &[u8]| check(CredentialKind::AccessToken, s).unwrap_err().reason();
        assert_eq!(reason(b""), InvalidReason::Empty);
        assert_eq!(reason(b" a"), InvalidReason::LeadingWhitespace);
        assert_eq!(
            reason(b"ab \t"),
            InvalidReason::TrailingWhitespace { position: 2 }
        );
        assert_eq!(
            reason(b"a b"),
            InvalidReason::InnerWhitespace { position: 1 }
        );
        assert_eq!(reason(b"a\nb"), InvalidReason::ControlByte { position: 1 });
        assert_eq!(reason(b"a\x7f"), InvalidReason::ControlByte { position: 1 });
        assert_eq!(
            reason("aé".as_bytes()),
            InvalidReason::NonAscii { position: 1 }
        );
    }

    #[test]
    fn interned_values_are_shared_and_sensitive() {
        let a = InstanceKey::new("intern-test-value").unwrap();
        let b = InstanceKey::new("intern-test-value").unwrap();
        assert_eq!(a.0.as_bytes().as_ptr(), b.0.as_bytes().as_ptr());
        assert!(a.0.is_sensitive());

        let token = AccessToken::new("intern-test-value").unwrap();
        assert_ne!(token.slot(), 0);
        assert_eq!(interned(token.slot()), Some(&a.0));
        assert!(interned(token.slot()).is_some_and(HeaderValue::is_sensitive));
        assert_eq!(interned(0), None);
    }
}
