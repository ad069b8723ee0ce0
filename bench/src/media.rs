//! The backings a benchmark runs on, prepared once per bench run and shared by every system.
//!
//! Images are filled with data first: a sparse image lets every backend answer reads of holes
//! without touching storage, which flatters them all and hides the difference between them.

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
}

impl Medium {
    pub fn name(self) -> &'static str {
        match self {
            Medium::Tmpfs => "tmpfs",
            Medium::Disk => "disk",
            Medium::Null => "null",
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
            _ => bail!("unknown medium {s:?} (tmpfs, disk, null)"),
        })
    }
}

impl fmt::Display for Medium {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A medium ready to serve: the image (none for null) and the disk size. Dropping it removes the
/// image.
pub struct Prepared {
    pub medium: Medium,
    /// The image file; `None` for the null backing.
    pub image: Option<PathBuf>,
    pub size: u64,
    _dir: Option<tempfile::TempDir>,
}

impl Prepared {
    /// The image path as a string, for command lines.
    pub fn image_str(&self) -> Option<&str> {
        self.image.as_deref().and_then(Path::to_str)
    }
}

/// Prepares `medium` of `size` bytes (a multiple of 1 MiB). Images go to a fresh directory under
/// /dev/shm (tmpfs) or under `disk_dir` (disk), which must be on a filesystem with O_DIRECT.
pub fn prepare(medium: Medium, size: u64, disk_dir: &Path) -> Result<Prepared> {
    const CHUNK: usize = 1 << 20;
    if size == 0 || size % CHUNK as u64 != 0 {
        bail!("image size {size} is not a positive multiple of 1 MiB");
    }
    let parent = match medium {
        Medium::Null => {
            return Ok(Prepared {
                medium,
                image: None,
                size,
                _dir: None,
            })
        }
        Medium::Tmpfs => Path::new("/dev/shm"),
        Medium::Disk => disk_dir,
    };
    let dir = tempfile::Builder::new()
        .prefix("vublk-bench-")
        .tempdir_in(parent)
        .with_context(|| format!("create a directory under {}", parent.display()))?;
    let image = dir.path().join(format!("{medium}.img"));
    let mut f = File::create(&image).with_context(|| format!("create {}", image.display()))?;
    // One chunk of pattern, stamped with its index so no two chunks are alike (nothing on the
    // way can deduplicate or compress them).
    let mut chunk = vublk_test_support::pattern::pattern(0xbe7c, 0, CHUNK);
    for i in 0..size / CHUNK as u64 {
        chunk[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all(&chunk)
            .with_context(|| format!("fill {}", image.display()))?;
    }
    f.sync_all()?;
    if medium == Medium::Disk {
        check_direct(&image)?;
    }
    Ok(Prepared {
        medium,
        image: Some(image),
        size,
        _dir: Some(dir),
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
