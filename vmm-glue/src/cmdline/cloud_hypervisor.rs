//! cloud-hypervisor's command line for a vublk export.
//!
//! ```text
//! --memory size=4G,shared=on                       guest RAM vublk can map
//! [--cpus boot=N]                                  enough vCPUs for the queues
//! --disk vhost_user=true,socket=S,num_queues=Q,queue_size=Z
//! ```
//!
//! The rules come from cloud-hypervisor's `vmm/src/config.rs` (not run here: cloud-hypervisor
//! needs KVM): `--disk` takes `vhost_user=on|off` (its `Toggle` reads `true` as well),
//! `socket=`, `num_queues=`, `queue_size=` (default 128); `DiskConfig::validate` refuses
//! `num_queues` above the boot vCPUs (`TooManyQueues`; `--cpus` defaults to `boot=1`) and, in
//! current releases, a `queue_size` of 2 or less (`MINIMUM_BLOCK_QUEUE_SIZE`); `VmConfig`
//! refuses vhost-user devices without `shared=on` memory. Sizes are `ByteSized`: `K`, `M`, `G`,
//! no `T`. Options are split at commas, so a socket path with a comma cannot be passed.

use super::{check_export, size, socket_str, CmdlineError, Export};

/// cloud-hypervisor refuses block queues this small or smaller.
pub const MIN_QUEUE_SIZE_EXCLUSIVE: u16 = 2;

/// Everything cloud-hypervisor's part of the command line depends on.
#[derive(Clone, Debug)]
pub struct ChOptions {
    pub export: Export,
    /// Guest RAM in bytes.
    pub mem: u64,
    /// Boot vCPUs, `None` for cloud-hypervisor's default (1).
    pub cpus: Option<u16>,
}

/// cloud-hypervisor's arguments for the export.
pub fn args(opts: &ChOptions) -> Result<Vec<String>, CmdlineError> {
    check_export(&opts.export, opts.mem)?;
    let socket = socket_str(&opts.export)?;
    if socket.contains(',') {
        return Err(CmdlineError::SocketPath {
            path: opts.export.socket.clone(),
            vmm: "cloud-hypervisor",
            why: "it splits --disk at commas",
        });
    }
    if let Some(qs) = opts.export.queue_size {
        if qs <= MIN_QUEUE_SIZE_EXCLUSIVE {
            return Err(CmdlineError::QueueSizeTooSmall {
                asked: qs,
                why: "cloud-hypervisor wants block queues larger than 2",
            });
        }
    }
    let vcpus = opts.cpus.unwrap_or(1);
    if opts.export.num_queues > vcpus {
        return Err(CmdlineError::TooManyQueues {
            asked: opts.export.num_queues,
            limit: format!(
                "the {vcpus} boot vCPU(s): cloud-hypervisor refuses a disk with more queues \
                 than boot vCPUs; pass --cpus {} or more",
                opts.export.num_queues
            ),
        });
    }

    let mut out = vec![
        "--memory".to_string(),
        format!("size={},shared=on", size::format(opts.mem)),
    ];
    if let Some(n) = opts.cpus {
        out.extend(["--cpus".to_string(), format!("boot={n}")]);
    }
    let mut disk = format!(
        "vhost_user=true,socket={socket},num_queues={}",
        opts.export.num_queues
    );
    if let Some(qs) = opts.export.queue_size {
        disk.push_str(&format!(",queue_size={qs}"));
    }
    out.extend(["--disk".to_string(), disk]);
    Ok(out)
}

/// Refuses extra arguments that set guest memory or vCPUs behind vmm-glue's back.
pub fn check_extra(extra: &[String]) -> Result<(), CmdlineError> {
    for arg in extra {
        let why = match arg.split('=').next().unwrap_or(arg) {
            "--memory" => "vmm-glue sets --memory from --mem (shared=on is what lets vublk map it)",
            "--memory-zone" => "memory zones are not supported by vmm-glue yet",
            "--cpus" => "vmm-glue sets --cpus from its own --cpus (it must cover the queues)",
            _ => continue,
        };
        return Err(CmdlineError::Conflict(format!("{arg}: {why}; drop it")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::BackendLimits;
    use super::*;

    fn opts(num_queues: u16, queue_size: Option<u16>, cpus: Option<u16>) -> ChOptions {
        ChOptions {
            export: Export {
                socket: "/run/vublk/disk.sock".into(),
                num_queues,
                queue_size,
                backend: BackendLimits::default(),
            },
            mem: 4 << 30,
            cpus,
        }
    }

    #[test]
    fn the_whole_fragment() {
        assert_eq!(
            args(&opts(4, Some(256), Some(4))).unwrap(),
            [
                "--memory",
                "size=4G,shared=on",
                "--cpus",
                "boot=4",
                "--disk",
                "vhost_user=true,socket=/run/vublk/disk.sock,num_queues=4,queue_size=256",
            ]
        );
        assert_eq!(
            args(&opts(1, Some(128), None)).unwrap(),
            [
                "--memory",
                "size=4G,shared=on",
                "--disk",
                "vhost_user=true,socket=/run/vublk/disk.sock,num_queues=1,queue_size=128",
            ]
        );
    }

    #[test]
    fn refuses_what_cloud_hypervisor_would() {
        assert_eq!(
            args(&opts(2, Some(128), None)).unwrap_err().to_string(),
            "2 queues is more than the 1 boot vCPU(s): cloud-hypervisor refuses a disk with \
             more queues than boot vCPUs; pass --cpus 2 or more"
        );
        assert!(matches!(
            args(&opts(1, Some(2), None)),
            Err(CmdlineError::QueueSizeTooSmall { asked: 2, .. })
        ));
        assert!(matches!(
            args(&opts(1, Some(96), None)),
            Err(CmdlineError::QueueSizeNotPowerOfTwo(96))
        ));
        let mut o = opts(1, Some(128), None);
        o.export.socket = "/run/a,b.sock".into();
        assert!(matches!(args(&o), Err(CmdlineError::SocketPath { .. })));
        o = opts(1, Some(128), None);
        o.mem = (4 << 30) + 512;
        assert!(matches!(
            args(&o),
            Err(CmdlineError::MemoryNotPageAligned(_))
        ));
    }

    #[test]
    fn extra_arguments_cannot_set_memory_or_cpus() {
        let ok: Vec<String> = ["--kernel", "vmlinux", "--cmdline", "console=hvc0"]
            .map(String::from)
            .to_vec();
        check_extra(&ok).unwrap();
        for bad in ["--memory", "--memory=size=1G", "--memory-zone", "--cpus"] {
            let args = vec![bad.to_string(), "size=1G".to_string()];
            assert!(check_extra(&args).is_err(), "{bad} was accepted");
        }
    }
}
