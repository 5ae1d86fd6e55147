//! A recording [`Cri`] for unit tests: it keeps sandboxes and containers in memory, records
//! every call as a line (`StartContainer app`), and answers ExecSync from a table.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use strake_types::cri;

use super::{Cri, RuntimeError};

#[derive(Debug, Default)]
struct State {
    calls: Vec<String>,
    /// List calls, counted apart from `calls` (they do not change anything).
    lists: usize,
    next: u64,
    sandboxes: Vec<cri::PodSandbox>,
    containers: Vec<cri::ContainerStatus>,
    sandbox_of: BTreeMap<String, String>,
    /// ExecSync exit codes by the command's first word.
    exec_exit: BTreeMap<String, i32>,
}

/// The fake runtime.
#[derive(Debug, Default)]
pub struct FakeCri {
    state: Mutex<State>,
}

fn status(code: tonic::Code, rpc: &'static str) -> RuntimeError {
    RuntimeError::Call {
        rpc,
        source: tonic::Status::new(code, "fake"),
    }
}

impl FakeCri {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// How many ListPodSandbox and ListContainers calls were made.
    pub fn list_calls(&self) -> usize {
        self.with(|s| s.lists)
    }

    /// The calls made so far, one line each.
    pub fn calls(&self) -> Vec<String> {
        self.with(|s| s.calls.clone())
    }

    /// ExecSync of a command whose first word is `program` exits with `code`.
    pub fn exec_exits(&self, program: &str, code: i32) {
        self.with(|s| s.exec_exit.insert(program.to_string(), code));
    }

    /// The newest instance of container `name` exits with `code`.
    pub fn exit(&self, name: &str, code: i32) {
        self.with(|s| {
            if let Some(c) = s
                .containers
                .iter_mut()
                .filter(|c| c.metadata.as_ref().is_some_and(|m| m.name == name))
                .max_by_key(|c| c.metadata.as_ref().map_or(0, |m| m.attempt))
            {
                c.state = cri::ContainerState::ContainerExited as i32;
                c.exit_code = code;
                c.finished_at = c.started_at + 1;
            }
        });
    }

    /// The newest instance of container `name` logs to `path`.
    pub fn log_to(&self, name: &str, path: &std::path::Path) {
        self.with(|s| {
            if let Some(c) = s
                .containers
                .iter_mut()
                .filter(|c| c.metadata.as_ref().is_some_and(|m| m.name == name))
                .max_by_key(|c| c.metadata.as_ref().map_or(0, |m| m.attempt))
            {
                c.log_path = path.display().to_string();
            }
        });
    }

    /// The mounts container `name`'s newest instance was created with.
    pub fn mounts(&self, name: &str) -> Vec<cri::Mount> {
        self.with(|s| {
            s.containers
                .iter()
                .filter(|c| c.metadata.as_ref().is_some_and(|m| m.name == name))
                .max_by_key(|c| c.metadata.as_ref().map_or(0, |m| m.attempt))
                .map(|c| c.mounts.clone())
                .unwrap_or_default()
        })
    }

    fn name_of(s: &State, id: &str) -> String {
        s.containers
            .iter()
            .find(|c| c.id == id)
            .and_then(|c| c.metadata.as_ref())
            .map_or_else(|| id.to_string(), |m| m.name.clone())
    }
}

#[async_trait::async_trait]
impl Cri for FakeCri {
    async fn list_sandboxes(
        &self,
        _uid: Option<&str>,
    ) -> Result<Vec<cri::PodSandbox>, RuntimeError> {
        Ok(self.with(|s| {
            s.lists += 1;
            s.sandboxes.clone()
        }))
    }

    async fn run_sandbox(
        &self,
        config: cri::PodSandboxConfig,
        _handler: &str,
    ) -> Result<String, RuntimeError> {
        Ok(self.with(|s| {
            s.next += 1;
            let id = format!("sb{}", s.next);
            s.calls.push("RunPodSandbox".into());
            s.sandboxes.push(cri::PodSandbox {
                id: id.clone(),
                labels: config.labels,
                metadata: config.metadata,
                state: cri::PodSandboxState::SandboxReady as i32,
                created_at: s.next as i64,
                ..Default::default()
            });
            id
        }))
    }

    async fn stop_sandbox(&self, id: &str) -> Result<(), RuntimeError> {
        self.with(|s| {
            s.calls.push("StopPodSandbox".into());
            for sb in s.sandboxes.iter_mut().filter(|sb| sb.id == id) {
                sb.state = cri::PodSandboxState::SandboxNotready as i32;
            }
        });
        Ok(())
    }

    async fn remove_sandbox(&self, id: &str) -> Result<(), RuntimeError> {
        self.with(|s| {
            s.calls.push("RemovePodSandbox".into());
            s.sandboxes.retain(|sb| sb.id != id);
            let gone: Vec<String> = s
                .sandbox_of
                .iter()
                .filter(|(_, sb)| *sb == id)
                .map(|(c, _)| c.clone())
                .collect();
            s.containers.retain(|c| !gone.contains(&c.id));
        });
        Ok(())
    }

    async fn sandbox_status(
        &self,
        id: &str,
    ) -> Result<Option<cri::PodSandboxStatus>, RuntimeError> {
        Ok(self.with(|s| {
            s.sandboxes
                .iter()
                .find(|sb| sb.id == id)
                .map(|sb| cri::PodSandboxStatus {
                    id: sb.id.clone(),
                    state: sb.state,
                    network: Some(cri::PodSandboxNetworkStatus {
                        ip: "10.88.0.7".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
        }))
    }

    async fn list_containers(
        &self,
        _uid: Option<&str>,
    ) -> Result<Vec<cri::Container>, RuntimeError> {
        Ok(self.with(|s| {
            s.lists += 1;
            s.containers
                .iter()
                .map(|c| cri::Container {
                    id: c.id.clone(),
                    pod_sandbox_id: s.sandbox_of.get(&c.id).cloned().unwrap_or_default(),
                    metadata: c.metadata.clone(),
                    state: c.state,
                    created_at: c.created_at,
                    labels: c.labels.clone(),
                    ..Default::default()
                })
                .collect()
        }))
    }

    async fn container_status(
        &self,
        id: &str,
    ) -> Result<Option<cri::ContainerStatus>, RuntimeError> {
        Ok(self.with(|s| s.containers.iter().find(|c| c.id == id).cloned()))
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        config: cri::ContainerConfig,
        _sandbox_config: cri::PodSandboxConfig,
    ) -> Result<String, RuntimeError> {
        Ok(self.with(|s| {
            s.next += 1;
            let id = format!("c{}", s.next);
            let name = config
                .metadata
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default();
            s.calls.push(format!("CreateContainer {name}"));
            s.sandbox_of.insert(id.clone(), sandbox_id.to_string());
            s.containers.push(cri::ContainerStatus {
                id: id.clone(),
                metadata: config.metadata,
                state: cri::ContainerState::ContainerCreated as i32,
                created_at: s.next as i64,
                mounts: config.mounts,
                labels: config.labels,
                ..Default::default()
            });
            id
        }))
    }

    async fn start_container(&self, id: &str) -> Result<(), RuntimeError> {
        self.with(|s| {
            let name = Self::name_of(s, id);
            s.calls.push(format!("StartContainer {name}"));
            match s.containers.iter_mut().find(|c| c.id == id) {
                Some(c) => {
                    c.state = cri::ContainerState::ContainerRunning as i32;
                    c.started_at = 1_000;
                    Ok(())
                }
                None => Err(status(tonic::Code::NotFound, "StartContainer")),
            }
        })
    }

    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        self.with(|s| {
            let name = Self::name_of(s, id);
            s.calls
                .push(format!("StopContainer {name} {}s", grace.as_secs()));
            if let Some(c) = s.containers.iter_mut().find(|c| c.id == id) {
                c.state = cri::ContainerState::ContainerExited as i32;
                c.exit_code = 137;
                c.finished_at = c.started_at + 1;
            }
        });
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        self.with(|s| {
            let name = Self::name_of(s, id);
            s.calls.push(format!("RemoveContainer {name}"));
            s.containers.retain(|c| c.id != id);
        });
        Ok(())
    }

    async fn update_container_resources(
        &self,
        id: &str,
        resources: cri::LinuxContainerResources,
    ) -> Result<(), RuntimeError> {
        self.with(|s| {
            let name = Self::name_of(s, id);
            s.calls.push(format!(
                "UpdateContainerResources {name} shares={} quota={} memory={}",
                resources.cpu_shares, resources.cpu_quota, resources.memory_limit_in_bytes
            ));
        });
        Ok(())
    }

    async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Duration,
    ) -> Result<cri::ExecSyncResponse, RuntimeError> {
        Ok(self.with(|s| {
            let name = Self::name_of(s, id);
            s.calls.push(format!(
                "ExecSync {name} {} {}s",
                cmd.join(" "),
                timeout.as_secs()
            ));
            let exit_code = cmd
                .first()
                .and_then(|p| s.exec_exit.get(p).copied())
                .unwrap_or(0);
            cri::ExecSyncResponse {
                stdout: Vec::new(),
                stderr: if exit_code == 0 {
                    Vec::new()
                } else {
                    b"hook failed".to_vec()
                },
                exit_code,
            }
        }))
    }

    async fn image_status(&self, image: &str) -> Result<Option<cri::Image>, RuntimeError> {
        Ok(Some(cri::Image {
            id: format!("sha256:{image}"),
            ..Default::default()
        }))
    }

    async fn pull_image(
        &self,
        image: &str,
        _auth: Option<cri::AuthConfig>,
    ) -> Result<String, RuntimeError> {
        self.with(|s| s.calls.push(format!("PullImage {image}")));
        Ok(format!("sha256:{image}"))
    }
}
