//! What each worker's sandbox allows (sandbox/): the supervisor decides it from the exports the
//! VMM may use and `--worker-allow`, and passes it on the worker's command line.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::disk::DiskSpec;
use crate::export::OpenAs;
use crate::identity::Peer;
use crate::sandbox::{PathRule, Plan, TestMisdeed};

use super::Export;

/// What workers may do besides serving their exports (`--worker-allow`, `--test-worker-arg`).
#[derive(Debug, Clone, Default)]
pub struct WorkerOptions {
    /// Paths every worker may read and write (and what is beneath them).
    pub allow: Vec<PathBuf>,
    /// Test only.
    pub test: Vec<TestMisdeed>,
}

/// The sandbox of a worker for `peer`: the images of the exports it is allowed on that the
/// worker opens itself (`open-as=vmm`; with `open-as=daemon` the file comes as a descriptor),
/// what a block device's probe reads in sysfs, the test I/O gates, and `--worker-allow`.
pub(super) fn plan_for(exports: &[Export], options: &WorkerOptions, peer: &Peer) -> Plan {
    let mut paths = Vec::new();
    for export in exports
        .iter()
        .filter(|e| e.listener.is_some())
        .map(|e| &e.spec)
        .filter(|spec| spec.allow.allows(peer.uid, peer.gid, &peer.groups))
    {
        if let (OpenAs::Vmm, DiskSpec::Path(path)) = (export.open_as, &export.disk) {
            paths.push(PathRule {
                path: path.clone(),
                write: !export.open.read_only,
            });
            paths.extend(
                block_queue_dirs(path)
                    .into_iter()
                    .map(|path| PathRule { path, write: false }),
            );
        }
        if let Some(gate) = &export.test_io_gate {
            paths.push(PathRule {
                path: gate.clone(),
                write: true,
            });
        }
    }
    paths.extend(options.allow.iter().map(|path| PathRule {
        path: path.clone(),
        write: true,
    }));
    paths.dedup();
    Plan {
        paths,
        namespaces: Vec::new(),
        test: options.test.clone(),
    }
}

/// For a block device, the sysfs directories of its queue limits (a partition's are its
/// disk's) that disk/probe.rs reads.
fn block_queue_dirs(path: &Path) -> Vec<PathBuf> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    if !meta.file_type().is_block_device() {
        return Vec::new();
    }
    let rdev = meta.rdev();
    let dev = format!("/sys/dev/block/{}:{}", libc::major(rdev), libc::minor(rdev));
    [format!("{dev}/queue"), format!("{dev}/../queue")]
        .iter()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect()
}
