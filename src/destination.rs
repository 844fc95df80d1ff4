//! Where credentials may go: the scheme check that keeps them off plain http, and the scope
//! that keeps them to chosen origins.
//!
//! ```
//! use tower_twn_auth::Origin;
//!
//! let api: Origin = "https://navigator-api.tweakwise.com".parse()?;
//! assert_eq!(api.to_string(), "https://navigator-api.tweakwise.com:443");
//! assert!("ftp://example.test".parse::<Origin>().is_err());
//! # Ok::<(), tower_twn_auth::InvalidOrigin>(())
//! ```

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::Arc;

use http::uri::{Scheme, Uri};

/// A scheme, host and port to which credentials may be sent.
///
/// Hosts compare without regard to case; a missing port is the scheme's default (443 for
/// `https`, 80 for `http`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    https: bool,
    host: Box<str>,
    port: u16,
    /// `host:port`, and `host` alone when the port is the scheme's default: the forms an
    /// authority without user info can take, compared as they are so that the host and port
    /// need not be parsed out of every request's URI.
    authorities: Box<[Box<str>]>,
}

/// A string that is not an origin: it lacks an `http` or `https` scheme or a host, or has a
/// path, query or user info.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidOrigin {
    reason: &'static str,
}

impl fmt::Display for InvalidOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid origin: {}", self.reason)
    }
}

impl std::error::Error for InvalidOrigin {}

impl Origin {
    /// Returns the origin of `uri`, such as `https://navigator-api.tweakwise.com`.
    ///
    /// # Errors
    ///
    /// Returns [`InvalidOrigin`] unless `uri` is `http` or `https` with a host, and at most
    /// `/` as its path.
    ///
    /// ```
    /// use tower_twn_auth::Origin;
    ///
    /// assert!(Origin::new("http://127.0.0.1:8080").is_ok());
    /// assert!(Origin::new("https://api.example.test/v1").is_err());
    /// ```
    pub fn new(uri: &str) -> Result<Self, InvalidOrigin> {
        let invalid = |reason| InvalidOrigin { reason };
        if uri.contains('#') {
            return Err(invalid("a fragment is not part of an origin"));
        }
        let uri: Uri = uri.parse().map_err(|_| invalid("not a URI"))?;
        let https = match uri.scheme() {
            Some(scheme) if *scheme == Scheme::HTTPS => true,
            Some(scheme) if *scheme == Scheme::HTTP => false,
            _ => return Err(invalid("the scheme must be http or https")),
        };
        let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("user info is not part of an origin"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(invalid("a path or query is not part of an origin"));
        }
        let host = authority.host();
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        let port = match authority.as_str()[host.len()..].strip_prefix(':') {
            None => default_port(https),
            Some(port) => match port.parse::<u16>() {
                Ok(port) if port != 0 => port,
                _ => return Err(invalid("the port must be a number from 1 to 65535")),
            },
        };
        let host = host.to_ascii_lowercase();
        // The bare host first: a request to the default port rarely spells the port out.
        let mut authorities = Vec::with_capacity(2);
        if port == default_port(https) {
            authorities.push(host.clone().into_boxed_str());
        }
        authorities.push(format!("{host}:{port}").into_boxed_str());
        Ok(Origin {
            https,
            host: host.into(),
            port,
            authorities: authorities.into(),
        })
    }

    /// Whether a request for `uri`, whose scheme is `https` or not, goes to this origin.
    fn matches(&self, https: bool, uri: &Uri) -> bool {
        if self.https != https {
            return false;
        }
        let Some(authority) = uri.authority() else {
            return false;
        };
        let authority = authority.as_str();
        if !authority.contains('@') {
            return self
                .authorities
                .iter()
                .any(|known| known.eq_ignore_ascii_case(authority));
        }
        // User info in front of the host: take the slower, parsing way.
        let port = uri.port_u16().unwrap_or(default_port(https));
        uri.host()
            .is_some_and(|host| self.port == port && self.host.eq_ignore_ascii_case(host))
    }
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Origin")
            .field(&format_args!("{self}"))
            .finish()
    }
}

impl FromStr for Origin {
    type Err = InvalidOrigin;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        Origin::new(uri)
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

const fn default_port(https: bool) -> u16 {
    if https {
        443
    } else {
        80
    }
}

/// What to do with a request, given its URI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Attach the credentials.
    Attach,
    /// Outside the scope: send the request without any TWN header.
    Strip,
    /// Plain http to a host that is not loopback, or another scheme, or a host named with no
    /// scheme: refuse it.
    Insecure,
    /// Neither scheme nor authority, or an authority with no host: refuse it.
    Unknown,
}

/// The destination rules of a layer.
#[derive(Clone, Debug, Default)]
pub(crate) struct Destinations {
    pub(crate) allow_plain_http: bool,
    pub(crate) allow_relative: bool,
    pub(crate) scope: Option<Scope>,
}

/// The origins a scoped layer sends credentials to.
#[derive(Clone)]
pub(crate) struct Scope {
    origins: Arc<[Origin]>,
    /// The authorities of the `https` origins as the origins store them (lowercase, without
    /// user info, with and without a default port), side by side, for the check that runs on
    /// every request.
    https_authorities: Arc<[Box<str>]>,
}

impl Scope {
    pub(crate) fn new(origins: Vec<Origin>) -> Self {
        let https_authorities = origins
            .iter()
            .filter(|origin| origin.https)
            .flat_map(|origin| origin.authorities.iter().cloned())
            .collect();
        Scope {
            origins: origins.into(),
            https_authorities,
        }
    }

    pub(crate) fn origins(&self) -> &[Origin] {
        &self.origins
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.origins.iter()).finish()
    }
}

impl Destinations {
    /// Whether credentials may go with a request for `uri` by the rules that settle nearly
    /// every request: `https` to a host, and to an origin of the scope as written there
    /// (lowercase, without user info). `false` means [`verdict`](Self::verdict) decides.
    ///
    /// It runs on every request, so it compares bytes and parses nothing.
    #[inline]
    pub(crate) fn attach_outright(&self, uri: &Uri) -> bool {
        if uri.scheme_str() != Some("https") {
            return false;
        }
        let Some(authority) = uri.authority().map(|authority| authority.as_str()) else {
            return false;
        };
        match &self.scope {
            None => names_a_host(authority),
            Some(scope) => scope
                .https_authorities
                .iter()
                .any(|known| known.as_bytes() == authority.as_bytes()),
        }
    }

    /// Decides, from the URI alone, whether credentials may go with a request.
    ///
    /// It runs for the requests [`attach_outright`](Self::attach_outright) does not settle:
    /// those with extensions, other schemes, and authorities spelled otherwise than the
    /// scope's.
    #[inline]
    pub(crate) fn verdict(&self, uri: &Uri) -> Verdict {
        // `http` stores the two standard schemes in lowercase, whatever the request said.
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            Some(_) if self.scope.is_some() => return Verdict::Strip,
            Some(_) => return Verdict::Insecure,
            None => return self.verdict_without_scheme(uri),
        };
        if https && self.scope.is_none() {
            // Only the host's presence is left to check.
            return match uri.authority() {
                Some(authority) if names_a_host(authority.as_str()) => Verdict::Attach,
                _ => Verdict::Unknown,
            };
        }

        if let Some(scope) = &self.scope {
            if !scope
                .origins()
                .iter()
                .any(|origin| origin.matches(https, uri))
            {
                return Verdict::Strip;
            }
        }
        if https || self.allow_plain_http {
            return Verdict::Attach;
        }
        match uri.host() {
            Some(host) if is_loopback(host) => Verdict::Attach,
            Some(host) if !host.is_empty() => Verdict::Insecure,
            _ => Verdict::Unknown,
        }
    }

    /// The verdict on a URI with no scheme. With no authority either (`/path`, `*`), it goes
    /// wherever the connection beneath goes. With one (authority-form, as `CONNECT` uses), it
    /// names a host but not https: like another scheme, it is refused, or outside a scope.
    /// A path that starts with `//` names a host too, once resolved against a base URL, so
    /// it is never taken for a relative URI.
    #[cold]
    fn verdict_without_scheme(&self, uri: &Uri) -> Verdict {
        match uri.authority() {
            Some(_) if self.scope.is_some() => Verdict::Strip,
            Some(_) if uri.host().is_some_and(|host| !host.is_empty()) => Verdict::Insecure,
            Some(_) => Verdict::Unknown,
            None if uri.path().starts_with("//") => Verdict::Unknown,
            None if self.allow_relative => Verdict::Attach,
            None => Verdict::Unknown,
        }
    }
}

/// Whether `authority` starts with a host: `Uri` allows an empty one, and a port with no
/// host before it. Behind user info an empty host goes unnoticed, since finding it would
/// mean scanning every request's authority; `Error::UnknownDestination` documents this.
#[inline]
fn names_a_host(authority: &str) -> bool {
    matches!(authority.as_bytes(), [first, ..] if *first != b':')
}

/// Whether `host` (as `Uri::host` gives it, IPv6 in brackets) is this machine.
pub(crate) fn is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback());
    }
    host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_recognised() {
        for host in ["localhost", "LocalHost", "127.0.0.1", "127.9.8.7", "[::1]"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in [
            "localhost.example",
            "128.0.0.1",
            "[::2]",
            "10.0.0.1",
            "example.test",
        ] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    /// Every rule set a layer can have: scope or not, plain http allowed or not.
    fn rule_sets() -> Vec<Destinations> {
        let scopes: [Option<&[&str]>; 4] = [
            None,
            Some(&["https://navigator-api.tweakwise.com"]),
            Some(&[
                "https://Navigator-API.tweakwise.com:8443",
                "http://127.0.0.1:8080",
            ]),
            Some(&["http://api.example.test", "https://[::1]"]),
        ];
        let mut sets = Vec::new();
        for scope in scopes {
            for allow_plain_http in [false, true] {
                sets.push(Destinations {
                    allow_plain_http,
                    allow_relative: false,
                    scope: scope.map(|origins| {
                        Scope::new(
                            origins
                                .iter()
                                .map(|origin| Origin::new(origin).expect("a valid origin"))
                                .collect(),
                        )
                    }),
                });
            }
        }
        sets
    }

    /// The URIs the fast check must not get wrong: every spelling of scheme, user info,
    /// host and port it could mistake for another.
    const URIS: &[&str] = &[
        "https://navigator-api.tweakwise.com/stats/totalproducts",
        "https://navigator-api.tweakwise.com:443/",
        "https://navigator-api.tweakwise.com:8443/",
        "https://NAVIGATOR-API.tweakwise.com/",
        "HTTPS://navigator-api.tweakwise.com/",
        "https://user@navigator-api.tweakwise.com/",
        "https://navigator-api.tweakwise.com@evil.example.test/",
        "https://navigator-api.tweakwise.com.evil.example.test/",
        "https://navigator-api.tweakwise.com./",
        "https://evil.example.test/?https://navigator-api.tweakwise.com",
        "https://:443/",
        "https://[::1]/",
        "https://[::1]:443/",
        "http://navigator-api.tweakwise.com/",
        "http://127.0.0.1:8080/",
        "https://127.0.0.1:8080/",
        "http://api.example.test/",
        "http://api.example.test:80/",
        "ws://navigator-api.tweakwise.com/",
        "/stats/totalproducts",
        "navigator-api.tweakwise.com:443",
    ];

    #[test]
    fn the_fast_check_attaches_only_where_the_full_rules_attach() {
        let mut fast = 0;
        for rules in rule_sets() {
            for text in URIS {
                let uri: Uri = text.parse().expect("a valid URI");
                if rules.attach_outright(&uri) {
                    fast += 1;
                    assert_eq!(
                        rules.verdict(&uri),
                        Verdict::Attach,
                        "{text} with {rules:?}"
                    );
                }
            }
        }
        // It must also take the requests it is there for, or the loop checks nothing. With
        // each rule set twice (plain http allowed or not): no scope, the 13 https URIs with a
        // host (`https://:443/` has none); one scope, the 3 spellings of its origin; the
        // next, its port spelled out; the last, `[::1]` with and without its port.
        assert_eq!(fast, 2 * (13 + 3 + 1 + 2));
    }

    #[test]
    fn the_fast_check_takes_the_common_requests() {
        let [no_scope, _, scoped, ..] = &rule_sets()[..] else {
            panic!("rule_sets returns eight sets");
        };
        let api: Uri = "https://navigator-api.tweakwise.com/stats/totalproducts"
            .parse()
            .expect("a valid URI");
        assert!(no_scope.attach_outright(&api));
        assert!(scoped.attach_outright(&api));
        let port: Uri = "https://navigator-api.tweakwise.com:443/"
            .parse()
            .expect("a valid URI");
        assert!(scoped.attach_outright(&port));
        // What the fast check leaves to the full rules: other spellings, other origins.
        for text in [
            "https://NAVIGATOR-API.tweakwise.com/",
            "https://user@navigator-api.tweakwise.com/",
            "https://other.example.test/",
            "http://127.0.0.1:8080/",
        ] {
            let uri: Uri = text.parse().expect("a valid URI");
            assert!(!scoped.attach_outright(&uri), "{text}");
        }
    }
}
