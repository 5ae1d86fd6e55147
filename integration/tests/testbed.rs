//! The test bed itself works: a real control plane, node namespaces on the cluster network, the
//! local registry with every test image, and the upstream tools from the cache.
//!
//! These tests need root and `make testbed` (which `make test` runs first).

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use strake_integration::control_plane::{ControlPlane, Options};
use strake_integration::netns::ClusterNet;
use strake_integration::process::pid_alive;
use strake_integration::registry::{self, Registry};
use strake_integration::{paths, process};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info,kube_client=off")
        .try_init();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_stores_a_node_and_tears_down_completely() {
    init_tracing();
    let cp = ControlPlane::start(Options::default())
        .await
        .expect("control plane starts");
    let nodes: Api<Node> = Api::all(cp.client().await.expect("client"));

    let mut node = Node::default();
    node.metadata.name = Some("strake-test-node".into());
    node.metadata.labels = Some(
        [(
            "kubernetes.io/hostname".to_string(),
            "strake-test-node".to_string(),
        )]
        .into(),
    );
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("create node");

    let back = nodes.get("strake-test-node").await.expect("read node back");
    assert_eq!(back.metadata.name.as_deref(), Some("strake-test-node"));
    assert_eq!(
        back.metadata
            .labels
            .unwrap_or_default()
            .get("kubernetes.io/hostname")
            .map(String::as_str),
        Some("strake-test-node")
    );
    assert!(back.metadata.uid.is_some(), "the API server assigns a UID");

    // The controller-manager runs too: it allocates the node a Pod CIDR from the cluster CIDR.
    let mut pod_cidr = None;
    for _ in 0..100 {
        pod_cidr = nodes
            .get("strake-test-node")
            .await
            .ok()
            .and_then(|n| n.spec?.pod_cidr);
        if pod_cidr.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let pod_cidr = pod_cidr.expect("controller-manager allocates a pod CIDR");
    assert!(pod_cidr.starts_with("10.244."), "{pod_cidr}");

    let pids = cp.pids();
    let dir = cp.dir().to_path_buf();
    let ns_path = cp.net().ns().path();
    assert_eq!(
        pids.len(),
        4,
        "etcd, apiserver, controller-manager, scheduler"
    );
    assert!(pids.iter().all(|p| pid_alive(*p)));
    drop(cp);
    for pid in pids {
        assert!(!pid_alive(pid), "process {pid} outlived the control plane");
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(!ns_path.exists(), "{} left behind", ns_path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_namespace_reaches_api_server_and_leaves_nothing() {
    init_tracing();
    let cp = ControlPlane::start(Options {
        controllers: false,
        ..Options::default()
    })
    .await
    .expect("control plane starts");
    let kubectl = paths::kubernetes_bin("kubectl").expect("kubectl");
    let mut node = cp.net().add_node(0).expect("node namespace");
    assert_eq!(node.ip().to_string(), "10.213.0.10");

    // From inside the node: TLS to the API server's cluster address, authenticated as the node.
    let kubeconfig = cp.node_kubeconfig("node-0").expect("node kubeconfig");
    let out = node
        .ns()
        .run(
            kubectl.to_str().expect("utf-8 path"),
            &[
                "--kubeconfig",
                kubeconfig.to_str().expect("utf-8 path"),
                "get",
                "--raw",
                "/readyz",
            ],
        )
        .expect("kubectl inside the node namespace");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    let out = node
        .ns()
        .run(
            kubectl.to_str().expect("utf-8 path"),
            &[
                "--kubeconfig",
                kubeconfig.to_str().expect("utf-8 path"),
                "auth",
                "whoami",
                "-o",
                "jsonpath={.status.userInfo.username}",
            ],
        )
        .expect("whoami");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "system:node:node-0"
    );

    // The node namespace is its own world: the root namespace's loopback is not there.
    let root_fwd = cp.kubeconfig().to_path_buf();
    let unreachable = node.ns().run(
        kubectl.to_str().expect("utf-8 path"),
        &[
            "--kubeconfig",
            root_fwd.to_str().expect("utf-8 path"),
            "get",
            "--raw",
            "/readyz",
            "--request-timeout=3s",
        ],
    );
    assert!(
        unreachable.is_err(),
        "root-namespace loopback must not be reachable from a node"
    );

    let sleeper = node
        .spawn(
            "sleep",
            std::path::Path::new("/bin/sleep"),
            &["1000"],
            &cp.dir().join("sleep.log"),
        )
        .expect("daemon in node");
    let ino = node.ns().inode().expect("inode");
    // nsenter enters the namespace just after fork: give it a moment before looking.
    let mut inside = false;
    for _ in 0..100 {
        inside = node.ns().pids().expect("pids").contains(&sleeper);
        if inside {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(inside, "daemon {sleeper} is not in the node namespace");
    let ns_path = node.ns().path();
    let veth = node.cluster_veth().to_string();
    cp.net()
        .ns()
        .ip(&["link", "show", &veth])
        .expect("veth end in the cluster namespace");

    drop(node);
    assert!(!ns_path.exists(), "{} left behind", ns_path.display());
    assert!(
        !pid_alive(sleeper),
        "node daemon {sleeper} survived teardown"
    );
    assert!(
        strake_integration::netns::pids_in_netns(ino).is_empty(),
        "a process still lives in the node's network namespace"
    );
    assert!(
        cp.net().ns().ip(&["link", "show", &veth]).is_err(),
        "veth {veth} left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_serves_every_test_image_and_guards_the_protected_one() {
    init_tracing();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let images = registry::test_images().expect("images.txt");
    for want in [
        "strake/busybox:1",
        "strake/multilayer:1",
        "strake/multiarch:1",
        "strake/http:1",
        "strake/pause:1",
    ] {
        assert!(
            images.iter().any(|i| i.name == want && !i.protected),
            "{want} missing"
        );
    }
    assert!(images.iter().any(|i| i.protected), "no protected image");

    let net = ClusterNet::create().expect("cluster net");
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = Registry::start(&net, dir.path()).expect("registry");
    // oci-client remembers credentials per registry, so each refusal check gets a fresh client.
    let new_client = || {
        oci_client::Client::new(oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::Http,
            ..Default::default()
        })
    };
    let client = new_client();
    let anonymous = oci_client::secrets::RegistryAuth::Anonymous;
    let basic = oci_client::secrets::RegistryAuth::Basic(
        registry::USER.to_string(),
        registry::PASSWORD.to_string(),
    );
    for image in &images {
        let addr = if image.protected {
            reg.protected_local()
        } else {
            reg.open_local()
        };
        let reference: oci_client::Reference =
            format!("{addr}/{}", image.name).parse().expect("reference");
        let auth = if image.protected { &basic } else { &anonymous };
        let (manifest, digest) = client
            .pull_manifest(&reference, auth)
            .await
            .unwrap_or_else(|e| panic!("pull manifest of {}: {e}", image.name));
        assert_eq!(digest, image.digest, "{}", image.name);
        match manifest {
            oci_client::manifest::OciManifest::Image(m) => {
                assert!(!m.layers.is_empty(), "{} has no layers", image.name);
                if image.name == "strake/multilayer:1" {
                    assert!(
                        m.layers.len() >= 4,
                        "multilayer has {} layers",
                        m.layers.len()
                    );
                }
            }
            oci_client::manifest::OciManifest::ImageIndex(index) => {
                assert_eq!(image.name, "strake/multiarch:1");
                let arches: Vec<String> = index
                    .manifests
                    .iter()
                    .filter_map(|m| m.platform.as_ref().map(|p| p.architecture.to_string()))
                    .collect();
                assert!(
                    arches.len() >= 2 && arches.contains(&"amd64".to_string()),
                    "{arches:?}"
                );
            }
        }
        if image.protected {
            // Anonymous access and a wrong password are refused.
            let refused = new_client().pull_manifest(&reference, &anonymous).await;
            assert!(
                refused.is_err(),
                "protected image served without credentials"
            );
            let bad =
                oci_client::secrets::RegistryAuth::Basic(registry::USER.into(), "wrong".into());
            let refused = new_client().pull_manifest(&reference, &bad).await;
            assert!(refused.is_err(), "wrong password accepted");
        }
    }
    // The images are reachable from a node, as a runtime there would pull them.
    let node = net.add_node(1).expect("node");
    let status = node
        .ns()
        .run(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{}/v2/", reg.open_in_cluster()),
            ],
        )
        .expect("curl from node");
    assert_eq!(String::from_utf8_lossy(&status.stdout), "200");
    drop(node);
}

#[test]
fn upstream_tools_run_from_the_cache() {
    let v = paths::Versions::pinned();
    let crictl = paths::cri_tools_bin("crictl").expect("crictl");
    let out = process::run(std::process::Command::new(&crictl).arg("--version"))
        .expect("crictl --version");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&v.cri_tools), "crictl --version: {text}");

    let critest = paths::cri_tools_bin("critest").expect("critest");
    let out = std::process::Command::new(&critest)
        .arg("--help")
        .output()
        .expect("critest --help");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("runtime-endpoint"), "critest --help: {text}");
    assert!(text.contains("ginkgo.focus"), "critest --help: {text}");

    for (name, bin) in [
        ("kube-apiserver", paths::kubernetes_bin("kube-apiserver")),
        ("kubelet", paths::kubernetes_bin("kubelet")),
        ("kube-proxy", paths::kubernetes_bin("kube-proxy")),
    ] {
        let out = process::run(std::process::Command::new(bin.expect(name)).arg("--version"))
            .unwrap_or_else(|e| panic!("{name} --version: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&v.kubernetes), "{name} --version: {text}");
    }
    let out =
        process::run(std::process::Command::new(paths::etcd_bin().expect("etcd")).arg("--version"))
            .expect("etcd --version");
    assert!(String::from_utf8_lossy(&out.stdout).contains(v.etcd.trim_start_matches('v')));
    for plugin in ["bridge", "host-local", "loopback", "portmap"] {
        assert!(
            paths::cni_bin_dir().expect("cni dir").join(plugin).exists(),
            "CNI plugin {plugin}"
        );
    }
}
