//! Shared by vmm-glue's integration tests: the two binaries under test and optional host tools.
//!
//! vmm-glue is built by cargo for its own tests (`CARGO_BIN_EXE_vmm-glue`). vublk belongs to
//! another package, so cargo does not name it here: `vublk_test_support::vublk_binary` finds it (or
//! builds it), as it does for guest-tests.

#![allow(dead_code)] // each test file uses part of this

use std::path::{Path, PathBuf};
use std::process::Command;

pub const VMM_GLUE: &str = env!("CARGO_BIN_EXE_vmm-glue");

/// The workspace root.
pub fn workspace() -> PathBuf {
    vublk_test_support::vublk_binary::workspace_dir()
}

/// `tool` on PATH, if installed; tests that need it print why they skip.
pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// Runs vmm-glue with `args`; returns (exit code, stdout, stderr).
pub fn vmm_glue(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(VMM_GLUE)
        .args(args)
        .output()
        .expect("run vmm-glue");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The vublk binary (`vublk_test_support::vublk_binary`). Built at most once per test process.
pub fn vublk() -> PathBuf {
    vublk_test_support::vublk_binary::vublk().unwrap_or_else(|e| panic!("the vublk binary: {e}"))
}
