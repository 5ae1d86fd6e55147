//! Registry credentials from a pod's `imagePullSecrets`: Docker config secrets
//! (`kubernetes.io/dockerconfigjson` and the older `kubernetes.io/dockercfg`) parsed and matched
//! against an image's registry the way upstream's credential keyring does, producing CRI
//! `AuthConfig`s to try in turn.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Deserialize;
use strake_types::cri;

/// Docker Hub's names; an image without a registry lives there.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_ALIASES: [&str; 3] = ["index.docker.io", "registry-1.docker.io", "docker.io"];

/// One registry's entry of a Docker config.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Entry {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub password: String,
    /// base64 of `username:password`.
    #[serde(default)]
    pub auth: String,
    #[serde(default, rename = "identitytoken")]
    pub identity_token: String,
    #[serde(default, rename = "registrytoken")]
    pub registry_token: String,
}

#[derive(Deserialize)]
struct DockerConfigJson {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

/// A secret that is not a usable Docker config.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    #[error("secret {secret:?} has no {key} key")]
    MissingKey { secret: String, key: &'static str },
    #[error("secret {secret:?}: {key} is not a Docker config: {reason}")]
    Malformed {
        secret: String,
        key: &'static str,
        reason: String,
    },
}

/// The registry entries of one image pull secret, keyed as written (`host[:port][/path]`,
/// possibly with a scheme). Secrets of other types hold no credentials.
pub fn entries_of_secret(
    name: &str,
    type_: Option<&str>,
    data: &BTreeMap<String, Vec<u8>>,
) -> Result<BTreeMap<String, Entry>, CredentialError> {
    let malformed = |key: &'static str, e: serde_json::Error| CredentialError::Malformed {
        secret: name.to_string(),
        key,
        reason: e.to_string(),
    };
    match type_ {
        Some("kubernetes.io/dockerconfigjson") => {
            let key = ".dockerconfigjson";
            let raw = data.get(key).ok_or(CredentialError::MissingKey {
                secret: name.to_string(),
                key,
            })?;
            let cfg: DockerConfigJson =
                serde_json::from_slice(raw).map_err(|e| malformed(key, e))?;
            Ok(cfg.auths)
        }
        Some("kubernetes.io/dockercfg") => {
            let key = ".dockercfg";
            let raw = data.get(key).ok_or(CredentialError::MissingKey {
                secret: name.to_string(),
                key,
            })?;
            serde_json::from_slice(raw).map_err(|e| malformed(key, e))
        }
        _ => Ok(BTreeMap::new()),
    }
}

/// The registry host (with port) and repository path of an image reference, Docker Hub's
/// name for references without a registry.
pub fn registry_of(image: &str) -> (String, String) {
    let name = image.split('@').next().unwrap_or(image);
    match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            let repo = strip_tag(rest);
            (first.to_lowercase(), repo.to_string())
        }
        Some(_) => (DOCKER_HUB.into(), strip_tag(name).to_string()),
        None => (DOCKER_HUB.into(), format!("library/{}", strip_tag(name))),
    }
}

fn strip_tag(repo: &str) -> &str {
    match repo.rsplit_once(':') {
        Some((r, tag)) if !tag.contains('/') => r,
        _ => repo,
    }
}

/// A config key split into host and path: scheme and trailing slashes dropped, Docker Hub's
/// aliases (and its old `/v1/` URL) folded into `docker.io`.
fn parse_key(key: &str) -> (String, String) {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let (host, path) = k.split_once('/').unwrap_or((k, ""));
    let host = host.to_lowercase();
    if DOCKER_HUB_ALIASES.contains(&host.as_str()) {
        // `https://index.docker.io/v1/` names the whole hub, not a repository.
        let path = if path.trim_end_matches('/') == "v1" {
            ""
        } else {
            path
        };
        return (DOCKER_HUB.into(), path.trim_end_matches('/').to_string());
    }
    (host, path.trim_end_matches('/').to_string())
}

/// Whether a key's host pattern matches a host: label by label, `*` matching one label, ports
/// equal.
fn host_matches(pattern: &str, host: &str) -> bool {
    let split = |h: &str| -> (String, String) {
        match h.rsplit_once(':') {
            Some((n, p)) if p.chars().all(|c| c.is_ascii_digit()) => (n.into(), p.into()),
            _ => (h.into(), String::new()),
        }
    };
    let ((pn, pp), (hn, hp)) = (split(pattern), split(host));
    if pp != hp {
        return false;
    }
    let (pl, hl): (Vec<&str>, Vec<&str>) = (pn.split('.').collect(), hn.split('.').collect());
    pl.len() == hl.len() && pl.iter().zip(&hl).all(|(p, h)| *p == "*" || p == h)
}

/// The credentials to try for `image`, most specific key (longest path) first, as CRI
/// `AuthConfig`s. Empty when no key matches: the pull is anonymous.
pub fn auth_configs(image: &str, entries: &[BTreeMap<String, Entry>]) -> Vec<cri::AuthConfig> {
    let (host, repo) = registry_of(image);
    let mut found: Vec<(usize, cri::AuthConfig)> = Vec::new();
    for (key, e) in entries.iter().flat_map(|m| m.iter()) {
        let (khost, kpath) = parse_key(key);
        let path_ok = kpath.is_empty() || repo == kpath || repo.starts_with(&format!("{kpath}/"));
        if !host_matches(&khost, &host) || !path_ok {
            continue;
        }
        let (mut username, mut password) = (e.username.clone(), e.password.clone());
        if username.is_empty()
            && let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(e.auth.trim())
            && let Some((u, p)) = String::from_utf8_lossy(&raw).split_once(':')
        {
            username = u.to_string();
            password = p.to_string();
        }
        found.push((
            kpath.len(),
            cri::AuthConfig {
                username,
                password,
                auth: e.auth.clone(),
                server_address: host.clone(),
                identity_token: e.identity_token.clone(),
                registry_token: e.registry_token.clone(),
            },
        ));
    }
    found.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
    found.into_iter().map(|(_, a)| a).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_secret(json: &str) -> BTreeMap<String, Vec<u8>> {
        BTreeMap::from([(".dockerconfigjson".to_string(), json.as_bytes().to_vec())])
    }

    #[test]
    fn references_name_their_registry() {
        assert_eq!(
            registry_of("busybox"),
            ("docker.io".into(), "library/busybox".into())
        );
        assert_eq!(
            registry_of("user/app:1"),
            ("docker.io".into(), "user/app".into())
        );
        assert_eq!(
            registry_of("10.213.0.1:5001/strake/protected:1"),
            ("10.213.0.1:5001".into(), "strake/protected".into())
        );
        assert_eq!(
            registry_of("Quay.io/org/app@sha256:abc"),
            ("quay.io".into(), "org/app".into())
        );
        assert_eq!(
            registry_of("localhost/app"),
            ("localhost".into(), "app".into())
        );
    }

    #[test]
    fn dockerconfigjson_entries_match_by_host_port_and_path() {
        let auth = base64::engine::general_purpose::STANDARD.encode("u2:p2");
        let data = json_secret(&format!(
            r#"{{"auths": {{
                "10.213.0.1:5001": {{"username": "u1", "password": "p1"}},
                "https://10.213.0.1:5001/strake": {{"auth": "{auth}"}},
                "10.213.0.1:5000": {{"username": "other", "password": "x"}},
                "https://index.docker.io/v1/": {{"username": "hub", "password": "h"}},
                "*.example.com": {{"username": "wild", "password": "w"}}
            }}}}"#
        ));
        let entries =
            entries_of_secret("regcred", Some("kubernetes.io/dockerconfigjson"), &data).unwrap();
        let got = auth_configs(
            "10.213.0.1:5001/strake/protected:1",
            std::slice::from_ref(&entries),
        );
        let users: Vec<&str> = got.iter().map(|a| a.username.as_str()).collect();
        assert_eq!(users, ["u2", "u1"], "longest path first, auth decoded");
        assert_eq!(got[0].password, "p2");
        assert_eq!(got[0].server_address, "10.213.0.1:5001");
        assert_eq!(
            auth_configs("busybox", std::slice::from_ref(&entries))[0].username,
            "hub"
        );
        assert_eq!(
            auth_configs("reg.example.com/a", std::slice::from_ref(&entries))[0].username,
            "wild"
        );
        assert!(auth_configs("a.b.example.com/a", std::slice::from_ref(&entries)).is_empty());
        assert!(auth_configs("10.213.0.1:5002/a", std::slice::from_ref(&entries)).is_empty());
    }

    #[test]
    fn dockercfg_and_other_secret_types() {
        let data = BTreeMap::from([(
            ".dockercfg".to_string(),
            br#"{"reg.io": {"username": "old", "password": "p"}}"#.to_vec(),
        )]);
        let e = entries_of_secret("old", Some("kubernetes.io/dockercfg"), &data).unwrap();
        assert_eq!(
            auth_configs("reg.io/x", std::slice::from_ref(&e))[0].username,
            "old"
        );
        assert!(
            entries_of_secret("opaque", Some("Opaque"), &data)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            entries_of_secret("bad", Some("kubernetes.io/dockerconfigjson"), &data),
            Err(CredentialError::MissingKey {
                secret: "bad".into(),
                key: ".dockerconfigjson"
            })
        );
        assert!(matches!(
            entries_of_secret(
                "bad",
                Some("kubernetes.io/dockerconfigjson"),
                &json_secret("{not json")
            ),
            Err(CredentialError::Malformed { .. })
        ));
    }
}
