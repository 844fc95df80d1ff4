//! A token source that re-reads an environment variable.

use std::fmt;
use std::time::Duration;

use tower::BoxError;

use super::{Token, TokenSource, DEFAULT_REREAD};
use crate::credentials::AccessToken;

/// Reads the access token from an environment variable, again every 30 seconds by default.
///
/// The value is trimmed of surrounding whitespace. When a re-read fails (the variable was
/// removed or holds an invalid token), the token read before keeps being used and the failure
/// is reported through `tracing`.
///
/// ```
/// use std::time::Duration;
/// use tower_twn_auth::{EnvSource, InstanceKey, TwnAuthLayer};
///
/// let source = EnvSource::new("SHOP_TWN_TOKEN").reread_every(Duration::from_secs(60));
/// let layer = TwnAuthLayer::with_token_source(InstanceKey::new("3f8c1a2b")?, source);
/// # Ok::<(), tower_twn_auth::InvalidCredential>(())
/// ```
#[derive(Clone)]
pub struct EnvSource {
    variable: String,
    name: String,
    reread: Duration,
}

impl EnvSource {
    /// Returns a source reading `variable`.
    pub fn new(variable: impl Into<String>) -> Self {
        let variable = variable.into();
        EnvSource {
            name: format!("environment variable {variable}"),
            variable,
            reread: DEFAULT_REREAD,
        }
    }

    /// Sets how often the variable is read again. Defaults to 30 seconds.
    pub fn reread_every(mut self, interval: Duration) -> Self {
        self.reread = interval;
        self
    }

    /// Reads the variable now.
    pub(crate) fn read(&self) -> Result<Token, crate::LoadError> {
        let token = AccessToken::from_env(&self.variable)?;
        Ok(Token::new(token).refresh_after(self.reread))
    }
}

impl TokenSource for EnvSource {
    async fn fetch(&self) -> Result<Token, BoxError> {
        Ok(self.read()?)
    }

    fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Debug for EnvSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvSource")
            .field("variable", &self.variable)
            .field("reread", &self.reread)
            .finish()
    }
}
