//! Finding the vublk binary from a test or tool of this workspace (vmm-glue's tests,
//! guest-tests, vublk-bench).
//!
//! It cannot be named with `env!("CARGO_BIN_EXE_vublk")`, which cargo only sets for the tests of
//! the package that owns the binary. So it is looked up the way cargo lays it out: a test runs as
//! `<target>/<profile>/deps/<test>-<hash>` (a binary such as `vublk-bench` as
//! `<target>/<profile>/vublk-bench`), and vublk is `<target>/<profile>/vublk`. `cargo test
//! --workspace` builds it before running any test. When it is missing or older than the backend's
//! sources (`cargo test -p vmm-glue` does not build it), it is built with `cargo build -p vublk
//! --bin vublk` for the same profile and target directory. `VUBLK_BIN` overrides all of this.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::SystemTime;

/// The workspace root.
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vublk-test-support lives in the workspace")
        .to_path_buf()
}

/// The profile directory the running executable lives in (`<target>/debug`,
/// `<target>/release`, ...), if it runs from a cargo target directory.
pub fn profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent()?;
    if dir.file_name()? == "deps" || dir.file_name()? == "examples" {
        dir = dir.parent()?;
    }
    // cargo marks its target directory with CACHEDIR.TAG; the profile directory is one below.
    dir.parent()?
        .join("CACHEDIR.TAG")
        .exists()
        .then(|| dir.to_path_buf())
}

/// The vublk binary (see the module docs). Builds it at most once per process.
pub fn vublk() -> io::Result<PathBuf> {
    static FOUND: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut found = FOUND.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(bin) = &*found {
        return Ok(bin.clone());
    }
    let bin = find_or_build()?;
    *found = Some(bin.clone());
    Ok(bin)
}

fn find_or_build() -> io::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("VUBLK_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            return Err(io::Error::other(format!(
                "VUBLK_BIN={} is not a file",
                bin.display()
            )));
        }
        return Ok(bin);
    }
    let profile_dir = profile_dir().ok_or_else(|| {
        io::Error::other(
            "cannot tell the cargo target directory from this executable's path; set VUBLK_BIN",
        )
    })?;
    let bin = profile_dir.join("vublk");
    if let (Ok(built), Some(sources)) = (mtime(&bin), newest_backend_source()) {
        if built >= sources {
            return Ok(bin);
        }
    }

    // Missing or stale: build it with the profile this executable was built with. `debug` is the
    // directory of the `dev` profile; every other profile's directory is its name.
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(name) => name.to_string(),
    };
    let target = profile_dir
        .parent()
        .ok_or_else(|| io::Error::other("profile dir has no parent"))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building vublk (cargo build -p vublk --bin vublk --profile {profile})");
    let status = Command::new(&cargo)
        .current_dir(workspace_dir())
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
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("run {}: {e}", Path::new(&cargo).display()),
            )
        })?;
    if !status.success() {
        return Err(io::Error::other(format!(
            "cargo build -p vublk failed ({status})"
        )));
    }
    if !bin.is_file() {
        return Err(io::Error::other(format!(
            "cargo build -p vublk did not produce {}",
            bin.display()
        )));
    }
    Ok(bin)
}

fn mtime(path: &Path) -> io::Result<SystemTime> {
    std::fs::metadata(path)?.modified()
}

/// The newest modification time among the files the vublk binary is built from.
fn newest_backend_source() -> Option<SystemTime> {
    let ws = workspace_dir();
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
