//! Facts about this machine that the Node reports: CPU, memory, disk, kernel, OS, IDs.

use std::path::Path;

/// What the node has and is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MachineInfo {
    /// Usable CPUs (affinity mask of this process, as the kubelet's cadvisor counts online CPUs).
    pub cpus: u32,
    /// Total memory in bytes.
    pub memory_bytes: u64,
    /// Capacity of the filesystem holding the kubelet's root directory, in bytes.
    pub ephemeral_storage_bytes: u64,
    pub kernel_version: String,
    pub os_image: String,
    pub machine_id: String,
    pub system_uuid: String,
    pub boot_id: String,
    pub architecture: String,
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
pub fn parse_meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `PRETTY_NAME` of an os-release file.
pub fn parse_os_release(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim().trim_matches('"').to_string())
}

/// The architecture name Kubernetes uses (GOARCH) for this build.
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

fn fs_capacity(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs writes into the zeroed struct; `c` is a valid path.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return 0;
        }
        st.f_blocks * st.f_frsize
    }
}

fn cpus() -> u32 {
    // SAFETY: sched_getaffinity fills a zeroed cpu_set_t for this process.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            return libc::CPU_COUNT(&set) as u32;
        }
    }
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

impl MachineInfo {
    /// Reads the facts; `root_dir` is where ephemeral storage lives (created if missing).
    pub fn read(root_dir: &Path) -> Self {
        let _ = std::fs::create_dir_all(root_dir);
        let kernel = {
            // SAFETY: uname fills the zeroed struct.
            let mut u: libc::utsname = unsafe { std::mem::zeroed() };
            if unsafe { libc::uname(&mut u) } == 0 {
                // SAFETY: uname NUL-terminates `release`.
                unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
                    .to_string_lossy()
                    .into_owned()
            } else {
                String::new()
            }
        };
        let os_release = std::fs::read_to_string("/etc/os-release")
            .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
            .unwrap_or_default();
        MachineInfo {
            cpus: cpus(),
            memory_bytes: parse_meminfo_total(
                &std::fs::read_to_string("/proc/meminfo").unwrap_or_default(),
            )
            .unwrap_or(0),
            ephemeral_storage_bytes: fs_capacity(root_dir),
            kernel_version: kernel,
            os_image: parse_os_release(&os_release).unwrap_or_else(|| "Linux".into()),
            machine_id: read_trim("/etc/machine-id"),
            system_uuid: read_trim("/sys/class/dmi/id/product_uuid").to_lowercase(),
            boot_id: read_trim("/proc/sys/kernel/random/boot_id"),
            architecture: go_arch().into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_and_os_release_parse() {
        assert_eq!(
            parse_meminfo_total("MemTotal:       24684084 kB\nMemFree: 1 kB\n"),
            Some(24_684_084 * 1024)
        );
        assert_eq!(parse_meminfo_total("nothing"), None);
        assert_eq!(
            parse_os_release("NAME=\"Debian\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n")
                .as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
    }

    #[test]
    fn this_machine_has_cpus_memory_and_a_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let m = MachineInfo::read(dir.path());
        assert!(m.cpus >= 1);
        assert!(m.memory_bytes > 0);
        assert!(m.ephemeral_storage_bytes > 0);
        assert!(!m.kernel_version.is_empty());
        assert_eq!(m.architecture, go_arch());
    }
}
