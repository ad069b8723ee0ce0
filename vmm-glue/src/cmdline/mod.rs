//! VMM command lines for a vublk export.
//!
//! Given an export (its socket, how many queues and how large a queue the VMM should use) and
//! the guest's memory size, [`qemu`] and [`cloud_hypervisor`] produce the exact arguments each
//! VMM needs to attach it as a virtio-blk disk, or refuse with a [`CmdlineError`] when the
//! combination cannot work (the VMM would fail at start-up, or the guest would never see the
//! disk). Both share the checks that belong to vhost-user itself (guest memory the backend can
//! map, queue counts and sizes the export accepts) in [`check_export`]; each VMM module adds the
//! rules of its own option parser and version history. [`size`] parses and prints byte sizes
//! the way the VMMs spell them, [`shell`] prints arguments for a shell.

pub mod cloud_hypervisor;
pub mod qemu;
pub mod shell;
pub mod size;

use std::path::PathBuf;

/// The most queues vublk serves per export (`vublk --num-queues`, 1 to 64).
pub const VUBLK_MAX_QUEUES: u16 = 64;
/// The largest queue size vublk accepts (`vublk --queue-size`, its default too).
pub const VUBLK_MAX_QUEUE_SIZE: u16 = 1024;
/// Guest memory is mapped page by page: QEMU rounds a memfd up to the host page size and then
/// refuses the mismatch ("backing store size ... does not match 'size' option").
pub const PAGE_SIZE: u64 = 4096;

/// What vublk was started with for this export, when the caller knows it. `None` falls back to
/// vublk's own limits, which any export satisfies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendLimits {
    /// `vublk --num-queues` (default 1): the VMM may use at most this many queues.
    pub num_queues: Option<u16>,
    /// `vublk --queue-size` (default 1024): the VMM may set queues at most this large.
    pub queue_size: Option<u16>,
}

/// A vublk export as a VMM should attach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    /// The export's unix socket (`vublk --socket-path`, or the `ListenStream=` of its socket unit).
    pub socket: PathBuf,
    /// Queues the VMM creates (QEMU `num-queues`, cloud-hypervisor `num_queues`).
    pub num_queues: u16,
    /// Size of each queue, `None` for the VMM's default.
    pub queue_size: Option<u16>,
    /// What the export offers, if known.
    pub backend: BackendLimits,
}

/// Why a command line cannot be produced.
#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    #[error("--queues must be at least 1")]
    NoQueues,
    #[error("{asked} queues is more than {limit}")]
    TooManyQueues { asked: u16, limit: String },
    #[error("queue size {0} is not a power of two (virtio split queues must be)")]
    QueueSizeNotPowerOfTwo(u16),
    #[error("queue size {asked} is larger than {limit}")]
    QueueSizeTooLarge { asked: u16, limit: String },
    #[error("queue size {asked} is too small: {why}")]
    QueueSizeTooSmall { asked: u16, why: &'static str },
    #[error("guest memory must not be empty")]
    NoMemory,
    #[error(
        "guest memory of {0} bytes is not a multiple of the {PAGE_SIZE}-byte page: the VMM \
         cannot back it with a shared memfd of exactly that size"
    )]
    MemoryNotPageAligned(u64),
    #[error("socket path {0:?} is not UTF-8: VMM option strings cannot carry it")]
    SocketNotUtf8(PathBuf),
    #[error("socket path {path:?} cannot be passed to {vmm}: {why}")]
    SocketPath {
        path: PathBuf,
        vmm: &'static str,
        why: &'static str,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("--reconnect must be at least 1 second (0 would turn reconnecting off)")]
    ZeroReconnect,
    #[error(
        "the QEMU version decides how --reconnect is spelled (reconnect= before 9.2, \
         reconnect-ms= since) and it could not be determined: {0}; pass --qemu-version X.Y"
    )]
    UnknownQemuVersion(String),
}

/// The checks every VMM needs: queue count and size within what vublk (and the export, if
/// known) accepts, guest memory present and page-aligned, a socket path that is text.
pub fn check_export(export: &Export, mem: u64) -> Result<(), CmdlineError> {
    if export.num_queues == 0 {
        return Err(CmdlineError::NoQueues);
    }
    match export.backend.num_queues {
        Some(offered) if export.num_queues > offered => {
            return Err(CmdlineError::TooManyQueues {
                asked: export.num_queues,
                limit: format!(
                    "the export offers ({offered}, vublk --num-queues): the VMM would fail \
                     when vublk answers GET_QUEUE_NUM; start vublk with --num-queues {} or ask \
                     for fewer",
                    export.num_queues
                ),
            });
        }
        _ if export.num_queues > VUBLK_MAX_QUEUES => {
            return Err(CmdlineError::TooManyQueues {
                asked: export.num_queues,
                limit: format!("vublk serves ({VUBLK_MAX_QUEUES})"),
            });
        }
        _ => {}
    }
    if let Some(size) = export.queue_size {
        if !size.is_power_of_two() {
            return Err(CmdlineError::QueueSizeNotPowerOfTwo(size));
        }
        let (max, who) = match export.backend.queue_size {
            Some(max) => (max, "the export accepts (vublk --queue-size)"),
            None => (VUBLK_MAX_QUEUE_SIZE, "vublk accepts"),
        };
        if size > max {
            return Err(CmdlineError::QueueSizeTooLarge {
                asked: size,
                limit: format!("{max}, the most {who}"),
            });
        }
    }
    if mem == 0 {
        return Err(CmdlineError::NoMemory);
    }
    if mem % PAGE_SIZE != 0 {
        return Err(CmdlineError::MemoryNotPageAligned(mem));
    }
    if export.socket.to_str().is_none() {
        return Err(CmdlineError::SocketNotUtf8(export.socket.clone()));
    }
    Ok(())
}

/// The socket path as text; [`check_export`] has made sure it is UTF-8.
fn socket_str(export: &Export) -> Result<&str, CmdlineError> {
    export
        .socket
        .to_str()
        .ok_or_else(|| CmdlineError::SocketNotUtf8(export.socket.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(num_queues: u16, queue_size: Option<u16>) -> Export {
        Export {
            socket: "/run/vublk/a.sock".into(),
            num_queues,
            queue_size,
            backend: BackendLimits::default(),
        }
    }

    #[test]
    fn accepts_what_vublk_serves() {
        check_export(&export(64, Some(1024)), 1 << 30).unwrap();
        check_export(&export(1, None), PAGE_SIZE).unwrap();
    }

    #[test]
    fn refuses_queue_counts_beyond_the_export() {
        assert!(matches!(
            check_export(&export(0, None), 1 << 30),
            Err(CmdlineError::NoQueues)
        ));
        assert!(matches!(
            check_export(&export(65, None), 1 << 30),
            Err(CmdlineError::TooManyQueues { asked: 65, .. })
        ));
        let mut e = export(4, None);
        e.backend.num_queues = Some(2);
        let err = check_export(&e, 1 << 30).unwrap_err();
        assert_eq!(
            err.to_string(),
            "4 queues is more than the export offers (2, vublk --num-queues): the VMM would \
             fail when vublk answers GET_QUEUE_NUM; start vublk with --num-queues 4 or ask for \
             fewer"
        );
        e.backend.num_queues = Some(4);
        check_export(&e, 1 << 30).unwrap();
    }

    #[test]
    fn refuses_queue_sizes_virtio_or_the_export_cannot_take() {
        assert_eq!(
            check_export(&export(1, Some(100)), 1 << 30)
                .unwrap_err()
                .to_string(),
            "queue size 100 is not a power of two (virtio split queues must be)"
        );
        assert!(matches!(
            check_export(&export(1, Some(2048)), 1 << 30),
            Err(CmdlineError::QueueSizeTooLarge { asked: 2048, .. })
        ));
        let mut e = export(1, Some(512));
        e.backend.queue_size = Some(256);
        assert_eq!(
            check_export(&e, 1 << 30).unwrap_err().to_string(),
            "queue size 512 is larger than 256, the most the export accepts (vublk --queue-size)"
        );
    }

    #[test]
    fn refuses_memory_the_backend_cannot_map() {
        assert!(matches!(
            check_export(&export(1, None), 0),
            Err(CmdlineError::NoMemory)
        ));
        assert!(matches!(
            check_export(&export(1, None), 1_000_001),
            Err(CmdlineError::MemoryNotPageAligned(1_000_001))
        ));
    }
}
