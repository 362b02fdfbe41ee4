//! Defences against web pages: what keeps a site the user visits from driving a gateway on the
//! user's machine through the user's browser.
//!
//! Browsers let any page open a websocket to any address, loopback included, and say which page
//! did in `Origin`: [`check_origin`] refuses upgrades from pages other than the gateway's own and
//! those on `--allow-origin`. A page may also rebind its own host name to 127.0.0.1 (DNS
//! rebinding): its requests then carry an `Origin` and a `Host` that match each other, both
//! named by the attacker. So without a token, [`check_host`] answers only requests for a host
//! that cannot be rebound (an IP literal, `localhost` and its subdomains) or that
//! `--allow-origin` names. (With a token, a rebound page still lacks the token.)
//! [`normalize_origin`] is the one reading of an origin, for the settings and the headers alike.

use std::net::IpAddr;

use axum::http::uri::{Authority, Uri};
use axum::http::{HeaderMap, header};

use super::limits::{GatewayError, Kind};

/// Why an `--allow-origin` entry is not an origin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "--allow-origin {origin:?} is not an origin: expected scheme://host[:port] (e.g. \
     https://app.example.com) or *"
)]
pub struct BadOrigin {
    /// The entry as given.
    pub origin: String,
}

/// `origin` as a browser sends it in `Origin`: `scheme://host[:port]`, lower case, without a
/// default port (80 for http, 443 for https) or a trailing `/`; `*` stays `*`.
///
/// # Errors
/// [`BadOrigin`] when it is not `scheme://host[:port]` (a path, a query or user info included).
pub fn normalize_origin(origin: &str) -> Result<String, BadOrigin> {
    let origin = origin.trim();
    if origin == "*" {
        return Ok(origin.to_owned());
    }
    let bad = || BadOrigin {
        origin: origin.to_owned(),
    };
    let uri: Uri = origin.parse().map_err(|_| bad())?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(bad());
    };
    let path_ok = matches!(uri.path(), "" | "/") && uri.query().is_none();
    if !path_ok || authority.as_str().contains('@') || authority.host().is_empty() {
        return Err(bad());
    }
    let scheme = scheme.to_ascii_lowercase();
    let host = authority.host().to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    };
    Ok(match authority.port_u16() {
        Some(port) if Some(port) != default_port => format!("{scheme}://{host}:{port}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// Checks a websocket upgrade's `Origin`: none (not a browser), the gateway's own (the same
/// `host[:port]` as `Host`, as the page the gateway serves has), or one of `allowed` (`*`:
/// any). Compared without regard to case, scheme aside: behind a TLS proxy the page is
/// `https://` while the gateway sees plain HTTP.
///
/// # Errors
/// [`Kind::Forbidden`] naming the origin and `--allow-origin`.
pub(crate) fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), GatewayError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = String::from_utf8_lossy(origin.as_bytes());
    let origin = origin.trim();
    let own = headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .is_some_and(|host| {
            origin
                .split_once("://")
                .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host.trim()))
        });
    let normalized = normalize_origin(origin).ok();
    let listed = allowed.iter().any(|a| {
        a == "*"
            || a.trim_end_matches('/').eq_ignore_ascii_case(origin)
            || normalize_origin(a)
                .ok()
                .is_some_and(|a| Some(a) == normalized)
    });
    if own || listed {
        return Ok(());
    }
    crate::metrics::rejected(Kind::Forbidden);
    Err(GatewayError::new(
        Kind::Forbidden,
        format!(
            "a web page from {origin:?} may not use this gateway; add its origin to \
             --allow-origin if it should"
        ),
    ))
}

/// Checks a request's `Host` when no token guards the gateway: an IP literal, `localhost` or
/// a name under it, or the host of an `allowed` origin (`*`: any). A request without `Host`
/// (HTTP/1.0; no browser sends one) passes.
///
/// # Errors
/// [`Kind::Forbidden`] naming the host and `--allow-origin`.
pub(crate) fn check_host(headers: &HeaderMap, allowed: &[String]) -> Result<(), GatewayError> {
    let Some(value) = headers.get(header::HOST) else {
        return Ok(());
    };
    let host = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<Authority>().ok())
        .map(|a| a.host().to_ascii_lowercase());
    if let Some(host) = &host {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let listed = allowed.iter().any(|a| {
            a == "*"
                || a.parse::<Uri>()
                    .ok()
                    .and_then(|uri| uri.host().map(str::to_ascii_lowercase))
                    .is_some_and(|allowed| allowed == *host)
        });
        if bare.parse::<IpAddr>().is_ok()
            || host == "localhost"
            || host.ends_with(".localhost")
            || listed
        {
            return Ok(());
        }
    }
    crate::metrics::rejected(Kind::Forbidden);
    let shown = String::from_utf8_lossy(value.as_bytes());
    Err(GatewayError::new(
        Kind::Forbidden,
        format!(
            "this gateway has no token and answers requests for an IP address, localhost or \
             a host of --allow-origin only, not {shown:?} (a web page could have pointed that \
             name at this machine); add its origin to --allow-origin, or set a token"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(name, HeaderValue::from_str(value).expect("header value"));
        }
        map
    }

    #[test]
    fn origins_are_normalized_and_bad_ones_refused() {
        for (given, expected) in [
            ("https://App.Example:443", "https://app.example"),
            ("http://app.example:80/", "http://app.example"),
            ("http://app.example:8080", "http://app.example:8080"),
            ("https://[::1]:8443", "https://[::1]:8443"),
            (" * ", "*"),
        ] {
            assert_eq!(normalize_origin(given).as_deref(), Ok(expected), "{given}");
        }
        for bad in [
            "app.example",
            "https://app.example/path",
            "https://app.example?q",
            "https://user@app.example",
            "https://",
            "",
            "null",
        ] {
            assert!(normalize_origin(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_allowed_origin_matches_with_or_without_its_default_port() {
        let allowed = vec!["https://app.example:443".to_owned()];
        let from = |origin: &str| {
            check_origin(
                &headers(&[(header::ORIGIN, origin), (header::HOST, "gw:8080")]),
                &allowed,
            )
        };
        assert!(from("https://app.example").is_ok());
        assert!(from("https://APP.example").is_ok());
        assert!(from("http://app.example").is_err());
        assert!(from("http://gw:8080").is_ok(), "the gateway's own page");
    }

    #[test]
    fn only_hosts_that_cannot_be_rebound_or_are_allowed_pass() {
        let allowed = vec!["https://gw.example.com".to_owned()];
        let host = |h: &str| check_host(&headers(&[(header::HOST, h)]), &allowed);
        for ok in [
            "127.0.0.1:8080",
            "10.1.2.3",
            "[::1]:8080",
            "localhost:8080",
            "LOCALHOST",
            "app.localhost:1",
            "gw.example.com",
            "gw.example.com:8443",
        ] {
            assert!(host(ok).is_ok(), "{ok}");
        }
        for refused in [
            "evil.example:8080",
            "localhost.evil.example",
            "example.com",
            "",
        ] {
            let error = host(refused).expect_err(refused);
            assert_eq!(error.kind, Kind::Forbidden);
            assert!(error.message.contains("--allow-origin"), "{error}");
        }
        assert!(check_host(&HeaderMap::new(), &allowed).is_ok());
        assert!(check_host(&headers(&[(header::HOST, "evil")]), &["*".to_owned()]).is_ok());
    }
}
