//! QEMU's command line for a vublk export.
//!
//! ```text
//! -m 4G
//! -object memory-backend-memfd,id=mem,size=4G,share=on   guest RAM in a memfd vublk can map
//! -numa node,memdev=mem                                  ... as all of the guest's RAM
//! -chardev socket,id=vublk0,path=S[,reconnect=N]         the export's socket (QEMU connects)
//! -device vhost-user-blk-pci,chardev=vublk0,num-queues=Q[,queue-size=Z]
//! ```
//!
//! What depends on the QEMU version (checked against QEMU 7.2 and 10.0 with `qemu-system-x86_64
//! -device vhost-user-blk-pci,help` and `-chardev socket,help`, and against QEMU's
//! `docs/about/deprecated.rst` and `removed-features.rst` for later ones):
//!
//! - Reconnecting: the chardev option `reconnect=SECONDS` (since 2.2) was deprecated in 9.2 for
//!   `reconnect-ms=MILLISECONDS` and removed in 10.2, so 9.2 and later get `reconnect-ms` (10.0
//!   takes both).
//! - `num-queues` defaults to the number of vCPUs in recent QEMU (7.2 and 10.0 print the "auto"
//!   value 65535); an export offering fewer queues than the guest has vCPUs would then fail to
//!   attach, so `num-queues` is always given.
//! - `queue-size` defaults to 128 for vhost-user-blk-pci (7.2, 10.0); it is given only when asked
//!   for.
//!
//! The memory size must be given with `-m` too: QEMU (7.2, 10.0) refuses NUMA nodes whose memory
//! does not add up to `-m` ("total memory for NUMA nodes ... should equal RAM size"), and the
//! default `-m` is 128M.

use std::fmt;
use std::path::Path;
use std::process::Command;

use super::{check_export, size, socket_str, CmdlineError, Export};

/// The id of the memory backend vmm-glue creates.
pub const MEMORY_ID: &str = "mem";

/// A QEMU release, as far as command lines care (major.minor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
}

impl QemuVersion {
    /// The first release with the chardev option `reconnect-ms` (and with `reconnect`
    /// deprecated).
    pub const RECONNECT_MS: QemuVersion = QemuVersion { major: 9, minor: 2 };

    /// Parses `7.2`, `7.2.22` or `10.0.0`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("'{text}' is not a QEMU version (X.Y or X.Y.Z)");
        let mut parts = text.trim().split('.');
        let major = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let minor = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        match parts.next() {
            None => {}
            Some(micro) if micro.parse::<u32>().is_ok() && parts.next().is_none() => {}
            Some(_) => return Err(bad()),
        }
        Ok(Self { major, minor })
    }

    /// The version in `qemu-system-x86_64 --version` output ("QEMU emulator version 7.2.22
    /// (Debian 1:7.2+dfsg-7+deb12u18+b3)").
    pub fn from_version_output(out: &str) -> Option<Self> {
        let rest = out.split("version ").nth(1)?;
        Self::parse(rest.split_whitespace().next()?).ok()
    }

    /// Runs `binary --version`.
    pub fn probe(binary: &Path) -> Result<Self, String> {
        let out = Command::new(binary)
            .arg("--version")
            .output()
            .map_err(|e| format!("{} --version: {e}", binary.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        Self::from_version_output(&text).ok_or_else(|| {
            format!(
                "{} --version printed no QEMU version ({})",
                binary.display(),
                text.lines().next().unwrap_or("nothing")
            )
        })
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Everything QEMU's part of the command line depends on.
#[derive(Clone, Debug)]
pub struct QemuOptions {
    pub export: Export,
    /// Guest RAM in bytes (`-m` and the memfd backend).
    pub mem: u64,
    /// The chardev's id.
    pub chardev_id: String,
    /// Reconnect to the export this many seconds after it went away.
    pub reconnect: Option<u32>,
    /// Needed when `reconnect` is set.
    pub version: Option<QemuVersion>,
}

/// QEMU's arguments for the export.
pub fn args(opts: &QemuOptions) -> Result<Vec<String>, CmdlineError> {
    check_export(&opts.export, opts.mem)?;
    check_id(&opts.chardev_id)?;
    let socket = socket_str(&opts.export)?;
    let mem = size::format(opts.mem);

    let mut chardev = format!(
        "socket,id={},path={}",
        opts.chardev_id,
        // QEMU's option parser ends a value at a comma; ",," is a literal comma.
        socket.replace(',', ",,")
    );
    if let Some(secs) = opts.reconnect {
        if secs == 0 {
            return Err(CmdlineError::ZeroReconnect);
        }
        let version = opts.version.ok_or_else(|| {
            CmdlineError::UnknownQemuVersion("no --qemu-version given".to_string())
        })?;
        if version >= QemuVersion::RECONNECT_MS {
            chardev.push_str(&format!(",reconnect-ms={}", u64::from(secs) * 1000));
        } else {
            chardev.push_str(&format!(",reconnect={secs}"));
        }
    }

    let mut device = format!(
        "vhost-user-blk-pci,chardev={},num-queues={}",
        opts.chardev_id, opts.export.num_queues
    );
    if let Some(qs) = opts.export.queue_size {
        device.push_str(&format!(",queue-size={qs}"));
    }

    Ok(vec![
        "-m".into(),
        mem.clone(),
        "-object".into(),
        format!("memory-backend-memfd,id={MEMORY_ID},size={mem},share=on"),
        "-numa".into(),
        format!("node,memdev={MEMORY_ID}"),
        "-chardev".into(),
        chardev,
        "-device".into(),
        device,
    ])
}

/// QEMU ids: a letter, then letters, digits, `-`, `.`, `_`.
fn check_id(id: &str) -> Result<(), CmdlineError> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if ok {
        Ok(())
    } else {
        Err(CmdlineError::Conflict(format!(
            "'{id}' is not a QEMU id (a letter, then letters, digits, '-', '.', '_')"
        )))
    }
}

/// Refuses extra QEMU arguments that would undo what vublk needs: guest memory set another way
/// (a different `-m`, `-mem-path`, `-machine memory-backend=`) or memory backends vublk cannot
/// map (not shared, or not backed by a file descriptor).
pub fn check_extra(extra: &[String]) -> Result<(), CmdlineError> {
    let conflict = |arg: &str, why: &str| Err(CmdlineError::Conflict(format!("{arg}: {why}")));
    let mut i = 0;
    while i < extra.len() {
        // QEMU accepts -opt and --opt alike.
        let opt = extra[i].strip_prefix('-').unwrap_or(&extra[i]);
        let opt = opt.strip_prefix('-').unwrap_or(opt);
        let value = extra.get(i + 1).map(String::as_str).unwrap_or("");
        match opt {
            "m" => {
                return conflict(
                    &format!("-m {value}"),
                    "vmm-glue sets -m from --mem (the memfd backend must be all of the guest's \
                     RAM); drop it",
                )
            }
            "mem-path" => {
                return conflict(
                    &format!("-mem-path {value}"),
                    "it maps guest RAM privately, which vublk cannot see; vmm-glue's shared \
                     memfd replaces it",
                )
            }
            "machine" | "M" if value.split(',').any(|p| p.starts_with("memory-backend=")) => {
                return conflict(
                    &format!("-machine {value}"),
                    "vmm-glue gives guest RAM to a NUMA node (-numa node,memdev=mem); drop \
                     memory-backend=",
                )
            }
            "object" if value.starts_with("memory-backend-") => {
                let props: Vec<&str> = value.split(',').collect();
                if props[0] == "memory-backend-ram" {
                    return conflict(
                        &format!("-object {value}"),
                        "memory-backend-ram has no file descriptor to hand to vublk; use \
                         memory-backend-memfd or memory-backend-file with share=on",
                    );
                }
                if !props.contains(&"share=on") {
                    return conflict(
                        &format!("-object {value}"),
                        "guest memory that is not shared cannot be mapped by vublk; add \
                         share=on",
                    );
                }
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::BackendLimits;
    use super::*;

    fn opts(version: Option<QemuVersion>, reconnect: Option<u32>) -> QemuOptions {
        QemuOptions {
            export: Export {
                socket: "/run/vublk/disk.sock".into(),
                num_queues: 4,
                queue_size: None,
                backend: BackendLimits::default(),
            },
            mem: 4 << 30,
            chardev_id: "vublk0".into(),
            reconnect,
            version,
        }
    }

    fn v(text: &str) -> Option<QemuVersion> {
        Some(QemuVersion::parse(text).unwrap())
    }

    #[test]
    fn the_whole_fragment() {
        assert_eq!(
            args(&opts(None, None)).unwrap(),
            [
                "-m",
                "4G",
                "-object",
                "memory-backend-memfd,id=mem,size=4G,share=on",
                "-numa",
                "node,memdev=mem",
                "-chardev",
                "socket,id=vublk0,path=/run/vublk/disk.sock",
                "-device",
                "vhost-user-blk-pci,chardev=vublk0,num-queues=4",
            ]
        );
    }

    #[test]
    fn queue_size_only_when_asked() {
        let mut o = opts(None, None);
        o.export.queue_size = Some(256);
        assert_eq!(
            args(&o).unwrap()[9],
            "vhost-user-blk-pci,chardev=vublk0,num-queues=4,queue-size=256"
        );
    }

    #[test]
    fn reconnect_is_seconds_before_9_2_and_milliseconds_since() {
        assert_eq!(
            args(&opts(v("7.2"), Some(5))).unwrap()[7],
            "socket,id=vublk0,path=/run/vublk/disk.sock,reconnect=5"
        );
        assert_eq!(
            args(&opts(v("9.1.3"), Some(1))).unwrap()[7],
            "socket,id=vublk0,path=/run/vublk/disk.sock,reconnect=1"
        );
        assert_eq!(
            args(&opts(v("9.2"), Some(5))).unwrap()[7],
            "socket,id=vublk0,path=/run/vublk/disk.sock,reconnect-ms=5000"
        );
        assert_eq!(
            args(&opts(v("10.2.0"), Some(2))).unwrap()[7],
            "socket,id=vublk0,path=/run/vublk/disk.sock,reconnect-ms=2000"
        );
    }

    #[test]
    fn reconnect_needs_a_version_and_a_delay() {
        assert!(matches!(
            args(&opts(None, Some(5))),
            Err(CmdlineError::UnknownQemuVersion(_))
        ));
        assert!(matches!(
            args(&opts(v("7.2"), Some(0))),
            Err(CmdlineError::ZeroReconnect)
        ));
    }

    #[test]
    fn commas_in_the_socket_path_are_doubled() {
        let mut o = opts(None, None);
        o.export.socket = "/run/a,b.sock".into();
        assert_eq!(args(&o).unwrap()[7], "socket,id=vublk0,path=/run/a,,b.sock");
    }

    #[test]
    fn ids_must_be_qemu_ids() {
        let mut o = opts(None, None);
        o.chardev_id = "0disk".into();
        assert!(matches!(args(&o), Err(CmdlineError::Conflict(_))));
        o.chardev_id = "disk,x=1".into();
        assert!(matches!(args(&o), Err(CmdlineError::Conflict(_))));
        o.chardev_id = "disk-1.a_b".into();
        args(&o).unwrap();
    }

    #[test]
    fn versions() {
        assert_eq!(
            QemuVersion::from_version_output(
                "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright"
            ),
            v("7.2")
        );
        assert_eq!(QemuVersion::parse("10.1").unwrap().to_string(), "10.1");
        assert!(QemuVersion::parse("7").is_err());
        assert!(QemuVersion::parse("7.x").is_err());
        assert!(QemuVersion::parse("7.2.1.1").is_err());
        assert!(v("10.0") > v("9.2"));
    }

    fn extra(args: &[&str]) -> Result<(), CmdlineError> {
        check_extra(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn extra_arguments_cannot_take_the_memory_away() {
        extra(&[
            "-machine",
            "q35,accel=kvm",
            "-smp",
            "4",
            "-kernel",
            "bzImage",
        ])
        .unwrap();
        extra(&[
            "-object",
            "memory-backend-file,id=m2,size=1G,mem-path=/dev/shm/x,share=on",
        ])
        .unwrap();
        for bad in [
            &["-m", "8G"][..],
            &["--m", "8G"],
            &["-mem-path", "/dev/hugepages"],
            &["-machine", "q35,memory-backend=ram0"],
            &["-object", "memory-backend-ram,id=m2,size=1G"],
            &[
                "-object",
                "memory-backend-file,id=m2,size=1G,mem-path=/dev/shm/x",
            ],
            &["-object", "memory-backend-memfd,id=m2,size=1G,share=off"],
        ] {
            assert!(
                matches!(extra(bad), Err(CmdlineError::Conflict(_))),
                "{bad:?} was accepted"
            );
        }
        assert_eq!(
            extra(&["-object", "memory-backend-file,id=m2,size=1G,mem-path=/x"])
                .unwrap_err()
                .to_string(),
            "-object memory-backend-file,id=m2,size=1G,mem-path=/x: guest memory that is not \
             shared cannot be mapped by vublk; add share=on"
        );
    }
}
