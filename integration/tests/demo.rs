//! `make demo` works: a Strake node (strake-runtime, strake-kubelet, strake-proxy) on the test
//! bed's control plane serves a three-pod Deployment behind a NodePort Service, reached through
//! its ClusterIP from the node and through its NodePort from outside.

use strake_integration::demo;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_a_deployment_behind_a_service() {
    let mut narration = Vec::new();
    let (running, report) = demo::run(&mut narration).await.unwrap_or_else(|e| {
        panic!(
            "demo failed: {e:?}\n{}",
            String::from_utf8_lossy(&narration)
        )
    });
    assert_eq!(report.pods.len(), 3, "{report:?}");
    for ip in report.pods.values() {
        assert!(
            ip.starts_with("10.88.0."),
            "pod IP from the node's CNI bridge: {report:?}"
        );
    }
    let answers: usize = report.cluster_ip_answers.values().sum();
    assert!(
        answers > 0 && report.cluster_ip_answers.len() >= 2,
        "{report:?}"
    );
    for answer in report
        .cluster_ip_answers
        .keys()
        .chain([&report.node_port_answer])
    {
        let pod = answer
            .strip_prefix("hello from ")
            .expect("a pod's greeting");
        assert!(
            report.pods.contains_key(pod),
            "{answer:?} is not from a Deployment pod: {report:?}"
        );
    }
    assert!(report.node_port > 0, "{report:?}");
    let first = report.pods.keys().next().expect("a pod");
    assert_eq!(report.log, format!("{first} serving on :8080"));
    drop(running);
}
