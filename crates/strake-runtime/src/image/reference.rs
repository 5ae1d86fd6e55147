//! Image references, normalised the way containerd and the kubelet do (the grammar of
//! `github.com/distribution/reference`): `busybox` is `docker.io/library/busybox:latest`,
//! `host:port/repo:tag` keeps its registry, `name@sha256:<hex>` pins a manifest.

use std::fmt;

/// The registry that short names resolve to.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag of a reference that names none.
pub const DEFAULT_TAG: &str = "latest";
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// Why a string is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// The reference is empty.
    #[error("image reference is empty")]
    Empty,
    /// The name is longer than 255 characters.
    #[error("image reference {reference:?}: repository name longer than 255 characters")]
    NameTooLong { reference: String },
    /// The repository path holds upper-case letters.
    #[error("image reference {reference:?}: repository name must be lowercase")]
    Uppercase { reference: String },
    /// A repository path component breaks the grammar.
    #[error("image reference {reference:?}: invalid repository path component {component:?}")]
    InvalidComponent {
        reference: String,
        component: String,
    },
    /// The registry host (or its port) breaks the grammar.
    #[error("image reference {reference:?}: invalid registry host {domain:?}")]
    InvalidDomain { reference: String, domain: String },
    /// The tag breaks the grammar.
    #[error("image reference {reference:?}: invalid tag {tag:?}")]
    InvalidTag { reference: String, tag: String },
    /// The digest is not `<algorithm>:<hex>` of a known algorithm and length.
    #[error("image reference {reference:?}: invalid digest {digest:?}")]
    InvalidDigest { reference: String, digest: String },
    /// A bare 64-hex string is an image ID, not a repository name.
    #[error(
        "image reference {reference:?}: a 64-character hexadecimal string is an image ID, not a repository"
    )]
    LooksLikeId { reference: String },
}

/// A validated `sha256:<64 hex>` (or sha384/sha512) content digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses `<algorithm>:<lower-case hex>`; the hex length must fit the algorithm.
    pub fn parse(s: &str) -> Option<Digest> {
        let (algo, hex) = s.split_once(':')?;
        let len = match algo {
            "sha256" => 64,
            "sha384" => 96,
            "sha512" => 128,
            _ => return None,
        };
        (hex.len() == len
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| Digest(s.to_string()))
    }

    /// The digest of `bytes` with sha256.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest(format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(bytes))
        ))
    }

    /// The algorithm, e.g. `sha256`.
    pub fn algorithm(&self) -> &str {
        self.0.split_once(':').map_or("", |(a, _)| a)
    }

    /// The hex part.
    pub fn hex(&self) -> &str {
        self.0.split_once(':').map_or("", |(_, h)| h)
    }

    /// The whole digest, `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A fully normalised image reference: registry, repository, and a tag or a digest (or both).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    domain: String,
    path: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parses and normalises `s` as containerd's `ParseNormalizedNamed` + `TagNameOnly` do.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        let err_ref = || s.to_string();
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ReferenceError::LooksLikeId {
                reference: err_ref(),
            });
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => {
                let digest = Digest::parse(d).ok_or_else(|| ReferenceError::InvalidDigest {
                    reference: err_ref(),
                    digest: d.to_string(),
                })?;
                (rest, Some(digest))
            }
            None => (s, None),
        };
        // A tag is what follows the last ':' only if no '/' comes after it (else it is a port).
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i + 1..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(tag) = tag
            && !valid_tag(tag)
        {
            return Err(ReferenceError::InvalidTag {
                reference: err_ref(),
                tag: tag.to_string(),
            });
        }
        if name.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (domain, path) = split_domain(name);
        if !valid_domain(&domain) {
            return Err(ReferenceError::InvalidDomain {
                reference: err_ref(),
                domain,
            });
        }
        if path.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ReferenceError::Uppercase {
                reference: err_ref(),
            });
        }
        for component in path.split('/') {
            if !valid_component(component) {
                return Err(ReferenceError::InvalidComponent {
                    reference: err_ref(),
                    component: component.to_string(),
                });
            }
        }
        if domain.len() + 1 + path.len() > MAX_NAME_LEN {
            return Err(ReferenceError::NameTooLong {
                reference: err_ref(),
            });
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            domain,
            path,
            tag,
            digest,
        })
    }

    /// The registry host (with port), e.g. `docker.io` or `127.0.0.1:5000`.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The repository path inside the registry, e.g. `library/busybox`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The tag, if the reference names one (`latest` when it named neither tag nor digest).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if the reference pins one.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// `domain/path`, e.g. `docker.io/library/busybox`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The repo tag CRI reports (`docker.io/library/busybox:latest`), if the reference has a tag.
    pub fn repo_tag(&self) -> Option<String> {
        self.tag.as_ref().map(|t| format!("{}:{t}", self.name()))
    }

    /// The repo digest CRI reports for this repository and a manifest (or index) digest.
    pub fn repo_digest(&self, manifest: &Digest) -> String {
        format!("{}@{manifest}", self.name())
    }

    /// This reference pinned to `digest`, without its tag (how a pull fetches what a tag named).
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            domain: self.domain.clone(),
            path: self.path.clone(),
            tag: None,
            digest: Some(digest),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.path)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

/// Splits `name` into registry and path as `splitDockerDomain` does.
fn split_domain(name: &str) -> (String, String) {
    let (domain, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_string(), rest.to_string())
        }
        // A first component with upper case letters is not a host either: it is an invalid path.
        _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
    };
    let domain = if domain == "index.docker.io" {
        DEFAULT_REGISTRY.to_string()
    } else {
        domain
    };
    let path = if domain == DEFAULT_REGISTRY && !path.contains('/') {
        format!("library/{path}")
    } else {
        path
    };
    (domain, path)
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__' or one or more '-'.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[\w][\w.-]{0,127}`
fn valid_tag(t: &str) -> bool {
    let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && word(b[0])
        && b.iter().all(|&x| word(x) || x == b'.' || x == b'-')
}

/// A host name (labels of `[a-zA-Z0-9-]`, not starting or ending with '-'), an IPv4 address
/// or a bracketed IPv6 address, with an optional numeric port.
pub(crate) fn valid_domain(d: &str) -> bool {
    let (host, port) = if let Some(rest) = d.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            p => match p.strip_prefix(':') {
                Some(port) => ("", Some(port)),
                None => return false,
            },
        }
    } else {
        match d.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (d, None),
        }
    };
    if let Some(port) = port
        && (port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.len() > 5)
    {
        return false;
    }
    if d.starts_with('[') {
        return true;
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn norm(s: &str) -> String {
        Reference::parse(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .to_string()
    }

    #[test]
    fn short_names_normalise_to_docker_hub_library_latest() {
        assert_eq!(norm("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(norm("library/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("bitnami/redis:7"), "docker.io/bitnami/redis:7");
        assert_eq!(
            norm("index.docker.io/library/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            norm("docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
    }

    #[test]
    fn registries_with_ports_and_localhost_keep_their_host() {
        let r = Reference::parse("127.0.0.1:5000/strake/busybox:1").expect("parse");
        assert_eq!(r.domain(), "127.0.0.1:5000");
        assert_eq!(r.path(), "strake/busybox");
        assert_eq!(r.tag(), Some("1"));
        assert_eq!(norm("localhost/foo"), "localhost/foo:latest");
        assert_eq!(norm("localhost:5000/foo"), "localhost:5000/foo:latest");
        assert_eq!(
            norm("registry.k8s.io/pause:3.10"),
            "registry.k8s.io/pause:3.10"
        );
        assert_eq!(norm("[::1]:5000/foo"), "[::1]:5000/foo:latest");
        // Without '.', ':' or "localhost" the first component is a path, not a host.
        assert_eq!(norm("myhost/foo"), "docker.io/myhost/foo:latest");
    }

    #[test]
    fn digests_and_tag_plus_digest() {
        let r = Reference::parse(&format!("busybox@sha256:{HEX}")).expect("parse");
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().map(Digest::hex), Some(HEX));
        assert_eq!(r.repo_tag(), None);
        assert_eq!(
            r.to_string(),
            format!("docker.io/library/busybox@sha256:{HEX}")
        );
        let r = Reference::parse(&format!("host:5000/a/b:v1@sha256:{HEX}")).expect("parse");
        assert_eq!(r.tag(), Some("v1"));
        assert_eq!(
            r.digest().map(Digest::as_str),
            Some(&*format!("sha256:{HEX}"))
        );
        let d = Digest::parse(&format!("sha256:{HEX}")).expect("digest");
        assert_eq!(
            Reference::parse("busybox").expect("parse").repo_digest(&d),
            format!("docker.io/library/busybox@sha256:{HEX}")
        );
    }

    #[test]
    fn invalid_references_are_typed_errors() {
        use ReferenceError::*;
        type Check = fn(&ReferenceError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, Empty)),
            ("BusyBox", |e| matches!(e, Uppercase { .. })),
            ("busybox:", |e| matches!(e, InvalidTag { .. })),
            ("busybox:-x", |e| matches!(e, InvalidTag { .. })),
            ("busybox@sha256:abc", |e| matches!(e, InvalidDigest { .. })),
            ("busybox@md5:0123", |e| matches!(e, InvalidDigest { .. })),
            ("a//b", |e| matches!(e, InvalidComponent { .. })),
            ("a/b-", |e| matches!(e, InvalidComponent { .. })),
            ("a/b___c", |e| matches!(e, InvalidComponent { .. })),
            ("host:port/foo", |e| matches!(e, InvalidDomain { .. })),
            ("-bad.host/foo", |e| matches!(e, InvalidDomain { .. })),
            (HEX, |e| matches!(e, LooksLikeId { .. })),
        ];
        for (input, want) in cases {
            let err = Reference::parse(input).expect_err(input);
            assert!(want(&err), "{input:?}: {err:?}");
        }
        let long = format!("a/{}", "b".repeat(260));
        assert!(matches!(
            Reference::parse(&long),
            Err(ReferenceError::NameTooLong { .. })
        ));
    }

    #[test]
    fn component_grammar_allows_single_dot_underscore_double_underscore_and_dashes() {
        for ok in ["a.b", "a_b", "a__b", "a-b", "a---b", "a1", "0"] {
            assert!(valid_component(ok), "{ok}");
        }
        for bad in ["", ".a", "a.", "a..b", "a_.b", "A"] {
            assert!(!valid_component(bad), "{bad}");
        }
    }

    #[test]
    fn digest_parse_checks_length_and_hex() {
        assert!(Digest::parse(&format!("sha256:{HEX}")).is_some());
        assert!(Digest::parse(&format!("sha256:{}", HEX.to_uppercase())).is_none());
        assert!(Digest::parse(&format!("sha512:{HEX}")).is_none());
        assert_eq!(
            Digest::sha256_of(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
