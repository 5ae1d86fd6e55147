//! Registry mirrors: other hosts that serve a registry's repositories under the same paths.
//! A pull of `registry.k8s.io/pause:3.9` with the mirror `http://10.0.0.1:5000` fetches
//! `10.0.0.1:5000/pause:3.9` and, if no mirror can resolve it, falls back to `registry.k8s.io`
//! itself (containerd's `registry.mirrors` behave the same). The image keeps the name it was
//! asked for: its RepoTags and RepoDigests name `registry.k8s.io`, never the mirror. Mirrors are
//! asked anonymously: a pull's credentials belong to the registry the reference names.

use std::collections::BTreeMap;
use std::fmt;

use super::reference::valid_domain;

/// A host to fetch from: a mirror, or the registry a reference names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    host: String,
    plain_http: bool,
}

/// A mirror endpoint that is not `[http://|https://]host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid registry mirror endpoint {endpoint:?}: {reason}")]
pub struct EndpointError {
    endpoint: String,
    reason: &'static str,
}

impl Endpoint {
    /// Parses `host[:port]`, `https://host[:port]` or `http://host[:port]` (plain HTTP). A
    /// path, query or credentials are refused: a mirror serves the same repository paths.
    pub fn parse(s: &str) -> Result<Endpoint, EndpointError> {
        let err = |reason| EndpointError {
            endpoint: s.to_string(),
            reason,
        };
        let (rest, plain_http) = if let Some(r) = s.strip_prefix("http://") {
            (r, true)
        } else if let Some(r) = s.strip_prefix("https://") {
            (r, false)
        } else if s.contains("://") {
            return Err(err("scheme must be http or https"));
        } else {
            (s, false)
        };
        let host = rest.strip_suffix('/').unwrap_or(rest);
        if host.is_empty() {
            return Err(err("no host"));
        }
        if host.contains(['/', '?', '#', '@']) {
            return Err(err("only a host and port may be given"));
        }
        if !valid_domain(host) {
            return Err(err("invalid host"));
        }
        Ok(Endpoint {
            host: host.to_string(),
            plain_http,
        })
    }

    /// The registry itself, as a reference's domain names it.
    pub fn registry(domain: &str) -> Endpoint {
        Endpoint {
            host: domain.to_string(),
            plain_http: false,
        }
    }

    /// `host[:port]`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether the endpoint is reached over plain HTTP (`http://`).
    pub fn plain_http(&self) -> bool {
        self.plain_http
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.plain_http {
            f.write_str("http://")?;
        }
        f.write_str(&self.host)
    }
}

impl std::str::FromStr for Endpoint {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Endpoint::parse(s)
    }
}

impl<'de> serde::Deserialize<'de> for Endpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Endpoint::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Mirrors by the registry host they stand in for (`docker.io`, `registry.k8s.io`, ...).
pub type Mirrors = BTreeMap<String, Vec<Endpoint>>;

/// The endpoints a pull from `domain` tries, in order: its mirrors, then `domain` itself.
pub fn endpoints_for(mirrors: &Mirrors, domain: &str) -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = Vec::new();
    for e in mirrors.get(domain).into_iter().flatten() {
        if !out.contains(e) {
            out.push(e.clone());
        }
    }
    if !out.iter().any(|e| e.host == domain) {
        out.push(Endpoint::registry(domain));
    }
    out
}

/// `NAME=ENDPOINT` of the `--registry-mirror` flag, e.g.
/// `registry.k8s.io=http://10.0.0.1:5000`.
pub fn parse_mirror_flag(s: &str) -> Result<(String, Endpoint), String> {
    let (registry, endpoint) = s
        .split_once('=')
        .ok_or_else(|| format!("expected REGISTRY=ENDPOINT, got {s:?}"))?;
    if registry.is_empty() || !valid_domain(registry) {
        return Err(format!("invalid registry host {registry:?} in {s:?}"));
    }
    let endpoint = Endpoint::parse(endpoint).map_err(|e| e.to_string())?;
    Ok((registry.to_string(), endpoint))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_with_or_without_scheme() {
        let e = Endpoint::parse("http://10.213.0.1:5000").unwrap();
        assert_eq!((e.host(), e.plain_http()), ("10.213.0.1:5000", true));
        let e = Endpoint::parse("https://mirror.example.com/").unwrap();
        assert_eq!((e.host(), e.plain_http()), ("mirror.example.com", false));
        let e = Endpoint::parse("mirror.example.com:443").unwrap();
        assert_eq!(
            (e.host(), e.plain_http()),
            ("mirror.example.com:443", false)
        );
        assert_eq!(
            Endpoint::parse("http://[::1]:5000").unwrap().to_string(),
            "http://[::1]:5000"
        );
        for bad in [
            "",
            "http://",
            "ftp://x",
            "http://x/v2/prefix",
            "u:p@x",
            "x:port",
            "x?y",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mirrors_come_first_then_the_registry_itself() {
        let m: Mirrors = BTreeMap::from([(
            "registry.k8s.io".to_string(),
            vec![
                Endpoint::parse("http://10.0.0.1:5000").unwrap(),
                Endpoint::parse("mirror.example.com").unwrap(),
                Endpoint::parse("http://10.0.0.1:5000").unwrap(),
            ],
        )]);
        let hosts = |d| {
            endpoints_for(&m, d)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            hosts("registry.k8s.io"),
            [
                "http://10.0.0.1:5000",
                "mirror.example.com",
                "registry.k8s.io"
            ]
        );
        assert_eq!(hosts("gcr.io"), ["gcr.io"]);
        // A registry listed as its own mirror is not tried twice.
        let own: Mirrors = BTreeMap::from([(
            "r.example".to_string(),
            vec![Endpoint::parse("r.example").unwrap()],
        )]);
        assert_eq!(endpoints_for(&own, "r.example").len(), 1);
    }

    #[test]
    fn mirror_flags() {
        let (r, e) = parse_mirror_flag("gcr.io=http://10.213.0.1:5000").unwrap();
        assert_eq!(r, "gcr.io");
        assert_eq!(e, Endpoint::parse("http://10.213.0.1:5000").unwrap());
        for bad in [
            "gcr.io",
            "=http://x",
            "gcr.io=",
            "bad host=x",
            "gcr.io=ftp://x",
        ] {
            assert!(parse_mirror_flag(bad).is_err(), "{bad}");
        }
    }
}
