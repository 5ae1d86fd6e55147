//! Types and helpers shared by the Strake daemons.
//!
//! - [`cgroups`]: the host's cgroup hierarchies (v1, hybrid, v2), the cgroupfs and systemd
//!   drivers' paths, and the readers of a cgroup's figures (runtime and kubelet).
//! - [`command`]: running a helper program (`nft`, `conntrack`) with bounded output and its
//!   failure in its own words.
//! - [`cri`]: the CRI `runtime.v1` API (messages, the RuntimeService/ImageService clients and
//!   servers), generated from `proto/runtime/v1/api.proto`.
//! - [`duration`]: Go's duration syntax (`1m30s`), which upstream's flags and files use.
//! - [`http`]: the accept loop every HTTP server of the daemons uses (connection cap, header
//!   deadline, accept back-off).
//! - [`kube_client`] (feature `kube`): the API server configuration from `--kubeconfig`.
//! - [`logging`]: the `--log-level`/`--log-format` flags and `tracing` setup every daemon uses.
//! - [`shutdown`]: the stop signal (SIGTERM or SIGINT) every daemon waits for.
//! - [`systemd`] (feature `systemd`): transient units through systemd's manager over D-Bus (the
//!   systemd cgroup driver).
//! - [`notify`]: readiness for systemd's `Type=notify` units (`NOTIFY_SOCKET`, `READY=1`).
//!
//! A newcomer should start with [`cri`] (the contract between kubelet and runtime).

pub mod cgroups;
pub mod command;
pub mod cri;
pub mod duration;
pub mod http;
#[cfg(feature = "kube")]
pub mod kube_client;
pub mod logging;
pub mod notify;
pub mod shutdown;
#[cfg(feature = "systemd")]
pub mod systemd;
