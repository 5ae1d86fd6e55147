//! strake-runtime's configuration: command-line flags over `/etc/strake/runtime.toml` over
//! built-in defaults (the paths DESIGN.md names).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::image::mirror::{Endpoint, Mirrors, parse_mirror_flag};
use crate::image::{PullConfig, UnpackOptions, pull, unpack};
use crate::server::{CgroupDriverKind, DEFAULT_HANDLER};

/// containerd's default streaming server address.
pub const DEFAULT_STREAM_ADDRESS: &str = "127.0.0.1";

/// containerd's default `stream_idle_timeout` (upstream's streaming server default too).
pub const DEFAULT_STREAM_IDLE_TIMEOUT: std::time::Duration =
    std::time::Duration::from_secs(4 * 3600);

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/strake/runtime.toml";

/// The image of infra containers unless configured: the pause image of the Kubernetes version
/// this runtime is tested with (kubeadm's `PauseVersion` of v1.37.2).
pub const DEFAULT_SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.10.2";

/// Flags of `strake-runtime`. Every setting may also come from the configuration file; a flag
/// given on the command line wins.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Flags {
    /// TOML configuration file (missing file = defaults, unless given explicitly).
    #[arg(long = "config")]
    pub config: Option<PathBuf>,
    /// Unix socket to serve CRI on.
    #[arg(long)]
    pub listen: Option<PathBuf>,
    /// Persistent state (images, sandbox and container records).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Runtime files (namespace pins, shm mounts, sockets); tmpfs in production.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// CNI network configuration directory.
    #[arg(long)]
    pub cni_conf_dir: Option<PathBuf>,
    /// CNI plugin directories, searched in order (repeatable).
    #[arg(long = "cni-bin-dir")]
    pub cni_bin_dirs: Vec<PathBuf>,
    /// OCI runtime for a RuntimeClass handler, `NAME=PATH` (repeatable); `runc` is the default
    /// handler.
    #[arg(long = "runtime-handler", value_parser = parse_handler)]
    pub runtime_handlers: Vec<(String, PathBuf)>,
    /// A global option given to a handler's OCI runtime before every command, `NAME=OPTION`
    /// (repeatable, in order; e.g. `gvisor=--platform=ptrace`). Flags for a handler replace the
    /// file's options of that handler.
    #[arg(long = "runtime-handler-option", value_parser = parse_handler_option)]
    pub runtime_handler_options: Vec<(String, String)>,
    /// A handler whose pods each get an infra container of the sandbox image, run by the
    /// handler's runtime (repeatable). gVisor needs one: it starts a pod's sandbox with it.
    #[arg(long = "infra-container-handler")]
    pub infra_container_handlers: Vec<String>,
    /// The image of infra containers (containerd's `sandbox_image`).
    #[arg(long)]
    pub sandbox_image: Option<String>,
    /// Registries reached over plain HTTP or without TLS verification (repeatable, `host[:port]`).
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
    /// A mirror of a registry, `REGISTRY=ENDPOINT` with ENDPOINT `[http://|https://]host[:port]`
    /// (repeatable; tried in the order given, before the registry itself). Flags for a
    /// registry replace the file's mirrors of that registry.
    #[arg(long = "registry-mirror", value_parser = parse_mirror_flag)]
    pub registry_mirrors: Vec<(String, Endpoint)>,
    /// cgroup driver reported to the kubelet and used for containers.
    #[arg(long, value_enum)]
    pub cgroup_driver: Option<CgroupDriverKind>,
    /// cgroup parent of pods whose RunPodSandbox names none (default: `/strake` with the
    /// cgroupfs driver, `system.slice` with systemd).
    #[arg(long)]
    pub default_cgroup_parent: Option<String>,
    /// The `strake-pause` binary (default: next to this executable).
    #[arg(long)]
    pub pause_binary: Option<PathBuf>,
    /// Address of the streaming server (exec, attach, port-forward); containerd's
    /// `stream_server_address`, default 127.0.0.1 (the kubelet proxies streams).
    #[arg(long)]
    pub stream_address: Option<String>,
    /// Port of the streaming server; containerd's `stream_server_port`, default 0 (random).
    #[arg(long)]
    pub stream_port: Option<u16>,
    /// Close streaming connections idle this long (Go duration, e.g. `4h`, `30m`; `0`:
    /// never); containerd's `stream_idle_timeout`, default 4h.
    #[arg(long, value_parser = strake_types::duration::parse)]
    pub stream_idle_timeout: Option<std::time::Duration>,
}

fn de_duration<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<std::time::Duration>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    s.map(|s| strake_types::duration::parse(&s).map_err(serde::de::Error::custom))
        .transpose()
}

fn parse_handler_option(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, option)) if !name.is_empty() && !option.is_empty() => {
            Ok((name.to_string(), option.to_string()))
        }
        _ => Err(format!("expected NAME=OPTION, got {s:?}")),
    }
}

/// The OCI runtime behind a RuntimeClass handler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeHandler {
    /// The binary, which speaks runc's command line: `runc`, `/usr/bin/crun`, `/usr/bin/runsc`.
    pub binary: PathBuf,
    /// Global options placed before every command (runsc's `--platform=ptrace`, say).
    pub options: Vec<String>,
    /// Each pod of this handler gets an infra container of the sandbox image, run by this
    /// runtime and annotated `container-type: sandbox`: runtimes that hold a pod's containers
    /// in one sandbox (gVisor) start it with that container and add the others to it.
    pub infra_container: bool,
}

impl RuntimeHandler {
    /// A runtime run with no options of its own.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        RuntimeHandler {
            binary: binary.into(),
            options: Vec::new(),
            infra_container: false,
        }
    }
}

/// A `[runtime_handlers]` entry: a path, or a table with the path and the runtime's options.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(
    untagged,
    expecting = "a path, or a table { path = \"...\", options = [\"...\"], infra_container = true }"
)]
pub enum HandlerEntry {
    Path(PathBuf),
    Table(HandlerTable),
}

/// The table form of a `[runtime_handlers]` entry.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HandlerTable {
    pub path: PathBuf,
    #[serde(default)]
    pub options: Vec<String>,
    #[serde(default)]
    pub infra_container: bool,
}

impl From<HandlerEntry> for RuntimeHandler {
    fn from(e: HandlerEntry) -> Self {
        match e {
            HandlerEntry::Path(path) => RuntimeHandler::new(path),
            HandlerEntry::Table(t) => RuntimeHandler {
                binary: t.path,
                options: t.options,
                infra_container: t.infra_container,
            },
        }
    }
}

fn parse_handler(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PATH, got {s:?}"))?;
    if name.is_empty() || path.is_empty() {
        return Err(format!("expected NAME=PATH, got {s:?}"));
    }
    Ok((name.to_string(), PathBuf::from(path)))
}

/// The configuration file's contents (all optional).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct FileConfig {
    pub listen: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub cni_conf_dir: Option<PathBuf>,
    pub cni_bin_dirs: Option<Vec<PathBuf>>,
    pub runtime_handlers: Option<BTreeMap<String, HandlerEntry>>,
    pub sandbox_image: Option<String>,
    pub insecure_registries: Option<Vec<String>>,
    /// `[registry_mirrors]` table: registry host = list of endpoints.
    pub registry_mirrors: Option<Mirrors>,
    pub cgroup_driver: Option<CgroupDriverKind>,
    pub default_cgroup_parent: Option<String>,
    pub pause_binary: Option<PathBuf>,
    pub stream_server_address: Option<String>,
    pub stream_server_port: Option<u16>,
    #[serde(default, deserialize_with = "de_duration")]
    pub stream_idle_timeout: Option<std::time::Duration>,
    /// containerd's key: a pull fails when no response or data came for this long.
    #[serde(default, deserialize_with = "de_duration")]
    pub image_pull_progress_timeout: Option<std::time::Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    pub image_pull_timeout: Option<std::time::Duration>,
    pub image_max_unpacked_bytes: Option<u64>,
    pub image_max_entries: Option<u64>,
    pub image_max_path_depth: Option<usize>,
}

/// The effective configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub listen: PathBuf,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dirs: Vec<PathBuf>,
    pub runtime_handlers: BTreeMap<String, RuntimeHandler>,
    /// The image infra containers run.
    pub sandbox_image: String,
    pub insecure_registries: Vec<String>,
    pub registry_mirrors: Mirrors,
    pub cgroup_driver: CgroupDriverKind,
    /// Empty: the driver's default.
    pub default_cgroup_parent: String,
    pub pause_binary: PathBuf,
    pub stream_server_address: String,
    pub stream_server_port: u16,
    /// Zero: never.
    pub stream_idle_timeout: std::time::Duration,
    /// A pull fails when no response or blob data arrived for this long.
    pub image_pull_progress_timeout: std::time::Duration,
    /// A whole pull (manifests, every layer, unpacking) fails after this long.
    pub image_pull_timeout: std::time::Duration,
    /// Most uncompressed bytes of one image's layers together.
    pub image_max_unpacked_bytes: u64,
    /// Most tar entries of one image's layers together.
    pub image_max_entries: u64,
    /// Most path components of one layer entry.
    pub image_max_path_depth: usize,
}

/// The configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration file {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{flag} names {name:?}, which is not a configured runtime handler")]
    UnknownHandler { flag: &'static str, name: String },
}

impl Config {
    /// Flags over the file over defaults.
    pub fn load(flags: &Flags) -> Result<Self, ConfigError> {
        let path = flags
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_FILE));
        let file = match std::fs::read_to_string(&path) {
            Ok(text) => {
                toml::from_str(&text).map_err(|source| ConfigError::Parse { path, source })?
            }
            // Only the default location may be missing: an explicit --config must exist.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && flags.config.is_none() => {
                FileConfig::default()
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let config = Self::merge(flags, file);
        let named = flags
            .runtime_handler_options
            .iter()
            .map(|(name, _)| ("--runtime-handler-option", name))
            .chain(
                flags
                    .infra_container_handlers
                    .iter()
                    .map(|name| ("--infra-container-handler", name)),
            );
        for (flag, name) in named {
            if !config.runtime_handlers.contains_key(name) {
                return Err(ConfigError::UnknownHandler {
                    flag,
                    name: name.clone(),
                });
            }
        }
        Ok(config)
    }

    fn merge(flags: &Flags, file: FileConfig) -> Self {
        let mut handlers = BTreeMap::from([
            (DEFAULT_HANDLER.to_string(), RuntimeHandler::new("runc")),
            ("crun".to_string(), RuntimeHandler::new("crun")),
        ]);
        handlers.extend(
            file.runtime_handlers
                .unwrap_or_default()
                .into_iter()
                .map(|(name, entry)| (name, entry.into())),
        );
        // A flag's path keeps what the file says of that handler besides its path.
        for (name, path) in &flags.runtime_handlers {
            handlers
                .entry(name.clone())
                .and_modify(|h| h.binary = path.clone())
                .or_insert_with(|| RuntimeHandler::new(path));
        }
        for name in flags.runtime_handler_options.iter().map(|(n, _)| n) {
            if let Some(h) = handlers.get_mut(name) {
                h.options.clear();
            }
        }
        for (name, option) in &flags.runtime_handler_options {
            if let Some(h) = handlers.get_mut(name) {
                h.options.push(option.clone());
            }
        }
        for name in &flags.infra_container_handlers {
            if let Some(h) = handlers.get_mut(name) {
                h.infra_container = true;
            }
        }
        let non_empty = |v: &Vec<PathBuf>| (!v.is_empty()).then(|| v.clone());
        let mut registry_mirrors = file.registry_mirrors.unwrap_or_default();
        for registry in flags.registry_mirrors.iter().map(|(r, _)| r) {
            registry_mirrors.remove(registry);
        }
        for (registry, endpoint) in &flags.registry_mirrors {
            registry_mirrors
                .entry(registry.clone())
                .or_default()
                .push(endpoint.clone());
        }
        Config {
            listen: flags
                .listen
                .clone()
                .or(file.listen)
                .unwrap_or_else(|| "/run/strake/runtime.sock".into()),
            state_dir: flags
                .state_dir
                .clone()
                .or(file.state_dir)
                .unwrap_or_else(|| "/var/lib/strake/runtime".into()),
            run_dir: flags
                .run_dir
                .clone()
                .or(file.run_dir)
                .unwrap_or_else(|| "/run/strake/runtime".into()),
            cni_conf_dir: flags
                .cni_conf_dir
                .clone()
                .or(file.cni_conf_dir)
                .unwrap_or_else(|| "/etc/cni/net.d".into()),
            cni_bin_dirs: non_empty(&flags.cni_bin_dirs)
                .or(file.cni_bin_dirs)
                .unwrap_or_else(|| vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()]),
            runtime_handlers: handlers,
            sandbox_image: flags
                .sandbox_image
                .clone()
                .or(file.sandbox_image)
                .unwrap_or_else(|| DEFAULT_SANDBOX_IMAGE.into()),
            insecure_registries: if flags.insecure_registries.is_empty() {
                file.insecure_registries.unwrap_or_default()
            } else {
                flags.insecure_registries.clone()
            },
            registry_mirrors,
            cgroup_driver: flags
                .cgroup_driver
                .or(file.cgroup_driver)
                .unwrap_or(CgroupDriverKind::Cgroupfs),
            default_cgroup_parent: flags
                .default_cgroup_parent
                .clone()
                .or(file.default_cgroup_parent)
                .unwrap_or_default(),
            pause_binary: flags
                .pause_binary
                .clone()
                .or(file.pause_binary)
                .unwrap_or_else(default_pause_binary),
            stream_server_address: flags
                .stream_address
                .clone()
                .or(file.stream_server_address)
                .unwrap_or_else(|| DEFAULT_STREAM_ADDRESS.into()),
            stream_server_port: flags.stream_port.or(file.stream_server_port).unwrap_or(0),
            stream_idle_timeout: flags
                .stream_idle_timeout
                .or(file.stream_idle_timeout)
                .unwrap_or(DEFAULT_STREAM_IDLE_TIMEOUT),
            // Zero would fail every pull at once: it means the default, as in containerd.
            image_pull_progress_timeout: file
                .image_pull_progress_timeout
                .filter(|d| !d.is_zero())
                .unwrap_or(pull::DEFAULT_PULL_PROGRESS_TIMEOUT),
            image_pull_timeout: file
                .image_pull_timeout
                .filter(|d| !d.is_zero())
                .unwrap_or(pull::DEFAULT_PULL_TIMEOUT),
            image_max_unpacked_bytes: file
                .image_max_unpacked_bytes
                .unwrap_or(unpack::DEFAULT_MAX_UNPACKED_BYTES),
            image_max_entries: file
                .image_max_entries
                .unwrap_or(unpack::DEFAULT_MAX_ENTRIES),
            image_max_path_depth: file
                .image_max_path_depth
                .unwrap_or(unpack::DEFAULT_MAX_PATH_DEPTH),
        }
    }
}

impl Config {
    /// How the image service pulls and unpacks, from this configuration.
    pub fn pull_config(&self) -> PullConfig {
        PullConfig {
            insecure_registries: self.insecure_registries.clone(),
            mirrors: self.registry_mirrors.clone(),
            request_timeout: self.image_pull_progress_timeout,
            pull_timeout: self.image_pull_timeout,
            unpack: UnpackOptions {
                max_size: self.image_max_unpacked_bytes,
                max_entries: self.image_max_entries,
                max_depth: self.image_max_path_depth,
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

fn default_pause_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("strake-pause")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| Path::new("/usr/local/bin/strake-pause").to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_cgroup_parent_comes_from_the_flag_or_the_file() {
        let file: FileConfig = toml::from_str("default_cgroup_parent = \"/pods\"\n").unwrap();
        let flags = Flags {
            default_cgroup_parent: Some("/mine".into()),
            ..Flags::default()
        };
        assert_eq!(
            Config::merge(&flags, file.clone()).default_cgroup_parent,
            "/mine"
        );
        assert_eq!(
            Config::merge(&Flags::default(), file).default_cgroup_parent,
            "/pods"
        );
        let c = Config::merge(&Flags::default(), FileConfig::default());
        assert_eq!(c.default_cgroup_parent, "");
    }

    #[test]
    fn defaults_follow_the_design() {
        let c = Config::merge(&Flags::default(), FileConfig::default());
        assert_eq!(c.listen, PathBuf::from("/run/strake/runtime.sock"));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/strake/runtime"));
        assert_eq!(c.cni_conf_dir, PathBuf::from("/etc/cni/net.d"));
        assert_eq!(
            c.cni_bin_dirs,
            vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]
        );
        assert_eq!(c.runtime_handlers["runc"], RuntimeHandler::new("runc"));
        assert_eq!(c.runtime_handlers["crun"], RuntimeHandler::new("crun"));
        assert_eq!(c.cgroup_driver, CgroupDriverKind::Cgroupfs);
        assert_eq!(c.stream_server_address, "127.0.0.1");
        assert_eq!(c.stream_server_port, 0);
        assert_eq!(c.stream_idle_timeout, DEFAULT_STREAM_IDLE_TIMEOUT);
    }

    #[test]
    fn durations_in_the_file_parse_like_go() {
        use std::time::Duration;
        let file: FileConfig = toml::from_str("stream_idle_timeout = \"30m\"").unwrap();
        assert_eq!(file.stream_idle_timeout, Some(Duration::from_secs(1800)));
        assert!(toml::from_str::<FileConfig>("stream_idle_timeout = \"soon\"").is_err());
    }

    #[test]
    fn stream_server_settings_come_from_flags_or_the_file() {
        let file: FileConfig =
            toml::from_str("stream_server_address = \"10.0.0.5\"\nstream_server_port = 10010\n")
                .unwrap();
        let c = Config::merge(&Flags::default(), file.clone());
        assert_eq!(
            (c.stream_server_address.as_str(), c.stream_server_port),
            ("10.0.0.5", 10010)
        );
        let flags = Flags {
            stream_address: Some("::1".into()),
            stream_port: Some(1),
            ..Default::default()
        };
        let c = Config::merge(&flags, file);
        assert_eq!(
            (c.stream_server_address.as_str(), c.stream_server_port),
            ("::1", 1)
        );
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let file: FileConfig = toml::from_str(
            r#"
            listen = "/tmp/file.sock"
            state_dir = "/tmp/state"
            cgroup_driver = "systemd"
            insecure_registries = ["10.0.0.1:5000"]
            [runtime_handlers]
            kata = "/opt/kata/bin/kata-runtime"
            "#,
        )
        .unwrap();
        let flags = Flags {
            listen: Some("/tmp/flag.sock".into()),
            runtime_handlers: vec![("runc".into(), "/usr/sbin/runc".into())],
            ..Default::default()
        };
        let c = Config::merge(&flags, file);
        assert_eq!(c.listen, PathBuf::from("/tmp/flag.sock"));
        assert_eq!(c.state_dir, PathBuf::from("/tmp/state"));
        assert_eq!(c.cgroup_driver, CgroupDriverKind::Systemd);
        assert_eq!(c.insecure_registries, vec!["10.0.0.1:5000".to_string()]);
        assert_eq!(
            c.runtime_handlers["kata"],
            RuntimeHandler::new("/opt/kata/bin/kata-runtime")
        );
        assert_eq!(
            c.runtime_handlers["runc"],
            RuntimeHandler::new("/usr/sbin/runc")
        );
    }

    #[test]
    fn registry_mirrors_from_the_file_and_flags() {
        let file: FileConfig = toml::from_str(
            r#"
            [registry_mirrors]
            "registry.k8s.io" = ["http://10.0.0.1:5000", "https://mirror.example.com"]
            "docker.io" = ["mirror.example.com"]
            "#,
        )
        .unwrap();
        let ep = |s| Endpoint::parse(s).unwrap();
        let c = Config::merge(&Flags::default(), file.clone());
        assert_eq!(
            c.registry_mirrors["registry.k8s.io"],
            [ep("http://10.0.0.1:5000"), ep("mirror.example.com")]
        );
        assert_eq!(c.registry_mirrors["docker.io"], [ep("mirror.example.com")]);
        // Flags for a registry replace the file's list for it, in the order given.
        let flags = Flags {
            registry_mirrors: vec![
                parse_mirror_flag("docker.io=http://10.0.0.2:5000").unwrap(),
                parse_mirror_flag("gcr.io=http://10.0.0.3").unwrap(),
                parse_mirror_flag("docker.io=http://10.0.0.4").unwrap(),
            ],
            ..Default::default()
        };
        let c = Config::merge(&flags, file);
        assert_eq!(c.registry_mirrors.len(), 3);
        assert_eq!(
            c.registry_mirrors["docker.io"],
            [ep("http://10.0.0.2:5000"), ep("http://10.0.0.4")]
        );
        assert_eq!(c.registry_mirrors["gcr.io"], [ep("http://10.0.0.3")]);
        assert_eq!(c.registry_mirrors["registry.k8s.io"].len(), 2);
        assert!(
            toml::from_str::<FileConfig>("[registry_mirrors]\n\"x.io\" = [\"http://m/path\"]")
                .is_err()
        );
    }

    #[test]
    fn unknown_file_keys_and_bad_handler_flags_are_errors() {
        assert!(toml::from_str::<FileConfig>("lisen = \"/x\"").is_err());
        assert!(parse_handler("runc").is_err());
        assert!(parse_handler("=x").is_err());
        assert_eq!(
            parse_handler("crun=/usr/bin/crun").unwrap().1,
            PathBuf::from("/usr/bin/crun")
        );
    }

    #[test]
    fn handlers_take_global_options_from_the_file_or_flags() {
        let file: FileConfig = toml::from_str(
            r#"
            [runtime_handlers]
            gvisor = { path = "/usr/bin/runsc", options = ["--platform=ptrace", "--debug"] }
            kata = "/opt/kata/bin/kata-runtime"
            "#,
        )
        .unwrap();
        let c = Config::merge(&Flags::default(), file.clone());
        assert_eq!(
            c.runtime_handlers["gvisor"],
            RuntimeHandler {
                binary: "/usr/bin/runsc".into(),
                options: vec!["--platform=ptrace".into(), "--debug".into()],
                infra_container: false,
            }
        );
        assert!(c.runtime_handlers["kata"].options.is_empty());
        // A flag's path keeps the file's options; flag options replace them.
        let flags = Flags {
            runtime_handlers: vec![("gvisor".into(), "/opt/runsc".into())],
            ..Default::default()
        };
        let c = Config::merge(&flags, file.clone());
        assert_eq!(
            c.runtime_handlers["gvisor"].binary,
            PathBuf::from("/opt/runsc")
        );
        assert_eq!(c.runtime_handlers["gvisor"].options.len(), 2);
        let flags = Flags {
            runtime_handler_options: vec![("gvisor".into(), "--platform=kvm".into())],
            ..Default::default()
        };
        let c = Config::merge(&flags, file);
        assert_eq!(c.runtime_handlers["gvisor"].options, vec!["--platform=kvm"]);

        // Infra containers: from the table or the flag, and the image they run.
        let file: FileConfig = toml::from_str(
            r#"
            sandbox_image = "10.0.0.1:5000/pause:3.10.2"
            [runtime_handlers]
            gvisor = { path = "/usr/bin/runsc", infra_container = true }
            "#,
        )
        .unwrap();
        let c = Config::merge(&Flags::default(), file);
        assert!(c.runtime_handlers["gvisor"].infra_container);
        assert!(!c.runtime_handlers["runc"].infra_container);
        assert_eq!(c.sandbox_image, "10.0.0.1:5000/pause:3.10.2");
        let flags = Flags {
            infra_container_handlers: vec!["crun".into()],
            ..Default::default()
        };
        let c = Config::merge(&flags, FileConfig::default());
        assert!(c.runtime_handlers["crun"].infra_container);
        assert_eq!(c.sandbox_image, DEFAULT_SANDBOX_IMAGE);

        // An option for a handler nobody configured is an error, not silently dropped.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runtime.toml");
        std::fs::write(&path, "").unwrap();
        let flags = Flags {
            config: Some(path),
            runtime_handler_options: vec![("gvisr".into(), "--platform=ptrace".into())],
            ..Default::default()
        };
        assert!(matches!(
            Config::load(&flags),
            Err(ConfigError::UnknownHandler { name, .. }) if name == "gvisr"
        ));
        assert!(parse_handler_option("gvisor").is_err());
        assert!(parse_handler_option("gvisor=").is_err());
        assert_eq!(
            parse_handler_option("gvisor=--platform=ptrace").unwrap(),
            ("gvisor".to_string(), "--platform=ptrace".to_string())
        );
        // A table with a misspelt key is refused.
        let bad = toml::from_str::<FileConfig>(
            "[runtime_handlers]\ngvisor = { path = \"/usr/bin/runsc\", option = [] }\n",
        );
        assert!(bad.is_err());
    }

    #[test]
    fn the_shipped_example_file_parses_and_states_the_defaults() {
        let file: FileConfig =
            toml::from_str(include_str!("../../../manifests/runtime/runtime.toml")).unwrap();
        let mut from_file = Config::merge(&Flags::default(), file);
        let defaults = Config::merge(&Flags::default(), FileConfig::default());
        from_file.pause_binary = defaults.pause_binary.clone();
        assert_eq!(from_file, defaults);
    }

    #[test]
    fn image_pull_limits_come_from_the_file() {
        use std::time::Duration;
        let c = Config::merge(&Flags::default(), FileConfig::default());
        let p = c.pull_config();
        assert_eq!(p.request_timeout, Duration::from_secs(60));
        assert_eq!(p.pull_timeout, Duration::from_secs(1800));
        assert_eq!(p.unpack.max_size, 16 << 30);
        assert_eq!(p.unpack.max_entries, 1_000_000);
        assert_eq!(p.unpack.max_depth, 128);
        let file: FileConfig = toml::from_str(
            r#"
            image_pull_progress_timeout = "5m"
            image_pull_timeout = "2h"
            image_max_unpacked_bytes = 1048576
            image_max_entries = 100
            image_max_path_depth = 8
            insecure_registries = ["127.0.0.1:5000"]
            "#,
        )
        .unwrap();
        let p = Config::merge(&Flags::default(), file).pull_config();
        assert_eq!(p.request_timeout, Duration::from_secs(300));
        assert_eq!(p.pull_timeout, Duration::from_secs(7200));
        assert_eq!(
            (p.unpack.max_size, p.unpack.max_entries, p.unpack.max_depth),
            (1 << 20, 100, 8)
        );
        assert!(!p.unpack.allow_devices);
        assert_eq!(p.insecure_registries, ["127.0.0.1:5000"]);
        let zero: FileConfig = toml::from_str("image_pull_timeout = \"0\"").unwrap();
        assert_eq!(
            Config::merge(&Flags::default(), zero).image_pull_timeout,
            Duration::from_secs(1800)
        );
        assert!(toml::from_str::<FileConfig>("image_max_entries = -1").is_err());
    }

    #[test]
    fn an_explicit_missing_config_file_is_an_error() {
        let flags = Flags {
            config: Some("/nonexistent/strake.toml".into()),
            ..Default::default()
        };
        assert!(matches!(
            Config::load(&flags),
            Err(ConfigError::Read { .. })
        ));
    }
}
