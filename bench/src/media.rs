//! The backings a benchmark runs on, prepared once per medium and number of VMs and shared by
//! every system.
//!
//! Images are filled with data first: a sparse image lets every backend answer reads of holes
//! without touching storage, which flatters them all and hides the difference between them.
//!
//! A cell with several VMs gets an image per VM (each VM its own disk, as in a real host), and
//! the images split the size one VM would get: 8 VMs on a 1 GiB medium have 128 MiB each, so
//! every cell works over the same amount of data (and 16 VMs do not need 16 GiB of tmpfs).

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Error, Result};

/// Where the data lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Medium {
    /// A filled image on tmpfs (/dev/shm): I/O is a memory copy, so the backend's own overhead
    /// dominates.
    Tmpfs,
    /// A filled image on the machine's real disk, opened with O_DIRECT by every backend.
    Disk,
    /// The null backing (vublk `--null`, QSD `null-co` with `read-zeroes=on`): no I/O at all.
    Null,
    /// Filled RBD images on a throwaway one-node Ceph cluster (scripts/ceph-dev.sh: a memstore
    /// OSD on 127.0.0.1), served through librbd (vublk `rbd:`, QSD `driver=rbd`), librbd's
    /// cache off in both.
    Rbd,
}

impl Medium {
    pub fn name(self) -> &'static str {
        match self {
            Medium::Tmpfs => "tmpfs",
            Medium::Disk => "disk",
            Medium::Null => "null",
            Medium::Rbd => "rbd",
        }
    }

    /// Whether backends open this medium with O_DIRECT.
    pub fn direct(self) -> bool {
        self == Medium::Disk
    }
}

impl FromStr for Medium {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "tmpfs" => Medium::Tmpfs,
            "disk" => Medium::Disk,
            "null" => Medium::Null,
            "rbd" => Medium::Rbd,
            _ => bail!("unknown medium {s:?} (tmpfs, disk, null, rbd)"),
        })
    }
}

impl fmt::Display for Medium {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A medium ready to serve `vms` VMs: an image per VM (none for null) and the size of each
/// VM's disk. Dropping it removes the images.
pub struct Prepared {
    pub medium: Medium,
    /// The image file of each VM; empty for the null backing; `rbd:rbd/NAME` for RBD.
    pub images: Vec<PathBuf>,
    /// The Ceph configuration of the RBD medium's cluster.
    pub ceph_conf: Option<PathBuf>,
    pub vms: u16,
    /// Bytes per VM's disk.
    pub size: u64,
    _dir: Option<tempfile::TempDir>,
}

impl Prepared {
    /// VM `vm`'s image path as a string, for command lines; `None` for null.
    pub fn image_str(&self, vm: usize) -> Option<&str> {
        self.images.get(vm).and_then(|p| p.to_str())
    }

    /// Images that are only named (nothing is created or removed), for unit tests.
    #[cfg(test)]
    pub(crate) fn for_test(medium: Medium, images: Vec<PathBuf>, size: u64) -> Prepared {
        Prepared {
            medium,
            vms: images.len().max(1) as u16,
            images,
            ceph_conf: None,
            size,
            _dir: None,
        }
    }
}

/// The bytes each of `vms` VMs gets of `size`: an equal share, rounded down to whole MiB.
pub fn share(size: u64, vms: u16) -> u64 {
    size / u64::from(vms.max(1)) / CHUNK as u64 * CHUNK as u64
}

const CHUNK: usize = 1 << 20;

/// Prepares `medium` for `vms` VMs sharing `size` bytes (a multiple of 1 MiB, at least 1 MiB
/// per VM). Images go to a fresh directory under /dev/shm (tmpfs) or under `disk_dir` (disk),
/// which must be on a filesystem with O_DIRECT.
pub fn prepare(medium: Medium, size: u64, vms: u16, disk_dir: &Path) -> Result<Prepared> {
    if size == 0 || size % CHUNK as u64 != 0 {
        bail!("image size {size} is not a positive multiple of 1 MiB");
    }
    if vms == 0 {
        bail!("no VMs to prepare {medium} for");
    }
    let each = share(size, vms);
    if each == 0 {
        bail!(
            "{} MiB cannot be shared by {vms} VMs (at least 1 MiB each)",
            size >> 20
        );
    }
    let parent = match medium {
        Medium::Null => {
            return Ok(Prepared {
                medium,
                images: Vec::new(),
                ceph_conf: None,
                vms,
                size: each,
                _dir: None,
            })
        }
        Medium::Rbd => return prepare_rbd(each, vms),
        Medium::Tmpfs => Path::new("/dev/shm"),
        Medium::Disk => disk_dir,
    };
    let dir = tempfile::Builder::new()
        .prefix("vublk-bench-")
        .tempdir_in(parent)
        .with_context(|| format!("create a directory under {}", parent.display()))?;
    let mut images = Vec::new();
    for vm in 0..vms {
        let image = if vms == 1 {
            dir.path().join(format!("{medium}.img"))
        } else {
            dir.path().join(format!("{medium}-vm{vm}.img"))
        };
        fill(&image, each, vm)?;
        if medium == Medium::Disk {
            check_direct(&image)?;
        }
        images.push(image);
    }
    Ok(Prepared {
        medium,
        images,
        ceph_conf: None,
        vms,
        size: each,
        _dir: Some(dir),
    })
}

/// Writes VM `vm`'s image of `size` bytes at `image`: chunks of pattern, each stamped with its
/// image and index so no two chunks are alike (nothing on the way can deduplicate or compress
/// them).
fn fill(image: &Path, size: u64, vm: u16) -> Result<()> {
    let mut chunk = vublk_test_support::pattern::pattern(0xbe7c, 0, CHUNK);
    let mut f = File::create(image).with_context(|| format!("create {}", image.display()))?;
    for i in 0..size / CHUNK as u64 {
        chunk[..8].copy_from_slice(&i.to_le_bytes());
        chunk[8..10].copy_from_slice(&vm.to_le_bytes());
        f.write_all(&chunk)
            .with_context(|| format!("fill {}", image.display()))?;
    }
    f.sync_all()?;
    Ok(())
}

/// The RBD medium: the process's cluster (started at the first call, under the system's temp
/// directory, killed when the benchmark exits) with an image per VM, filled like the others
/// (written to a file on tmpfs, then `rbd import`).
fn prepare_rbd(each: u64, vms: u16) -> Result<Prepared> {
    let cluster = vublk_test_support::ceph::cluster(&std::env::temp_dir().join("vublk-bench-ceph"))
        .with_context(|| {
            format!(
                "the rbd medium needs a Ceph cluster: {}",
                vublk_test_support::ceph::NOT_INSTALLED
            )
        })?;
    let dir = tempfile::Builder::new()
        .prefix("vublk-bench-rbd-")
        .tempdir_in("/dev/shm")
        .context("create a directory under /dev/shm")?;
    let mut images = Vec::new();
    for vm in 0..vms {
        let file = dir.path().join("fill.img");
        fill(&file, each, vm)?;
        let spec = cluster.import_image(&format!("bench-vm{vm}"), &file);
        std::fs::remove_file(&file)?;
        images.push(PathBuf::from(spec));
    }
    Ok(Prepared {
        medium: Medium::Rbd,
        images,
        ceph_conf: Some(cluster.conf()),
        vms,
        size: each,
        _dir: None,
    })
}

/// Fails early, with a clear message, when the disk image's filesystem refuses O_DIRECT.
fn check_direct(image: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(image)
        .with_context(|| {
            format!(
                "{} cannot be opened with O_DIRECT (choose another --disk-dir)",
                image.display()
            )
        })?;
    Ok(())
}
