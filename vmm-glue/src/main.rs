//! `vmm-glue`: prints (or runs) VMM command lines for a vublk export, launches vublk and a VMM
//! together, and installs vublk's vhost-user descriptor. Argument parsing and output only; the
//! rules live in the library.
//!
//! Exit codes: 0 done; 1 a runtime failure (a file cannot be written, the VMM cannot be
//! started); 2 a usage error, including a combination that cannot work. `launch` exits with the
//! VMM's status (see [`vmm_glue::launch`]).

use std::error::Error;
use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use vmm_glue::cmdline::cloud_hypervisor::{self, ChOptions};
use vmm_glue::cmdline::qemu::{self, QemuOptions, QemuVersion};
use vmm_glue::cmdline::{shell, size, BackendLimits, CmdlineError, Export};
use vmm_glue::install::{install, InstallOptions};
use vmm_glue::launch::{self, LaunchOptions, VublkOptions};

#[derive(Parser)]
#[command(
    name = "vmm-glue",
    version,
    about = "Attach vublk exports to QEMU and cloud-hypervisor"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print QEMU's options for a vublk export (with --run, start QEMU with them).
    Qemu(QemuCmd),
    /// Print cloud-hypervisor's options for a vublk export (with --run, start it with them).
    #[command(name = "cloud-hypervisor")]
    CloudHypervisor(ChCmd),
    /// Start vublk and a VMM together on a socket vmm-glue creates; stop both when either ends.
    #[command(subcommand)]
    Launch(LaunchVmm),
    /// Install vublk's vhost-user descriptor: PREFIX/share/qemu/vhost-user/50-vublk.json.
    Install(InstallArgs),
}

#[derive(Args)]
struct ExportArgs {
    /// The export's unix socket (vublk --socket-path; `launch` creates it).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Queues the VMM creates.
    #[arg(long, value_name = "N")]
    queues: u16,
    /// Guest RAM (suffixes K M G T, powers of 1024); all of it is shared with vublk.
    #[arg(long, value_name = "BYTES", value_parser = size::parse)]
    mem: u64,
    /// The queues the export offers (its vublk --num-queues), if known; `launch` starts vublk
    /// with this many [default there: --queues].
    #[arg(long, value_name = "N")]
    backend_queues: Option<u16>,
    /// The largest queue size the export accepts (its vublk --queue-size), if known; `launch`
    /// starts vublk with it.
    #[arg(long, value_name = "N")]
    backend_queue_size: Option<u16>,
}

/// What the printing subcommands do with the options.
#[derive(Args)]
struct PrintArgs {
    /// Print a JSON array of arguments instead of shell words.
    #[arg(long)]
    json: bool,
    /// Start the VMM with these options followed by the arguments after `--`.
    #[arg(long)]
    run: bool,
    /// More VMM arguments (after `--`), checked for conflicts with vublk's needs.
    #[arg(last = true, value_name = "VMM ARGS")]
    extra: Vec<String>,
}

impl ExportArgs {
    /// For a launch: the export offers what vmm-glue starts vublk with, its --num-queues
    /// defaulting to the VMM's queues.
    fn pin_backend(&mut self) {
        self.backend_queues.get_or_insert(self.queues);
    }

    fn export(&self, queue_size: Option<u16>) -> Export {
        Export {
            socket: self.socket.clone(),
            num_queues: self.queues,
            queue_size,
            backend: BackendLimits {
                num_queues: self.backend_queues,
                queue_size: self.backend_queue_size,
            },
        }
    }
}

#[derive(Args)]
struct QemuArgs {
    #[command(flatten)]
    export: ExportArgs,
    /// Size of each queue (QEMU's default for vhost-user-blk-pci is 128).
    #[arg(long, value_name = "N")]
    queue_size: Option<u16>,
    /// Reconnect this many seconds after the export goes away.
    #[arg(long, value_name = "SECS")]
    reconnect: Option<u32>,
    /// The QEMU version to write for (X.Y); by default asked from the QEMU binary when it matters.
    #[arg(long, value_name = "X.Y", value_parser = QemuVersion::parse)]
    qemu_version: Option<QemuVersion>,
    /// The QEMU binary (for --run, launch and the version).
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// The chardev's id.
    #[arg(long, value_name = "ID", default_value = "vublk0")]
    id: String,
}

#[derive(Args)]
struct QemuCmd {
    #[command(flatten)]
    qemu: QemuArgs,
    #[command(flatten)]
    print: PrintArgs,
}

#[derive(Args)]
struct ChCmd {
    #[command(flatten)]
    ch: ChArgs,
    #[command(flatten)]
    print: PrintArgs,
}

#[derive(Subcommand)]
enum LaunchVmm {
    /// vublk and QEMU.
    Qemu(LaunchQemu),
    /// vublk and cloud-hypervisor.
    #[command(name = "cloud-hypervisor")]
    CloudHypervisor(LaunchCh),
}

#[derive(Args)]
struct LaunchQemu {
    #[command(flatten)]
    qemu: QemuArgs,
    #[command(flatten)]
    vublk: VublkArgs,
    /// More QEMU arguments (after `--`), checked for conflicts with vublk's needs.
    #[arg(last = true, value_name = "VMM ARGS")]
    extra: Vec<String>,
}

#[derive(Args)]
struct LaunchCh {
    #[command(flatten)]
    ch: ChArgs,
    #[command(flatten)]
    vublk: VublkArgs,
    /// More cloud-hypervisor arguments (after `--`), checked for conflicts with vublk's needs.
    #[arg(last = true, value_name = "VMM ARGS")]
    extra: Vec<String>,
}

/// The vublk a launch starts.
#[derive(Args)]
struct VublkArgs {
    /// The image vublk serves (vublk --blk-file: a raw image, a block device, or null:SIZE).
    #[arg(long, value_name = "IMAGE")]
    blk_file: String,
    /// The vublk binary.
    #[arg(long, value_name = "PATH", default_value = "vublk")]
    vublk: PathBuf,
    /// One more vublk argument (repeat for more: --vublk-arg=--direct --vublk-arg=--serial=d1).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    vublk_arg: Vec<String>,
    /// Seconds each process gets to stop after SIGTERM before it is killed.
    #[arg(long, value_name = "SECS", default_value_t = 15)]
    stop_timeout: u64,
}

#[derive(Args)]
struct ChArgs {
    #[command(flatten)]
    export: ExportArgs,
    /// Size of each queue.
    #[arg(long, value_name = "N")]
    queue_size: u16,
    /// Boot vCPUs (cloud-hypervisor refuses more disk queues than boot vCPUs; its default is 1).
    #[arg(long, value_name = "N")]
    cpus: Option<u16>,
    /// The cloud-hypervisor binary (for --run and launch).
    #[arg(long, value_name = "PATH", default_value = "cloud-hypervisor")]
    cloud_hypervisor: PathBuf,
}

#[derive(Args)]
struct InstallArgs {
    /// Installation prefix; QEMU tooling searches /usr/share/qemu/vhost-user (prefix /usr).
    #[arg(long, value_name = "DIR")]
    prefix: PathBuf,
    /// Stage the file under this directory (packaging).
    #[arg(long, value_name = "DIR")]
    destdir: Option<PathBuf>,
    /// The installed vublk binary [default: PREFIX/bin/vublk].
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
}

/// A failure and the exit code it gets.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn usage(e: CmdlineError) -> Self {
        Self {
            code: 2,
            message: chain(&e),
        }
    }

    fn runtime(message: String) -> Self {
        Self { code: 1, message }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Qemu(a) => qemu_cmd(a),
        Cmd::CloudHypervisor(a) => ch_cmd(a),
        Cmd::Launch(a) => launch_cmd(a),
        Cmd::Install(a) => install_cmd(a).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            eprintln!("vmm-glue: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// QEMU's options for the export (the version asked from the binary when it matters).
fn qemu_args(a: &QemuArgs, extra: &[String]) -> Result<Vec<String>, Failure> {
    let mut version = a.qemu_version;
    if version.is_none() && a.reconnect.is_some() {
        version = Some(
            QemuVersion::probe(&a.qemu)
                .map_err(|e| Failure::usage(CmdlineError::UnknownQemuVersion(e)))?,
        );
    }
    let opts = QemuOptions {
        export: a.export.export(a.queue_size),
        mem: a.export.mem,
        chardev_id: a.id.clone(),
        reconnect: a.reconnect,
        version,
    };
    let mut args = qemu::args(&opts).map_err(Failure::usage)?;
    qemu::check_extra(extra).map_err(Failure::usage)?;
    args.extend(extra.iter().cloned());
    Ok(args)
}

/// cloud-hypervisor's options for the export.
fn ch_args(a: &ChArgs, extra: &[String]) -> Result<Vec<String>, Failure> {
    let opts = ChOptions {
        export: a.export.export(Some(a.queue_size)),
        mem: a.export.mem,
        cpus: a.cpus,
    };
    let mut args = cloud_hypervisor::args(&opts).map_err(Failure::usage)?;
    cloud_hypervisor::check_extra(extra).map_err(Failure::usage)?;
    args.extend(extra.iter().cloned());
    Ok(args)
}

fn qemu_cmd(a: QemuCmd) -> Result<ExitCode, Failure> {
    let args = qemu_args(&a.qemu, &a.print.extra)?;
    if a.print.run {
        // Without reconnect= QEMU gives up at once when nobody listens yet.
        if a.qemu.reconnect.is_none() {
            require_socket(&a.qemu.export.socket, "or pass --reconnect")?;
        }
        return run(&a.qemu.qemu, &args);
    }
    print(&args, a.print.json)
}

fn ch_cmd(a: ChCmd) -> Result<ExitCode, Failure> {
    let args = ch_args(&a.ch, &a.print.extra)?;
    if a.print.run {
        require_socket(&a.ch.export.socket, "cloud-hypervisor does not wait for it")?;
        return run(&a.ch.cloud_hypervisor, &args);
    }
    print(&args, a.print.json)
}

fn launch_cmd(a: LaunchVmm) -> Result<ExitCode, Failure> {
    // vublk is started with the export's shape, so the checks run against what it will offer.
    let (export, vmm, vmm_args, vublk) = match a {
        LaunchVmm::Qemu(mut l) => {
            l.qemu.export.pin_backend();
            let args = qemu_args(&l.qemu, &l.extra)?;
            (l.qemu.export, l.qemu.qemu, args, l.vublk)
        }
        LaunchVmm::CloudHypervisor(mut l) => {
            l.ch.export.pin_backend();
            let args = ch_args(&l.ch, &l.extra)?;
            (l.ch.export, l.ch.cloud_hypervisor, args, l.vublk)
        }
    };
    launch::check_vublk_extra(&vublk.vublk_arg).map_err(Failure::usage)?;
    let opts = LaunchOptions {
        socket: export.socket.clone(),
        vublk: VublkOptions {
            binary: vublk.vublk,
            blk_file: vublk.blk_file,
            num_queues: export.backend_queues.unwrap_or(export.queues),
            queue_size: export.backend_queue_size,
            extra: vublk.vublk_arg,
        },
        vmm,
        vmm_args,
        stop_timeout: Duration::from_secs(vublk.stop_timeout),
        ready_timeout: launch::READY_TIMEOUT,
    };
    let outcome = launch::run(&opts, &mut |line| eprintln!("vmm-glue: {line}"))
        .map_err(|e| Failure::runtime(chain(&e)))?;
    Ok(ExitCode::from(outcome.exit_code()))
}

fn install_cmd(a: InstallArgs) -> Result<(), Failure> {
    let done = install(&InstallOptions {
        prefix: a.prefix,
        destdir: a.destdir,
        binary: a.binary,
    })
    .map_err(|e| Failure::runtime(chain(&e)))?;
    println!("{}", done.path.display());
    match &done.capabilities {
        Some(c) => eprintln!(
            "vmm-glue: {} is a '{}' backend with features {}",
            done.binary.display(),
            c.kind,
            c.features.join(", ")
        ),
        None => eprintln!(
            "vmm-glue: note: {} is not installed yet; the descriptor names it",
            done.binary.display()
        ),
    }
    if !done.searched {
        eprintln!(
            "vmm-glue: note: QEMU tooling does not search {}; with prefix /usr, or copied to \
             /etc/qemu/vhost-user/, it is found",
            done.path.parent().unwrap_or(Path::new("")).display()
        );
    }
    Ok(())
}

fn print(args: &[String], json: bool) -> Result<ExitCode, Failure> {
    if json {
        let text = serde_json::to_string(args).map_err(|e| Failure::runtime(e.to_string()))?;
        println!("{text}");
    } else {
        println!("{}", shell::render(args));
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses to start a VMM on a socket that is not there.
fn require_socket(socket: &Path, hint: &str) -> Result<(), Failure> {
    match std::fs::metadata(socket) {
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(_) => Err(Failure::runtime(format!(
            "{} is not a socket",
            socket.display()
        ))),
        Err(e) if e.kind() == ErrorKind::NotFound => Err(Failure::runtime(format!(
            "no socket at {}: start vublk first ({hint})",
            socket.display()
        ))),
        Err(e) => Err(Failure::runtime(format!("{}: {e}", socket.display()))),
    }
}

/// Replaces this process with the VMM, so signals and the exit status are the VMM's own.
fn run(binary: &Path, args: &[String]) -> Result<ExitCode, Failure> {
    let mut words = vec![shell::quote(&binary.to_string_lossy())];
    words.extend(args.iter().map(|a| shell::quote(a)));
    eprintln!("vmm-glue: running {}", words.join(" "));
    let err = Command::new(binary).args(args).exec();
    Err(Failure::runtime(format!(
        "could not start {}: {err}",
        binary.display()
    )))
}

/// `error: cause: cause ...` on one line.
fn chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}
