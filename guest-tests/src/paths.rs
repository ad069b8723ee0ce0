//! Where things are: the cargo target directory, the guest cache, the vublk binary under test
//! (found, or built, by `vublk_test_support::vublk_binary`; `VUBLK_BIN` overrides it).

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
