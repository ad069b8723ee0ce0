//! vmm-glue: the VMM side of vublk.
//!
//! - [`cmdline`]: the exact QEMU and cloud-hypervisor options that attach a vublk export, with
//!   the version differences and the combinations that cannot work.
//! - [`descriptor`] and [`install`]: vublk's QEMU vhost-user backend descriptor
//!   (`share/qemu/vhost-user/50-vublk.json`), checked against `vublk --print-capabilities`.
//! - [`launch`]: vublk and a VMM started together on a socket vmm-glue creates, stopped
//!   together.
//! - [`frontend`]: a scripted vhost-user-blk frontend the protocol tests use to talk to the
//!   backend the way QEMU or cloud-hypervisor would (and the way a hostile guest would not be
//!   allowed to).
//! - [`vublk_binary`]: the vublk binary of this workspace, for tests and tools.
//! - [`inherit`]: a descriptor handed to a child process at a fixed number (launch, the
//!   frontend's daemon, vublk's own tests).
//!
//! The `vmm-glue` binary (`src/main.rs`) is a thin command line over the first three.

pub mod cmdline;
pub mod descriptor;
pub mod frontend;
pub mod inherit;
pub mod install;
pub mod launch;
pub mod vublk_binary;
