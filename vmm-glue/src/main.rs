//! `vmm-glue`: prints (or runs) VMM command lines for a vublk export and installs vublk's
//! vhost-user descriptor. Argument parsing and output only; the rules live in the library.
//!
//! Exit codes: 0 done; 1 a runtime failure (a file cannot be written, the VMM cannot be
//! started); 2 a usage error, including a combination that cannot work.

use std::error::Error;
use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::{Args, Parser, Subcommand};
use vmm_glue::cmdline::cloud_hypervisor::{self, ChOptions};
use vmm_glue::cmdline::qemu::{self, QemuOptions, QemuVersion};
use vmm_glue::cmdline::{shell, size, BackendLimits, CmdlineError, Export};
use vmm_glue::install::{install, InstallOptions};

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
    Qemu(QemuArgs),
    /// Print cloud-hypervisor's options for a vublk export (with --run, start it with them).
    #[command(name = "cloud-hypervisor")]
    CloudHypervisor(ChArgs),
    /// Install vublk's vhost-user descriptor: PREFIX/share/qemu/vhost-user/50-vublk.json.
    Install(InstallArgs),
}

#[derive(Args)]
struct ExportArgs {
    /// The export's unix socket (vublk --socket-path).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Queues the VMM creates.
    #[arg(long, value_name = "N")]
    queues: u16,
    /// Guest RAM (suffixes K M G T, powers of 1024); all of it is shared with vublk.
    #[arg(long, value_name = "BYTES", value_parser = size::parse)]
    mem: u64,
    /// The queues the export offers (its vublk --num-queues), if known.
    #[arg(long, value_name = "N")]
    backend_queues: Option<u16>,
    /// The largest queue size the export accepts (its vublk --queue-size), if known.
    #[arg(long, value_name = "N")]
    backend_queue_size: Option<u16>,
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
    /// The QEMU binary (for --run and the version).
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// The chardev's id.
    #[arg(long, value_name = "ID", default_value = "vublk0")]
    id: String,
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
    /// The cloud-hypervisor binary (for --run).
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
        Cmd::Install(a) => install_cmd(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("vmm-glue: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn qemu_cmd(a: QemuArgs) -> Result<(), Failure> {
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
        chardev_id: a.id,
        reconnect: a.reconnect,
        version,
    };
    let mut args = qemu::args(&opts).map_err(Failure::usage)?;
    qemu::check_extra(&a.export.extra).map_err(Failure::usage)?;
    args.extend(a.export.extra.iter().cloned());
    if a.export.run {
        // Without reconnect= QEMU gives up at once when nobody listens yet.
        if a.reconnect.is_none() {
            require_socket(&a.export.socket, "or pass --reconnect")?;
        }
        return run(&a.qemu, &args);
    }
    print(&args, a.export.json)
}

fn ch_cmd(a: ChArgs) -> Result<(), Failure> {
    let opts = ChOptions {
        export: a.export.export(Some(a.queue_size)),
        mem: a.export.mem,
        cpus: a.cpus,
    };
    let mut args = cloud_hypervisor::args(&opts).map_err(Failure::usage)?;
    cloud_hypervisor::check_extra(&a.export.extra).map_err(Failure::usage)?;
    args.extend(a.export.extra.iter().cloned());
    if a.export.run {
        require_socket(&a.export.socket, "cloud-hypervisor does not wait for it")?;
        return run(&a.cloud_hypervisor, &args);
    }
    print(&args, a.export.json)
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

fn print(args: &[String], json: bool) -> Result<(), Failure> {
    if json {
        let text = serde_json::to_string(args).map_err(|e| Failure::runtime(e.to_string()))?;
        println!("{text}");
    } else {
        println!("{}", shell::render(args));
    }
    Ok(())
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
fn run(binary: &Path, args: &[String]) -> Result<(), Failure> {
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
