//! Which values are credentials, how they are read from files and the environment, and what
//! the errors say (and never say).
//!
//! The environment is process-global: every test here that touches it holds [`ENV`] through an
//! [`EnvGuard`], which also puts back what it changed.

// Tests and benchmarks need Rust 1.88, as their dev-dependencies do; the `rust-version`
// that Clippy checks API use against is what the library alone needs.
#![allow(clippy::incompatible_msrv)]

use std::convert::Infallible;
use std::ffi::{OsStr, OsString};
use std::future::Future;
use std::path::Path;
use std::pin::pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use http::{Request, Response};
use proptest::prelude::*;
use tower::{Layer, Service, ServiceExt};
use tower_twn_auth::{
    AccessToken, CredentialKind, InstanceKey, InvalidCredential, InvalidReason, LoadError,
    LoadedFrom, TokenProvider, TwnAuthLayer, TWN_AUTHENTICATION, TWN_INSTANCEKEY,
};

const URI: &str = "https://navigator-api.tweakwise.com/stats/totalproducts";
const KEY: &str = "3f8c1a2b";
const TOKEN: &str = "tw-0123456789abcdef";

// ---------------------------------------------------------------------------------------
// The rule, written out independently of the crate
// ---------------------------------------------------------------------------------------

/// Whether the rule accepts `bytes`: non-empty, and every byte visible ASCII.
fn rule_accepts(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// The reason the rule gives for rejecting `bytes`, located at the first offending byte.
fn expected_reason(bytes: &[u8]) -> Option<InvalidReason> {
    if bytes.is_empty() {
        return Some(InvalidReason::Empty);
    }
    let position = bytes.iter().position(|b| !(0x21..=0x7e).contains(b))?;
    let blank = |b: &u8| matches!(b, b' ' | b'\t');
    Some(match bytes[position] {
        b' ' | b'\t' if position == 0 => InvalidReason::LeadingWhitespace,
        b' ' | b'\t' if bytes[position..].iter().all(blank) => {
            InvalidReason::TrailingWhitespace { position }
        }
        b' ' | b'\t' => InvalidReason::InnerWhitespace { position },
        0x80..=0xff => InvalidReason::NonAscii { position },
        _ => InvalidReason::ControlByte { position },
    })
}

/// Strips spaces, tabs, `\r` and `\n` from both ends, as the file and env readers must.
fn trimmed(bytes: &[u8]) -> &[u8] {
    let space = |b: &u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let start = bytes.iter().position(|b| !space(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !space(b))
        .map_or(start, |end| end + 1);
    &bytes[start..end]
}

/// Returns a value, unrelated to any input, that the rule rejects for `reason`.
///
/// An error for any input must print exactly what the error for this value prints: then its
/// output depends on the reason alone, and cannot carry any part of the input.
fn sample_for(reason: InvalidReason) -> String {
    let filler = |position: usize| "x".repeat(position);
    match reason {
        InvalidReason::Empty => String::new(),
        InvalidReason::LeadingWhitespace => " x".into(),
        InvalidReason::TrailingWhitespace { position } => filler(position) + " ",
        InvalidReason::InnerWhitespace { position } => filler(position) + " x",
        InvalidReason::ControlByte { position } => filler(position) + "\u{1}",
        InvalidReason::NonAscii { position } => filler(position) + "\u{e9}",
        other => panic!("a reason this test does not know: {other:?}"),
    }
}

#[test]
fn samples_have_the_reason_they_stand_for() {
    let reasons = [
        InvalidReason::Empty,
        InvalidReason::LeadingWhitespace,
        InvalidReason::TrailingWhitespace { position: 3 },
        InvalidReason::InnerWhitespace { position: 2 },
        InvalidReason::ControlByte { position: 0 },
        InvalidReason::ControlByte { position: 5 },
        InvalidReason::NonAscii { position: 1 },
    ];
    for reason in reasons {
        let sample = sample_for(reason);
        assert_eq!(
            expected_reason(sample.as_bytes()),
            Some(reason),
            "{sample:?}"
        );
        assert_eq!(AccessToken::new(&sample).unwrap_err().reason(), reason);
    }
}

// ---------------------------------------------------------------------------------------
// Reading what the layer sends
// ---------------------------------------------------------------------------------------

/// Returns the instance key and token a static layer puts on a request.
///
/// The layer and the inner service are ready at once, so this polls without a runtime.
fn sent_by(key: InstanceKey, token: AccessToken) -> (Vec<u8>, Vec<u8>) {
    let inner = tower::service_fn(|request: Request<()>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(request)))
    });
    let mut service = TwnAuthLayer::new(key, token).layer(inner);
    let mut cx = Context::from_waker(Waker::noop());

    assert!(matches!(service.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    let mut future = pin!(service.call(Request::get(URI).body(()).unwrap()));
    let Poll::Ready(Ok(response)) = future.as_mut().poll(&mut cx) else {
        panic!("a static layer over a ready service answers at once");
    };

    let headers = response.body().headers();
    assert_eq!(headers.get_all(TWN_INSTANCEKEY).iter().count(), 1);
    assert_eq!(headers.get_all(TWN_AUTHENTICATION).iter().count(), 1);
    (
        headers[TWN_INSTANCEKEY].as_bytes().to_vec(),
        headers[TWN_AUTHENTICATION].as_bytes().to_vec(),
    )
}

fn sent_token(token: AccessToken) -> Vec<u8> {
    sent_by(InstanceKey::new(KEY).unwrap(), token).1
}

fn sent_key(key: InstanceKey) -> Vec<u8> {
    sent_by(key, AccessToken::new(TOKEN).unwrap()).0
}

/// Returns the instance key and token any layer puts on a request.
async fn sent_by_layer<P: TokenProvider>(layer: TwnAuthLayer<P>) -> (String, String) {
    let inner = tower::service_fn(|request: Request<()>| async move {
        Ok::<_, Infallible>(Response::new(request))
    });
    let request = Request::get(URI).body(()).unwrap();
    let seen = layer
        .layer(inner)
        .oneshot(request)
        .await
        .unwrap()
        .into_body();
    let value = |name: http::HeaderName| {
        let values: Vec<_> = seen.headers().get_all(&name).iter().collect();
        assert_eq!(values.len(), 1, "{name}");
        values[0].to_str().unwrap().to_owned()
    };
    (value(TWN_INSTANCEKEY), value(TWN_AUTHENTICATION))
}

// ---------------------------------------------------------------------------------------
// The environment
// ---------------------------------------------------------------------------------------

static ENV: Mutex<()> = Mutex::new(());

/// Holds [`ENV`] and puts back every variable it changed when dropped.
struct EnvGuard {
    saved: Vec<(String, Option<OsString>)>,
    _lock: MutexGuard<'static, ()>,
}

impl EnvGuard {
    fn lock() -> Self {
        // A test that failed while holding the lock still restored the variables on unwind.
        let lock = ENV.lock().unwrap_or_else(PoisonError::into_inner);
        EnvGuard {
            saved: Vec::new(),
            _lock: lock,
        }
    }

    fn save(&mut self, name: &str) {
        if !self.saved.iter().any(|(saved, _)| saved == name) {
            self.saved.push((name.to_owned(), std::env::var_os(name)));
        }
    }

    fn set(&mut self, name: &str, value: impl AsRef<OsStr>) {
        self.save(name);
        std::env::set_var(name, value);
    }

    fn remove(&mut self, name: &str) {
        self.save(name);
        std::env::remove_var(name);
    }

    /// Removes all three variables that `TwnAuthLayer::from_env` reads.
    fn clear_twn(&mut self) {
        for name in [
            "TWN_INSTANCE_KEY",
            "TWN_ACCESS_TOKEN",
            "TWN_ACCESS_TOKEN_FILE",
        ] {
            self.remove(name);
        }
    }
}

impl Drop for EnvGuard {
    fn drop(&mut self) {
        for (name, value) in self.saved.drain(..).rev() {
            match value {
                Some(value) => std::env::set_var(&name, value),
                None => std::env::remove_var(&name),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The rule, through the constructors
// ---------------------------------------------------------------------------------------

#[test]
fn visible_ascii_values_are_accepted_and_sent_unchanged() {
    let every_visible: String = (0x21u8..=0x7e).map(char::from).collect();
    let long = "t".repeat(8192);
    for value in ["a", "!", "~", "3f8c1a2b", &every_visible, &long] {
        assert_eq!(sent_key(InstanceKey::new(value).unwrap()), value.as_bytes());
        assert_eq!(
            sent_token(AccessToken::new(value).unwrap()),
            value.as_bytes()
        );
    }
}

#[test]
fn rejected_values_give_the_reason_at_the_first_offending_byte() {
    let cases = [
        ("", InvalidReason::Empty),
        (" ab", InvalidReason::LeadingWhitespace),
        ("\tab", InvalidReason::LeadingWhitespace),
        (" ", InvalidReason::LeadingWhitespace),
        ("ab ", InvalidReason::TrailingWhitespace { position: 2 }),
        ("ab \t ", InvalidReason::TrailingWhitespace { position: 2 }),
        ("a b", InvalidReason::InnerWhitespace { position: 1 }),
        ("a\tb c", InvalidReason::InnerWhitespace { position: 1 }),
        ("a \n", InvalidReason::InnerWhitespace { position: 1 }),
        ("\n", InvalidReason::ControlByte { position: 0 }),
        ("a\nb", InvalidReason::ControlByte { position: 1 }),
        ("ab\r\n", InvalidReason::ControlByte { position: 2 }),
        (
            "ik\r\nX-Injected: 1",
            InvalidReason::ControlByte { position: 2 },
        ),
        ("a\0", InvalidReason::ControlByte { position: 1 }),
        ("abc\u{7f}", InvalidReason::ControlByte { position: 3 }),
        ("\u{e9}", InvalidReason::NonAscii { position: 0 }),
        ("ab\u{e9} ", InvalidReason::NonAscii { position: 2 }),
        ("tok\u{2028}en", InvalidReason::NonAscii { position: 3 }),
    ];
    for (value, reason) in cases {
        let key = InstanceKey::new(value).unwrap_err();
        let token = AccessToken::new(value).unwrap_err();

        assert_eq!(
            (key.kind(), key.reason()),
            (CredentialKind::InstanceKey, reason)
        );
        assert_eq!(
            (token.kind(), token.reason()),
            (CredentialKind::AccessToken, reason)
        );
        assert_eq!(expected_reason(value.as_bytes()), Some(reason), "{value:?}");
    }
}

#[test]
fn error_display_names_header_reason_and_position() {
    let cases = [
        (
            InstanceKey::new("ik\r\nX-Injected: 1").unwrap_err(),
            "invalid TWN-InstanceKey value: control byte at byte 2",
        ),
        (
            AccessToken::new("a\nb").unwrap_err(),
            "invalid TWN-Authentication value: control byte at byte 1",
        ),
        (
            AccessToken::new("").unwrap_err(),
            "invalid TWN-Authentication value: the value is empty",
        ),
        (
            InstanceKey::new(" k").unwrap_err(),
            "invalid TWN-InstanceKey value: whitespace at the start",
        ),
        (
            AccessToken::new("tok  ").unwrap_err(),
            "invalid TWN-Authentication value: whitespace at the end, from byte 3",
        ),
        (
            AccessToken::new("to k").unwrap_err(),
            "invalid TWN-Authentication value: whitespace at byte 2",
        ),
        (
            InstanceKey::new("k\u{e9}").unwrap_err(),
            "invalid TWN-InstanceKey value: non-ASCII byte at byte 1",
        ),
    ];
    for (error, message) in cases {
        assert_eq!(error.to_string(), message);
    }
}

#[test]
fn error_debug_names_header_reason_and_position() {
    let key = InstanceKey::new("ik\r\nX-Injected: 1").unwrap_err();
    let token = AccessToken::new("a\nb").unwrap_err();

    for (error, header) in [(key, "TWN-InstanceKey"), (token, "TWN-Authentication")] {
        let debug = format!("{error:?}");
        assert!(debug.contains("ControlByte"), "{debug}");
        assert!(debug.contains("position: "), "{debug}");
        assert!(
            debug.contains(header),
            "Debug does not name the header: {debug}"
        );
    }
}

#[test]
fn load_error_debug_names_header_and_reason() {
    let mut env = EnvGuard::lock();
    let name = "TWN_TEST_CREDENTIALS_DEBUG";
    env.set(name, "a\nb");

    let key = InstanceKey::from_env(name).unwrap_err();
    let token = AccessToken::from_env(name).unwrap_err();

    for (error, header) in [(key, "TWN-InstanceKey"), (token, "TWN-Authentication")] {
        let debug = format!("{error:?}");
        assert!(debug.contains(name), "{debug}");
        assert!(debug.contains("ControlByte"), "{debug}");
        assert!(
            debug.contains(header),
            "Debug does not name the header: {debug}"
        );
    }
}

#[test]
fn error_output_never_contains_the_value() {
    let values = [
        "SeCrEt-v4lue\r\nX-Injected: 1",
        "SeCrEt v4lue",
        "SeCrEt-v4lue\u{e9}",
    ];
    for value in values {
        let key = InstanceKey::new(value).unwrap_err();
        let token = AccessToken::new(value).unwrap_err();
        for error in [key, token] {
            let output = format!("{error} {error:?} {error:#?}");
            assert!(!output.contains("SeCrEt"), "{output}");
            assert!(!output.contains("v4lue"), "{output}");
        }
    }
}

#[test]
fn invalid_credential_converts_to_box_error_and_back() {
    fn build(value: &str) -> Result<AccessToken, tower::BoxError> {
        Ok(AccessToken::new(value)?)
    }

    let error = build("a\nb").unwrap_err();
    let error = error.downcast::<InvalidCredential>().unwrap();

    assert_eq!(error.reason(), InvalidReason::ControlByte { position: 1 });
}

#[test]
fn from_str_and_try_from_agree_with_new() {
    for value in ["tok", "a b", "", "ik\r\n"] {
        let new = AccessToken::new(value).map(sent_token);
        let parsed = value.parse::<AccessToken>().map(sent_token);
        let from_str = AccessToken::try_from(value).map(sent_token);
        let from_string = AccessToken::try_from(value.to_owned()).map(sent_token);
        assert_eq!(parsed, new);
        assert_eq!(from_str, new);
        assert_eq!(from_string, new);

        let new = InstanceKey::new(value).map(sent_key);
        assert_eq!(value.parse::<InstanceKey>().map(sent_key), new);
        assert_eq!(InstanceKey::try_from(value).map(sent_key), new);
        assert_eq!(InstanceKey::try_from(value.to_owned()).map(sent_key), new);
    }
}

// ---------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------

fn token_file(dir: &Path, content: &[u8]) -> std::path::PathBuf {
    let path = dir.join("token");
    std::fs::write(&path, content).unwrap();
    path
}

#[test]
fn token_file_with_surrounding_whitespace_gives_exactly_the_trimmed_value() {
    let dir = tempfile::tempdir().unwrap();
    for content in [
        "tok\n",
        "tok\r\n",
        "tok \t\n",
        " \ttok\n",
        "\r\n\r\ntok\n\n",
        "tok",
    ] {
        let path = token_file(dir.path(), content.as_bytes());

        let token = AccessToken::from_file(&path).unwrap();

        assert_eq!(sent_token(token), b"tok", "{content:?}");
    }
}

#[test]
fn empty_or_blank_token_file_is_an_empty_value_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for content in ["", "\n", "\r\n", " \t \n"] {
        let path = token_file(dir.path(), content.as_bytes());

        let error = AccessToken::from_file(&path).unwrap_err();

        let LoadError::Invalid { origin, source } = &error else {
            panic!("{content:?}: {error:?}");
        };
        assert_eq!(*origin, LoadedFrom::File(path.clone()));
        assert_eq!(source.reason(), InvalidReason::Empty);
        assert_eq!(
            error.to_string(),
            format!(
                "file {}: invalid TWN-Authentication value: the value is empty",
                path.display()
            )
        );
    }
}

#[test]
fn whitespace_inside_a_token_file_stays_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = token_file(dir.path(), b"  to ken\n");

    let error = AccessToken::from_file(&path).unwrap_err();

    let LoadError::Invalid { source, .. } = &error else {
        panic!("{error:?}");
    };
    assert_eq!(
        source.reason(),
        InvalidReason::InnerWhitespace { position: 2 }
    );
}

#[test]
fn missing_token_file_is_an_io_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent");

    let error = AccessToken::from_file(&path).unwrap_err();

    let LoadError::Io {
        path: reported,
        source,
    } = &error
    else {
        panic!("{error:?}");
    };
    assert_eq!(*reported, path);
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
    assert_eq!(
        error.to_string(),
        format!("cannot read file {}", path.display())
    );
    assert!(std::error::Error::source(&error).is_some());
}

// ---------------------------------------------------------------------------------------
// Environment variables
// ---------------------------------------------------------------------------------------

#[test]
fn env_values_with_surrounding_whitespace_give_exactly_the_trimmed_value() {
    let mut env = EnvGuard::lock();
    let name = "TWN_TEST_CREDENTIALS_TRIMMED";
    for value in ["val\n", "val\r\n", "val \t\n", "\t val", "val"] {
        env.set(name, value);

        let key = InstanceKey::from_env(name).unwrap();
        let token = AccessToken::from_env(name).unwrap();

        assert_eq!(
            sent_by(key, token),
            (b"val".to_vec(), b"val".to_vec()),
            "{value:?}"
        );
    }
}

#[test]
fn empty_or_blank_env_value_is_an_empty_value_error_naming_the_variable() {
    let mut env = EnvGuard::lock();
    let name = "TWN_TEST_CREDENTIALS_BLANK";
    for value in ["", "\n", " \r\n"] {
        env.set(name, value);

        let key = InstanceKey::from_env(name).unwrap_err();
        let token = AccessToken::from_env(name).unwrap_err();

        for (error, header) in [(key, "TWN-InstanceKey"), (token, "TWN-Authentication")] {
            let LoadError::Invalid { origin, source } = &error else {
                panic!("{value:?}: {error:?}");
            };
            assert_eq!(*origin, LoadedFrom::Env(name.into()));
            assert_eq!(source.reason(), InvalidReason::Empty);
            assert_eq!(
                error.to_string(),
                format!("environment variable {name}: invalid {header} value: the value is empty")
            );
        }
    }
}

#[test]
fn unset_env_variable_is_a_missing_error_naming_the_variable() {
    let mut env = EnvGuard::lock();
    let name = "TWN_TEST_CREDENTIALS_UNSET";
    env.remove(name);

    let error = AccessToken::from_env(name).unwrap_err();

    assert!(matches!(&error, LoadError::Missing { variable } if variable == name));
    assert_eq!(
        error.to_string(),
        format!("environment variable {name} is not set")
    );
    assert!(matches!(
        InstanceKey::from_env(name),
        Err(LoadError::Missing { variable }) if variable == name
    ));
}

#[cfg(unix)]
#[test]
fn non_unicode_env_value_is_an_error_naming_the_variable() {
    use std::os::unix::ffi::OsStringExt;

    let mut env = EnvGuard::lock();
    let name = "TWN_TEST_CREDENTIALS_NOT_UNICODE";
    env.set(name, OsString::from_vec(b"tok\xff".to_vec()));

    let error = AccessToken::from_env(name).unwrap_err();

    assert!(matches!(&error, LoadError::NotUnicode { variable } if variable == name));
    assert_eq!(
        error.to_string(),
        format!("environment variable {name} is not valid Unicode")
    );
}

// ---------------------------------------------------------------------------------------
// TwnAuthLayer::from_env
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn from_env_with_key_and_token_variables_sends_the_trimmed_values() {
    let layer = {
        let mut env = EnvGuard::lock();
        env.clear_twn();
        env.set("TWN_INSTANCE_KEY", "env-key\n");
        env.set("TWN_ACCESS_TOKEN", " env-token\r\n");
        TwnAuthLayer::from_env().unwrap()
    };

    let sent = sent_by_layer(layer).await;

    assert_eq!(sent, ("env-key".into(), "env-token".into()));
}

#[tokio::test]
async fn from_env_with_token_file_variable_sends_the_trimmed_file_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = token_file(dir.path(), b"file-token \t\n");
    let path = path.to_str().unwrap();
    // The path is trimmed like the values.
    for variable in [path.to_owned(), format!(" \t{path}\r\n")] {
        let layer = {
            let mut env = EnvGuard::lock();
            env.clear_twn();
            env.set("TWN_INSTANCE_KEY", "env-key");
            env.set("TWN_ACCESS_TOKEN_FILE", &variable);
            TwnAuthLayer::from_env().unwrap()
        };

        let sent = sent_by_layer(layer).await;

        assert_eq!(
            sent,
            ("env-key".into(), "file-token".into()),
            "{variable:?}"
        );
    }
}

#[test]
fn from_env_with_both_token_variables_is_a_conflict_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = token_file(dir.path(), b"file-token");
    let mut env = EnvGuard::lock();
    env.clear_twn();
    env.set("TWN_INSTANCE_KEY", "env-key");
    env.set("TWN_ACCESS_TOKEN", "env-token");
    env.set("TWN_ACCESS_TOKEN_FILE", &path);

    let error = TwnAuthLayer::from_env().unwrap_err();

    assert!(
        matches!(
            &error,
            LoadError::Conflict { value_variable, file_variable }
                if value_variable == "TWN_ACCESS_TOKEN" && file_variable == "TWN_ACCESS_TOKEN_FILE"
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("TWN_ACCESS_TOKEN "), "{message}");
    assert!(message.contains("TWN_ACCESS_TOKEN_FILE"), "{message}");
    assert!(
        !message.contains("env-token") && !message.contains("file-token"),
        "{message}"
    );
}

#[test]
fn from_env_with_nothing_set_is_a_missing_error_naming_the_instance_key_variable() {
    let mut env = EnvGuard::lock();
    env.clear_twn();

    let error = TwnAuthLayer::from_env().unwrap_err();

    assert!(
        matches!(&error, LoadError::Missing { variable } if variable == "TWN_INSTANCE_KEY"),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "environment variable TWN_INSTANCE_KEY is not set"
    );
}

#[test]
fn from_env_with_key_but_no_token_is_a_missing_error_naming_both_token_variables() {
    let mut env = EnvGuard::lock();
    env.clear_twn();
    env.set("TWN_INSTANCE_KEY", "env-key");

    let error = TwnAuthLayer::from_env().unwrap_err();

    assert!(
        matches!(
            &error,
            LoadError::MissingToken { value_variable, file_variable }
                if value_variable == "TWN_ACCESS_TOKEN" && file_variable == "TWN_ACCESS_TOKEN_FILE"
        ),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "neither TWN_ACCESS_TOKEN nor TWN_ACCESS_TOKEN_FILE is set; set one of them"
    );
}

#[test]
fn from_env_with_empty_values_is_an_error_naming_the_variable() {
    let mut env = EnvGuard::lock();

    env.clear_twn();
    env.set("TWN_INSTANCE_KEY", "\n");
    env.set("TWN_ACCESS_TOKEN", "tok");
    let error = TwnAuthLayer::from_env().unwrap_err();
    assert!(error.to_string().contains("TWN_INSTANCE_KEY"), "{error}");
    assert!(matches!(
        &error,
        LoadError::Invalid { origin: LoadedFrom::Env(variable), source }
            if variable == "TWN_INSTANCE_KEY" && source.reason() == InvalidReason::Empty
    ));

    env.set("TWN_INSTANCE_KEY", "key");
    env.set("TWN_ACCESS_TOKEN", "");
    let error = TwnAuthLayer::from_env().unwrap_err();
    assert!(error.to_string().contains("TWN_ACCESS_TOKEN"), "{error}");
    assert!(matches!(
        &error,
        LoadError::Invalid { origin: LoadedFrom::Env(variable), source }
            if variable == "TWN_ACCESS_TOKEN" && source.reason() == InvalidReason::Empty
    ));

    env.remove("TWN_ACCESS_TOKEN");
    for path in ["", " \t\n"] {
        env.set("TWN_ACCESS_TOKEN_FILE", path);
        let error = TwnAuthLayer::from_env().unwrap_err();
        assert!(
            matches!(&error, LoadError::EmptyPath { variable } if variable == "TWN_ACCESS_TOKEN_FILE"),
            "{path:?}: {error:?}"
        );
        assert_eq!(
            error.to_string(),
            "environment variable TWN_ACCESS_TOKEN_FILE is empty; set it to the path of a file"
        );
    }
}

#[test]
fn from_env_with_missing_or_empty_token_file_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = EnvGuard::lock();
    env.clear_twn();
    env.set("TWN_INSTANCE_KEY", "env-key");

    let absent = dir.path().join("absent");
    env.set("TWN_ACCESS_TOKEN_FILE", &absent);
    let error = TwnAuthLayer::from_env().unwrap_err();
    assert!(
        matches!(&error, LoadError::Io { path, .. } if *path == absent),
        "{error:?}"
    );

    let empty = token_file(dir.path(), b"\n");
    env.set("TWN_ACCESS_TOKEN_FILE", &empty);
    let error = TwnAuthLayer::from_env().unwrap_err();
    assert!(
        matches!(
            &error,
            LoadError::Invalid { origin: LoadedFrom::File(path), source }
                if *path == empty && source.reason() == InvalidReason::Empty
        ),
        "{error:?}"
    );
}

#[test]
fn from_env_with_injected_instance_key_is_an_error_without_the_value() {
    let mut env = EnvGuard::lock();
    env.clear_twn();
    env.set("TWN_INSTANCE_KEY", "SeCrEt\r\nX-Injected: 1");
    env.set("TWN_ACCESS_TOKEN", "tok");

    let error = TwnAuthLayer::from_env().unwrap_err();

    let LoadError::Invalid { source, .. } = &error else {
        panic!("{error:?}");
    };
    assert_eq!(source.reason(), InvalidReason::ControlByte { position: 6 });
    let output = format!("{error} {error:?}");
    assert!(
        !output.contains("SeCrEt") && !output.contains("Injected"),
        "{output}"
    );
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

/// A prefix that no message text contains, so that finding it in an output is a leak.
const MARK: &[u8] = b"~Zq9";

fn blanks() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(b" \t\r\n".to_vec()), 0..4)
}

fn visible() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(0x21u8..=0x7e, 1..40)
}

/// Mostly visible ASCII, with whitespace, control bytes and high bytes mixed in.
fn mixed() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        8 => 0x21u8..=0x7e,
        1 => prop::sample::select(b" \t\r\n".to_vec()),
        1 => any::<u8>(),
    ];
    prop::collection::vec(byte, 0..40)
}

/// Byte strings of every kind: valid, padded, mixed, fully arbitrary, and marked.
fn inputs() -> impl Strategy<Value = Vec<u8>> {
    let padded = (blanks(), visible(), blanks()).prop_map(|(a, b, c)| [a, b, c].concat());
    let marked =
        (blanks(), mixed(), blanks()).prop_map(|(a, b, c)| [a, MARK.to_vec(), b, c].concat());
    prop_oneof![visible(), padded, mixed(), any::<Vec<u8>>(), marked]
}

/// Fails if `output` contains `input`, where finding it there means something: the input is
/// at least 4 bytes long and not part of `fixed`, the text every error of this kind prints.
fn check_no_leak(input: &[u8], output: &str, fixed: &str) -> Result<(), TestCaseError> {
    let found = |haystack: &[u8]| haystack.windows(input.len()).any(|window| window == input);
    if input.len() >= 4 && !found(fixed.as_bytes()) {
        prop_assert!(!found(output.as_bytes()), "{output:?} contains the input");
    }
    if input.starts_with(MARK) {
        prop_assert!(!output.contains("~Zq9"), "{output:?} contains the mark");
    }
    Ok(())
}

#[test]
fn leak_check_detects_the_input_in_an_output() {
    let found = |input: &[u8], output: &str| check_no_leak(input, output, "fixed text").is_err();

    assert!(found(b"abcd", "error: abcd"));
    assert!(found(b"~Zq9", "error: ~Zq9 and more"));
    assert!(
        found(b"~Zq9 secret", "error: ~Zq9"),
        "the mark alone is a leak"
    );
    assert!(!found(b"abcd", "error"));
    assert!(
        !found(b"text", "fixed text"),
        "an input the fixed text contains proves nothing"
    );
    assert!(
        !found(b"abc", "abc"),
        "an input under 4 bytes proves nothing"
    );
}

/// Renders an error the way a log line or a panic would: Display, Debug, alternate Debug and
/// the source chain.
fn render(error: &(dyn std::error::Error + 'static)) -> String {
    let mut output = format!("{error} | {error:?} | {error:#?}");
    let mut source = error.source();
    while let Some(cause) = source {
        output.push_str(&format!(" | {cause} | {cause:?}"));
        source = cause.source();
    }
    output
}

fn check_constructor_error(
    input: &str,
    error: InvalidCredential,
    kind: CredentialKind,
    sample: &Result<impl Sized, InvalidCredential>,
) -> Result<(), TestCaseError> {
    let Err(reference) = sample else {
        return Err(TestCaseError::fail("the sample was accepted"));
    };
    prop_assert_eq!(error.kind(), kind);
    prop_assert_eq!(Some(error.reason()), expected_reason(input.as_bytes()));
    prop_assert_eq!(render(&error), render(reference));
    check_no_leak(input.as_bytes(), &render(&error), &render(reference))
}

proptest! {
    #[test]
    fn constructors_accept_exactly_the_rule_and_never_print_the_input(bytes in inputs()) {
        let input = String::from_utf8_lossy(&bytes);
        let expected = expected_reason(input.as_bytes());
        prop_assert_eq!(expected.is_none(), rule_accepts(input.as_bytes()));

        match (InstanceKey::new(&input), expected) {
            (Ok(key), None) => prop_assert_eq!(sent_key(key), input.as_bytes()),
            (Err(error), Some(reason)) => {
                let sample = InstanceKey::new(&sample_for(reason));
                check_constructor_error(&input, error, CredentialKind::InstanceKey, &sample)?;
            }
            (result, _) => prop_assert!(false, "rule says {:?}, got {:?}", expected, result),
        }
        match (AccessToken::new(&input), expected) {
            (Ok(token), None) => prop_assert_eq!(sent_token(token), input.as_bytes()),
            (Err(error), Some(reason)) => {
                let sample = AccessToken::new(&sample_for(reason));
                check_constructor_error(&input, error, CredentialKind::AccessToken, &sample)?;
            }
            (result, _) => prop_assert!(false, "rule says {:?}, got {:?}", expected, result),
        }
    }

    #[test]
    fn arbitrary_strings_through_constructors_match_the_rule(input in any::<String>()) {
        prop_assert_eq!(InstanceKey::new(&input).is_ok(), rule_accepts(input.as_bytes()));
        prop_assert_eq!(AccessToken::new(&input).is_ok(), rule_accepts(input.as_bytes()));
    }

    #[test]
    fn file_reader_accepts_exactly_the_trimmed_rule_and_never_prints_the_input(
        bytes in inputs(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = token_file(dir.path(), &bytes);
        let value = trimmed(&bytes);

        match (AccessToken::from_file(&path), expected_reason(value)) {
            (Ok(token), None) => prop_assert_eq!(sent_token(token), value),
            (Err(error), Some(reason)) => {
                let LoadError::Invalid { origin, source } = &error else {
                    return Err(TestCaseError::fail(format!("{error:?}")));
                };
                prop_assert_eq!(origin, &LoadedFrom::File(path.clone()));
                prop_assert_eq!(source.reason(), reason);

                std::fs::write(&path, sample_for(reason)).unwrap();
                let reference = AccessToken::from_file(&path).unwrap_err();
                prop_assert_eq!(render(&error), render(&reference));
                check_no_leak(&bytes, &render(&error), &render(&reference))?;
            }
            (result, expected) => {
                prop_assert!(false, "rule says {:?}, got {:?}", expected, result)
            }
        }
    }
}

/// Drops NUL bytes, which no environment variable can hold.
#[cfg(unix)]
fn without_nul(bytes: Vec<u8>) -> Vec<u8> {
    bytes.into_iter().filter(|b| *b != 0).collect()
}

#[cfg(unix)]
proptest! {
    #[test]
    fn env_reader_accepts_exactly_the_trimmed_rule_and_never_prints_the_input(
        bytes in inputs().prop_map(without_nul),
    ) {
        use std::os::unix::ffi::OsStringExt;

        let name = "TWN_TEST_CREDENTIALS_PROPERTY";
        let mut env = EnvGuard::lock();
        env.set(name, OsString::from_vec(bytes.clone()));
        let value = trimmed(&bytes);
        let expected = expected_reason(value);

        let key = InstanceKey::from_env(name);
        let token = AccessToken::from_env(name);

        match (key, token, expected) {
            (Ok(key), Ok(token), None) => {
                prop_assert_eq!(sent_by(key, token), (value.to_vec(), value.to_vec()));
            }
            (Err(key), Err(token), Some(reason)) => {
                let sample: OsString = match std::str::from_utf8(&bytes) {
                    Ok(_) => sample_for(reason).into(),
                    Err(_) => OsString::from_vec(b"\xff".to_vec()),
                };
                env.set(name, sample);
                let reference_key = InstanceKey::from_env(name).unwrap_err();
                let reference_token = AccessToken::from_env(name).unwrap_err();

                for (error, reference) in [(key, reference_key), (token, reference_token)] {
                    match &error {
                        LoadError::Invalid { origin, source } => {
                            prop_assert_eq!(origin, &LoadedFrom::Env(name.into()));
                            prop_assert_eq!(source.reason(), reason);
                        }
                        LoadError::NotUnicode { variable } => {
                            prop_assert!(std::str::from_utf8(&bytes).is_err());
                            prop_assert_eq!(variable, name);
                        }
                        other => prop_assert!(false, "unexpected {:?}", other),
                    }
                    prop_assert_eq!(render(&error), render(&reference));
                    check_no_leak(&bytes, &render(&error), &render(&reference))?;
                }
            }
            (key, token, expected) => prop_assert!(
                false,
                "rule says {:?}, got {:?} and {:?}",
                expected,
                key.map(|_| ()),
                token.map(|_| ())
            ),
        }
    }
}
