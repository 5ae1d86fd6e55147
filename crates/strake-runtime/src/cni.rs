//! CNI: the plugins that give each pod sandbox its network.
//!
//! The runtime reads the first network configuration in the configured directory (a `.conflist`,
//! or a single-plugin `.conf`/`.json`, in lexical order as libcni and containerd do) and runs its
//! plugins as the CNI specification says: ADD in list order with each result passed to the next
//! as `prevResult`, DEL in reverse order, CHECK in order. Plugins are found in the configured
//! binary directories. The [`PluginExec`] trait is the only place that spawns a plugin.
//!
//! Written by hand rather than with a crate: the crates on crates.io implement the plugin side
//! of CNI, not the runtime side that libcni covers in Go.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A failed CNI operation.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// No usable network configuration in the configuration directory.
    #[error("no CNI network configuration in {dir}")]
    NoConfig { dir: PathBuf },
    /// A configuration file could not be read or parsed.
    #[error("invalid CNI configuration {path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    /// A plugin binary is not in any of the binary directories.
    #[error("CNI plugin {plugin:?} not found in {dirs:?}")]
    PluginNotFound { plugin: String, dirs: Vec<PathBuf> },
    /// A plugin could not be started.
    #[error("cannot run CNI plugin {plugin}")]
    Spawn {
        plugin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A plugin reported an error (exit status non-zero, CNI error object on stdout).
    #[error("CNI plugin {plugin} {command} failed: {message}")]
    Plugin {
        plugin: String,
        command: &'static str,
        message: String,
    },
    /// A plugin's result is not valid JSON of the expected shape.
    #[error("CNI plugin {plugin} returned an invalid result: {reason}")]
    BadResult { plugin: String, reason: String },
    /// A `CNI_ARGS` value holds `;` or `=`, which would split it into pairs of its own.
    #[error("CNI_ARGS value of {key} ({value:?}) contains ';' or '='")]
    BadArgs { key: String, value: String },
}

/// The network configuration list the runtime uses.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkConfig {
    /// File it came from.
    pub path: PathBuf,
    /// Network name.
    pub name: String,
    /// CNI version of the list.
    pub cni_version: String,
    /// Each plugin's configuration object, in order.
    pub plugins: Vec<serde_json::Map<String, Value>>,
}

impl NetworkConfig {
    /// Loads the first valid configuration of `dir`, as libcni's ordering picks it.
    pub fn load_first(dir: &Path) -> Result<Self, CniError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|_| CniError::NoConfig {
                dir: dir.to_path_buf(),
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
            })
            .collect();
        files.sort();
        let mut last_error = None;
        for path in files {
            match Self::load(&path) {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping CNI configuration");
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or(CniError::NoConfig {
            dir: dir.to_path_buf(),
        }))
    }

    /// Loads one `.conflist` or single-plugin `.conf`/`.json` file.
    pub fn load(path: &Path) -> Result<Self, CniError> {
        let bad = |reason: String| CniError::BadConfig {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let obj = value
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("missing \"name\"".into()))?
            .to_string();
        let cni_version = obj
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or("0.4.0")
            .to_string();
        let plugins = match obj.get("plugins") {
            Some(Value::Array(list)) => list
                .iter()
                .map(|p| {
                    p.as_object()
                        .cloned()
                        .ok_or_else(|| bad("plugin is not an object".into()))
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(_) => return Err(bad("\"plugins\" is not a list".into())),
            // A single-plugin file is its own plugin entry.
            None => vec![obj.clone()],
        };
        if plugins.is_empty() {
            return Err(bad("no plugins".into()));
        }
        for p in &plugins {
            if p.get("type")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(bad("a plugin has no \"type\"".into()));
            }
        }
        Ok(NetworkConfig {
            path: path.to_path_buf(),
            name,
            cni_version,
            plugins,
        })
    }

    /// The configuration a plugin receives on stdin: its own object plus the list's `name` and
    /// `cniVersion`, the runtime's `runtimeConfig` for the capabilities it declares, and
    /// `prevResult` when there is one.
    fn plugin_input(
        &self,
        plugin: &serde_json::Map<String, Value>,
        runtime_config: &RuntimeConfig,
        prev_result: Option<&Value>,
    ) -> Value {
        let mut conf = plugin.clone();
        conf.insert("name".into(), Value::String(self.name.clone()));
        conf.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        let caps = plugin.get("capabilities").and_then(Value::as_object);
        let mut rc = serde_json::Map::new();
        if caps.is_some_and(|c| c.get("portMappings") == Some(&Value::Bool(true)))
            && !runtime_config.port_mappings.is_empty()
        {
            rc.insert(
                "portMappings".into(),
                serde_json::json!(runtime_config.port_mappings),
            );
        }
        if !rc.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(rc));
        }
        conf.remove("capabilities");
        if let Some(prev) = prev_result {
            conf.insert("prevResult".into(), prev.clone());
        }
        Value::Object(conf)
    }
}

/// One port mapping, in the `portMappings` capability's format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

/// Per-sandbox runtime configuration passed to plugins that declare the capability.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    pub port_mappings: Vec<PortMapping>,
}

/// What identifies one attachment of a sandbox to the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// The sandbox ID (`CNI_CONTAINERID`).
    pub container_id: String,
    /// Path of the sandbox's network namespace (`CNI_NETNS`).
    pub netns: PathBuf,
    /// Interface name inside the sandbox (`CNI_IFNAME`), `eth0` for pods.
    pub ifname: String,
    /// `CNI_ARGS` pairs: `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_INFRA_CONTAINER_ID`,
    /// `K8S_POD_UID`.
    pub args: BTreeMap<String, String>,
}

impl Attachment {
    /// The attachment of a pod sandbox with Kubernetes' standard `CNI_ARGS`.
    pub fn pod(sandbox_id: &str, netns: &Path, namespace: &str, name: &str, uid: &str) -> Self {
        let args = [
            ("IgnoreUnknown", "1"),
            ("K8S_POD_NAMESPACE", namespace),
            ("K8S_POD_NAME", name),
            ("K8S_POD_INFRA_CONTAINER_ID", sandbox_id),
            ("K8S_POD_UID", uid),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Attachment {
            container_id: sandbox_id.to_string(),
            netns: netns.to_path_buf(),
            ifname: "eth0".into(),
            args,
        }
    }

    /// Refuses values that `CNI_ARGS` cannot carry. The format (`K=V;K=V`) has no escape,
    /// and API validation that keeps `;` and `=` out of pod names and namespaces does not bind
    /// a CRI client: a value like `x;K8S_POD_NAMESPACE=kube-system` would forge a second pair.
    fn check_args(&self) -> Result<(), CniError> {
        match self
            .args
            .iter()
            .find(|(k, v)| k.contains([';', '=']) || v.contains([';', '=']) || k.is_empty())
        {
            Some((key, value)) => Err(CniError::BadArgs {
                key: key.clone(),
                value: value.clone(),
            }),
            None => Ok(()),
        }
    }

    fn cni_args(&self) -> String {
        self.args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }
}

/// The addresses a successful ADD gave the sandbox.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddResult {
    /// Addresses on the sandbox's interface, IPv4 first.
    pub ips: Vec<IpAddr>,
    /// The final plugin's full result, kept for DEL and CHECK (`prevResult`).
    pub raw: Value,
}

/// Runs one plugin binary: the only code that spawns CNI plugins.
pub trait PluginExec: Send + Sync {
    /// Runs `plugin` with the CNI environment `env` and `stdin`; returns (success, stdout).
    fn exec(
        &self,
        plugin: &Path,
        env: &[(String, String)],
        stdin: &[u8],
    ) -> Result<(bool, Vec<u8>), CniError>;
}

/// Spawns plugins as child processes with only the CNI environment and `PATH`.
#[derive(Debug, Default)]
pub struct ProcessExec;

impl PluginExec for ProcessExec {
    fn exec(
        &self,
        plugin: &Path,
        env: &[(String, String)],
        stdin: &[u8],
    ) -> Result<(bool, Vec<u8>), CniError> {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let spawn_err = |source| CniError::Spawn {
            plugin: plugin.to_path_buf(),
            source,
        };
        let mut child = Command::new(plugin)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let Some(mut input) = child.stdin.take() {
            // A plugin that exits without reading its input is reported by its status below.
            let _ = input.write_all(stdin);
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if !out.stderr.is_empty() {
            tracing::debug!(plugin = %plugin.display(), stderr = %String::from_utf8_lossy(&out.stderr), "CNI plugin stderr");
        }
        Ok((out.status.success(), out.stdout))
    }
}

/// The CNI driver: configuration, binary directories and the plugin executor.
pub struct Cni<E = ProcessExec> {
    conf_dir: PathBuf,
    bin_dirs: Vec<PathBuf>,
    exec: E,
}

impl<E> std::fmt::Debug for Cni<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cni")
            .field("conf_dir", &self.conf_dir)
            .field("bin_dirs", &self.bin_dirs)
            .finish()
    }
}

impl Cni<ProcessExec> {
    /// A driver that spawns real plugins.
    pub fn new(conf_dir: PathBuf, bin_dirs: Vec<PathBuf>) -> Self {
        Cni {
            conf_dir,
            bin_dirs,
            exec: ProcessExec,
        }
    }
}

impl<E: PluginExec> Cni<E> {
    /// A driver with a custom executor.
    pub fn with_exec(conf_dir: PathBuf, bin_dirs: Vec<PathBuf>, exec: E) -> Self {
        Cni {
            conf_dir,
            bin_dirs,
            exec,
        }
    }

    /// The network configuration in force, if there is one (NetworkReady).
    pub fn config(&self) -> Result<NetworkConfig, CniError> {
        NetworkConfig::load_first(&self.conf_dir)
    }

    fn find(&self, plugin_type: &str) -> Result<PathBuf, CniError> {
        // A type is a plain file name; anything else could run an arbitrary binary.
        if !plugin_type.contains('/') && plugin_type != ".." {
            for dir in &self.bin_dirs {
                let p = dir.join(plugin_type);
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
        Err(CniError::PluginNotFound {
            plugin: plugin_type.to_string(),
            dirs: self.bin_dirs.clone(),
        })
    }

    fn env(&self, command: &str, att: &Attachment) -> Vec<(String, String)> {
        let path = std::env::join_paths(&self.bin_dirs)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        vec![
            ("CNI_COMMAND".into(), command.into()),
            ("CNI_CONTAINERID".into(), att.container_id.clone()),
            ("CNI_NETNS".into(), att.netns.display().to_string()),
            ("CNI_IFNAME".into(), att.ifname.clone()),
            ("CNI_ARGS".into(), att.cni_args()),
            ("CNI_PATH".into(), path),
        ]
    }

    fn run(
        &self,
        command: &'static str,
        conf: &NetworkConfig,
        plugin: &serde_json::Map<String, Value>,
        att: &Attachment,
        rc: &RuntimeConfig,
        prev: Option<&Value>,
    ) -> Result<Option<Value>, CniError> {
        let plugin_type = plugin
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let bin = self.find(plugin_type)?;
        let input = conf.plugin_input(plugin, rc, prev);
        let stdin = serde_json::to_vec(&input).map_err(|e| CniError::BadResult {
            plugin: plugin_type.into(),
            reason: e.to_string(),
        })?;
        let (ok, stdout) = self.exec.exec(&bin, &self.env(command, att), &stdin)?;
        if !ok {
            let message = serde_json::from_slice::<Value>(&stdout)
                .ok()
                .map(|v| {
                    let msg = v["msg"].as_str().unwrap_or("").to_string();
                    match v["details"].as_str() {
                        Some(d) if !d.is_empty() => format!("{msg}: {d}"),
                        _ => msg,
                    }
                })
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| String::from_utf8_lossy(&stdout).trim().to_string());
            return Err(CniError::Plugin {
                plugin: plugin_type.into(),
                command,
                message,
            });
        }
        if command != "ADD" || stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        serde_json::from_slice(&stdout)
            .map(Some)
            .map_err(|e| CniError::BadResult {
                plugin: plugin_type.into(),
                reason: e.to_string(),
            })
    }

    /// ADD: attaches the sandbox; on failure, what was added is deleted again.
    pub fn add(&self, att: &Attachment, rc: &RuntimeConfig) -> Result<AddResult, CniError> {
        att.check_args()?;
        let conf = self.config()?;
        let mut prev: Option<Value> = None;
        for (i, plugin) in conf.plugins.iter().enumerate() {
            match self.run("ADD", &conf, plugin, att, rc, prev.as_ref()) {
                Ok(Some(result)) => prev = Some(result),
                Ok(None) => {}
                Err(e) => {
                    // Undo the plugins that did run, newest first, so nothing leaks (IPs, veths).
                    for p in conf.plugins[..=i].iter().rev() {
                        if let Err(undo) = self.run("DEL", &conf, p, att, rc, prev.as_ref()) {
                            tracing::warn!(error = %undo, "CNI DEL after failed ADD");
                        }
                    }
                    return Err(e);
                }
            }
        }
        let raw = prev.unwrap_or(Value::Null);
        let ips = result_ips(&raw, att.ifname.as_str());
        Ok(AddResult { ips, raw })
    }

    /// DEL: detaches the sandbox. Runs every plugin even if one fails (an already-gone netns or
    /// interface must not keep the IP allocated), and reports the first failure.
    pub fn del(
        &self,
        att: &Attachment,
        rc: &RuntimeConfig,
        prev: Option<&Value>,
    ) -> Result<(), CniError> {
        if let Err(e) = att.check_args() {
            // ADD refuses such arguments, so no plugin ever ran for this attachment.
            tracing::debug!(error = %e, "CNI DEL skipped: nothing was added");
            return Ok(());
        }
        let conf = self.config()?;
        let mut first_error = None;
        for plugin in conf.plugins.iter().rev() {
            if let Err(e) = self.run("DEL", &conf, plugin, att, rc, prev.filter(|v| !v.is_null())) {
                tracing::warn!(error = %e, "CNI DEL");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// CHECK: asks every plugin whether the attachment is still as ADD left it.
    pub fn check(
        &self,
        att: &Attachment,
        rc: &RuntimeConfig,
        prev: &Value,
    ) -> Result<(), CniError> {
        att.check_args()?;
        let conf = self.config()?;
        for plugin in &conf.plugins {
            self.run("CHECK", &conf, plugin, att, rc, Some(prev))?;
        }
        Ok(())
    }
}

/// The addresses of a CNI result (spec 0.3.0 and later), on the sandbox's interface when the
/// result says which interface an address is on; IPv4 first.
pub fn result_ips(result: &Value, ifname: &str) -> Vec<IpAddr> {
    let interfaces = result["interfaces"].as_array().cloned().unwrap_or_default();
    let mut ips: Vec<IpAddr> = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|ip| match ip["interface"].as_u64() {
            Some(idx) => interfaces
                .get(idx as usize)
                .is_none_or(|i| i["name"].as_str().is_none_or(|n| n == ifname)),
            None => true,
        })
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .collect();
    ips.sort_by_key(|ip| ip.is_ipv6());
    ips
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<(String, String, Value)>>,
        fail: Option<&'static str>,
    }

    impl PluginExec for Recorder {
        fn exec(
            &self,
            plugin: &Path,
            env: &[(String, String)],
            stdin: &[u8],
        ) -> Result<(bool, Vec<u8>), CniError> {
            let name = plugin.file_name().unwrap().to_string_lossy().into_owned();
            let cmd = env
                .iter()
                .find(|(k, _)| k == "CNI_COMMAND")
                .unwrap()
                .1
                .clone();
            let input: Value = serde_json::from_slice(stdin).unwrap();
            self.calls
                .lock()
                .unwrap()
                .push((name.clone(), cmd.clone(), input.clone()));
            if self.fail == Some(name.as_str()) && cmd == "ADD" {
                return Ok((
                    false,
                    br#"{"code":11,"msg":"no more addresses","details":"range full"}"#.to_vec(),
                ));
            }
            let out = if name == "bridge" {
                serde_json::json!({
                    "cniVersion": "1.0.0",
                    "interfaces": [{"name": "cni0"}, {"name": "veth1"}, {"name": "eth0", "sandbox": "/x"}],
                    "ips": [
                        {"address": "fd00::5/64", "interface": 2},
                        {"address": "10.88.0.5/24", "gateway": "10.88.0.1", "interface": 2}
                    ]
                })
            } else {
                // Chained plugins such as portmap and loopback hand the previous result on.
                input["prevResult"].clone()
            };
            Ok((true, serde_json::to_vec(&out).unwrap()))
        }
    }

    fn setup(conflist: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("net.d");
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(conf.join("10-test.conflist"), conflist).unwrap();
        for p in ["bridge", "portmap", "loopback"] {
            std::fs::write(bin.join(p), "").unwrap();
        }
        (dir, conf, bin)
    }

    const LIST: &str = r#"{"cniVersion":"1.0.0","name":"pods","plugins":[
        {"type":"bridge","bridge":"cni0","ipam":{"type":"host-local"}},
        {"type":"portmap","capabilities":{"portMappings":true}},
        {"type":"loopback"}]}"#;

    fn att() -> Attachment {
        Attachment::pod("sb1", Path::new("/run/netns/sb1"), "default", "web", "u-1")
    }

    #[test]
    fn cni_args_values_with_separators_are_refused_before_any_plugin_runs() {
        let (_d, conf, bin) = setup(LIST);
        let cni = Cni::with_exec(conf, vec![bin], Recorder::default());
        let rc = RuntimeConfig::default();
        for (namespace, name) in [
            ("default", "web;K8S_POD_NAMESPACE=kube-system"),
            ("a=b", "web"),
            ("default;IgnoreUnknown=0", "web"),
        ] {
            let att = Attachment::pod("sb1", Path::new("/run/netns/sb1"), namespace, name, "u");
            let err = cni
                .add(&att, &rc)
                .expect_err("separator in CNI_ARGS accepted");
            assert!(matches!(err, CniError::BadArgs { .. }), "{err}");
            assert!(err.to_string().contains("contains ';' or '='"), "{err}");
            cni.check(&att, &rc, &Value::Null)
                .expect_err("CHECK with a separator in CNI_ARGS");
            // Nothing was added, so DEL has nothing to undo and succeeds.
            cni.del(&att, &rc, None).expect("DEL");
        }
        assert!(cni.exec.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn add_chains_prev_result_and_passes_port_mappings_to_capable_plugins() {
        let (_d, conf, bin) = setup(LIST);
        let cni = Cni::with_exec(conf, vec![bin], Recorder::default());
        let rc = RuntimeConfig {
            port_mappings: vec![PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: String::new(),
            }],
        };
        let res = cni.add(&att(), &rc).unwrap();
        assert_eq!(
            res.ips,
            vec![
                "10.88.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        let calls = cni.exec.calls.lock().unwrap();
        let names: Vec<&str> = calls.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(names, ["bridge", "portmap", "loopback"]);
        assert!(calls[0].2.get("prevResult").is_none());
        assert_eq!(
            calls[1].2["prevResult"]["ips"][1]["address"],
            "10.88.0.5/24"
        );
        assert_eq!(
            calls[1].2["runtimeConfig"]["portMappings"][0]["hostPort"],
            8080
        );
        assert!(
            calls[0].2.get("runtimeConfig").is_none(),
            "bridge has no portMappings capability"
        );
        assert!(calls[1].2.get("capabilities").is_none());
        assert_eq!(calls[2].2["name"], "pods");
        assert_eq!(calls[2].2["cniVersion"], "1.0.0");
    }

    #[test]
    fn failed_add_undoes_what_ran_in_reverse_and_keeps_the_plugin_message() {
        let (_d, conf, bin) = setup(LIST);
        let cni = Cni::with_exec(
            conf,
            vec![bin],
            Recorder {
                fail: Some("portmap"),
                ..Default::default()
            },
        );
        let err = cni.add(&att(), &RuntimeConfig::default()).unwrap_err();
        assert!(
            err.to_string().contains("no more addresses: range full"),
            "{err}"
        );
        let calls = cni.exec.calls.lock().unwrap();
        let seq: Vec<String> = calls.iter().map(|c| format!("{} {}", c.1, c.0)).collect();
        assert_eq!(
            seq,
            ["ADD bridge", "ADD portmap", "DEL portmap", "DEL bridge"]
        );
    }

    #[test]
    fn del_runs_every_plugin_in_reverse_even_after_a_failure() {
        let (_d, conf, bin) = setup(LIST);
        let cni = Cni::with_exec(conf, vec![bin], Recorder::default());
        cni.del(&att(), &RuntimeConfig::default(), None).unwrap();
        let calls = cni.exec.calls.lock().unwrap();
        let seq: Vec<String> = calls.iter().map(|c| format!("{} {}", c.1, c.0)).collect();
        assert_eq!(seq, ["DEL loopback", "DEL portmap", "DEL bridge"]);
    }

    #[test]
    fn environment_carries_kubernetes_args() {
        let cni = Cni::new(
            PathBuf::from("/x"),
            vec![PathBuf::from("/a"), PathBuf::from("/b")],
        );
        let env: BTreeMap<String, String> = cni.env("ADD", &att()).into_iter().collect();
        assert_eq!(env["CNI_COMMAND"], "ADD");
        assert_eq!(env["CNI_CONTAINERID"], "sb1");
        assert_eq!(env["CNI_NETNS"], "/run/netns/sb1");
        assert_eq!(env["CNI_IFNAME"], "eth0");
        assert_eq!(env["CNI_PATH"], "/a:/b");
        assert_eq!(
            env["CNI_ARGS"],
            "IgnoreUnknown=1;K8S_POD_INFRA_CONTAINER_ID=sb1;K8S_POD_NAME=web;K8S_POD_NAMESPACE=default;K8S_POD_UID=u-1"
        );
    }

    #[test]
    fn result_ips_prefer_ipv4_and_the_sandbox_interface() {
        let r = serde_json::json!({
            "interfaces": [{"name": "cni0"}, {"name": "eth0", "sandbox": "/x"}],
            "ips": [
                {"address": "fd00::5/64", "interface": 1},
                {"address": "10.88.0.1/24", "interface": 0},
                {"address": "10.88.0.5/24", "interface": 1}
            ]
        });
        let ips = result_ips(&r, "eth0");
        assert_eq!(
            ips,
            vec![
                "10.88.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
    }

    #[test]
    fn configs_load_in_lexical_order_and_bad_files_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("05-broken.conflist"), "{not json").unwrap();
        std::fs::write(
            dir.path().join("10-single.conf"),
            r#"{"cniVersion":"0.4.0","name":"one","type":"bridge"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("20-list.conflist"), LIST).unwrap();
        std::fs::write(dir.path().join("99-ignored.txt"), "x").unwrap();
        let c = NetworkConfig::load_first(dir.path()).unwrap();
        assert_eq!(c.name, "one");
        assert_eq!(c.plugins.len(), 1);
        assert_eq!(c.plugins[0]["type"], "bridge");
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            NetworkConfig::load_first(empty.path()),
            Err(CniError::NoConfig { .. })
        ));
    }

    #[test]
    fn the_shipped_default_network_loads() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/cni/10-strake.conflist");
        let c = NetworkConfig::load(&path).unwrap();
        let types: Vec<&str> = c
            .plugins
            .iter()
            .filter_map(|p| p["type"].as_str())
            .collect();
        assert_eq!(types, ["bridge", "portmap", "loopback"]);
        assert_eq!(c.cni_version, "1.0.0");
    }

    #[test]
    fn plugin_types_cannot_escape_the_binary_directories() {
        let (_d, conf, bin) =
            setup(r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"../../bin/sh"}]}"#);
        let cni = Cni::with_exec(conf, vec![bin], Recorder::default());
        let err = cni.add(&att(), &RuntimeConfig::default()).unwrap_err();
        assert!(matches!(err, CniError::PluginNotFound { .. }), "{err}");
    }
}
