//! The API server configuration of the daemons that talk to it (kubelet, proxy), read as
//! upstream's daemons read theirs: the `--kubeconfig` file when one is named, else inferred
//! (in a pod, its service account; elsewhere `$KUBECONFIG` or `~/.kube/config`).

use std::path::{Path, PathBuf};

/// The configuration could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KubeConfigError {
    /// The named kubeconfig could not be read or parsed.
    #[error("read kubeconfig {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// The kubeconfig was read but names no usable cluster, user or context.
    #[error("load kubeconfig {path}")]
    Load {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No kubeconfig was named, and none could be inferred.
    #[error("no --kubeconfig, and none found in the pod or the environment")]
    Infer(#[source] kube::config::InferConfigError),
}

/// The configuration from `kubeconfig` (its current context), or inferred when `None`.
pub async fn config(kubeconfig: Option<&Path>) -> Result<kube::Config, KubeConfigError> {
    let Some(path) = kubeconfig else {
        return kube::Config::infer().await.map_err(KubeConfigError::Infer);
    };
    let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| KubeConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|source| KubeConfigError::Load {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_named_kubeconfig_is_read_and_a_bad_one_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        std::fs::write(
            &good,
            r#"
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: { server: "https://10.0.0.1:6443", insecure-skip-tls-verify: true }
users:
- name: u
  user: { token: abc }
contexts:
- name: x
  context: { cluster: c, user: u }
current-context: x
"#,
        )
        .unwrap();
        let c = config(Some(&good)).await.unwrap();
        assert_eq!(c.cluster_url.to_string(), "https://10.0.0.1:6443/");

        let missing = dir.path().join("missing");
        let e = config(Some(&missing)).await.unwrap_err();
        assert!(matches!(e, KubeConfigError::Read { .. }), "{e:?}");
        assert!(e.to_string().contains("missing"), "{e}");

        let no_context = dir.path().join("no-context");
        std::fs::write(&no_context, "apiVersion: v1\nkind: Config\n").unwrap();
        let e = config(Some(&no_context)).await.unwrap_err();
        assert!(matches!(e, KubeConfigError::Load { .. }), "{e:?}");
    }
}
