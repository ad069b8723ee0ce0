//! The command line, following QEMU's vhost-user "backend program conventions"
//! (docs/interop/vhost-user.rst) for type "block".

use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::disk::{DiskSpec, OpenOptions};
use crate::endpoint::{Endpoint, SocketAccess};
use crate::export::{AllowList, ExportSpec, OpenAs};
use crate::io::rbd::RbdSpec;
use crate::qos::QosLimits;
use crate::supervisor::{
    ExportDefaults, TenantLimits, WorkerOptions, DEFAULT_CONNECTIONS_PER_VMM, DEFAULT_VMS_PER_UID,
};
use crate::virtio_blk::DeviceOptions;

/// vublk: a vhost-user virtio-blk backend serving raw images and block devices via io_uring.
#[derive(Debug, Parser)]
#[command(name = "vublk", version, about, long_about = None, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Cli {
    /// Listen on this unix socket path (created; removed on exit).
    #[arg(long, value_name = "PATH", conflicts_with = "fd", required_unless_present_any = ["fd", "print_capabilities", "export", "worker_control_fd"])]
    pub socket_path: Option<PathBuf>,

    /// Serve the inherited socket fd N: a listening socket is accepted on, a connected one is
    /// served directly.
    #[arg(long, value_name = "N")]
    pub fd: Option<RawFd>,

    /// The raw image or block device to serve; `null:SIZE` for the null backing;
    /// `rbd:POOL/IMAGE` for an RBD image on a Ceph cluster (see --ceph-conf).
    #[arg(long, value_name = "IMAGE", conflicts_with = "null", required_unless_present_any = ["null", "print_capabilities", "export", "worker_control_fd"])]
    pub blk_file: Option<String>,

    /// Serve a null disk of SIZE bytes (suffixes K, M, G, T): reads return zeroes, writes are
    /// dropped.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub null: Option<u64>,

    /// For `rbd:` disks: the Ceph configuration file, which names the monitors and the keyring
    /// (read by the worker, as the VMM's user: the keyring must be readable by that user).
    #[arg(long, value_name = "FILE", default_value = "/etc/ceph/ceph.conf")]
    pub ceph_conf: PathBuf,

    /// For `rbd:` disks: the Ceph client id to connect as (`client.ID`).
    #[arg(long, value_name = "ID", default_value = "admin")]
    pub ceph_id: String,

    /// For `rbd:` disks: seconds an operation waits for the cluster before it fails with an
    /// I/O error, and a connect before it gives up. 0: operations wait until the cluster
    /// comes back; a connect gives up after 30 s.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub ceph_timeout: u32,

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

    /// Who opens the image: `vmm` (the per-VM worker, as the VMM's user: a VM can only use
    /// images its owner could open) or `daemon` (the supervisor, which passes the open file to
    /// the worker, for deployments where the VMM's user must not hold a path to the image).
    #[arg(long, value_name = "vmm|daemon", default_value = "vmm")]
    pub open_as: OpenAs,

    /// Serve only these users on the main export: a comma-separated list of user names or
    /// uids. With --allow-gids, a peer in either list is served; the others are disconnected
    /// before any worker exists. Default: whoever can connect to the socket.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_user)]
    pub allow_uids: Option<Vec<u32>>,

    /// Serve only members of these groups on the main export (primary or supplementary, as
    /// the kernel recorded them at connect): a comma-separated list of group names or gids.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_group)]
    pub allow_gids: Option<Vec<u32>>,

    /// Requests per second the main export serves per VM (a leaky bucket shared by its queues;
    /// docs/operations.md#qos). 0 or none: no limit.
    #[arg(long, value_name = "N", default_value = "none", value_parser = crate::qos::parse_iops)]
    pub iops_limit: u64,

    /// A higher rate of requests per second allowed for about a second (QEMU's iops-total-max);
    /// needs --iops-limit.
    #[arg(long, value_name = "N", default_value = "none", value_parser = crate::qos::parse_iops)]
    pub iops_burst: u64,

    /// Bytes per second (read and written) the main export serves per VM (suffixes K, M, G,
    /// T). 0 or none: no limit.
    #[arg(long, value_name = "BYTES", default_value = "none", value_parser = crate::qos::parse_bps)]
    pub bps_limit: u64,

    /// A higher rate of bytes per second allowed for about a second; needs --bps-limit.
    #[arg(long, value_name = "BYTES", default_value = "none", value_parser = crate::qos::parse_bps)]
    pub bps_burst: u64,

    /// More exports served by the same daemon, each
    /// `socket-path=PATH,blk-file=IMAGE[,read-only][,num-queues=N][,queue-size=N][,direct]
    /// [,serial=S][,blk-size=512|4096][,write-cache=on|off][,open-as=vmm|daemon]
    /// [,allow-uids=U1:U2...][,allow-gids=G1:G2...][,socket-mode=MODE][,socket-group=GROUP]
    /// [,ceph-conf=FILE][,ceph-id=ID][,ceph-timeout=SECS][,iops-limit=N][,iops-burst=N]
    /// [,bps-limit=BYTES][,bps-burst=BYTES]`
    /// (`fd=N` instead of socket-path, `null=SIZE` instead of blk-file). An export without
    /// socket-mode or socket-group takes --socket-mode and --socket-group.
    #[arg(long, value_name = "SPEC", value_parser = parse_export)]
    pub export: Vec<(Endpoint, ExportSpec)>,

    /// Serve every VM from this process, as the daemon's own user, instead of from per-VM
    /// worker processes carrying each VMM's identity.
    #[arg(long)]
    pub single_process: bool,

    /// Permissions of the export sockets vublk creates, in octal (e.g. 0660): a VMM running as
    /// another user needs write permission on its socket. Default: from the umask.
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    pub socket_mode: Option<u32>,

    /// Group of the export sockets vublk creates (a name or a number).
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    pub socket_group: Option<u32>,

    /// Connections one VMM (a process) may hold at once, served or waiting for its worker.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CONNECTIONS_PER_VMM,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    pub max_connections_per_vmm: usize,

    /// VMs (worker processes) one uid may have at once.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_VMS_PER_UID,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub max_vms_per_uid: usize,

    /// Let workers open PATH (and what is beneath it) for reading and writing, on top of the
    /// export images: their landlock sandbox denies every other path (docs/security.md).
    #[arg(long, value_name = "PATH", conflicts_with = "single_process")]
    pub worker_allow: Vec<PathBuf>,

    /// Test only: make workers misbehave on purpose (forbidden-syscall, open:PATH,
    /// forge-reports; each with an optional @EXPORT).
    #[arg(long, value_name = "WHAT", hide = true, value_parser = crate::sandbox::TestMisdeed::parse)]
    pub test_worker_arg: Vec<crate::sandbox::TestMisdeed>,

    /// How long retiring guest memory (REM_MEM_REG, SET_MEM_TABLE, a stopped ring, a
    /// disconnect) waits for the requests using it before cancelling them, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub retire_timeout: u64,

    /// Busy-poll each queue for new requests for up to this many microseconds before sleeping
    /// (an adaptive window: it grows while requests keep arriving within it and drops to
    /// zero when the driver goes idle). Polling saves the driver its kicks and the queue
    /// thread its wakeups, at the price of CPU time, which is charged to the VM: queue threads
    /// run in the VM's worker. 0 turns polling off. The default is KVM's halt_poll_ns default.
    #[arg(long, value_name = "US", default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub poll_max_us: u64,

    /// Test only: identify frontends as on a kernel without SO_PEERPIDFD (pidfd_open).
    #[arg(long, hide = true)]
    pub test_without_peer_pidfd: bool,

    /// Test only: hold every I/O operation until a byte can be read from this FIFO.
    #[arg(long, value_name = "FIFO", hide = true)]
    pub test_io_gate: Option<PathBuf>,

    /// Test only: the gate holds only the reads and writes that start at this byte.
    #[arg(long, value_name = "BYTES", hide = true, requires = "test_io_gate")]
    pub test_io_gate_offset: Option<u64>,

    /// Answer `vublk status` on this unix socket (created, owner-only; removed on exit). It is
    /// created once every export listens: when it appears, vublk is ready.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Keep each guest's write-cache choice in this directory (created, mode 0700), so that a
    /// new daemon on the same sockets (after a crash, an upgrade) restores it. Meant for a
    /// runtime directory such as /run/vublk. Default: `vublk-state` in the directory of the
    /// first export's socket. Not with --single-process, which keeps no state.
    #[arg(long, value_name = "DIR", conflicts_with = "single_process")]
    pub state_dir: Option<PathBuf>,

    /// Serve Prometheus metrics (`GET /metrics`, text exposition format) on this TCP address,
    /// HOST:PORT (e.g. 127.0.0.1:9850). Metrics name exports, VMM pids and uids: bind it where
    /// only the monitoring system can reach it. Not with --single-process.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_socket_addr)]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Print the capabilities JSON (vhost-user backend conventions) and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    #[command(subcommand)]
    pub command: Option<Command>,

    /// Internal: run as a per-VM worker on this control socket (set by the supervisor).
    #[arg(long, value_name = "FD", hide = true)]
    pub worker_control_fd: Option<RawFd>,

    /// Internal: the worker's sandbox, as JSON (set by the supervisor).
    #[arg(long, value_name = "JSON", hide = true, requires = "worker_control_fd")]
    pub worker_sandbox: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show each VM a running daemon serves: VMM and worker pids, identity, cgroups, limits,
    /// devices and what they served.
    Status {
        /// The daemon's --control-socket.
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add, remove, resize or list the exports of a running daemon. Changes are not persisted: the
    /// daemon's command line still says what it serves after a restart.
    #[command(subcommand)]
    Export(ExportCommand),
    /// Replace a running daemon with a new binary without closing its sockets: the daemon
    /// starts BINARY (default: the path it was started from) with its own arguments on its
    /// listening sockets, waits until it is ready, then stops its workers one at a time (each
    /// VM's QEMU reconnects to the new daemon) and exits. Prints the new daemon's pid. If the
    /// new daemon fails to start, the running one goes on serving and the reason is printed.
    Upgrade {
        /// The daemon's --control-socket.
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        /// The new binary.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
    /// A live view of a running daemon per VM and export: IOPS, bandwidth, latency, polling
    /// share and worker CPU, refreshed every second and sorted by IOPS (q or Ctrl-C quits).
    Top {
        /// The daemon's --control-socket.
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        /// Print one plain table after another instead of redrawing the screen (as without
        /// a terminal).
        #[arg(long, short = 'b')]
        batch: bool,
        /// Stop after N tables.
        #[arg(long, short = 'n', value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        iterations: Option<u64>,
        /// Seconds between tables (0.1 to 3600).
        #[arg(long, short = 'd', value_name = "SECS", default_value = "1", value_parser = parse_delay)]
        delay: std::time::Duration,
    },
}

/// `--delay`: seconds, fractions allowed.
fn parse_delay(value: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number of seconds"))?;
    if !(0.1..=3600.0).contains(&secs) {
        return Err(format!("{value} is not between 0.1 and 3600 seconds"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// Serve one more export: SPEC as --export takes it (socket-path=PATH,blk-file=IMAGE,...).
    Add {
        /// The daemon's --control-socket.
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        #[arg(value_name = "SPEC")]
        spec: String,
    },
    /// Stop serving the export on SOCKET-PATH and remove its socket. Refused while a VM is
    /// connected to it, unless --force.
    Remove {
        /// The daemon's --control-socket.
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        #[arg(value_name = "SOCKET-PATH")]
        socket: PathBuf,
        /// Stop the devices of connected VMs cleanly (requests in flight complete, then the
        /// connections close).
        #[arg(long)]
        force: bool,
    },
    /// The image, block device or RBD image of the export on SOCKET-PATH grew: connected
    /// devices read its size again and tell their guests (virtio config change). Shrinking is
    /// refused (logged by the worker).
    Resize {
        /// The daemon's --control-socket.
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        #[arg(value_name = "SOCKET-PATH")]
        socket: PathBuf,
    },
    /// Change the QoS limits of the export on SOCKET-PATH, for its connected VMs too:
    /// iops-limit=N, iops-burst=N, bps-limit=BYTES, bps-burst=BYTES (0 or none removes one).
    Set {
        /// The daemon's --control-socket.
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        #[arg(value_name = "SOCKET-PATH")]
        socket: PathBuf,
        #[arg(value_name = "KEY=VALUE", required = true)]
        settings: Vec<String>,
    },
    /// List the exports served now, with how many VM connections each has.
    List {
        /// The daemon's --control-socket.
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
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
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// HOST:PORT, HOST a name or an address; the first address it resolves to.
fn parse_socket_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .map_err(|e| format!("'{s}' is not HOST:PORT: {e}"))?
        .next()
        .ok_or_else(|| format!("'{s}' resolves to no address"))
}

fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(mode) if mode <= 0o7777 => Ok(mode),
        _ => Err(format!("'{s}' is not an octal mode like 0660")),
    }
}

/// A user: a uid, or a name from /etc/passwd.
fn parse_user(s: &str) -> Result<u32, String> {
    parse_id(s, "user", "/etc/passwd")
}

/// A group: a gid, or a name from /etc/group.
fn parse_group(s: &str) -> Result<u32, String> {
    parse_id(s, "group", "/etc/group")
}

/// A number, or the third field of the line of `database` whose first field is `s` (the
/// layout /etc/passwd and /etc/group share).
fn parse_id(s: &str, what: &str, database: &str) -> Result<u32, String> {
    if s.is_empty() {
        return Err(format!("an empty {what}"));
    }
    if let Ok(id) = s.parse::<u32>() {
        // (uid_t)-1 means "leave unchanged" to chown and is nobody's id.
        return if id == u32::MAX {
            Err(format!("{id} is not a valid {what} id"))
        } else {
            Ok(id)
        };
    }
    let entries =
        std::fs::read_to_string(database).map_err(|e| format!("cannot read {database}: {e}"))?;
    entries
        .lines()
        .find_map(|l| {
            let mut fields = l.split(':');
            (fields.next() == Some(s))
                .then(|| fields.nth(1)?.parse().ok())
                .flatten()
        })
        .ok_or_else(|| format!("no {what} '{s}' in {database}"))
}

impl Cli {
    /// Who may connect to the main export's socket (the daemon-wide --socket-mode and
    /// --socket-group).
    pub fn socket_access(&self) -> SocketAccess {
        SocketAccess {
            mode: self.socket_mode,
            group: self.socket_group,
        }
    }

    /// What `--export` specs, and those added at run time, take from the daemon-wide options.
    pub fn export_defaults(&self) -> ExportDefaults {
        ExportDefaults {
            retire_timeout_ms: self.retire_timeout,
            poll_max_us: self.poll_max_us,
            socket: self.socket_access(),
            test_io_gate: self.test_io_gate.clone(),
            test_io_gate_offset: self.test_io_gate_offset,
        }
    }

    /// What workers may do besides serving their exports.
    pub fn worker_options(&self) -> WorkerOptions {
        WorkerOptions {
            allow: self.worker_allow.clone(),
            test: self.test_worker_arg.clone(),
        }
    }

    /// What each tenant may have.
    pub fn tenant_limits(&self) -> TenantLimits {
        TenantLimits {
            connections_per_vmm: self.max_connections_per_vmm,
            vms_per_uid: self.max_vms_per_uid,
        }
    }
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
        return Err(format!(
            "is {} bytes long; virtio-blk serials are at most 20",
            s.len()
        ));
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

/// `--export` values, parsed like the single-export options: each `key=value` becomes
/// `--key value`. Lists (`allow-uids=`, `allow-gids=`) are separated by `:`, as `,` separates
/// the keys.
pub fn parse_export(spec: &str) -> Result<(Endpoint, ExportSpec), String> {
    let mut args = vec!["vublk".to_string()];
    let mut after_list = false;
    for item in spec.split(',').filter(|i| !i.is_empty()) {
        let (key, value) = item.split_once('=').unwrap_or((item, ""));
        let flag = matches!(key, "read-only" | "direct");
        if flag && !matches!(value, "" | "on") {
            if value == "off" {
                continue;
            }
            return Err(format!("{key} takes no value (or on/off)"));
        }
        let list = matches!(key, "allow-uids" | "allow-gids");
        if !list
            && !matches!(
                key,
                "socket-path"
                    | "fd"
                    | "blk-file"
                    | "null"
                    | "read-only"
                    | "num-queues"
                    | "queue-size"
                    | "direct"
                    | "serial"
                    | "blk-size"
                    | "write-cache"
                    | "open-as"
                    | "socket-mode"
                    | "socket-group"
                    | "ceph-conf"
                    | "ceph-id"
                    | "ceph-timeout"
                    | "iops-limit"
                    | "iops-burst"
                    | "bps-limit"
                    | "bps-burst"
            )
        {
            let hint = if after_list {
                " (lists in --export are separated by ':', as in allow-uids=1000:qemu)"
            } else {
                ""
            };
            return Err(format!("unknown export option '{key}'{hint}"));
        }
        after_list = list;
        // `--key=value` in one argument, so a value starting with '-' is not taken for an
        // option.
        if list {
            args.push(format!("--{key}={}", value.replace(':', ",")));
        } else if flag {
            args.push(format!("--{key}"));
        } else {
            args.push(format!("--{key}={value}"));
        }
    }
    // clap's message up to its usage block, on one line (a missing key is on the next).
    let cli = Cli::try_parse_from(&args).map_err(|e| {
        e.to_string()
            .lines()
            .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
            .trim_start_matches("error: ")
            .to_string()
    })?;
    if !cli.export.is_empty() {
        return Err("exports do not nest".into());
    }
    let (endpoint, export) = cli.single_export()?;
    check_open_as(&export, ("open-as=daemon", "allow-uids=", "allow-gids="))?;
    Ok((endpoint, export))
}

/// `open-as=daemon` serves the image with the supervisor's rights (root's) to whoever gets
/// through: an export using it must say who may. `names` spell the options as the export
/// was given (command-line options or `--export` keys).
fn check_open_as(export: &ExportSpec, names: (&str, &str, &str)) -> Result<(), String> {
    let (open_as, uids, gids) = names;
    if export.open_as == OpenAs::Daemon {
        if let DiskSpec::Rbd(spec) = &export.disk {
            return Err(format!(
                "{open_as} has no file to hand over for {}: the worker connects to the cluster \
                 itself, as the VMM's user, with the Ceph id and keyring its configuration names",
                spec.name()
            ));
        }
    }
    if export.open_as == OpenAs::Daemon && !export.allow.restricts() {
        return Err(format!(
            "{open_as} needs {uids} or {gids}: the supervisor opens the image as root for whoever \
             may connect to the socket, so say who may"
        ));
    }
    Ok(())
}

impl Cli {
    /// The export the single-export options describe.
    fn single_export(&self) -> Result<(Endpoint, ExportSpec), String> {
        let endpoint = match (&self.socket_path, self.fd) {
            (Some(path), None) => Endpoint::Path(path.clone()),
            (None, Some(fd)) => Endpoint::Fd(fd),
            _ => return Err("exactly one of --socket-path and --fd is required".into()),
        };
        let disk = match (&self.blk_file, self.null) {
            (Some(file), None) => {
                if let Some(size) = file.strip_prefix("null:") {
                    DiskSpec::Null {
                        size: parse_size(size).map_err(|e| format!("--blk-file: {e}"))?,
                    }
                } else if let Some(location) = file.strip_prefix("rbd:") {
                    let (pool, image) = RbdSpec::parse_location(location)?;
                    if self.ceph_id.is_empty() {
                        return Err("the Ceph id is empty".into());
                    }
                    DiskSpec::Rbd(Box::new(RbdSpec {
                        pool,
                        image,
                        conf: self.ceph_conf.clone(),
                        id: self.ceph_id.clone(),
                        timeout_secs: self.ceph_timeout,
                    }))
                } else {
                    DiskSpec::Path(PathBuf::from(file))
                }
            }
            (None, Some(size)) => DiskSpec::Null { size },
            _ => return Err("exactly one of --blk-file and --null is required".into()),
        };
        let name = endpoint.name();
        let qos = QosLimits {
            iops_limit: self.iops_limit,
            iops_burst: self.iops_burst,
            bps_limit: self.bps_limit,
            bps_burst: self.bps_burst,
        };
        qos.check()?;
        Ok((
            endpoint,
            ExportSpec {
                name,
                disk,
                open: OpenOptions {
                    read_only: self.read_only,
                    direct: self.direct,
                },
                device: DeviceOptions {
                    num_queues: self.num_queues,
                    max_queue_size: self.queue_size,
                    blk_size: self.blk_size,
                    serial: self.serial.clone(),
                    write_cache: self.write_cache == OnOff::On,
                },
                open_as: self.open_as,
                retire_timeout_ms: self.retire_timeout,
                poll_max_us: self.poll_max_us,
                test_io_gate: self.test_io_gate.clone(),
                test_io_gate_offset: self.test_io_gate_offset,
                socket: self.socket_access(),
                allow: AllowList {
                    uids: self.allow_uids.clone(),
                    gids: self.allow_gids.clone(),
                },
                daemon_file: None,
                qos,
            },
        ))
    }

    /// Every export on the command line; `Err` is a usage error.
    pub fn exports(&self) -> Result<Vec<(Endpoint, ExportSpec)>, String> {
        let mut exports = Vec::new();
        if self.socket_path.is_some()
            || self.fd.is_some()
            || self.blk_file.is_some()
            || self.null.is_some()
        {
            let main = self.single_export()?;
            check_open_as(
                &main.1,
                ("--open-as daemon", "--allow-uids", "--allow-gids"),
            )?;
            exports.push(main);
        } else if self.iops_limit != 0
            || self.iops_burst != 0
            || self.bps_limit != 0
            || self.bps_burst != 0
        {
            return Err(
                "--iops-limit, --iops-burst, --bps-limit and --bps-burst apply to the main export \
                 (--socket-path or --fd); give an --export its own iops-limit= and so on"
                    .into(),
            );
        } else if self.allow_uids.is_some() || self.allow_gids.is_some() {
            // Not silently dropped: whoever wrote them expects them to restrict something.
            return Err(
                "--allow-uids and --allow-gids apply to the main export (--socket-path or --fd); \
                        give an --export its own allow-uids= or allow-gids="
                    .into(),
            );
        }
        // Daemon-wide settings apply to the --export ones too (the socket's mode and group
        // unless the export sets its own).
        let defaults = self.export_defaults();
        exports.extend(self.export.iter().cloned().map(|(endpoint, mut spec)| {
            defaults.apply(&mut spec);
            (endpoint, spec)
        }));
        if exports.is_empty() {
            return Err("no export: give --socket-path and --blk-file, or --export".into());
        }
        if self.single_process && exports.iter().any(|(_, spec)| spec.allow.restricts()) {
            return Err(
                "--single-process does not check --allow-uids or --allow-gids (the supervisor \
                        does); restrict the socket with --socket-mode and --socket-group instead"
                    .into(),
            );
        }
        let mut paths: Vec<_> = exports.iter().map(|(e, _)| format!("{e:?}")).collect();
        paths.sort();
        if paths.windows(2).any(|w| w[0] == w[1]) {
            return Err("two exports use the same socket".into());
        }
        Ok(exports)
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
        let exports = cli.exports().unwrap();
        assert_eq!(exports[0].1.disk, DiskSpec::Null { size: 1 << 20 });
        assert!(matches!(exports[0].0, Endpoint::Fd(3)));
    }

    #[test]
    fn rbd_images() {
        let cli = Cli::try_parse_from([
            "vublk", "--socket-path", "/a.sock", "--blk-file", "rbd:pool/disk",
            "--export", "socket-path=/b.sock,blk-file=rbd:vms/vm-1,ceph-conf=/t/ceph.conf,ceph-id=tenant1,ceph-timeout=20",
        ])
        .unwrap();
        let exports = cli.exports().unwrap();
        let spec = |i: usize| match &exports[i].1.disk {
            DiskSpec::Rbd(spec) => (**spec).clone(),
            other => panic!("not an RBD disk: {other:?}"),
        };
        assert_eq!(
            spec(0),
            RbdSpec {
                pool: "pool".into(),
                image: "disk".into(),
                conf: "/etc/ceph/ceph.conf".into(),
                id: "admin".into(),
                timeout_secs: 0,
            }
        );
        assert_eq!(
            spec(1),
            RbdSpec {
                pool: "vms".into(),
                image: "vm-1".into(),
                conf: "/t/ceph.conf".into(),
                id: "tenant1".into(),
                timeout_secs: 20,
            }
        );
        for bad in [
            "rbd:disk",
            "rbd:/disk",
            "rbd:pool/",
            "rbd:pool/ns/disk",
            "rbd:pool/disk@snap",
        ] {
            let cli = Cli::try_parse_from(["vublk", "--socket-path", "/a", "--blk-file", bad]);
            assert!(cli.unwrap().exports().is_err(), "{bad}");
        }
        // No file to hand over: refused, saying why.
        let daemon = Cli::try_parse_from([
            "vublk",
            "--socket-path",
            "/a",
            "--blk-file",
            "rbd:p/i",
            "--open-as",
            "daemon",
            "--allow-uids",
            "0",
        ])
        .unwrap()
        .exports()
        .unwrap_err();
        assert!(
            daemon.contains("no file to hand over for rbd:p/i"),
            "{daemon}"
        );
    }

    #[test]
    fn several_exports() {
        let cli = Cli::try_parse_from([
            "vublk", "--socket-path", "/a.sock", "--blk-file", "/a.img",
            "--export", "socket-path=/b.sock,blk-file=/b.img,read-only,num-queues=4,open-as=daemon,allow-uids=0",
            "--export", "fd=5,null=1G,direct=off",
        ])
        .unwrap();
        let exports = cli.exports().unwrap();
        assert_eq!(exports.len(), 3);
        let b = &exports[1].1;
        assert!(b.open.read_only && b.device.num_queues == 4 && b.open_as == OpenAs::Daemon);
        assert_eq!(b.name, "/b.sock");
        assert_eq!(exports[2].1.disk, DiskSpec::Null { size: 1 << 30 });
        assert!(!exports[2].1.open.direct);
        for bad in [
            "socket-path=/b.sock",
            "socket-path=/c,blk-file=/c,bogus=1",
            "socket-path=/c,blk-file=/c,num-queues=0",
            "socket-path=/c,blk-file=/c,read-only=yes",
        ] {
            assert!(
                Cli::try_parse_from(["vublk", "--export", bad]).is_err(),
                "{bad}"
            );
        }
        let twice = Cli::try_parse_from([
            "vublk",
            "--socket-path",
            "/a",
            "--null",
            "1M",
            "--export",
            "socket-path=/a,null=1M",
        ])
        .unwrap();
        assert!(twice.exports().is_err());
    }

    #[test]
    fn conflicting_and_invalid_options_are_usage_errors() {
        assert!(
            Cli::try_parse_from(["vublk", "--fd", "3", "--socket-path", "s", "--null", "1M"])
                .is_err()
        );
        assert!(Cli::try_parse_from(["vublk", "--socket-path", "s"]).is_err());
        assert!(Cli::try_parse_from([
            "vublk",
            "--socket-path",
            "s",
            "--null",
            "1M",
            "--blk-size",
            "1024"
        ])
        .is_err());
        assert!(Cli::try_parse_from([
            "vublk",
            "--socket-path",
            "s",
            "--null",
            "1M",
            "--queue-size",
            "1000"
        ])
        .is_err());
        assert!(Cli::try_parse_from([
            "vublk",
            "--socket-path",
            "s",
            "--null",
            "1M",
            "--serial",
            "x".repeat(21).as_str()
        ])
        .is_err());
        assert!(Cli::try_parse_from(["vublk", "--print-capabilities"]).is_ok());
        // --single-process has no workers to sandbox.
        assert!(Cli::try_parse_from([
            "vublk",
            "--socket-path",
            "s",
            "--null",
            "1M",
            "--single-process",
            "--worker-allow",
            "/srv"
        ])
        .is_err());
        let cli = Cli::try_parse_from([
            "vublk",
            "--socket-path",
            "s",
            "--null",
            "1M",
            "--worker-allow",
            "/srv",
            "--test-worker-arg",
            "open:/etc/shadow@a.sock",
        ])
        .unwrap();
        assert_eq!(cli.worker_options().allow, [PathBuf::from("/srv")]);
        assert!(Cli::try_parse_from([
            "vublk",
            "--socket-path",
            "s",
            "--null",
            "1M",
            "--test-worker-arg",
            "reboot"
        ])
        .is_err());
        assert!(Cli::try_parse_from([
            "vublk",
            "--socket-path",
            "s",
            "--null",
            "1M",
            "--socket-mode",
            "0999"
        ])
        .is_err());
        assert!(Cli::try_parse_from([
            "vublk",
            "--socket-path",
            "s",
            "--null",
            "1M",
            "--socket-group",
            "no-such-group-here"
        ])
        .is_err());
        let cli = Cli::try_parse_from([
            "vublk",
            "--socket-path",
            "s",
            "--null",
            "1M",
            "--socket-mode",
            "0660",
            "--socket-group",
            "root",
        ])
        .unwrap();
        assert_eq!(
            (cli.socket_access().mode, cli.socket_access().group),
            (Some(0o660), Some(0))
        );
    }

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(std::iter::once("vublk").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    fn exports(args: &[&str]) -> Result<Vec<(Endpoint, ExportSpec)>, String> {
        parse(args)?.exports()
    }

    /// The first user and group of the host that have a name and a non-zero id, as
    /// (name, id), to check names resolve to the right id (not just to root's 0).
    fn named(database: &str) -> (String, u32) {
        std::fs::read_to_string(database)
            .unwrap()
            .lines()
            .find_map(|l| {
                let f: Vec<_> = l.split(':').collect();
                let id: u32 = f.get(2)?.parse().ok()?;
                (id != 0 && !f[0].is_empty() && f[0].parse::<u32>().is_err())
                    .then(|| (f[0].to_string(), id))
            })
            .expect("a named non-root entry")
    }

    #[test]
    fn allow_lists_take_numbers_and_names() {
        let (user, uid) = named("/etc/passwd");
        let (group, gid) = named("/etc/group");
        let main = exports(&[
            "--socket-path",
            "/a",
            "--null",
            "1M",
            "--allow-uids",
            &format!("1000,{user},root"),
            "--allow-gids",
            &group,
        ])
        .unwrap();
        assert_eq!(
            main[0].1.allow,
            AllowList {
                uids: Some(vec![1000, uid, 0]),
                gids: Some(vec![gid])
            }
        );
        // No list: everyone who can connect.
        let open = exports(&["--socket-path", "/a", "--null", "1M"]).unwrap();
        assert_eq!(open[0].1.allow, AllowList::default());
        assert!(!open[0].1.allow.restricts());
        // In --export, lists are separated by ':'.
        let spec = format!("socket-path=/b,null=1M,allow-uids=1000:{user},allow-gids={group}:7");
        let both = exports(&[
            "--socket-path",
            "/a",
            "--null",
            "1M",
            "--allow-uids",
            "5",
            "--export",
            &spec,
        ])
        .unwrap();
        assert_eq!(
            both[0].1.allow,
            AllowList {
                uids: Some(vec![5]),
                gids: None
            },
            "the main export's own lists"
        );
        assert_eq!(
            both[1].1.allow,
            AllowList {
                uids: Some(vec![1000, uid]),
                gids: Some(vec![gid, 7])
            },
            "not the main export's"
        );
        let gids_only = exports(&["--export", "socket-path=/b,null=1M,allow-gids=0"]).unwrap();
        assert_eq!(
            gids_only[0].1.allow,
            AllowList {
                uids: None,
                gids: Some(vec![0])
            }
        );
    }

    #[test]
    fn bad_allow_lists_are_usage_errors() {
        let base = ["--socket-path", "/a", "--null", "1M"];
        for (option, value, expected) in [
            (
                "--allow-uids",
                "no-such-user-here",
                "no user 'no-such-user-here' in /etc/passwd",
            ),
            (
                "--allow-gids",
                "no-such-group-here",
                "no group 'no-such-group-here' in /etc/group",
            ),
            ("--allow-uids", "1000,", "an empty user"),
            ("--allow-uids", "4294967295", "is not a valid user id"),
            ("--allow-gids", "-1", "no group '-1'"),
        ] {
            let err = parse(&[&base[..], &[&format!("{option}={value}")]].concat()).unwrap_err();
            assert!(err.contains(expected), "{option} {value}: {err}");
        }
        for (spec, expected) in [
            (
                "socket-path=/b,null=1M,allow-uids=no-such-user-here",
                "no user 'no-such-user-here'",
            ),
            (
                "socket-path=/b,null=1M,allow-gids=0:no-such-group-here",
                "no group 'no-such-group-here'",
            ),
            (
                "socket-path=/b,null=1M,allow-uids=1000,1001",
                "lists in --export are separated by ':'",
            ),
            ("socket-path=/b,null=1M,allow-uids=", "an empty user"),
        ] {
            let err = parse(&["--export", spec]).unwrap_err();
            assert!(err.contains(expected), "{spec}: {err}");
        }
        // Lists for the main export when there is none would restrict nothing.
        let err =
            exports(&["--export", "socket-path=/b,null=1M", "--allow-uids", "0"]).unwrap_err();
        assert!(err.contains("apply to the main export"), "{err}");
        // --single-process serves without a supervisor to check them.
        let err = exports(&[
            "--single-process",
            "--socket-path",
            "/a",
            "--null",
            "1M",
            "--allow-gids",
            "0",
        ])
        .unwrap_err();
        assert!(err.contains("--single-process does not check"), "{err}");
    }

    #[test]
    fn exports_take_the_daemon_wide_socket_access_unless_they_set_their_own() {
        let (group, gid) = named("/etc/group");
        let list = exports(&[
            "--socket-path",
            "/a",
            "--null",
            "1M",
            "--socket-mode",
            "0660",
            "--socket-group",
            "root",
            "--export",
            "socket-path=/b,null=1M",
            "--export",
            &format!("socket-path=/c,null=1M,socket-mode=0600,socket-group={group}"),
            "--export",
            "socket-path=/d,null=1M,socket-mode=0o666",
            "--export",
            "socket-path=/e,null=1M,socket-group=42",
        ])
        .unwrap();
        let access: Vec<_> = list
            .iter()
            .map(|(_, spec)| (spec.socket.mode, spec.socket.group))
            .collect();
        assert_eq!(
            access,
            [
                (Some(0o660), Some(0)),
                (Some(0o660), Some(0)),
                (Some(0o600), Some(gid)),
                (Some(0o666), Some(0)),
                (Some(0o660), Some(42)),
            ]
        );
        // Nothing daemon-wide: the umask's mode and our group, as before.
        let plain = exports(&[
            "--export",
            "socket-path=/b,null=1M",
            "--export",
            "socket-path=/c,null=1M,socket-mode=0640",
        ])
        .unwrap();
        assert_eq!(plain[0].1.socket, SocketAccess::default());
        assert_eq!(
            plain[1].1.socket,
            SocketAccess {
                mode: Some(0o640),
                group: None
            }
        );
        for bad in [
            "socket-mode=0999",
            "socket-mode=rw",
            "socket-mode=17777",
            "socket-group=no-such-group-here",
            "socket-group=4294967295",
        ] {
            let spec = format!("socket-path=/b,null=1M,{bad}");
            assert!(parse(&["--export", &spec]).is_err(), "{bad}");
        }
    }

    #[test]
    fn open_as_daemon_needs_an_allow_list() {
        let err = exports(&[
            "--socket-path",
            "/a",
            "--blk-file",
            "/a.img",
            "--open-as",
            "daemon",
        ])
        .unwrap_err();
        assert_eq!(
            err,
            "--open-as daemon needs --allow-uids or --allow-gids: the supervisor opens the image as root for \
             whoever may connect to the socket, so say who may"
        );
        let err =
            parse(&["--export", "socket-path=/b,blk-file=/b.img,open-as=daemon"]).unwrap_err();
        assert!(err.contains("open-as=daemon needs allow-uids= or allow-gids=: the supervisor opens the image as root"), "{err}");
        // The main export's list is not the export's.
        let err = parse(&[
            "--socket-path",
            "/a",
            "--null",
            "1M",
            "--allow-uids",
            "0",
            "--export",
            "socket-path=/b,blk-file=/b.img,open-as=daemon",
        ])
        .unwrap_err();
        assert!(err.contains("open-as=daemon needs"), "{err}");
        // Either list will do; open-as=vmm needs none.
        assert!(exports(&[
            "--socket-path",
            "/a",
            "--blk-file",
            "/a.img",
            "--open-as",
            "daemon",
            "--allow-uids",
            "0"
        ])
        .is_ok());
        assert!(exports(&[
            "--socket-path",
            "/a",
            "--blk-file",
            "/a.img",
            "--open-as",
            "daemon",
            "--allow-gids",
            "0"
        ])
        .is_ok());
        assert!(exports(&[
            "--export",
            "socket-path=/b,blk-file=/b.img,open-as=daemon,allow-gids=0"
        ])
        .is_ok());
        assert!(exports(&["--export", "socket-path=/b,blk-file=/b.img,open-as=vmm"]).is_ok());
    }

    #[test]
    fn qos_options_and_keys() {
        let list = exports(&[
            "--socket-path",
            "/a",
            "--null",
            "1M",
            "--iops-limit",
            "1000",
            "--iops-burst",
            "2000",
            "--bps-limit",
            "10M",
            "--export",
            "socket-path=/b,null=1M,bps-limit=1G,bps-burst=2G,iops-limit=none",
            "--export",
            "socket-path=/c,null=1M",
        ])
        .unwrap();
        assert_eq!(
            list[0].1.qos,
            QosLimits {
                iops_limit: 1000,
                iops_burst: 2000,
                bps_limit: 10 << 20,
                bps_burst: 0
            }
        );
        assert_eq!(
            list[1].1.qos,
            QosLimits {
                iops_limit: 0,
                iops_burst: 0,
                bps_limit: 1 << 30,
                bps_burst: 2 << 30
            },
            "not the main export's"
        );
        assert!(list[2].1.qos.is_unlimited());
        for (args, why) in [
            (&["--iops-limit", "fast"][..], "not a number"),
            (&["--bps-limit", "1Q"][..], "unknown size suffix"),
            (&["--iops-burst", "10"][..], "needs iops-limit="),
            (
                &["--iops-limit", "100", "--iops-burst", "10"][..],
                "below iops-limit=100",
            ),
            (
                &["--export", "socket-path=/b,null=1M,bps-burst=1M"][..],
                "needs bps-limit=",
            ),
            (
                &["--export", "socket-path=/b,null=1M,iops-limit=-1"][..],
                "not a number",
            ),
            (
                &[
                    "--export",
                    "socket-path=/b,null=1M,iops-limit=2000000000000000",
                ][..],
                "largest rate",
            ),
            (
                &["--export", "socket-path=/b,null=1M,iops-limits=5"][..],
                "unknown export option 'iops-limits'",
            ),
        ] {
            let err = exports(&[&["--socket-path", "/a", "--null", "1M"][..], args].concat())
                .unwrap_err();
            assert!(err.contains(why), "{args:?}: {err}");
        }
        // The options are the main export's: without one they would limit nothing.
        let err =
            exports(&["--export", "socket-path=/b,null=1M", "--iops-limit", "5"]).unwrap_err();
        assert!(err.contains("apply to the main export"), "{err}");
    }

    #[test]
    fn tenant_limits() {
        let base = ["--socket-path", "/a", "--null", "1M"];
        assert_eq!(
            parse(&base).unwrap().tenant_limits(),
            TenantLimits::default()
        );
        assert_eq!(
            TenantLimits::default(),
            TenantLimits {
                connections_per_vmm: DEFAULT_CONNECTIONS_PER_VMM,
                vms_per_uid: DEFAULT_VMS_PER_UID
            }
        );
        let cli = parse(
            &[
                &base[..],
                &[
                    "--max-connections-per-vmm",
                    "65536",
                    "--max-vms-per-uid",
                    "1",
                ],
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(
            cli.tenant_limits(),
            TenantLimits {
                connections_per_vmm: 65536,
                vms_per_uid: 1
            }
        );
        let cli = parse(
            &[
                &base[..],
                &[
                    "--max-connections-per-vmm",
                    "1",
                    "--max-vms-per-uid",
                    "1000000",
                ],
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(
            cli.tenant_limits(),
            TenantLimits {
                connections_per_vmm: 1,
                vms_per_uid: 1_000_000
            }
        );
        for bad in [
            ["--max-connections-per-vmm", "0"],
            ["--max-connections-per-vmm", "65537"],
            ["--max-vms-per-uid", "0"],
            ["--max-vms-per-uid", "1000001"],
            ["--max-vms-per-uid", "many"],
        ] {
            assert!(parse(&[&base[..], &bad[..]].concat()).is_err(), "{bad:?}");
        }
        // Daemon-wide, not export keys.
        assert!(parse(&["--export", "socket-path=/b,null=1M,max-vms-per-uid=3"]).is_err());
    }
}
