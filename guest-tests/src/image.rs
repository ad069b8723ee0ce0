//! The guest: a kernel and a base initramfs, built once and cached.
//!
//! Inputs:
//! - the kernel and its virtio modules from Debian's `linux-image-amd64` (the versioned package
//!   it depends on), or `VUBLK_GUEST_KERNEL` (a bzImage) with modules searched under
//!   `VUBLK_GUEST_MODULES` (none needed when virtio is built in);
//! - busybox from Debian's `busybox-static`, for the shell and the small tools;
//! - `fio` and util-linux's `blkdiscard` (busybox's has no `-z`) as installed on the host, with
//!   every shared library `ldd` lists and the dynamic loader, copied to the same paths;
//! - `init.sh` as `/init`.
//!
//! The cache key hashes all of them (package file names carry versions; host files are keyed by
//! path, size and mtime), so a new kernel in the archive, an upgraded fio or an edited init
//! rebuilds the image and anything else reuses it. The result lives in
//! `<cache>/images/<key>/{vmlinuz,initramfs.cpio}`; older keys are removed when a new one is
//! built. A lock file serialises builders across processes (tests in other binaries, `guest-fio`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

use crate::{cpio, debian, paths};

/// The guest's init script.
pub const INIT: &str = include_str!("init.sh");

/// Bumped when the image layout changes in a way the other inputs do not show.
const LAYOUT_VERSION: u32 = 2;

/// The virtio modules the guest loads, in dependency order (Debian 6.1 builds them as modules).
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
];

/// Host programs copied into the guest with their libraries.
const HOST_TOOLS: &[&str] = &["fio", "blkdiscard"];

/// A built guest.
#[derive(Clone, Debug)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Identifies the inputs; also keys cached facts about this guest (KVM probe).
    pub key: String,
}

/// The guest image, built on first use and reused by every later call in this process.
pub fn guest_image() -> Result<GuestImage> {
    static IMAGE: Mutex<Option<GuestImage>> = Mutex::new(None);
    let mut image = IMAGE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = &*image {
        return Ok(i.clone());
    }
    let built = build().context("building the guest image")?;
    *image = Some(built.clone());
    Ok(built)
}

/// The kernel and where its modules are.
struct KernelSource {
    kernel: PathBuf,
    modules: Vec<(String, PathBuf)>,
    key: String,
}

fn build() -> Result<GuestImage> {
    let cache = paths::cache_dir();
    std::fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
    let _lock = lock(&cache.join("lock"))?;

    let kernel = kernel_source(&cache)?;
    let busybox = busybox(&cache)?;
    let tools = host_files()?;

    let mut key_input = format!("layout {LAYOUT_VERSION}\nkernel {}\n", kernel.key);
    key_input.push_str(&format!(
        "busybox {}\ninit {:016x}\n",
        busybox.0,
        fnv64(INIT.as_bytes())
    ));
    for (path, meta) in &tools {
        key_input.push_str(&format!("host {path} {meta}\n"));
    }
    let key = format!("{:016x}", fnv64(key_input.as_bytes()));
    let dir = cache.join("images").join(&key);
    let mut image = GuestImage {
        kernel: dir.join("vmlinux"),
        initramfs: dir.join("initramfs.cpio"),
        key: key.clone(),
    };
    if dir.join("complete").exists() {
        if !image.kernel.exists() {
            image.kernel = dir.join("vmlinuz");
        }
        return Ok(image);
    }

    eprintln!(
        "guest-tests: building the guest image {key} in {}",
        dir.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    match uncompressed_kernel(&kernel.kernel) {
        Ok(vmlinux) => std::fs::write(&image.kernel, vmlinux).context("write vmlinux")?,
        Err(e) => {
            eprintln!("guest-tests: booting the compressed kernel (slower under TCG): {e:#}");
            image.kernel = dir.join("vmlinuz");
            std::fs::copy(&kernel.kernel, &image.kernel).context("copy the kernel")?;
        }
    }
    write_initramfs(&image.initramfs, &kernel, &busybox.1, &tools)?;
    std::fs::write(dir.join("inputs"), &key_input)?;
    std::fs::write(dir.join("complete"), b"")?;

    // Images of other inputs are dead weight (tens of MB each).
    for old in std::fs::read_dir(cache.join("images"))?.flatten() {
        if old.file_name() != key.as_str() {
            let _ = std::fs::remove_dir_all(old.path());
        }
    }
    Ok(image)
}

fn kernel_source(cache: &Path) -> Result<KernelSource> {
    if let Some(kernel) = std::env::var_os("VUBLK_GUEST_KERNEL") {
        let kernel = PathBuf::from(kernel);
        let mut modules = Vec::new();
        if let Some(dir) = std::env::var_os("VUBLK_GUEST_MODULES") {
            modules = find_modules(Path::new(&dir));
        }
        let mut key = format!("custom {} {}", kernel.display(), file_meta(&kernel)?);
        for (name, path) in &modules {
            key.push_str(&format!(" {name}={}", file_meta(path)?));
        }
        return Ok(KernelSource {
            kernel,
            modules,
            key,
        });
    }

    let deb = debs(cache)?.0;
    let deb_name = deb.file_name().unwrap().to_string_lossy().into_owned();
    let unpacked = cache.join("unpacked").join(&deb_name);
    if !unpacked.join("complete").exists() {
        let _ = std::fs::remove_dir_all(&unpacked);
        debian::extract(
            &deb,
            &unpacked,
            &[
                "*boot/vmlinuz-*",
                "*/kernel/drivers/virtio/*",
                "*/kernel/drivers/block/virtio_blk.ko*",
            ],
        )?;
        std::fs::write(unpacked.join("complete"), b"")?;
    }
    let files = debian::walk(&unpacked);
    let kernel = files
        .iter()
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .cloned()
        .with_context(|| format!("no boot/vmlinuz-* in {deb_name}"))?;
    let modules = find_modules(&unpacked);
    if !modules.iter().any(|(n, _)| n == "virtio_blk") {
        bail!("no virtio_blk module in {deb_name}");
    }
    Ok(KernelSource {
        kernel,
        modules,
        key: deb_name,
    })
}

/// The kernel and busybox packages: (kernel .deb, busybox-static .deb).
///
/// Asking apt takes seconds (five apt-cache/apt-get runs), too long to pay in every test binary,
/// and the answer only changes when apt's lists do. So it is recorded in `debs/resolved` with
/// the modification time of `/var/lib/apt/lists` (apt-get update renames files into it) and
/// reused while that stays the same and the files are there.
fn debs(cache: &Path) -> Result<(PathBuf, PathBuf)> {
    let dir = cache.join("debs");
    let record = dir.join("resolved");
    let stamp = std::fs::metadata("/var/lib/apt/lists")
        .and_then(|m| m.modified())
        .map(|t| format!("{t:?}"))
        .unwrap_or_default();
    if let Ok(text) = std::fs::read_to_string(&record) {
        let lines: Vec<&str> = text.lines().collect();
        if let [s, kernel, busybox] = lines[..] {
            let (kernel, busybox) = (dir.join(kernel), dir.join(busybox));
            if s == stamp && kernel.is_file() && busybox.is_file() {
                return Ok((kernel, busybox));
            }
        }
    }
    let package = debian::resolve_metapackage("linux-image-amd64", "linux-image-")?;
    let kernel = debian::download(&package, &dir)?;
    let busybox = debian::download("busybox-static", &dir)?;
    // Again: an apt-get update the downloads needed changed it.
    let stamp = std::fs::metadata("/var/lib/apt/lists")
        .and_then(|m| m.modified())
        .map(|t| format!("{t:?}"))
        .unwrap_or_default();
    let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::write(
        &record,
        format!("{stamp}\n{}\n{}\n", name(&kernel), name(&busybox)),
    )?;
    // Packages of older versions, and what was unpacked from them, are dead weight.
    let keep = [name(&kernel), name(&busybox), "resolved".to_string()];
    for sub in ["debs", "unpacked"] {
        for old in std::fs::read_dir(cache.join(sub))
            .into_iter()
            .flatten()
            .flatten()
        {
            let n = old.file_name().to_string_lossy().into_owned();
            if !keep.contains(&n) && !n.starts_with(".download-") {
                let _ = std::fs::remove_dir_all(old.path())
                    .or_else(|_| std::fs::remove_file(old.path()));
            }
        }
    }
    Ok((kernel, busybox))
}

/// The ELF kernel inside the bzImage at `path`, if it can be booted directly: QEMU starts an ELF
/// kernel at its PVH entry point, skipping the decompressor, which takes ~5 s under TCG. Needs
/// the payload's decompressor on the host (`xz`, `zstd` or `gzip`) and a kernel built with
/// CONFIG_PVH (Debian's is).
fn uncompressed_kernel(path: &Path) -> Result<Vec<u8>> {
    let bz = read(path)?;
    // The x86 boot protocol's setup header: setup_sects at 0x1f1, payload_offset/_length at 0x248.
    let u32_at = |o: usize| {
        bz.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    if bz.get(0x202..0x206) != Some(b"HdrS") {
        bail!("{} is not a bzImage", path.display());
    }
    let setup_sects = match bz[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let (off, len) = (
        u32_at(0x248).unwrap() as usize,
        u32_at(0x24c).unwrap() as usize,
    );
    let start = (setup_sects + 1) * 512 + off;
    let payload = bz
        .get(start..start + len)
        .context("payload outside the bzImage")?;
    let args: &[&str] = match payload {
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => &["xz", "-dc", "--single-stream"],
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dcq"],
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        _ => bail!(
            "unknown kernel compression {:02x?}",
            &payload[..payload.len().min(6)]
        ),
    };
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("run {}", args[0]))?;
    let mut stdin = child.stdin.take().unwrap();
    let payload = payload.to_vec();
    // The size the kernel build appends after the stream is ignored (gzip warns about it).
    let feeder = std::thread::spawn(move || stdin.write_all(&payload));
    let out = child.wait_with_output()?;
    let _ = feeder.join();
    if out.stdout.get(..4) != Some(b"\x7fELF") {
        bail!(
            "{} did not give an ELF kernel: {}",
            args[0],
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if !has_pvh_note(&out.stdout) {
        bail!("the kernel has no PVH entry point (CONFIG_PVH)");
    }
    Ok(out.stdout)
}

/// Whether the 64-bit ELF `elf` has the Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY = 18),
/// which QEMU needs to boot it.
fn has_pvh_note(elf: &[u8]) -> bool {
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        const PT_NOTE: usize = 4;
        if u32_at(ph) != Some(PT_NOTE) {
            continue;
        }
        let (Some(mut off), Some(size)) = (u64_at(ph + 8), u64_at(ph + 32)) else {
            continue;
        };
        let end = off + size;
        while off + 12 <= end {
            let (Some(namesz), Some(descsz), Some(kind)) =
                (u32_at(off), u32_at(off + 4), u32_at(off + 8))
            else {
                break;
            };
            let name = elf.get(off + 12..off + 12 + namesz).unwrap_or_default();
            if name.starts_with(b"Xen") && kind == 18 {
                return true;
            }
            off += 12 + namesz.next_multiple_of(4) + descsz.next_multiple_of(4);
        }
    }
    false
}

/// The `.ko` / `.ko.xz` files under `dir` that are in [`MODULES`].
fn find_modules(dir: &Path) -> Vec<(String, PathBuf)> {
    let files = debian::walk(dir);
    MODULES
        .iter()
        .filter_map(|m| {
            files
                .iter()
                .find(|p| {
                    let n = p.file_name().unwrap_or_default().to_string_lossy();
                    n == format!("{m}.ko") || n == format!("{m}.ko.xz")
                })
                .map(|p| (m.to_string(), p.clone()))
        })
        .collect()
}

/// busybox-static's binary: (cache key, path).
fn busybox(cache: &Path) -> Result<(String, PathBuf)> {
    let deb = debs(cache)?.1;
    let deb_name = deb.file_name().unwrap().to_string_lossy().into_owned();
    let unpacked = cache.join("unpacked").join(&deb_name);
    if !unpacked.join("complete").exists() {
        let _ = std::fs::remove_dir_all(&unpacked);
        debian::extract(&deb, &unpacked, &["*bin/busybox"])?;
        std::fs::write(unpacked.join("complete"), b"")?;
    }
    let bin = debian::walk(&unpacked)
        .into_iter()
        .find(|p| p.ends_with("bin/busybox"))
        .with_context(|| format!("no bin/busybox in {deb_name}"))?;
    Ok((deb_name, bin))
}

/// The host files the guest gets, as (absolute path, "size mtime"): the tools, the libraries
/// `ldd` resolves for them, and the dynamic loader.
fn host_files() -> Result<Vec<(String, String)>> {
    let mut files = std::collections::BTreeMap::new();
    for tool in HOST_TOOLS {
        let path = which(tool).with_context(|| {
            format!("{tool} is not installed on the host (the guest runs a copy of it; scripts/test.sh installs it)")
        })?;
        files.insert(format!("/usr/bin/{tool}"), path.clone());
        let ldd = Command::new("ldd").arg(&path).output().context("run ldd")?;
        if !ldd.status.success() {
            bail!(
                "ldd {} failed: {}",
                path.display(),
                String::from_utf8_lossy(&ldd.stderr)
            );
        }
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no path.
            let lib = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line
                    .split_whitespace()
                    .next()
                    .filter(|p| p.starts_with('/')),
            };
            if let Some(lib) = lib.filter(|l| l.starts_with('/')) {
                files.insert(lib.to_string(), PathBuf::from(lib));
            } else if line.contains("not found") {
                bail!("ldd {}: {line}", path.display());
            }
        }
    }
    files
        .into_iter()
        .map(|(guest, host)| {
            let meta = file_meta(&host)?;
            Ok((guest, format!("{} {meta}", host.display())))
        })
        .collect()
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// "size mtime" of the file `path` points to.
fn file_meta(path: &Path) -> Result<String> {
    let m = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    let mtime = m
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    Ok(format!("{} {mtime}", m.len()))
}

fn write_initramfs(
    out: &Path,
    kernel: &KernelSource,
    busybox: &Path,
    host: &[(String, String)],
) -> Result<()> {
    let tmp = out.with_extension("tmp");
    let file = File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let mut w = cpio::Writer::new(BufWriter::new(file));
    let mut dirs = std::collections::BTreeSet::new();
    let mut mkdirs = |w: &mut cpio::Writer<_>, path: &str| -> Result<()> {
        let mut cur = String::new();
        for part in path
            .trim_start_matches('/')
            .split('/')
            .filter(|p| !p.is_empty())
        {
            cur.push('/');
            cur.push_str(part);
            if dirs.insert(cur.clone()) {
                w.dir(&cur, 0o755)?;
            }
        }
        Ok(())
    };
    for d in [
        "/bin",
        "/dev",
        "/proc",
        "/sys",
        "/tmp",
        "/etc/vublk",
        "/lib/modules/vublk",
        "/job",
    ] {
        mkdirs(&mut w, d)?;
    }
    w.char_dev("/dev/console", 0o600, 5, 1)?;
    w.file("/init", 0o755, INIT.as_bytes())?;
    w.file("/bin/busybox", 0o755, &read(busybox)?)?;

    let mut order = String::new();
    for (name, path) in &kernel.modules {
        let file = path.file_name().unwrap().to_string_lossy();
        let ext = if file.ends_with(".xz") { "ko.xz" } else { "ko" };
        w.file(
            &format!("/lib/modules/vublk/{name}.{ext}"),
            0o644,
            &read(path)?,
        )?;
        order.push_str(name);
        order.push('\n');
    }
    w.file("/etc/vublk/modules", 0o644, order.as_bytes())?;

    for (guest, meta) in host {
        let host_path = meta.rsplitn(3, ' ').nth(2).unwrap_or(guest);
        let parent = Path::new(guest)
            .parent()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        mkdirs(&mut w, &parent)?;
        w.file(guest, 0o755, &read(Path::new(host_path))?)?;
    }
    w.finish()?
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("read {}", path.display()))
}

/// Holds an exclusive flock(2) on `path` until dropped.
struct Lock(#[allow(dead_code)] File);

fn lock(path: &Path) -> Result<Lock> {
    let file = File::create(path).with_context(|| format!("create {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error()).context("lock the guest cache");
    }
    Ok(Lock(file))
}

/// FNV-1a, 64 bit: a stable hash for cache keys (std's hasher may change between releases).
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Appends a job to a copy of the base initramfs: `files` land under `/job/`.
pub fn initramfs_with_job(base: &Path, out: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    std::fs::copy(base, out)
        .with_context(|| format!("copy {} to {}", base.display(), out.display()))?;
    let file = std::fs::OpenOptions::new().append(true).open(out)?;
    let mut w = cpio::Writer::new(BufWriter::new(file));
    for (name, data) in files {
        w.file(&format!("/job/{name}"), 0o755, data)?;
    }
    let mut out = w.finish()?.into_inner().map_err(|e| e.into_error())?;
    out.flush()?;
    Ok(())
}
