//! RBD images (Ceph's block devices) through librbd, loaded at run time.
//!
//! | File | Job |
//! |---|---|
//! | `ffi.rs` | the few librados and librbd functions used, loaded with `libloading` |
//! | `image.rs` | connecting to the cluster and opening an image ([`RbdImage`]), shared by a device's queues |
//! | `engine.rs` | a queue's engine: librbd aio from guest iovecs, completions back through an eventfd |

pub mod engine;
pub mod ffi;
pub mod image;

pub use engine::RbdEngine;
pub use image::{RbdError, RbdImage, RbdSpec};
