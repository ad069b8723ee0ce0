//! What an export is: the disk behind one socket and how to serve it ([`ExportSpec`]), who may
//! use it ([`AllowList`]) and who opens its image ([`OpenAs`]). The command line builds these
//! (`cli.rs`); the supervisor checks connections against them, sends them to workers
//! (`handoff.rs`), and the device is built from them (`virtio_blk::device_for`), so none of
//! those needs to know about the command line.

use std::path::PathBuf;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::disk::{DiskSpec, FileId, OpenOptions};
use crate::endpoint::SocketAccess;
use crate::qos::QosLimits;
use crate::virtio_blk::DeviceOptions;

/// Who opens an export's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum OpenAs {
    // (No doc comments on the variants: clap would print them in --help.)
    // The per-VM worker opens the image as the VMM's user: a VM can only use images its owner
    // could open.
    Vmm,
    // The supervisor opens it and passes the open file to the worker.
    Daemon,
}

/// One export: what a worker needs to serve it (the endpoint stays with the supervisor).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportSpec {
    /// For logs and status: the socket path or `fd:N`.
    pub name: String,
    pub disk: DiskSpec,
    pub open: OpenOptions,
    pub device: DeviceOptions,
    pub open_as: OpenAs,
    pub retire_timeout_ms: u64,
    /// The ceiling of each queue's adaptive polling window (`--poll-max-us`).
    #[serde(default)]
    pub poll_max_us: u64,
    /// Test only (`--test-io-gate`).
    pub test_io_gate: Option<PathBuf>,
    /// Test only (`--test-io-gate-offset`).
    #[serde(default)]
    pub test_io_gate_offset: Option<u64>,
    /// Who may connect to this export's socket (mode and group of the socket vublk creates).
    #[serde(default)]
    pub socket: SocketAccess,
    /// Which peers the supervisor serves on this export; the rest are closed before any
    /// worker exists.
    #[serde(default)]
    pub allow: AllowList,
    /// For `open-as=daemon` on an image path: the file found at start-up. The supervisor
    /// opens the path again for each connection and refuses another file found there.
    #[serde(default)]
    pub daemon_file: Option<FileId>,
    /// Limits on what each device of this export serves (`iops-limit=`, ...; `vublk export
    /// set` changes them).
    #[serde(default)]
    pub qos: QosLimits,
}

/// `allow-uids=` / `allow-gids=` of an export (`--allow-uids`, `--allow-gids` for the main
/// one). `None` allows everyone who can connect to the socket. A peer is allowed when its uid
/// is in `uids`, or its gid or one of its supplementary groups (as the kernel recorded them at
/// connect) is in `gids`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowList {
    pub uids: Option<Vec<u32>>,
    pub gids: Option<Vec<u32>>,
}

impl AllowList {
    /// Whether there is any list at all.
    pub fn restricts(&self) -> bool {
        self.uids.is_some() || self.gids.is_some()
    }

    /// Whether a peer with these credentials may use the export.
    pub fn allows(&self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        if !self.restricts() {
            return true;
        }
        let uid_ok = self.uids.as_ref().is_some_and(|l| l.contains(&uid));
        let gid_ok = self
            .gids
            .as_ref()
            .is_some_and(|l| l.contains(&gid) || groups.iter().any(|g| l.contains(g)));
        uid_ok || gid_ok
    }
}
