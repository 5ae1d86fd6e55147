//! The HTTPS API's TLS: the configured serving certificate, or (as upstream) a self-signed one
//! generated once into `<root-dir>/pki/kubelet.crt|key`; client certificates verified against
//! the client CA bundle when one is configured.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Config;

/// The TLS setup failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("generate self-signed serving certificate")]
    Generate(#[source] rcgen::Error),
    #[error("tlsCertFile and tlsPrivateKeyFile must be given together")]
    Incomplete,
    #[error("client CA bundle {path} holds no usable certificate")]
    ClientCa {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("TLS configuration")]
    Config(#[source] rustls::Error),
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    CertificateDer::pem_file_iter(path)
        .map_err(err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a self-signed certificate for the node's name and IP, as the kubelet does when no
/// serving certificate is given. Returns the certificate and key paths.
pub fn self_signed(config: &Config) -> Result<(PathBuf, PathBuf), TlsError> {
    let dir = config.root_dir.join("pki");
    let cert_path = dir.join("kubelet.crt");
    let key_path = dir.join("kubelet.key");
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Write { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(write_err(&dir))?;
    let mut sans = vec![config.node_name.clone()];
    if let Some(ip) = config.node_ip {
        sans.push(ip.to_string());
    }
    let mut params = rcgen::CertificateParams::new(sans).map_err(TlsError::Generate)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("{}@{now}", config.node_name),
    );
    // Valid from yesterday for one year, like upstream's self-signed kubelet certificate.
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    let yesterday = today.yesterday().unwrap_or(today);
    params.not_before = rcgen::date_time_ymd(
        i32::from(yesterday.year()),
        yesterday.month() as u8,
        yesterday.day() as u8,
    );
    let next_year = today.saturating_add(jiff::Span::new().years(1));
    params.not_after = rcgen::date_time_ymd(
        i32::from(next_year.year()),
        next_year.month() as u8,
        next_year.day() as u8,
    );
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().map_err(TlsError::Generate)?;
    let cert = params.self_signed(&key).map_err(TlsError::Generate)?;
    // The key first, readable by root only; the certificate's presence marks completion.
    write_private(&key_path, key.serialize_pem().as_bytes()).map_err(write_err(&key_path))?;
    std::fs::write(&cert_path, cert.pem()).map_err(write_err(&cert_path))?;
    Ok((cert_path, key_path))
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

/// The rustls server configuration of the API (HTTP/1.1: the streaming upgrades need it).
pub fn server_config(config: &Config) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (cert_path, key_path) = match (&config.tls_cert_file, &config.tls_private_key_file) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        (None, None) => self_signed(config)?,
        _ => return Err(TlsError::Incomplete),
    };
    let certs = read_certs(&cert_path)?;
    let key = read_key(&key_path)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?;
    let builder = match &config.authentication.client_ca_file {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs(ca)? {
                // Unusable entries are skipped; an empty store is refused by the builder.
                let _ = roots.add(c);
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    // Token and anonymous requests come without a certificate.
                    .allow_unauthenticated()
                    .build()
                    .map_err(|source| TlsError::ClientCa {
                        path: ca.clone(),
                        source,
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder
        .with_single_cert(certs, key)
        .map_err(TlsError::Config)?;
    // HTTP/2 for the clients that offer it (the API server's log and stats requests, as to
    // upstream's kubelet), HTTP/1.1 for the others and for the upgrades of exec, attach and
    // port-forward.
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Flags;

    #[test]
    fn a_self_signed_certificate_is_made_once_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::load(&Flags {
            hostname_override: Some("node-a".into()),
            node_ip: Some("10.1.2.3".parse().unwrap()),
            root_dir: Some(dir.path().into()),
            ..Default::default()
        })
        .unwrap();
        let (cert, key) = self_signed(&config).unwrap();
        assert_eq!(cert, dir.path().join("pki/kubelet.crt"));
        let first = std::fs::read(&cert).unwrap();
        self_signed(&config).unwrap();
        assert_eq!(
            std::fs::read(&cert).unwrap(),
            first,
            "kept, not regenerated"
        );
        let der = read_certs(&cert).unwrap().remove(0);
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = parsed.subject_alternative_name().unwrap().unwrap();
        let names = format!("{:?}", san.value.general_names);
        assert!(names.contains("node-a"), "{names}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(server_config(&config).is_ok());
    }
}
