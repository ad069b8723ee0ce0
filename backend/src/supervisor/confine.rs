//! What each worker's sandbox allows (sandbox/): the supervisor decides it from the exports the
//! VMM may use and `--worker-allow`, and passes it on the worker's command line.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::disk::DiskSpec;
use crate::export::OpenAs;
use crate::identity::Peer;
use crate::sandbox::{PathRule, Plan, Profile, TestMisdeed};

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
/// what a block device's probe reads in sysfs, the test I/O gates, and `--worker-allow`. A
/// worker with an `rbd:` export gets the [`Profile::Rbd`] profile and reads its Ceph files
/// ([`ceph_paths`]).
pub(super) fn plan_for(exports: &[Export], options: &WorkerOptions, peer: &Peer) -> Plan {
    let mut paths = Vec::new();
    let mut profile = Profile::Files;
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
        if let DiskSpec::Rbd(spec) = &export.disk {
            profile = Profile::Rbd;
            paths.extend(
                ceph_paths(&spec.conf)
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
        profile,
        test: options.test.clone(),
    }
}

/// What librados reads for a cluster whose configuration is `conf`: the file, its directory and
/// /etc/ceph (where the default keyring paths are, and where deployments keep the keyrings a
/// configuration names with `$cluster` or `$name`), and every absolute `keyring` or `keyfile`
/// path the configuration names without a `$` (a key kept elsewhere). Read only.
pub(crate) fn ceph_paths(conf: &Path) -> Vec<PathBuf> {
    let mut paths = vec![conf.to_path_buf(), PathBuf::from("/etc/ceph")];
    if let Some(dir) = conf.parent().filter(|d| !d.as_os_str().is_empty()) {
        paths.push(dir.to_path_buf());
    }
    if let Ok(text) = std::fs::read_to_string(conf) {
        paths.extend(keyrings_named(&text));
    }
    paths
}

/// The absolute key paths a Ceph configuration names without metavariables (`keyring = A,B`
/// or `keyfile = C`, in any section).
fn keyrings_named(conf: &str) -> Vec<PathBuf> {
    conf.lines()
        .filter_map(|line| line.split_once('='))
        .filter(|(key, _)| matches!(key.trim(), "keyring" | "keyfile"))
        .flat_map(|(_, value)| {
            // A comment ends the value.
            let value = value.split(['#', ';']).next().unwrap_or("");
            value.split(',').map(str::trim)
        })
        .filter(|path| path.starts_with('/') && !path.contains('$'))
        .map(PathBuf::from)
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyrings_are_read_from_the_configuration() {
        let conf = "[global]\nmon_host = 127.0.0.1\n keyring = /srv/a.keyring, /srv/b.keyring # two\n[client.x]\nkeyring=/etc/ceph/$cluster.$name.keyring\nkeyfile = /srv/c.key\nkey ring = /not\n";
        assert_eq!(
            keyrings_named(conf),
            [
                PathBuf::from("/srv/a.keyring"),
                PathBuf::from("/srv/b.keyring"),
                PathBuf::from("/srv/c.key")
            ]
        );
        let paths = ceph_paths(Path::new("/nonexistent/dir/ceph.conf"));
        assert!(paths.contains(&PathBuf::from("/nonexistent/dir")));
        assert!(paths.contains(&PathBuf::from("/etc/ceph")));
    }
}
