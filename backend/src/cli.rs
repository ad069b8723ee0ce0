//! The command line, following QEMU's vhost-user "backend program conventions"
//! (docs/interop/vhost-user.rst) for type "block".

use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::daemon::Endpoint;
use crate::disk::{DiskSpec, OpenOptions};
use crate::virtio_blk::DeviceOptions;

/// vublk: a vhost-user virtio-blk backend serving raw images and block devices via io_uring.
#[derive(Debug, Parser)]
#[command(name = "vublk", version, about, long_about = None)]
pub struct Cli {
    /// Listen on this unix socket path (created; removed on exit).
    #[arg(long, value_name = "PATH", conflicts_with = "fd", required_unless_present_any = ["fd", "print_capabilities"])]
    pub socket_path: Option<PathBuf>,

    /// Serve the inherited socket fd N: a listening socket is accepted on, a connected one is
    /// served directly.
    #[arg(long, value_name = "N")]
    pub fd: Option<RawFd>,

    /// The raw image or block device to serve; `null:SIZE` for the null backing.
    #[arg(long, value_name = "IMAGE", conflicts_with = "null", required_unless_present_any = ["null", "print_capabilities"])]
    pub blk_file: Option<String>,

    /// Serve a null disk of SIZE bytes (suffixes K, M, G, T): reads return zeroes, writes are
    /// dropped.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub null: Option<u64>,

    /// Export the disk read-only.
    #[arg(long)]
    pub read_only: bool,

    /// Number of virtqueues (one thread each).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,

    /// Largest queue size the frontend may use (a power of two, up to 1024).
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Open the backing with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,

    /// The serial the guest reads with GET_ID (at most 20 bytes); default: from the image path.
    #[arg(long, value_name = "S", value_parser = parse_serial)]
    pub serial: Option<String>,

    /// Logical block size the guest sees.
    #[arg(long, value_name = "BYTES", default_value_t = 512, value_parser = parse_blk_size)]
    pub blk_size: u32,

    /// Write-back cache (on: writes complete before they are durable, flushes make them so) or
    /// write-through (off: every write is durable when it completes). The guest may change it.
    #[arg(long, value_name = "on|off", default_value = "on")]
    pub write_cache: OnOff,

    /// Print the capabilities JSON (vhost-user backend conventions) and exit.
    #[arg(long)]
    pub print_capabilities: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// The JSON `--print-capabilities` prints, as the conventions define it for type "block".
pub const CAPABILITIES: &str = r#"{"type":"block","features":["read-only","blk-file"]}"#;

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix '{c}' (use K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("'{s}' is not a size"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("size '{s}' is too large"))
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if n == 0 || n > 1024 || !n.is_power_of_two() {
        return Err("must be a power of two from 1 to 1024".into());
    }
    Ok(n)
}

fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() > 20 {
        return Err(format!("is {} bytes long; virtio-blk serials are at most 20", s.len()));
    }
    Ok(s.to_string())
}

fn parse_blk_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err("must be 512 or 4096".into()),
    }
}

/// The validated configuration of one export.
#[derive(Debug, Clone)]
pub struct Export {
    pub endpoint: Endpoint,
    pub disk: DiskSpec,
    pub open: OpenOptions,
    pub device: DeviceOptions,
}

impl Cli {
    /// Turns the parsed arguments into an export; `Err` is a usage error.
    pub fn export(&self) -> Result<Export, String> {
        let endpoint = match (&self.socket_path, self.fd) {
            (Some(path), None) => Endpoint::Path(path.clone()),
            (None, Some(fd)) => Endpoint::Fd(fd),
            _ => return Err("exactly one of --socket-path and --fd is required".into()),
        };
        let disk = match (&self.blk_file, self.null) {
            (Some(file), None) => match file.strip_prefix("null:") {
                Some(size) => DiskSpec::Null { size: parse_size(size).map_err(|e| format!("--blk-file: {e}"))? },
                None => DiskSpec::Path(PathBuf::from(file)),
            },
            (None, Some(size)) => DiskSpec::Null { size },
            _ => return Err("exactly one of --blk-file and --null is required".into()),
        };
        Ok(Export {
            endpoint,
            disk,
            open: OpenOptions { read_only: self.read_only, direct: self.direct },
            device: DeviceOptions {
                num_queues: self.num_queues,
                max_queue_size: self.queue_size,
                blk_size: self.blk_size,
                serial: self.serial.clone(),
                write_cache: self.write_cache == OnOff::On,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("16m"), Ok(16 << 20));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn null_file_and_fd() {
        let cli = Cli::try_parse_from(["vublk", "--fd", "3", "--blk-file", "null:1M"]).unwrap();
        let export = cli.export().unwrap();
        assert_eq!(export.disk, DiskSpec::Null { size: 1 << 20 });
        assert!(matches!(export.endpoint, Endpoint::Fd(3)));
    }

    #[test]
    fn conflicting_and_invalid_options_are_usage_errors() {
        assert!(Cli::try_parse_from(["vublk", "--fd", "3", "--socket-path", "s", "--null", "1M"]).is_err());
        assert!(Cli::try_parse_from(["vublk", "--socket-path", "s"]).is_err());
        assert!(Cli::try_parse_from(["vublk", "--socket-path", "s", "--null", "1M", "--blk-size", "1024"]).is_err());
        assert!(Cli::try_parse_from(["vublk", "--socket-path", "s", "--null", "1M", "--queue-size", "1000"]).is_err());
        assert!(Cli::try_parse_from(["vublk", "--socket-path", "s", "--null", "1M", "--serial", "x".repeat(21).as_str()]).is_err());
        assert!(Cli::try_parse_from(["vublk", "--print-capabilities"]).is_ok());
    }
}
