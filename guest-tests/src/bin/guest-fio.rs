//! guest-fio: boots the test guest on one or more vhost-user-blk sockets and runs a fio job file
//! inside it, printing fio's output — a load test of a deployed backend (vublk or any other)
//! from a real guest kernel. The disks appear as /dev/vda, /dev/vdb, ... in socket order.
//!
//!   cargo run -p guest-tests --bin guest-fio -- --socket /tmp/vublk.sock --job my.fio
//!
//! Exits 0 when fio exits 0 and the guest kernel logged no I/O errors, 1 otherwise.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use guest_tests::{Job, Vm};

#[derive(Parser)]
#[command(
    version,
    about = "Run a fio job file in a QEMU guest against vhost-user-blk sockets"
)]
struct Args {
    /// A vhost-user-blk socket to attach (repeat for more disks: vda, vdb, ...).
    #[arg(long, required = true)]
    socket: Vec<PathBuf>,
    /// The fio job file to run in the guest (filename=/dev/vda etc.).
    #[arg(long)]
    job: PathBuf,
    /// Virtqueues per disk (the backend must offer at least this many).
    #[arg(long, default_value_t = 1)]
    num_queues: u16,
    /// Guest vCPUs (blk-mq uses at most one queue per vCPU).
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    mem: u32,
    /// Kill the guest after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Print fio's JSON report instead of its normal output.
    #[arg(long)]
    json: bool,
    /// Keep the guest's console and initramfs in this directory (default: a temp dir, removed).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn run(args: Args) -> Result<bool> {
    let jobfile = std::fs::read_to_string(&args.job)
        .with_context(|| format!("read {}", args.job.display()))?;
    for s in &args.socket {
        if !s.exists() {
            bail!("{} does not exist (is the backend running?)", s.display());
        }
    }
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("guest-fio-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let mut vm = Vm {
        cpus: args.cpus,
        mem_mib: args.mem,
        timeout: Duration::from_secs(args.timeout),
        ..Vm::default()
    };
    for s in &args.socket {
        vm = vm.disk(s, args.num_queues);
    }
    let mut job = Job::new();
    if args.json {
        job.fio("fio", &jobfile);
    } else {
        job.fio_text("fio", &jobfile);
    }
    let boot = vm.boot(&dir, "guest-fio", &job)?;
    let step = boot.step("fio")?;
    println!("{}", step.stdout);
    if !step.stderr.is_empty() {
        eprintln!("{}", step.stderr);
    }
    let mut ok = step.rc == Some(0);
    if !ok {
        eprintln!("guest-fio: fio exited with {:?}", step.rc);
    }
    if let Err(e) = boot.check_kernel(&[]) {
        // Only the complaint lines, not the whole console.
        eprintln!(
            "guest-fio: {}",
            format!("{e:#}").split("\n----").next().unwrap_or("")
        );
        ok = false;
    }
    Ok(ok)
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("guest-fio: {e:#}");
            ExitCode::FAILURE
        }
    }
}
