//! A token source that re-reads a file, such as a mounted secret.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tower::BoxError;

use super::{Token, TokenSource, DEFAULT_REREAD};
use crate::credentials::AccessToken;
use crate::error::{LoadError, LoadedFrom};

/// Reads the access token from a file, again every 30 seconds by default.
///
/// The content is trimmed of surrounding whitespace. The file is opened anew on every read,
/// so replacing it atomically (writing a new file and renaming it over the old one, as
/// Kubernetes does with mounted secrets) is picked up at the next read. When a read fails
/// (the file is missing, unreadable, empty or invalid), the token read before keeps being
/// used, the failure is reported through `tracing`, and the read is retried after a backoff;
/// an empty header is never sent.
///
/// ```
/// use std::time::Duration;
/// use tower_twn_auth::{FileSource, InstanceKey, TwnAuthLayer};
///
/// let source = FileSource::new("/run/secrets/twn-token").reread_every(Duration::from_secs(10));
/// let layer = TwnAuthLayer::with_token_source(InstanceKey::new("3f8c1a2b")?, source);
/// # Ok::<(), tower_twn_auth::InvalidCredential>(())
/// ```
#[derive(Clone)]
pub struct FileSource {
    path: PathBuf,
    name: String,
    reread: Duration,
}

impl FileSource {
    /// Returns a source reading the file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        FileSource {
            name: format!("file {}", path.display()),
            path,
            reread: DEFAULT_REREAD,
        }
    }

    /// Sets how often the file is read again. Defaults to 30 seconds.
    pub fn reread_every(mut self, interval: Duration) -> Self {
        self.reread = interval;
        self
    }

    /// Returns the path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file now, blocking the thread.
    pub(crate) fn read_blocking(&self) -> Result<Token, LoadError> {
        let token = AccessToken::from_file(&self.path)?;
        Ok(Token::new(token).refresh_after(self.reread))
    }
}

impl TokenSource for FileSource {
    async fn fetch(&self) -> Result<Token, BoxError> {
        let raw = tokio::fs::read(&self.path)
            .await
            .map_err(|source| LoadError::Io {
                path: self.path.clone(),
                source,
            })?;
        let token = AccessToken::from_loaded(LoadedFrom::File(self.path.clone()), &raw)?;
        Ok(Token::new(token).refresh_after(self.reread))
    }

    fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Debug for FileSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileSource")
            .field("path", &self.path)
            .field("reread", &self.reread)
            .finish()
    }
}
