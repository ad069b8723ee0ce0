//! `vublk status`: what the supervisor reports on its control socket, and the command that
//! asks for it and prints it.

use serde::{Deserialize, Serialize};

use crate::handoff::DeviceStatus;

/// What `vublk status` shows.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub exports: Vec<String>,
    pub vms: Vec<VmStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VmStatus {
    pub vmm_pid: i32,
    pub worker_pid: i32,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub cgroups: Vec<String>,
    /// The VMM's limits; the worker keeps ours where the VMM's hard limit is above them.
    pub limits: Vec<crate::identity::proc::Limit>,
    pub devices: Vec<DeviceStatus>,
    /// The worker's sandbox as it reported it, once it has.
    #[serde(default)]
    pub sandbox: Option<crate::sandbox::SandboxStatus>,
    /// The kernel's word on the worker's seccomp mode (`Seccomp:` of /proc/PID/status):
    /// "filter", "strict", "none".
    #[serde(default)]
    pub seccomp: String,
}

/// The seccomp mode the kernel reports for `pid`.
pub(super) fn seccomp_of(pid: i32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    match status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .map(str::trim)
    {
        Some("0") => "none",
        Some("1") => "strict",
        Some("2") => "filter",
        _ => "unknown",
    }
    .to_string()
}

/// `vublk status`: asks the supervisor behind `control` and prints the answer; `Err` is the
/// line to print.
pub fn print_status(control: &std::path::Path, json: bool) -> Result<(), String> {
    use super::control::{ask, Request, ANSWER_TIMEOUT};
    let body = ask(control, &Request::Status, ANSWER_TIMEOUT).map_err(|e| crate::error_line(&e))?;
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let status: Status = serde_json::from_slice(&body).map_err(|e| {
        format!(
            "the daemon on {} gave an answer that is not one: {e}",
            control.display()
        )
    })?;
    println!("exports: {}", status.exports.join(", "));
    if status.vms.is_empty() {
        println!("no VMs connected");
    }
    for vm in &status.vms {
        println!(
            "VMM pid {}  worker pid {}  uid {} gid {} groups {:?}",
            vm.vmm_pid, vm.worker_pid, vm.uid, vm.gid, vm.groups
        );
        println!("  cgroups: {}", vm.cgroups.join("  "));
        let show = |v: Option<u64>| v.map_or("unlimited".to_string(), |n| n.to_string());
        let limits: Vec<String> = vm
            .limits
            .iter()
            .map(|l| {
                format!(
                    "{}={}/{}",
                    l.name.trim_start_matches("Max "),
                    show(l.soft),
                    show(l.hard)
                )
            })
            .collect();
        println!("  limits: {}", limits.join(", "));
        match &vm.sandbox {
            Some(s) => println!(
                "  sandbox: seccomp {} ({}), landlock {}, {}, namespaces: {}, network: {}",
                vm.seccomp,
                s.seccomp,
                s.landlock,
                if s.dumpable {
                    "dumpable"
                } else {
                    "not dumpable"
                },
                if s.namespaces.is_empty() {
                    "none".to_string()
                } else {
                    s.namespaces.join(", ")
                },
                s.network
            ),
            None => println!("  sandbox: not reported yet (seccomp {})", vm.seccomp),
        }
        for d in &vm.devices {
            println!(
                "  device {} (connection {}): {} queue(s), {}, {} requests, {} errors, {} bytes read, {} bytes written",
                d.export, d.connection, d.queues,
                match d.write_cache {
                    Some(true) => "write-back",
                    Some(false) => "write-through",
                    None => "write cache not reported",
                },
                d.totals.requests, d.totals.errors, d.totals.bytes_read, d.totals.bytes_written
            );
            let t = &d.totals;
            println!(
                "    queue threads: {} request(s) done inline, {} kick(s), {} interrupt(s), polled {} time(s) ({} found work, {} ms)",
                t.inline,
                t.kicks,
                t.calls,
                t.polls,
                t.poll_hits,
                t.poll_ns / 1_000_000
            );
            println!(
                "    polling policy: {} epoch(s) polling ({} ms), {} sleeping ({} ms)",
                t.polling_epochs,
                t.polling_epoch_ns / 1_000_000,
                t.sleeping_epochs,
                t.sleeping_epoch_ns / 1_000_000
            );
            let m = &d.memory;
            let live: Vec<String> = m
                .live
                .iter()
                .map(|(id, pins)| format!("{id} ({pins} pins)"))
                .collect();
            println!(
                "    memory: generation {}, live {}, {} retire wait(s), longest {} us, {} cancelled",
                m.generation,
                live.join(", "),
                m.retire_waits,
                m.longest_retire_wait_us,
                m.cancelled
            );
        }
    }
    Ok(())
}
