//! Fetching and unpacking Debian packages without installing them.
//!
//! `apt-get download` fetches the candidate version of a package into the cache (`debs/`), named
//! `<name>_<version>_<arch>.deb` as apt names it, so a new version in the archive is a new file
//! and a new cache key. On a fresh machine apt has no package lists yet: `apt-get update` runs
//! first (as root; otherwise the error says what to run). Unpacking streams `dpkg-deb
//! --fsys-tarfile` into `tar`, extracting only the members asked for (the kernel package is
//! ~400 MB unpacked; the guest needs a few MB of it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;

use anyhow::{bail, Context, Result};

/// Runs `cmd`, returning its stdout; a failure carries its stderr.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Makes sure apt can download `probe`: runs `apt-get update` once when it cannot, e.g. on a
/// fresh CI machine with empty lists.
fn ensure_lists(probe: &str) -> Result<()> {
    static UPDATE: Once = Once::new();
    // Not `apt-cache policy`: an installed package has a candidate even with empty lists, but
    // nothing to download it from.
    let known = |p: &str| {
        output(Command::new("apt-get").args(["download", "--print-uris", p]))
            .is_ok_and(|s| s.lines().any(|l| l.starts_with('\'')))
    };
    if known(probe) {
        return Ok(());
    }
    if !is_root() {
        bail!("apt cannot download the package {probe}: run `sudo apt-get update` first");
    }
    let mut result = Ok(());
    UPDATE.call_once(|| {
        eprintln!("guest-tests: apt-get update (apt cannot download {probe})");
        result = output(
            Command::new("apt-get")
                .args(["update", "-q"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .map(drop);
    });
    result?;
    if !known(probe) {
        bail!("apt-get update ran but apt still cannot download {probe}");
    }
    Ok(())
}

/// The package a metapackage points at, e.g. `linux-image-amd64` → `linux-image-6.1.0-56-amd64`:
/// its first dependency whose name starts with `prefix`.
pub fn resolve_metapackage(meta: &str, prefix: &str) -> Result<String> {
    ensure_lists(meta)?;
    let deps = output(Command::new("apt-cache").args(["depends", meta]))?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(|d| d.trim().trim_start_matches('<').trim_end_matches('>'))
        .find(|d| d.starts_with(prefix))
        .map(str::to_string)
        .with_context(|| format!("apt-cache depends {meta} lists no {prefix}* package:\n{deps}"))
}

/// The `.deb` of `package`'s candidate version in `dir`, downloaded unless already there.
pub fn download(package: &str, dir: &Path) -> Result<PathBuf> {
    ensure_lists(package)?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    // `--print-uris` prints `'URI' FILENAME SIZE HASH` without downloading.
    let uris = output(Command::new("apt-get").args(["download", "--print-uris", package]))?;
    let (file, size) = uris
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace().skip(1);
            Some((f.next()?.to_string(), f.next()?.parse::<u64>().ok()?))
        })
        .with_context(|| format!("apt-get download --print-uris {package} printed:\n{uris}"))?;
    let deb = dir.join(&file);
    if std::fs::metadata(&deb).map(|m| m.len()).ok() == Some(size) {
        return Ok(deb);
    }

    // Download into a private directory, then rename: a half-downloaded file is never taken for
    // a complete one.
    let tmp = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(dir)
        .context("create download dir")?;
    eprintln!(
        "guest-tests: apt-get download {package} ({} MB)",
        size / 1_000_000
    );
    output(
        Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(tmp.path()),
    )?;
    let got = tmp.path().join(&file);
    if std::fs::metadata(&got).map(|m| m.len()).ok() != Some(size) {
        bail!("apt-get download {package} did not produce {file} of {size} bytes");
    }
    std::fs::rename(&got, &deb).with_context(|| format!("move {file} into the cache"))?;
    Ok(deb)
}

/// Extracts the members of `deb` matching the tar `patterns` (shell wildcards, `*` matching `/`
/// too) into `dest`. Fails if nothing matched.
pub fn extract(deb: &Path, dest: &Path, patterns: &[&str]) -> Result<()> {
    std::fs::create_dir_all(dest)?;
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("run dpkg-deb (is this Debian?)")?;
    let tar_out = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(dest)
        .arg("--wildcards")
        .args(patterns)
        .stdin(dpkg.stdout.take().expect("piped"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("run tar")?;
    let dpkg_status = dpkg.wait()?;
    if !tar_out.status.success() {
        bail!(
            "extracting {patterns:?} from {} failed: {}",
            deb.display(),
            String::from_utf8_lossy(&tar_out.stderr).trim()
        );
    }
    // tar stops reading once every pattern matched, which can kill dpkg-deb with SIGPIPE.
    if !dpkg_status.success()
        && std::os::unix::process::ExitStatusExt::signal(&dpkg_status).is_none()
    {
        bail!(
            "dpkg-deb --fsys-tarfile {} failed ({dpkg_status})",
            deb.display()
        );
    }
    Ok(())
}

/// All regular files (and symlinks) under `dir`, recursively.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(p),
                Ok(_) => files.push(p),
                Err(_) => {}
            }
        }
    }
    files.sort();
    files
}
