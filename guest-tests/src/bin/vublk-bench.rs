//! vublk-bench: vublk against qemu-storage-daemon under the same libblkio load, side by side.
//!
//!   cargo run --release -p guest-tests --bin vublk-bench -- --media tmpfs,null --iodepth 1,32 \
//!       --queues 1 --rw randread --client interrupt --json results.json
//!
//! For each cell of the matrix (medium × rw × iodepth × queues × client mode) the systems run in
//! turn, A B A B, for `--repetitions` rounds; each run starts a fresh backend, runs the load
//! generator in its own process (warm-up, then the measured window) and stops the backend. The
//! medians per cell and system are printed as a Markdown table with the vublk/QSD ratios, and
//! written as JSON with every sample. See docs/benchmarks.md and `guest_tests::bench`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use guest_tests::bench::load::{self, LoadSpec};
use guest_tests::bench::media::{self, Medium};
use guest_tests::bench::report::{self, Sample};
use guest_tests::bench::systems::{self, Backend, System};
use guest_tests::bench::{Cell, ClientMode, Rw};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Benchmark vublk against qemu-storage-daemon with a libblkio load generator",
    args_conflicts_with_subcommands = true
)]
struct Args {
    /// Systems to compare, in the order they alternate (vublk, vublk-single, qsd).
    #[arg(long, value_delimiter = ',')]
    systems: Option<Vec<System>>,
    /// Media: tmpfs (filled image in /dev/shm), disk (filled image in --disk-dir, O_DIRECT),
    /// null (no I/O).
    #[arg(long, value_delimiter = ',')]
    media: Option<Vec<Medium>>,
    /// Request mixes: randread, randwrite, randrw.
    #[arg(long, value_delimiter = ',')]
    rw: Option<Vec<Rw>>,
    /// Requests in flight per queue.
    #[arg(long, value_delimiter = ',')]
    iodepth: Option<Vec<u32>>,
    /// Queues (the load generator runs one thread per queue; the backend gets as many).
    #[arg(long, value_delimiter = ',')]
    queues: Option<Vec<u16>>,
    /// Client queues: interrupt (completion fd) or poll (libblkio poll queues).
    #[arg(long, value_delimiter = ',')]
    client: Option<Vec<ClientMode>>,
    /// Measured seconds per run.
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds of load before the measured window of each run.
    #[arg(long)]
    warmup: Option<f64>,
    /// Rounds of A B per cell; the medians are reported.
    #[arg(long)]
    repetitions: Option<usize>,
    /// Image size in MiB (tmpfs and disk images are filled; the null disk is as large).
    #[arg(long)]
    image_mib: Option<u64>,
    /// Directory for the disk image: must be on the real disk, on a filesystem with O_DIRECT.
    #[arg(long, default_value = "/var/tmp")]
    disk_dir: PathBuf,
    /// Write the JSON document (setup, every sample, medians, ratios) here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the Markdown tables here too (they are always printed on stdout).
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// A tiny matrix with short runs, to check the bench works (options given still apply).
    #[arg(long)]
    smoke: bool,
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// Internal: run the load generator described by SPEC (JSON).
    #[command(hide = true)]
    Load { spec: String },
}

/// The matrix and the run parameters, with the defaults (or the smoke defaults) filled in.
#[derive(Debug)]
struct Plan {
    systems: Vec<System>,
    media: Vec<Medium>,
    rw: Vec<Rw>,
    iodepth: Vec<u32>,
    queues: Vec<u16>,
    client: Vec<ClientMode>,
    duration: Duration,
    warmup: Duration,
    repetitions: usize,
    image_size: u64,
}

impl Plan {
    fn new(a: &Args) -> Result<Plan> {
        let smoke = a.smoke;
        let pick = |given: &Option<f64>, full: f64, smoke_v: f64| -> Result<Duration> {
            let secs = given.unwrap_or(if smoke { smoke_v } else { full });
            Duration::try_from_secs_f64(secs).with_context(|| format!("bad duration {secs}"))
        };
        let plan = Plan {
            systems: a
                .systems
                .clone()
                .unwrap_or_else(|| vec![System::Vublk, System::Qsd]),
            media: a.media.clone().unwrap_or_else(|| {
                if smoke {
                    vec![Medium::Tmpfs, Medium::Null]
                } else {
                    vec![Medium::Tmpfs, Medium::Disk, Medium::Null]
                }
            }),
            rw: a.rw.clone().unwrap_or_else(|| {
                if smoke {
                    vec![Rw::RandRead]
                } else {
                    vec![Rw::RandRead, Rw::RandWrite]
                }
            }),
            iodepth: a.iodepth.clone().unwrap_or_else(|| {
                if smoke {
                    vec![4]
                } else {
                    vec![1, 8, 32, 128]
                }
            }),
            queues: a
                .queues
                .clone()
                .unwrap_or_else(|| if smoke { vec![1] } else { vec![1, 2] }),
            client: a.client.clone().unwrap_or_else(|| {
                if smoke {
                    vec![ClientMode::Interrupt]
                } else {
                    vec![ClientMode::Interrupt, ClientMode::Poll]
                }
            }),
            duration: pick(&a.duration, 5.0, 0.5)?,
            warmup: pick(&a.warmup, 1.0, 0.1)?,
            repetitions: a.repetitions.unwrap_or(if smoke { 1 } else { 3 }),
            image_size: a.image_mib.unwrap_or(if smoke { 64 } else { 1024 }) << 20,
        };
        if plan.systems.is_empty()
            || plan.media.is_empty()
            || plan.rw.is_empty()
            || plan.iodepth.is_empty()
            || plan.queues.is_empty()
            || plan.client.is_empty()
            || plan.repetitions == 0
        {
            bail!("the matrix is empty");
        }
        if plan.iodepth.contains(&0) || plan.queues.contains(&0) {
            bail!("iodepth and queues must be at least 1");
        }
        Ok(plan)
    }

    fn cells(&self, medium: Medium) -> Vec<Cell> {
        let mut cells = Vec::new();
        for &rw in &self.rw {
            for &queues in &self.queues {
                for &client in &self.client {
                    for &iodepth in &self.iodepth {
                        cells.push(Cell {
                            medium,
                            rw,
                            iodepth,
                            queues,
                            client,
                        });
                    }
                }
            }
        }
        cells
    }

    fn runs(&self) -> usize {
        self.media.len() * self.cells(Medium::Null).len() * self.repetitions * self.systems.len()
    }

    fn to_json(&self) -> serde_json::Value {
        let names = |v: Vec<String>| json!(v);
        json!({
            "systems": names(self.systems.iter().map(|s| s.to_string()).collect()),
            "media": names(self.media.iter().map(|s| s.to_string()).collect()),
            "rw": names(self.rw.iter().map(|s| s.to_string()).collect()),
            "iodepth": self.iodepth,
            "queues": self.queues,
            "client": names(self.client.iter().map(|s| s.to_string()).collect()),
            "duration_s": self.duration.as_secs_f64(),
            "warmup_s": self.warmup.as_secs_f64(),
            "repetitions": self.repetitions,
            "image_size": self.image_size,
            "block_size": guest_tests::bench::BLOCK,
        })
    }
}

/// What the machine is, for the report.
fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|x| x.1.trim().to_string())
        })
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0);
    json!({
        "cpu": model,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": mem_kib as f64 / (1u64 << 20) as f64,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

fn run(args: Args) -> Result<()> {
    let plan = Plan::new(&args)?;
    let exe = std::env::current_exe().context("find the bench executable")?;
    let per_run = plan.warmup + plan.duration + Duration::from_millis(300);
    eprintln!(
        "vublk-bench: {} runs of {:.1} s + start/stop (about {:.0} s)",
        plan.runs(),
        (plan.warmup + plan.duration).as_secs_f64(),
        per_run.as_secs_f64() * plan.runs() as f64
    );
    let setup = json!({
        "machine": machine(),
        "versions": plan.systems.iter().map(|s| (s.name().to_string(), json!(systems::version(*s)))).collect::<serde_json::Map<_, _>>(),
        "command": std::env::args().collect::<Vec<_>>(),
        "plan": plan.to_json(),
    });

    let dir = tempfile::Builder::new().prefix("vublk-bench-").tempdir()?;
    let samples = match run_matrix(&exe, &plan, &args.disk_dir, dir.path()) {
        Ok(samples) => samples,
        Err(e) => {
            let kept = dir.keep();
            return Err(e.context(format!(
                "sockets and backend logs kept in {}",
                kept.display()
            )));
        }
    };

    let rows = report::summarize(&samples);
    let table = report::markdown(&rows);
    print!("{table}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, &table).with_context(|| format!("write {}", path.display()))?;
    }
    if let Some(path) = &args.json {
        let doc = report::json(setup, &samples, &rows);
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// Every run of the plan, in order: per medium, per cell, `repetitions` rounds of the systems.
fn run_matrix(exe: &Path, plan: &Plan, disk_dir: &Path, dir: &Path) -> Result<Vec<Sample>> {
    let mut samples: Vec<Sample> = Vec::new();
    let started = Instant::now();
    let total = plan.runs();
    for &medium in &plan.media {
        eprintln!(
            "vublk-bench: preparing {medium} ({} MiB)",
            plan.image_size >> 20
        );
        let prepared = media::prepare(medium, plan.image_size, disk_dir)?;
        for cell in plan.cells(medium) {
            for rep in 0..plan.repetitions {
                for &system in &plan.systems {
                    let sample = measure(exe, &prepared, cell, system, rep, plan, dir)
                        .with_context(|| format!("{cell}, {system}, repetition {}", rep + 1))?;
                    eprintln!(
                        "[{}/{total} {:.0} s] {cell} {system} #{}: {:.0} IOPS, p50 {:.1} µs, \
                         p99 {:.1} µs, backend {:.2} CPU s / M I/O",
                        samples.len() + 1,
                        started.elapsed().as_secs_f64(),
                        rep + 1,
                        sample.load.iops,
                        sample.load.p50_us,
                        sample.load.p99_us,
                        sample.backend_cpu_per_mio(),
                    );
                    samples.push(sample);
                }
            }
        }
    }
    Ok(samples)
}

/// One run: a fresh backend, the load generator against it, a clean stop.
fn measure(
    exe: &Path,
    prepared: &media::Prepared,
    cell: Cell,
    system: System,
    rep: usize,
    plan: &Plan,
    dir: &Path,
) -> Result<Sample> {
    let mut backend = Backend::start(system, prepared, cell.queues, dir, system.name())?;
    let spec = LoadSpec {
        socket: backend.socket.clone(),
        rw: cell.rw,
        iodepth: cell.iodepth,
        queues: cell.queues,
        client: cell.client,
        warmup: plan.warmup,
        duration: plan.duration,
        size: prepared.size,
    };
    let measured = load::run(exe, &spec, backend.pid())
        .with_context(|| format!("backend log:\n{}", backend.log_text()))?;
    backend.check_running()?;
    backend.stop()?;
    if measured.load.ios == 0 {
        bail!("no I/O completed in the measured window");
    }
    Ok(Sample {
        cell,
        system,
        rep,
        load: measured.load,
        backend_cpu_s: measured.backend_cpu_s,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match &args.command {
        Some(Sub::Load { spec }) => load::main(spec),
        None => run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vublk-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
