//! The part of librados and librbd (Ceph 16.2, `rados/librados.h` and `rbd/librbd.h`) vublk
//! calls, loaded at run time with `libloading`: vublk builds, tests and runs on a machine
//! without Ceph, and only an `rbd:` export needs the libraries. They are loaded once per process,
//! at the first [`api`] call, and never unloaded (librados starts threads that run their code
//! until the process exits).
//!
//! Each declaration below is copied from the headers of Debian 12's librbd-dev (16.2.15); the
//! functions are all in the ABI of librados.so.2 and librbd.so.1 since Ceph 15 (write-zeroes,
//! the newest, came in 15.2).

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use libloading::Library;
use thiserror::Error;

pub type RadosT = *mut c_void;
pub type IoctxT = *mut c_void;
pub type ImageT = *mut c_void;
pub type CompletionT = *mut c_void;
/// `rbd_callback_t`: called on one of librbd's threads when an operation completes.
pub type Callback = unsafe extern "C" fn(completion: CompletionT, arg: *mut c_void);

/// The sonames of Ceph's client libraries.
pub const LIBRADOS: &str = "librados.so.2";
pub const LIBRBD: &str = "librbd.so.1";

#[derive(Debug, Error, Clone)]
pub enum LoadError {
    #[error("cannot load {library} for rbd: disks (install Debian's librbd1 package): {reason}")]
    Library {
        library: &'static str,
        reason: String,
    },
    #[error("{library} has no {symbol} (Ceph 15 or later is needed for rbd: disks): {reason}")]
    Symbol {
        library: &'static str,
        symbol: &'static str,
        reason: String,
    },
}

/// The functions, with the libraries that hold them.
pub struct Api {
    pub rados_create: unsafe extern "C" fn(cluster: *mut RadosT, id: *const c_char) -> c_int,
    pub rados_conf_read_file: unsafe extern "C" fn(cluster: RadosT, path: *const c_char) -> c_int,
    pub rados_conf_set:
        unsafe extern "C" fn(cluster: RadosT, option: *const c_char, value: *const c_char) -> c_int,
    pub rados_connect: unsafe extern "C" fn(cluster: RadosT) -> c_int,
    pub rados_shutdown: unsafe extern "C" fn(cluster: RadosT),
    pub rados_ioctx_create:
        unsafe extern "C" fn(cluster: RadosT, pool: *const c_char, ioctx: *mut IoctxT) -> c_int,
    pub rados_ioctx_destroy: unsafe extern "C" fn(ioctx: IoctxT),

    pub rbd_open: unsafe extern "C" fn(
        ioctx: IoctxT,
        name: *const c_char,
        image: *mut ImageT,
        snap_name: *const c_char,
    ) -> c_int,
    pub rbd_open_read_only: unsafe extern "C" fn(
        ioctx: IoctxT,
        name: *const c_char,
        image: *mut ImageT,
        snap_name: *const c_char,
    ) -> c_int,
    pub rbd_close: unsafe extern "C" fn(image: ImageT) -> c_int,
    pub rbd_get_size: unsafe extern "C" fn(image: ImageT, size: *mut u64) -> c_int,
    pub rbd_aio_create_completion: unsafe extern "C" fn(
        arg: *mut c_void,
        callback: Callback,
        completion: *mut CompletionT,
    ) -> c_int,
    pub rbd_aio_get_return_value: unsafe extern "C" fn(completion: CompletionT) -> isize,
    pub rbd_aio_release: unsafe extern "C" fn(completion: CompletionT),
    pub rbd_aio_readv: unsafe extern "C" fn(
        image: ImageT,
        iov: *const libc::iovec,
        iovcnt: c_int,
        offset: u64,
        completion: CompletionT,
    ) -> c_int,
    pub rbd_aio_writev: unsafe extern "C" fn(
        image: ImageT,
        iov: *const libc::iovec,
        iovcnt: c_int,
        offset: u64,
        completion: CompletionT,
    ) -> c_int,
    pub rbd_aio_flush: unsafe extern "C" fn(image: ImageT, completion: CompletionT) -> c_int,
    pub rbd_aio_discard: unsafe extern "C" fn(
        image: ImageT,
        offset: u64,
        len: u64,
        completion: CompletionT,
    ) -> c_int,
    pub rbd_aio_write_zeroes: unsafe extern "C" fn(
        image: ImageT,
        offset: u64,
        len: usize,
        completion: CompletionT,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int,

    _rados: Library,
    _rbd: Library,
}

/// The libraries, loaded at the first call (the outcome is kept: a failure is not retried).
pub fn api() -> Result<&'static Api, LoadError> {
    static API: OnceLock<Result<Api, LoadError>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn open(library: &'static str) -> Result<Library, LoadError> {
    // SAFETY: loading runs the libraries' initialisers: Ceph's client libraries (C++ static
    // constructors) have no requirement on the loading process.
    unsafe { Library::new(library) }.map_err(|e| LoadError::Library {
        library,
        reason: e.to_string(),
    })
}

fn load() -> Result<Api, LoadError> {
    let rados = open(LIBRADOS)?;
    let rbd = open(LIBRBD)?;
    /// Copies the function pointer `name` out of `lib`, typed as the field it is assigned to.
    macro_rules! sym {
        ($lib:ident, $name:literal) => {{
            // SAFETY: the field's type, which the symbol is read as, is the C declaration of
            // `$name` in Ceph 16.2's headers; the pointer stays valid because the library is
            // kept in the same `Api`, which lives in a static and is never dropped.
            match unsafe { $lib.get(concat!($name, "\0").as_bytes()) } {
                Ok(symbol) => *symbol,
                Err(e) => {
                    return Err(LoadError::Symbol {
                        library: if stringify!($lib) == "rados" {
                            LIBRADOS
                        } else {
                            LIBRBD
                        },
                        symbol: $name,
                        reason: e.to_string(),
                    })
                }
            }
        }};
    }
    Ok(Api {
        rados_create: sym!(rados, "rados_create"),
        rados_conf_read_file: sym!(rados, "rados_conf_read_file"),
        rados_conf_set: sym!(rados, "rados_conf_set"),
        rados_connect: sym!(rados, "rados_connect"),
        rados_shutdown: sym!(rados, "rados_shutdown"),
        rados_ioctx_create: sym!(rados, "rados_ioctx_create"),
        rados_ioctx_destroy: sym!(rados, "rados_ioctx_destroy"),
        rbd_open: sym!(rbd, "rbd_open"),
        rbd_open_read_only: sym!(rbd, "rbd_open_read_only"),
        rbd_close: sym!(rbd, "rbd_close"),
        rbd_get_size: sym!(rbd, "rbd_get_size"),
        rbd_aio_create_completion: sym!(rbd, "rbd_aio_create_completion"),
        rbd_aio_get_return_value: sym!(rbd, "rbd_aio_get_return_value"),
        rbd_aio_release: sym!(rbd, "rbd_aio_release"),
        rbd_aio_readv: sym!(rbd, "rbd_aio_readv"),
        rbd_aio_writev: sym!(rbd, "rbd_aio_writev"),
        rbd_aio_flush: sym!(rbd, "rbd_aio_flush"),
        rbd_aio_discard: sym!(rbd, "rbd_aio_discard"),
        rbd_aio_write_zeroes: sym!(rbd, "rbd_aio_write_zeroes"),
        _rados: rados,
        _rbd: rbd,
    })
}
