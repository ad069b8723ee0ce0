//! guest-tests: real guests under QEMU running fio against vublk.
//!
//! The fourth test layer (STYLE.md): a Debian kernel boots with an initramfs holding busybox, fio
//! and the virtio modules, sees vublk's disks through QEMU's `vhost-user-blk-pci`, runs a job
//! and powers off; the harness reads the results off the serial console. See docs/testing.md.
//!
//! The path of one test, by file:
//!
//! ```text
//! paths.rs     where the cache and the vublk binary are (built if missing or stale)
//! debian.rs    apt-get download + dpkg-deb: the kernel and busybox packages
//! image.rs     kernel + base initramfs (cpio.rs), cached by a key of all inputs; init.sh is /init
//! vublk.rs     vublk serving a socket (the shared harness), stopped with SIGTERM and checked
//! qemu.rs      one boot: job appended to the initramfs, QEMU with a timeout, KVM or TCG
//! console.rs   the console split into the job's steps; kernel complaints
//! fio.rs       fio's JSON report and whether the run passed
//! ```

pub mod console;
pub mod cpio;
pub mod debian;
pub mod fio;
pub mod image;
pub mod paths;
pub mod qemu;
pub mod qmp;
pub mod vublk;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result};

pub use qemu::{Boot, Job, Vm};
pub use vublk::{start_vublk, start_vublk_inherited, start_vublk_on};
pub use vublk_test_support::Daemon;

pub const MIB: u64 = 1024 * 1024;

/// Runs a guest test in a fresh directory. On failure the directory (consoles, vublk logs,
/// images) is kept and named in the panic message; on success it is removed, unless
/// `VUBLK_GUEST_KEEP` is set.
pub fn guest_test(name: &str, body: impl FnOnce(&Path) -> Result<()>) {
    let dir = tempfile::Builder::new()
        .prefix(&format!("vublk-guest-{name}-"))
        .tempdir()
        .expect("create a temp dir");
    let start = std::time::Instant::now();
    match body(dir.path()) {
        Ok(()) => {
            let secs = start.elapsed().as_secs_f64();
            if std::env::var_os("VUBLK_GUEST_KEEP").is_some() {
                eprintln!(
                    "{name}: passed in {secs:.1} s (files kept in {})",
                    dir.keep().display()
                );
            } else {
                eprintln!("{name}: passed in {secs:.1} s");
            }
        }
        Err(e) => {
            let kept = dir.keep();
            // The chain of contexts, outermost first; not `{e:?}`, which appends a backtrace of
            // the harness when RUST_BACKTRACE is set.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            panic!(
                "{name} failed after {:.1} s (files kept in {}):\n{}{}",
                start.elapsed().as_secs_f64(),
                kept.display(),
                chain.join("\n"),
                log_tails(&kept)
            );
        }
    }
}

/// The last lines of each vublk log in `dir` (a hang in the guest is often explained there).
fn log_tails(dir: &Path) -> String {
    const TAIL: usize = 30;
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    let mut out = String::new();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        out.push_str(&format!(
            "\n---- {} (last {TAIL} lines) ----\n",
            log.display()
        ));
        out.push_str(&lines[lines.len().saturating_sub(TAIL)..].join("\n"));
    }
    out
}

/// Creates a sparse image of `size` bytes.
pub fn sparse_image(path: &Path, size: u64) -> Result<()> {
    let f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.set_len(size)?;
    Ok(())
}

/// Writes `data` at `offset` of the file at `path`.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) -> Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.write_all_at(data, offset)?;
    f.sync_all()?;
    Ok(())
}

/// Reads `len` bytes at `offset` of the file at `path`.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let f = File::open(path)?;
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}
