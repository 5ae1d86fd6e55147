//! Certificates and keys for a test control plane, made fresh for each one.
//!
//! One CA signs everything: the API server's serving certificate, client certificates (admin,
//! nodes, the API server's kubelet client) and, through controller-manager, kubelet CSRs. The
//! service-account signing key is a separate P-256 key pair.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::{Error, Result};

/// A certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The control plane's PKI, written under one directory.
pub struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (trust anchor for servers and clients).
    pub ca: CertFiles,
    /// kube-apiserver's serving certificate.
    pub apiserver: CertFiles,
    /// Cluster admin (`system:masters`).
    pub admin: CertFiles,
    /// The API server's client certificate towards kubelets.
    pub apiserver_kubelet_client: CertFiles,
    /// Service-account token signing key (private) and its public half.
    pub service_account_key: PathBuf,
    pub service_account_pub: PathBuf,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn cert_err(name: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |source| Error::Certificate {
        name: name.to_string(),
        source,
    }
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(crate::io_err("write", path))
}

impl Pki {
    /// Generates a CA, the API server certificate (valid for `server_ips` and the usual
    /// in-cluster names), an admin and an API server kubelet-client certificate, and the
    /// service-account key, all under `dir`.
    pub fn generate(dir: &Path, server_ips: &[IpAddr]) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(crate::io_err("create", dir))?;
        let ca_key = KeyPair::generate().map_err(cert_err("ca"))?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("ca"))?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "strake-testbed-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(cert_err("ca"))?;
        let ca_files = CertFiles {
            cert: dir.join("ca.crt"),
            key: dir.join("ca.key"),
        };
        write(&ca_files.cert, &ca_cert.pem())?;
        write(&ca_files.key, &ca_key.serialize_pem())?;
        let issuer = Issuer::new(ca_params, ca_key);

        let sa_key = KeyPair::generate().map_err(cert_err("service-account"))?;
        let service_account_key = dir.join("sa.key");
        let service_account_pub = dir.join("sa.pub");
        write(&service_account_key, &sa_key.serialize_pem())?;
        write(&service_account_pub, &sa_key.public_key_pem())?;

        let mut pki = Pki {
            dir: dir.to_path_buf(),
            issuer,
            ca: ca_files,
            apiserver: CertFiles {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            admin: CertFiles {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            apiserver_kubelet_client: CertFiles {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            service_account_key,
            service_account_pub,
        };
        let mut sans: Vec<String> = server_ips.iter().map(ToString::to_string).collect();
        sans.extend(
            [
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ]
            .map(String::from),
        );
        pki.apiserver = pki.issue("apiserver", "kube-apiserver", &[], &sans, true)?;
        pki.admin = pki.issue_client("admin", "strake-admin", &["system:masters"])?;
        pki.apiserver_kubelet_client = pki.issue_client(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            &["system:masters"],
        )?;
        Ok(pki)
    }

    /// Issues a client certificate for `common_name` in `groups`, written as `<file>.crt/.key`.
    /// Nodes use `system:node:<name>` in `system:nodes`.
    pub fn issue_client(
        &self,
        file: &str,
        common_name: &str,
        groups: &[&str],
    ) -> Result<CertFiles> {
        self.issue(file, common_name, groups, &[], false)
    }

    /// Issues a serving certificate for `common_name` valid for `sans` (DNS names or IP
    /// addresses), written as `<file>.crt/.key` (a kubelet's 10250, which the API server
    /// verifies against the CA).
    pub fn issue_server(
        &self,
        file: &str,
        common_name: &str,
        sans: &[String],
    ) -> Result<CertFiles> {
        self.issue(file, common_name, &[], sans, true)
    }

    fn issue(
        &self,
        file: &str,
        common_name: &str,
        groups: &[&str],
        sans: &[String],
        server: bool,
    ) -> Result<CertFiles> {
        let key = KeyPair::generate().map_err(cert_err(file))?;
        let mut params = CertificateParams::new(sans.to_vec()).map_err(cert_err(file))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        for g in groups {
            params.distinguished_name.push(DnType::OrganizationName, *g);
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = if server {
            vec![ExtendedKeyUsagePurpose::ServerAuth]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(cert_err(file))?;
        let files = CertFiles {
            cert: self.dir.join(format!("{file}.crt")),
            key: self.dir.join(format!("{file}.key")),
        };
        write(&files.cert, &cert.pem())?;
        write(&files.key, &key.serialize_pem())?;
        Ok(files)
    }

    /// Writes a kubeconfig for `server` authenticating with `client` to `path`.
    pub fn write_kubeconfig(&self, path: &Path, server: &str, client: &CertFiles) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: strake-testbed\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: user\n  user:\n    client-certificate: {cert}\n    client-key: {key}\ncontexts:\n- name: strake-testbed\n  context:\n    cluster: strake-testbed\n    user: user\ncurrent-context: strake-testbed\n",
            ca = self.ca.cert.display(),
            cert = client.cert.display(),
            key = client.key.display(),
        );
        write(path, &text)
    }
}
