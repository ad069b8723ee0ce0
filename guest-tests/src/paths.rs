//! Where things are: the cargo target directory, the guest cache, the vublk binary under test
//! (found, or built, by `vublk_test_support::vublk_binary`; `VUBLK_BIN` overrides it), and
//! Debian 12's QEMU 7.2 unpacked beside the installed QEMU.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use vublk_test_support::vublk_binary;

/// The cargo target directory, if this executable runs from one.
pub fn target_dir() -> Option<PathBuf> {
    vublk_binary::profile_dir()?.parent().map(Path::to_path_buf)
}

/// The guest cache: `$VUBLK_GUEST_CACHE`, else `<target>/guest-cache`, else a directory under the
/// system temp dir.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VUBLK_GUEST_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(target) = target_dir() {
        return target.join("guest-cache");
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("guest-cache");
    }
    std::env::temp_dir().join("vublk-guest-cache")
}

/// The vublk binary to test (see the module docs). Builds it at most once per process.
pub fn vublk_bin() -> Result<PathBuf> {
    vublk_binary::vublk().context("the vublk binary")
}

/// Where scripts/prereqs.sh unpacks Debian 12's QEMU 7.2 (`qemu-system-x86`,
/// `qemu-system-common`, `qemu-system-data` and `seabios` of bookworm, not installed: the
/// installed QEMU is 10.0 from bookworm-backports, with the same package names):
/// `$VUBLK_QEMU72_DIR`, else `/opt/vublk-qemu-7.2`. The binary is `usr/bin/qemu-system-x86_64`
/// under it and finds its firmware, ROMs and modules (TCG is one) relative to itself.
pub fn qemu72_dir() -> PathBuf {
    std::env::var_os("VUBLK_QEMU72_DIR")
        .map_or_else(|| PathBuf::from("/opt/vublk-qemu-7.2"), PathBuf::from)
}
