//! The backing store behind a virtio-blk device: a raw image file, a block device, an RBD image
//! on a Ceph cluster (io/rbd/), or nothing at all (`null`, for measuring the device overhead
//! alone).
//!
//! Opening a disk also decides what it can do — discard, write-zeroes, the alignment O_DIRECT
//! needs — so the device offers only features the backing really has.

pub(crate) mod probe;

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use probe::DirectIoAlignment;

use crate::io::inline::{self, InlineIo};
use crate::io::mapped::MappedImage;
use crate::io::rbd::{RbdError, RbdImage, RbdSpec};

/// Where the data lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskSpec {
    /// A raw image file or a block device.
    Path(PathBuf),
    /// Reads return zeroes, writes are dropped; `size` bytes of capacity.
    Null { size: u64 },
    /// An RBD image (`rbd:POOL/IMAGE`).
    Rbd(Box<RbdSpec>),
}

/// How the backing is opened.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct OpenOptions {
    pub read_only: bool,
    pub direct: bool,
}

/// Which file a path led to: device and inode, as `stat` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// How a write-zeroes request is carried out on this backing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroesMethod {
    /// `fallocate(FALLOC_FL_ZERO_RANGE)`: zeroed and still allocated.
    ZeroRange,
    /// The filesystem has no ZERO_RANGE (tmpfs): punch a hole, then allocate it again, so a
    /// request without the UNMAP flag still leaves the range allocated.
    PunchThenAllocate,
    /// Nothing to do (null backing).
    Nothing,
    /// The backing zeroes ranges itself (rbd_aio_write_zeroes).
    Backing,
}

/// What the backing is and what it can do.
#[derive(Debug)]
pub struct Disk {
    pub backing: Backing,
    /// Bytes visible to the guest: the backing's size rounded down to whole 512-byte sectors.
    pub capacity: u64,
    pub read_only: bool,
    pub direct: bool,
    /// Set when `direct`: what O_DIRECT requires of buffers and offsets.
    pub dio_align: DirectIoAlignment,
    /// `fallocate(PUNCH_HOLE)` works: discard is offered, and write-zeroes may unmap.
    pub punch_hole: bool,
    /// How write-zeroes is done; `None`: the feature is not offered.
    pub write_zeroes: Option<ZeroesMethod>,
    /// Whether queue threads may read and write the backing themselves before io_uring
    /// (io/inline.rs); never with O_DIRECT.
    pub inline_read: InlineIo,
    pub inline_write: InlineIo,
    /// The image mapped, on memory filesystems (io/mapped.rs): requests become copies. Shared
    /// with the queues' engines.
    pub mapping: Option<Arc<MappedImage>>,
    /// A human name for logs and the default serial.
    pub name: String,
}

#[derive(Debug)]
pub enum Backing {
    /// A regular file or a block device.
    File {
        file: File,
        block_device: bool,
    },
    Null,
    /// Shared by the device's queues.
    Rbd(Arc<RbdImage>),
}

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot get the size of {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is neither a regular file nor a block device")]
    NotAFileOrBlockDevice { path: PathBuf },
    #[error("{path} is a symbolic link, or a directory on its way is (open-as=daemon does not follow symbolic links)")]
    SymbolicLink { path: PathBuf },
    #[error("{path} is no longer the file vublk started with (device and inode changed)")]
    Replaced { path: PathBuf },
    #[error("the null backing needs a size of at least 512 bytes")]
    NullTooSmall,
    #[error(transparent)]
    Rbd(#[from] RbdError),
}

impl Disk {
    /// Opens the backing described by `spec`.
    pub fn open(spec: &DiskSpec, options: OpenOptions) -> Result<Disk, DiskError> {
        match spec {
            DiskSpec::Null { size } => Self::null(*size, options),
            DiskSpec::Path(path) => Self::open_path(path, options),
            DiskSpec::Rbd(spec) => Self::rbd(spec, options),
        }
    }

    /// Connects to the cluster and opens the image, as the calling process's user (its
    /// keyring must be readable by it). Discard and write-zeroes are librbd's; O_DIRECT means
    /// nothing there (librbd's cache is always off).
    fn rbd(spec: &RbdSpec, options: OpenOptions) -> Result<Disk, DiskError> {
        let image = RbdImage::open(spec, options.read_only)?;
        Ok(Disk {
            capacity: image.size & !511,
            backing: Backing::Rbd(Arc::new(image)),
            read_only: options.read_only,
            direct: false,
            dio_align: DirectIoAlignment::NONE,
            punch_hole: !options.read_only,
            write_zeroes: (!options.read_only).then_some(ZeroesMethod::Backing),
            inline_read: InlineIo::Never,
            inline_write: InlineIo::Never,
            mapping: None,
            name: spec.name(),
        })
    }

    fn null(size: u64, options: OpenOptions) -> Result<Disk, DiskError> {
        if size < 512 {
            return Err(DiskError::NullTooSmall);
        }
        Ok(Disk {
            backing: Backing::Null,
            capacity: size & !511,
            read_only: options.read_only,
            direct: false,
            dio_align: DirectIoAlignment::NONE,
            punch_hole: !options.read_only,
            write_zeroes: (!options.read_only).then_some(ZeroesMethod::Nothing),
            inline_read: InlineIo::Never,
            inline_write: InlineIo::Never,
            mapping: None,
            name: format!("null:{size}"),
        })
    }

    /// Opens the image or block device at `path` with the flags `options` ask for.
    pub fn open_file(path: &Path, options: OpenOptions) -> Result<File, DiskError> {
        let mut flags = libc::O_CLOEXEC;
        if options.direct {
            flags |= libc::O_DIRECT;
        }
        std::fs::OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .custom_flags(flags)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_owned(),
                source,
            })
    }

    /// Opens the image or block device at `path` for `open-as=daemon`, where the supervisor
    /// opens it with its own rights on behalf of a VMM: no symbolic link is followed, in the
    /// last component or any directory before it (whoever may write one of those directories
    /// could otherwise point the path at any file of the host), only a regular file or a block
    /// device is opened (a FIFO or a device is not even opened: that can block or have side
    /// effects), and with `expected`, only that file (device and inode), so a file put in the
    /// image's place after start-up is refused. Returns the file and what it is.
    pub fn open_for_daemon(
        path: &Path,
        options: OpenOptions,
        expected: Option<FileId>,
    ) -> Result<(File, FileId), DiskError> {
        let open_err = |source: io::Error| DiskError::Open {
            path: path.to_owned(),
            source,
        };
        let found = nofollow::open_path(path).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => DiskError::SymbolicLink {
                path: path.to_owned(),
            },
            _ => open_err(e),
        })?;
        let stat = rustix::fs::fstat(&found).map_err(|e| open_err(e.into()))?;
        let id = FileId {
            dev: stat.st_dev,
            ino: stat.st_ino,
        };
        let file_type = rustix::fs::FileType::from_raw_mode(stat.st_mode);
        if file_type == rustix::fs::FileType::Symlink {
            // Only on the fallback for kernels without openat2 (O_PATH|O_NOFOLLOW stops at the
            // link itself).
            return Err(DiskError::SymbolicLink {
                path: path.to_owned(),
            });
        }
        if expected.is_some_and(|e| e != id) {
            return Err(DiskError::Replaced {
                path: path.to_owned(),
            });
        }
        if !matches!(
            file_type,
            rustix::fs::FileType::RegularFile | rustix::fs::FileType::BlockDevice
        ) {
            return Err(DiskError::NotAFileOrBlockDevice {
                path: path.to_owned(),
            });
        }
        // Open the inode just checked for I/O through its /proc link, which cannot lead
        // anywhere else.
        use std::os::fd::AsRawFd;
        let file = Self::open_file(
            Path::new(&format!("/proc/self/fd/{}", found.as_raw_fd())),
            options,
        )
        .map_err(|e| match e {
            DiskError::Open { source, .. } => open_err(source),
            other => other,
        })?;
        Ok((file, id))
    }

    fn open_path(path: &Path, options: OpenOptions) -> Result<Disk, DiskError> {
        Self::from_file(Self::open_file(path, options)?, path, options)
    }

    /// A disk on a file opened by someone else (the supervisor, for `open-as=daemon`); `path`
    /// names it in logs.
    pub fn from_file(file: File, path: &Path, options: OpenOptions) -> Result<Disk, DiskError> {
        let open_err = |source| DiskError::Open {
            path: path.to_owned(),
            source,
        };
        let meta = file.metadata().map_err(open_err)?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(DiskError::NotAFileOrBlockDevice {
                path: path.to_owned(),
            });
        }
        let size = if block_device {
            probe::block_device_size(&file)
        } else {
            Ok(meta.len())
        }
        .map_err(|source| DiskError::Size {
            path: path.to_owned(),
            source,
        })?;
        let dio_align = if options.direct {
            probe::direct_io_alignment(&file, block_device)
        } else {
            DirectIoAlignment::NONE
        };
        let (punch_hole, write_zeroes) = if options.read_only {
            (false, None)
        } else if block_device {
            probe::block_device_zeroing(&file)
        } else {
            probe::file_zeroing(&file, size)
        };
        let (inline_read, inline_write) = if options.direct {
            (InlineIo::Never, InlineIo::Never)
        } else {
            use std::os::fd::AsRawFd;
            (
                inline::read_policy(file.as_raw_fd(), size),
                inline::write_policy(file.as_raw_fd()),
            )
        };
        let capacity = size & !511;
        let mapping = if inline_read == InlineIo::Memory && capacity > 0 {
            MappedImage::new(&file, capacity, options.read_only)
                .inspect_err(|e| {
                    tracing::debug!("{}: not mapped ({e}); using system calls", path.display())
                })
                .ok()
                .map(Arc::new)
        } else {
            None
        };
        Ok(Disk {
            backing: Backing::File { file, block_device },
            inline_read,
            inline_write,
            mapping,
            capacity,
            read_only: options.read_only,
            direct: options.direct,
            dio_align,
            punch_hole,
            write_zeroes,
            name: path.display().to_string(),
        })
    }

    /// The backing's size now, in bytes (it may have grown since it was opened): the file's
    /// length, the block device's size (BLKGETSIZE64), or the RBD image's. A null disk keeps
    /// its size.
    pub fn current_size(&self) -> std::io::Result<u64> {
        match &self.backing {
            Backing::File {
                file,
                block_device: true,
            } => probe::block_device_size(file),
            Backing::File { file, .. } => Ok(file.metadata()?.len()),
            Backing::Null => Ok(self.capacity),
            Backing::Rbd(image) => image.current_size(),
        }
    }

    /// Discard is offered when holes can be punched.
    pub fn supports_discard(&self) -> bool {
        self.punch_hole && !self.read_only
    }

    /// The default serial: the image's file name, shortened, plus a hash of its full path so
    /// two images called `disk.img` in different directories still differ. At most 20 bytes.
    pub fn default_serial(&self) -> String {
        let base: String = Path::new(&self.name)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            .take(11)
            .collect();
        let hash = fnv1a32(self.name.as_bytes());
        if base.is_empty() {
            format!("vublk-{hash:08x}")
        } else {
            format!("{base}-{hash:08x}")
        }
    }
}

/// Opening a path without following symbolic links anywhere in it.
mod nofollow {
    use std::io;
    use std::os::fd::OwnedFd;
    use std::path::{Component, Path};

    use rustix::fs::{openat, openat2, Mode, OFlags, ResolveFlags, CWD};

    /// An `O_PATH` descriptor of `path` (nothing is opened for I/O); ELOOP if `path` or a
    /// directory on its way is a symbolic link. Without openat2 (before Linux 5.6, or under a
    /// seccomp filter that refuses it) the path is walked one component at a time.
    pub(super) fn open_path(path: &Path) -> io::Result<OwnedFd> {
        match openat2(
            CWD,
            path,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS,
        ) {
            Err(rustix::io::Errno::NOSYS | rustix::io::Errno::PERM) => walk(path),
            result => Ok(result?),
        }
    }

    /// `open_path` with one `O_PATH | O_NOFOLLOW` open per component, each relative to the
    /// directory the one before opened.
    pub(super) fn walk(path: &Path) -> io::Result<OwnedFd> {
        let start = if path.is_absolute() { "/" } else { "." };
        let mut at = openat(
            CWD,
            start,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut components = path
            .components()
            .filter(|c| !matches!(c, Component::RootDir | Component::CurDir))
            .peekable();
        if components.peek().is_none() && path.as_os_str().is_empty() {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        for component in components {
            let name = match component {
                Component::Normal(name) => name,
                _ => "..".as_ref(),
            };
            let next = openat(
                &at,
                name,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            if rustix::fs::FileType::from_raw_mode(rustix::fs::fstat(&next)?.st_mode)
                == rustix::fs::FileType::Symlink
            {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            at = next;
        }
        Ok(at)
    }
}

fn fnv1a32(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_serial_fits_and_differs_by_directory() {
        let open = |p: &str| Disk {
            backing: Backing::Null,
            capacity: 0,
            read_only: true,
            direct: false,
            dio_align: DirectIoAlignment::NONE,
            punch_hole: false,
            write_zeroes: None,
            inline_read: InlineIo::Never,
            inline_write: InlineIo::Never,
            mapping: None,
            name: p.to_string(),
        };
        let a = open("/srv/a/a-very-long-image-name.img").default_serial();
        let b = open("/srv/b/a-very-long-image-name.img").default_serial();
        assert!(a.len() <= 20, "{a}");
        assert!(a.starts_with("a-very-long-"), "{a}");
        assert_ne!(a, b);
        assert_eq!(
            a,
            open("/srv/a/a-very-long-image-name.img").default_serial()
        );
    }

    #[test]
    fn null_capacity_rounds_down_to_sectors() {
        let disk = Disk::open(&DiskSpec::Null { size: 4097 }, OpenOptions::default()).unwrap();
        assert_eq!(disk.capacity, 4096);
        assert!(Disk::open(&DiskSpec::Null { size: 100 }, OpenOptions::default()).is_err());
    }

    #[test]
    fn regular_file_probes_and_read_only_offers_no_zeroing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![7u8; 8192 + 100]).unwrap();
        let spec = DiskSpec::Path(path.clone());
        let rw = Disk::open(&spec, OpenOptions::default()).unwrap();
        assert_eq!(rw.capacity, 8192);
        assert!(rw.write_zeroes.is_some(), "ext4 and tmpfs both can zero");
        // Probing must not change the image.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8292);
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 8292]);
        let ro = Disk::open(
            &spec,
            OpenOptions {
                read_only: true,
                direct: false,
            },
        )
        .unwrap();
        assert!(!ro.supports_discard());
        assert!(ro.write_zeroes.is_none());
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = Disk::open(
            &DiskSpec::Path("/nonexistent/vublk.img".into()),
            OpenOptions::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vublk.img"), "{err}");
    }

    /// What `open_for_daemon` refuses, and that it says why: a symbolic link as the last
    /// component or as a directory on the way, what is neither a regular file nor a block
    /// device, and a file put in the image's place after start-up.
    #[test]
    fn open_for_daemon_follows_no_link_and_opens_only_the_file_it_started_with() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        // Without the links the temporary directory's own path may have.
        let base = dir.path().canonicalize().unwrap();
        let real = base.join("real");
        std::fs::create_dir(&real).unwrap();
        let img = real.join("disk.img");
        std::fs::write(&img, vec![1u8; 4096]).unwrap();
        let opts = OpenOptions::default();

        let (file, id) = Disk::open_for_daemon(&img, opts, None).unwrap();
        let meta = std::fs::metadata(&img).unwrap();
        assert_eq!(
            id,
            FileId {
                dev: meta.dev(),
                ino: meta.ino()
            }
        );
        assert_eq!(file.metadata().unwrap().ino(), meta.ino());
        // Opened for I/O as asked: writable unless read-only.
        let (file, _) = Disk::open_for_daemon(&img, opts, Some(id)).unwrap();
        assert!(Disk::from_file(file, &img, opts).is_ok());
        let (ro, _) = Disk::open_for_daemon(
            &img,
            OpenOptions {
                read_only: true,
                direct: false,
            },
            Some(id),
        )
        .unwrap();
        use std::io::Write;
        assert!((&ro).write(b"x").is_err(), "read-only open is writable");

        let link = base.join("link.img");
        std::os::unix::fs::symlink(&img, &link).unwrap();
        let dir_link = base.join("dirlink");
        std::os::unix::fs::symlink(&real, &dir_link).unwrap();
        let fifo = base.join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        for path in [link.clone(), dir_link.join("disk.img")] {
            let err = Disk::open_for_daemon(&path, opts, None).unwrap_err();
            assert!(
                matches!(err, DiskError::SymbolicLink { .. }),
                "{}: {err}",
                path.display()
            );
            assert_eq!(
                err.to_string(),
                format!("{} is a symbolic link, or a directory on its way is (open-as=daemon does not follow symbolic links)", path.display())
            );
        }
        // A FIFO is not opened at all (that would block until a writer came).
        for path in [fifo.clone(), real.clone(), PathBuf::from("/dev/null")] {
            let err = Disk::open_for_daemon(&path, opts, None).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                )
            );
        }

        // Same path, another file: refused, whether renamed over or deleted and recreated.
        let replacement = real.join("new.img");
        std::fs::write(&replacement, vec![2u8; 4096]).unwrap();
        std::fs::rename(&replacement, &img).unwrap();
        let err = Disk::open_for_daemon(&img, opts, Some(id)).unwrap_err();
        assert!(matches!(err, DiskError::Replaced { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "{} is no longer the file vublk started with (device and inode changed)",
                img.display()
            )
        );
        // Nor does a link to the original, put in its place, get through.
        std::fs::remove_file(&img).unwrap();
        std::os::unix::fs::symlink(&link, &img).unwrap();
        let err = Disk::open_for_daemon(&img, opts, Some(id)).unwrap_err();
        assert!(matches!(err, DiskError::SymbolicLink { .. }), "{err}");
        std::fs::remove_file(&img).unwrap();
        let err = Disk::open_for_daemon(&img, opts, Some(id)).unwrap_err();
        assert!(
            matches!(err, DiskError::Open { .. }) && err.to_string().contains("disk.img"),
            "{err}"
        );
    }

    /// The fallback for kernels without openat2 refuses the same links.
    #[test]
    fn walking_the_path_stops_at_every_symbolic_link() {
        let dir = tempfile::tempdir().unwrap();
        // Without the links the temporary directory's own path may have.
        let base = dir.path().canonicalize().unwrap();
        let real = base.join("real");
        std::fs::create_dir(&real).unwrap();
        let img = real.join("disk.img");
        std::fs::write(&img, b"x").unwrap();
        std::os::unix::fs::symlink(&img, base.join("link.img")).unwrap();
        std::os::unix::fs::symlink(&real, base.join("dirlink")).unwrap();
        let ino = |fd: &std::os::fd::OwnedFd| rustix::fs::fstat(fd).unwrap().st_ino;
        let want = rustix::fs::stat(&img).unwrap().st_ino;
        assert_eq!(ino(&nofollow::walk(&img).unwrap()), want);
        assert_eq!(
            ino(&nofollow::walk(&real.join("./../real/disk.img")).unwrap()),
            want
        );
        for path in [base.join("link.img"), base.join("dirlink/disk.img")] {
            let err = nofollow::walk(&path).unwrap_err();
            assert_eq!(
                err.raw_os_error(),
                Some(libc::ELOOP),
                "{}: {err}",
                path.display()
            );
        }
        assert_eq!(
            nofollow::walk(Path::new("")).unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
        assert_eq!(
            nofollow::walk(&img.join("x")).unwrap_err().raw_os_error(),
            Some(libc::ENOTDIR)
        );
    }
}
