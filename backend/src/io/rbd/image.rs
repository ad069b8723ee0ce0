//! An RBD image and the cluster connection under it: connect as a Ceph client id with a
//! configuration file (the keyring is wherever that file says, as librados reads it), open the
//! pool and the image, and close all three, in the reverse order, when the last user drops it.
//!
//! One [`RbdImage`] serves every queue of a device: librbd handles are thread-safe, and two
//! handles of one image in one process would take its exclusive lock (on by default for new
//! images) from each other at every write.

use std::ffi::{c_int, CString};
use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::ffi::{self, Api, ImageT, IoctxT, LoadError, RadosT};

/// Where an `rbd:` disk is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RbdSpec {
    pub pool: String,
    pub image: String,
    /// The Ceph configuration file (`--ceph-conf`).
    pub conf: PathBuf,
    /// The client id, without `client.` (`--ceph-id`).
    pub id: String,
    /// Seconds a connect or an operation waits for the cluster before failing; 0: operations
    /// wait until the cluster answers, and a connect gives up after [`CONNECT_TIMEOUT`] s.
    pub timeout_secs: u32,
}

/// How long a connect waits for the monitors without `--ceph-timeout`, in seconds: long enough
/// for a monitor election, short enough that a VMM trying to start a VM hears why it cannot.
pub const CONNECT_TIMEOUT: u32 = 30;

impl RbdSpec {
    /// Splits `POOL/IMAGE` (what follows `rbd:`).
    pub fn parse_location(location: &str) -> Result<(String, String), String> {
        match location.split_once('/') {
            Some((pool, image))
                if !pool.is_empty() && !image.is_empty() && !image.contains(['/', '@']) =>
            {
                Ok((pool.to_string(), image.to_string()))
            }
            _ => Err(format!(
                "'rbd:{location}' is not rbd:POOL/IMAGE (snapshots and namespaces are not supported)"
            )),
        }
    }

    /// `rbd:POOL/IMAGE`, for logs and the default serial.
    pub fn name(&self) -> String {
        format!("rbd:{}/{}", self.pool, self.image)
    }
}

#[derive(Debug, Error)]
pub enum RbdError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{what} for {name} has a NUL byte")]
    Nul { what: &'static str, name: String },
    #[error("cannot create a Ceph client as client.{id}")]
    Create {
        id: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the Ceph configuration {path}")]
    Conf {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the Ceph option {option}")]
    Option {
        option: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to the Ceph cluster of {conf} as client.{id} (is the keyring readable by this user?)")]
    Connect {
        conf: PathBuf,
        id: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the Ceph pool {pool}")]
    Pool {
        pool: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open {name} as client.{id}{}", caps_hint(id, pool, source))]
    Open {
        name: String,
        id: String,
        pool: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot get the size of {name}")]
    Size {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// What to add to an open refused by the OSDs: the usual cause is a client id whose caps do not
/// cover the pool (`osd 'profile rbd pool=OTHER'`), which librbd reports as a bare EPERM.
fn caps_hint(id: &str, pool: &str, source: &io::Error) -> String {
    match source.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => {
            format!(" (do client.{id}'s osd caps allow the pool {pool}?)")
        }
        _ => String::new(),
    }
}

/// A Ceph return value (0 or a negative errno) as a result.
fn check(ret: c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::from_raw_os_error(-ret))
    } else {
        Ok(())
    }
}

/// An open image, with its pool and cluster handles.
pub struct RbdImage {
    api: &'static Api,
    cluster: RadosT,
    ioctx: IoctxT,
    image: ImageT,
    /// Bytes, from `rbd_get_size` when opened.
    pub size: u64,
    pub name: String,
}

// SAFETY: librados and librbd handles may be used from any thread, and an image's aio calls
// from several threads at once (librbd serialises what needs it internally); `RbdImage` only
// hands the raw image handle to those calls.
unsafe impl Send for RbdImage {}
// SAFETY: as above: every use through `&RbdImage` is a thread-safe librbd call.
unsafe impl Sync for RbdImage {}

impl std::fmt::Debug for RbdImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdImage")
            .field("name", &self.name)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

fn cstring(what: &'static str, value: &str, name: &str) -> Result<CString, RbdError> {
    CString::new(value).map_err(|_| RbdError::Nul {
        what,
        name: name.to_string(),
    })
}

impl RbdImage {
    /// Connects to the cluster `spec` names and opens the image, read-only or not. librbd's
    /// own cache is turned off: a write is durable when it completes, as the device's
    /// write-through mode needs, and flushes cost nothing more. Its aio calls start their
    /// operations in the calling thread (`rbd_non_blocking_aio` off).
    pub fn open(spec: &RbdSpec, read_only: bool) -> Result<RbdImage, RbdError> {
        let api = ffi::api()?;
        let name = spec.name();
        let id = cstring("the Ceph id", &spec.id, &name)?;
        let conf = cstring(
            "the Ceph configuration path",
            &spec.conf.to_string_lossy(),
            &name,
        )?;
        let pool = cstring("the pool", &spec.pool, &name)?;
        let image_name = cstring("the image", &spec.image, &name)?;
        let mut image = RbdImage {
            api,
            cluster: std::ptr::null_mut(),
            ioctx: std::ptr::null_mut(),
            image: std::ptr::null_mut(),
            size: 0,
            name: name.clone(),
        };
        // SAFETY: `cluster` is written by rados_create; on failure it stays null and Drop
        // skips it.
        check(unsafe { (api.rados_create)(&mut image.cluster, id.as_ptr()) }).map_err(
            |source| RbdError::Create {
                id: spec.id.clone(),
                source,
            },
        )?;
        // SAFETY: a created, unconnected cluster handle and a NUL-terminated path.
        check(unsafe { (api.rados_conf_read_file)(image.cluster, conf.as_ptr()) }).map_err(
            |source| RbdError::Conf {
                path: spec.conf.clone(),
                source,
            },
        )?;
        let connect_timeout = if spec.timeout_secs == 0 {
            CONNECT_TIMEOUT
        } else {
            spec.timeout_secs
        };
        let mut options: Vec<(&'static str, String)> = vec![
            ("rbd_cache", "false".into()),
            // librbd starts an operation in the calling queue thread instead of handing it to
            // its own dispatch thread, which then wakes the messenger: one wakeup less per
            // request. Measured on the rbd medium (docs/benchmarks.md): random reads at iodepth
            // 1 gained 1.46× IOPS at 0.72× the CPU per I/O; the other cells did not move beyond
            // the machine's noise. The call still does not wait for the cluster: lock
            // acquisition and image refreshes queue the request inside librbd, and only
            // librados' in-flight throttle (`objecter_inflight_ops`, 1024 per client) can hold
            // it, until operations complete or time out.
            ("rbd_non_blocking_aio", "false".into()),
            ("client_mount_timeout", connect_timeout.to_string()),
        ];
        if spec.timeout_secs != 0 {
            options.push(("rados_osd_op_timeout", spec.timeout_secs.to_string()));
            options.push(("rados_mon_op_timeout", spec.timeout_secs.to_string()));
        }
        for (option, value) in options {
            image.set(option, &value)?;
        }
        // SAFETY: a configured cluster handle, connected once.
        check(unsafe { (api.rados_connect)(image.cluster) }).map_err(|source| {
            RbdError::Connect {
                conf: spec.conf.clone(),
                id: spec.id.clone(),
                source,
            }
        })?;
        // SAFETY: a connected cluster; `ioctx` is written on success and stays null otherwise.
        check(unsafe { (api.rados_ioctx_create)(image.cluster, pool.as_ptr(), &mut image.ioctx) })
            .map_err(|source| RbdError::Pool {
                pool: spec.pool.clone(),
                source,
            })?;
        let open = if read_only {
            api.rbd_open_read_only
        } else {
            api.rbd_open
        };
        // SAFETY: an open pool; `image` is written on success; no snapshot (NULL).
        check(unsafe {
            open(
                image.ioctx,
                image_name.as_ptr(),
                &mut image.image,
                std::ptr::null(),
            )
        })
        .map_err(|source| RbdError::Open {
            name: name.clone(),
            id: spec.id.clone(),
            pool: spec.pool.clone(),
            source,
        })?;
        // SAFETY: an open image and a u64 to write.
        check(unsafe { (api.rbd_get_size)(image.image, &mut image.size) })
            .map_err(|source| RbdError::Size { name, source })?;
        Ok(image)
    }

    fn set(&self, option: &'static str, value: &str) -> Result<(), RbdError> {
        let key = CString::new(option).expect("option names have no NUL");
        let value = CString::new(value).expect("option values have no NUL");
        // SAFETY: an unconnected cluster handle and two NUL-terminated strings, copied by
        // librados.
        check(unsafe { (self.api.rados_conf_set)(self.cluster, key.as_ptr(), value.as_ptr()) })
            .map_err(|source| RbdError::Option { option, source })
    }

    /// The image's size now, in bytes (`rbd_get_size`; librbd refreshes it when the image was
    /// resized elsewhere).
    pub fn current_size(&self) -> io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: an open image and a u64 to write.
        check(unsafe { (self.api.rbd_get_size)(self.image, &mut size) })?;
        Ok(size)
    }

    pub fn api(&self) -> &'static Api {
        self.api
    }

    /// The image handle, for the aio calls.
    pub fn handle(&self) -> ImageT {
        self.image
    }
}

impl Drop for RbdImage {
    fn drop(&mut self) {
        // SAFETY: each handle was opened by `open` and is closed once, image before pool before
        // cluster. rbd_close waits for the image's operations in flight; no engine is left to
        // receive their completions (they hold an `Arc` of this image while they have any).
        unsafe {
            if !self.image.is_null() {
                (self.api.rbd_close)(self.image);
            }
            if !self.ioctx.is_null() {
                (self.api.rados_ioctx_destroy)(self.ioctx);
            }
            if !self.cluster.is_null() {
                (self.api.rados_shutdown)(self.cluster);
            }
        }
    }
}
