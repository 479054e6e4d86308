//! Facts about the machine the agent runs on: its identity and the process's own memory use.

use std::fs;
use std::path::Path;

/// The stable identity of this machine, used as the MQTT client id and in reports.
///
/// systemd's `/etc/machine-id` is unique per installation and stable across reboots; we use a
/// prefix of it (the full id is a secret-ish value that should not be broadcast verbatim).
/// Machines without one (some containers) fall back to the host name.
pub fn default_device_id() -> String {
    device_id_from(
        Path::new("/etc/machine-id"),
        Path::new("/proc/sys/kernel/hostname"),
    )
}

fn device_id_from(machine_id: &Path, hostname: &Path) -> String {
    if let Ok(id) = fs::read_to_string(machine_id) {
        let id = id.trim();
        if id.len() >= 12 && id.chars().all(|c| c.is_ascii_hexdigit()) {
            return format!("plaster-{}", &id[..12]);
        }
    }
    match fs::read_to_string(hostname) {
        Ok(name) if !name.trim().is_empty() => name.trim().to_string(),
        _ => "unknown-device".to_string(),
    }
}

/// Peak resident set size of this process in bytes (`VmHWM` in `/proc/self/status`).
///
/// `None` where procfs is not mounted; the report then says so rather than guessing.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_kib(&status, "VmHWM:").map(|kib| kib * 1024)
}

fn parse_vm_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_prefers_machine_id_then_hostname() {
        let dir = tempfile::tempdir().unwrap();
        let mid = dir.path().join("machine-id");
        let host = dir.path().join("hostname");
        fs::write(&host, "jetson-017\n").unwrap();
        assert_eq!(device_id_from(&mid, &host), "jetson-017");
        fs::write(&mid, "0123456789abcdef0123456789abcdef\n").unwrap();
        assert_eq!(device_id_from(&mid, &host), "plaster-0123456789ab");
        fs::write(&mid, "garbage").unwrap();
        assert_eq!(device_id_from(&mid, &host), "jetson-017");
    }

    #[test]
    fn parses_vmhwm() {
        let status = "Name:\tx\nVmPeak:\t  100 kB\nVmHWM:\t    2048 kB\n";
        assert_eq!(parse_vm_kib(status, "VmHWM:"), Some(2048));
        assert!(peak_rss_bytes().unwrap() > 0);
    }
}
