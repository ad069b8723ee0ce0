//! vmm-glue: the VMM side of vublk.
//!
//! Today it holds [`frontend`], a scripted vhost-user-blk frontend the protocol tests use to
//! talk to the backend the way QEMU or cloud-hypervisor would (and the way a hostile guest
//! would not be allowed to). VMM command lines and launchers come later.

pub mod frontend;
