//! vmm-glue: the VMM side of vublk.
//!
//! - [`cmdline`]: the exact QEMU and cloud-hypervisor options that attach a vublk export, with
//!   the version differences and the combinations that cannot work.
//! - [`descriptor`] and [`install`]: vublk's QEMU vhost-user backend descriptor
//!   (`share/qemu/vhost-user/50-vublk.json`), checked against `vublk --print-capabilities`.
//! - [`launch`]: vublk and a VMM started together on a socket vmm-glue creates, stopped
//!   together.
//! - [`inherit`]: a descriptor handed to a child process at a fixed number (launch, and the
//!   test harness in `vublk-test-support`).
//!
//! The `vmm-glue` binary (`src/main.rs`) is a thin command line over the first three. The
//! scripted vhost-user frontend the protocol tests drive vublk with lives in the
//! `vublk-test-support` crate (`test-support/`).

pub mod cmdline;
pub mod descriptor;
pub mod inherit;
pub mod install;
pub mod launch;
