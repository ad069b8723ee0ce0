//! What the supervisor allows each tenant: how many connections a VMM may hold and how many
//! VMs a uid may run.

/// Per-tenant limits (`--max-connections-per-vmm`, `--max-vms-per-uid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantLimits {
    /// Connections one VMM (pid and start time) may have open at once, served or waiting.
    pub connections_per_vmm: usize,
    /// VMs (workers) one uid may have at once.
    pub vms_per_uid: usize,
}

impl Default for TenantLimits {
    fn default() -> TenantLimits {
        TenantLimits { connections_per_vmm: DEFAULT_CONNECTIONS_PER_VMM, vms_per_uid: DEFAULT_VMS_PER_UID }
    }
}

/// A VM has one connection per vhost-user device; 64 disks is far more than a VMM attaches.
pub const DEFAULT_CONNECTIONS_PER_VMM: usize = 64;
/// libvirt runs every VM of a host as one uid (`qemu`), so this must be generous.
pub const DEFAULT_VMS_PER_UID: usize = 1024;
