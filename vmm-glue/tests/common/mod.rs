//! Shared by vmm-glue's integration tests: the two binaries under test and optional host tools.
//!
//! vmm-glue is built by cargo for its own tests (`CARGO_BIN_EXE_vmm-glue`). vublk belongs to
//! another package, so cargo does not name it here: it is `VUBLK_BIN` if set, else
//! `<target>/<profile>/vublk` next to this test's directory when it is newer than the backend's
//! sources (`cargo test --workspace` builds it first), else built with `cargo build -p vublk
//! --bin vublk` into the same target directory (guest-tests finds it the same way).

#![allow(dead_code)] // each test file uses part of this

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::SystemTime;

pub const VMM_GLUE: &str = env!("CARGO_BIN_EXE_vmm-glue");

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vmm-glue lives in the workspace")
        .to_path_buf()
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

/// The vublk binary (see the module docs). Built at most once per test process.
pub fn vublk() -> PathBuf {
    static FOUND: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut found = FOUND.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(bin) = &*found {
        return bin.clone();
    }
    let bin = find_or_build_vublk();
    *found = Some(bin.clone());
    bin
}

fn find_or_build_vublk() -> PathBuf {
    if let Some(bin) = std::env::var_os("VUBLK_BIN") {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "VUBLK_BIN={} is not a file", bin.display());
        return bin;
    }
    // This test runs as <target>/<profile>/deps/<name>-<hash>; vublk is <target>/<profile>/vublk.
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable in <target>/<profile>/deps")
        .to_path_buf();
    let bin = profile_dir.join("vublk");
    if let (Ok(built), Some(sources)) = (mtime(&bin), newest_backend_source()) {
        if built >= sources {
            return bin;
        }
    }
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(name) => name.to_string(),
    };
    let target = profile_dir.parent().expect("profile dir has a parent");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("vmm-glue tests: building vublk (cargo build -p vublk --bin vublk)");
    let status = Command::new(cargo)
        .current_dir(workspace())
        .env("CARGO_TARGET_DIR", target)
        .args([
            "build",
            "-p",
            "vublk",
            "--bin",
            "vublk",
            "--profile",
            &profile,
        ])
        .status()
        .expect("run cargo");
    assert!(status.success(), "cargo build -p vublk failed ({status})");
    assert!(
        bin.is_file(),
        "cargo build did not produce {}",
        bin.display()
    );
    bin
}

fn mtime(path: &Path) -> std::io::Result<SystemTime> {
    std::fs::metadata(path)?.modified()
}

fn newest_backend_source() -> Option<SystemTime> {
    let ws = workspace();
    let mut newest = None;
    for f in ["backend/Cargo.toml", "Cargo.lock", "Cargo.toml"] {
        newest = newest.max(mtime(&ws.join(f)).ok());
    }
    let mut visit = vec![ws.join("backend/src")];
    while let Some(dir) = visit.pop() {
        for entry in std::fs::read_dir(&dir).ok()?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                visit.push(path);
            } else {
                newest = newest.max(mtime(&path).ok());
            }
        }
    }
    newest
}
