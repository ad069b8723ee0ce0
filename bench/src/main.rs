//! vublk-bench: vublk against qemu-storage-daemon under the same libblkio load, side by side.
//!
//!   cargo run --release -p vublk-bench -- --media tmpfs,null --iodepth 1,32 \
//!       --queues 1 --rw randread --client interrupt --json results.json --svg results.svg
//!
//! For each cell of the matrix (medium × rw × iodepth × queues × client mode × rate) the systems
//! run in turn, A B A B, for `--repetitions` rounds; each run starts a fresh backend, runs the
//! load generator in its own process (warm-up, then the measured window) and stops the backend.
//! The `io_uring` and `fio` systems have no backend: the load generator (or fio) opens the image
//! itself. A cell with several VMs (`--vms`) runs a load generator per VM against an export per
//! VM of one backend. The medians per cell and system are printed as a Markdown table with the
//! ratios of vublk to QSD, io_uring and fio, written as JSON with every sample, and drawn as an
//! SVG chart (`--svg`). See docs/benchmarks.md and `vublk_bench` (the library,
//! `bench/src/lib.rs`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;
use vublk_bench::load::{self, LoadSpec, Target};
use vublk_bench::media::{self, Medium};
use vublk_bench::report::{self, Sample};
use vublk_bench::systems::{self, System};
use vublk_bench::{svg, Cell, ClientMode, Rate, Rw};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Benchmark vublk against qemu-storage-daemon and plain io_uring with a libblkio load \
             generator",
    args_conflicts_with_subcommands = true
)]
struct Args {
    /// Systems to compare, in the order they alternate (vublk, vublk-single, vublk-qos, qsd,
    /// io_uring, fio, rbd-bench; vublk-qos is vublk with limits no load reaches, the cost of the
    /// limiter; io_uring is libblkio's io_uring driver on the image, no backend, not on null or
    /// rbd; fio is fio's io_uring engine with O_DIRECT, the disk's own limit: disk medium and
    /// interrupt-driven clients only; rbd-bench is Ceph's `rbd bench`, the cluster's limit for
    /// a librbd client: rbd medium, one VM, interrupt-driven clients at full load only)
    /// [default: vublk,qsd,io_uring,fio, and rbd-bench with the rbd medium]
    #[arg(long, value_delimiter = ',')]
    systems: Option<Vec<System>>,
    /// Media: tmpfs (filled image in /dev/shm), disk (filled image in --disk-dir, O_DIRECT),
    /// null (no I/O), rbd (filled RBD images on a throwaway one-node Ceph cluster started by
    /// scripts/ceph-dev.sh; vublk, qsd and rbd-bench only; not in the default set).
    #[arg(long, value_delimiter = ',')]
    media: Option<Vec<Medium>>,
    /// Request mixes: randread, randwrite, randrw.
    #[arg(long, value_delimiter = ',')]
    rw: Option<Vec<Rw>>,
    /// Requests in flight per queue.
    #[arg(long, value_delimiter = ',')]
    iodepth: Option<Vec<u32>>,
    /// Queues per VM (the load generator runs one thread per queue; the backend gets as many).
    #[arg(long, value_delimiter = ',')]
    queues: Option<Vec<u16>>,
    /// VMs on one backend: a load generator process per VM, each with an export (and an image
    /// of its own, the --image-mib split between them) on the one daemon (vublk: a worker per
    /// VM; QSD: an iothread per export). 8,16 for the many-VM cells [default: 1]
    #[arg(long, value_delimiter = ',')]
    vms: Option<Vec<u16>>,
    /// Client queues: interrupt (completion fd) or poll (libblkio poll queues).
    #[arg(long, value_delimiter = ',')]
    client: Option<Vec<ClientMode>>,
    /// Load: max (closed loop, iodepth always in flight) or a total rate in IOPS over all VMs and
    /// queues (20000, 20k, 1.5M), paced with at most iodepth in flight per queue, so every system
    /// does the same work and CPU per I/O compares at equal load.
    #[arg(long, value_delimiter = ',')]
    rate: Option<Vec<Rate>>,
    /// Measured seconds per run.
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds of load before the measured window of each run.
    #[arg(long)]
    warmup: Option<f64>,
    /// Rounds of A B per cell; the medians are reported.
    #[arg(long)]
    repetitions: Option<usize>,
    /// Image size in MiB (tmpfs and disk images are filled; the null disk is as large); several
    /// VMs share it, an equal part each.
    #[arg(long)]
    image_mib: Option<u64>,
    /// Re-run a round (all its systems) when the hypervisor stole more than this percentage of
    /// the machine's CPU in one of its runs (/proc/stat): such a run measures the host, not the
    /// backend. 0 keeps every round [default: 10; smoke: 0]
    #[arg(long)]
    max_steal: Option<f64>,
    /// Re-runs of one round for steal, after which it is kept as it is (and noted) [default: 3]
    #[arg(long)]
    steal_retries: Option<usize>,
    /// Directory for the disk image: must be on the real disk, on a filesystem with O_DIRECT.
    #[arg(long, default_value = "/var/tmp")]
    disk_dir: PathBuf,
    /// Write the JSON document (setup, every sample, medians, ratios) here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the Markdown tables here too (they are always printed on stdout).
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Write a chart here (SVG): median IOPS and CPU per I/O, a group of bars per cell.
    #[arg(long)]
    svg: Option<PathBuf>,
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
    rate: Vec<Rate>,
    vms: Vec<u16>,
    duration: Duration,
    warmup: Duration,
    repetitions: usize,
    image_size: u64,
    /// The share of stolen CPU above which a round is re-run; `None` keeps every round.
    max_steal: Option<f64>,
    steal_retries: usize,
}

/// What becomes of a round, given the host's steal in it.
#[derive(Debug, PartialEq)]
enum RoundVerdict {
    Keep,
    /// Run it again: the host stole too much.
    Again,
    /// Keep it though the host stole too much: the re-runs are used up.
    KeepStolen,
}

impl Plan {
    fn new(a: &Args) -> Result<Plan> {
        let smoke = a.smoke;
        let pick = |given: &Option<f64>, full: f64, smoke_v: f64| -> Result<Duration> {
            let secs = given.unwrap_or(if smoke { smoke_v } else { full });
            Duration::try_from_secs_f64(secs).with_context(|| format!("bad duration {secs}"))
        };
        let media = a.media.clone().unwrap_or_else(|| {
            if smoke {
                vec![Medium::Tmpfs, Medium::Null]
            } else {
                vec![Medium::Tmpfs, Medium::Disk, Medium::Null]
            }
        });
        let plan = Plan {
            systems: a.systems.clone().unwrap_or_else(|| {
                let mut systems = vec![System::Vublk, System::Qsd, System::IoUring, System::Fio];
                // The rbd medium's own reference, only when it runs (elsewhere it is skipped).
                if media.contains(&Medium::Rbd) {
                    systems.push(System::RbdBench);
                }
                systems
            }),
            media,
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
            rate: a.rate.clone().unwrap_or_else(|| vec![Rate::Max]),
            vms: a.vms.clone().unwrap_or_else(|| vec![1]),
            duration: pick(&a.duration, 5.0, 0.5)?,
            warmup: pick(&a.warmup, 1.0, 0.1)?,
            repetitions: a.repetitions.unwrap_or(if smoke { 1 } else { 3 }),
            image_size: a.image_mib.unwrap_or(if smoke { 64 } else { 1024 }) << 20,
            max_steal: match a.max_steal.unwrap_or(if smoke { 0.0 } else { 10.0 }) {
                0.0 => None,
                pct if pct > 0.0 && pct < 100.0 => Some(pct / 100.0),
                pct => bail!("bad --max-steal {pct} (a percentage, 0 to turn it off)"),
            },
            steal_retries: a.steal_retries.unwrap_or(3),
        };
        if plan.systems.is_empty()
            || plan.media.is_empty()
            || plan.rw.is_empty()
            || plan.iodepth.is_empty()
            || plan.queues.is_empty()
            || plan.client.is_empty()
            || plan.rate.is_empty()
            || plan.vms.is_empty()
            || plan.repetitions == 0
        {
            bail!("the matrix is empty");
        }
        if plan.iodepth.contains(&0) || plan.queues.contains(&0) || plan.vms.contains(&0) {
            bail!("iodepth, queues and vms must be at least 1");
        }
        for &vms in &plan.vms {
            if media::share(plan.image_size, vms) == 0 {
                bail!(
                    "{} MiB cannot be shared by {vms} VMs (at least 1 MiB each)",
                    plan.image_size >> 20
                );
            }
            for &rate in &plan.rate {
                if rate.iops().is_some_and(|n| n < u32::from(vms)) {
                    bail!("a rate of {rate} IOPS is less than one per VM with {vms} VMs");
                }
            }
        }
        if plan.runs() == 0 {
            bail!("no system can run on these media");
        }
        Ok(plan)
    }

    /// What to do with a round whose runs saw at most `steal` stolen, after `attempt` re-runs.
    fn after_round(&self, steal: f64, attempt: usize) -> RoundVerdict {
        match self.max_steal {
            Some(max) if steal > max && attempt < self.steal_retries => RoundVerdict::Again,
            Some(max) if steal > max => RoundVerdict::KeepStolen,
            _ => RoundVerdict::Keep,
        }
    }

    /// The cells on `medium` with `vms` VMs (the media are prepared per medium and VM count).
    fn cells(&self, medium: Medium, vms: u16) -> Vec<Cell> {
        let mut cells = Vec::new();
        for &rw in &self.rw {
            for &queues in &self.queues {
                for &client in &self.client {
                    for &iodepth in &self.iodepth {
                        for &rate in &self.rate {
                            cells.push(Cell {
                                medium,
                                rw,
                                iodepth,
                                queues,
                                client,
                                rate,
                                vms,
                            });
                        }
                    }
                }
            }
        }
        cells
    }

    /// Every cell, in the order they run.
    fn all_cells(&self) -> Vec<Cell> {
        let mut cells = Vec::new();
        for &medium in &self.media {
            for &vms in &self.vms {
                cells.extend(self.cells(medium, vms));
            }
        }
        cells
    }

    /// The systems that run in `cell`, in order.
    fn systems_on<'a>(&'a self, cell: &'a Cell) -> impl Iterator<Item = System> + 'a {
        self.systems
            .iter()
            .copied()
            .filter(move |s| s.unsupported(cell).is_none())
    }

    fn runs(&self) -> usize {
        self.all_cells()
            .iter()
            .map(|c| self.systems_on(c).count() * self.repetitions)
            .sum()
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
            "rate": self.rate.iter().map(|r| r.iops()).collect::<Vec<_>>(),
            "vms": self.vms,
            "duration_s": self.duration.as_secs_f64(),
            "warmup_s": self.warmup.as_secs_f64(),
            "repetitions": self.repetitions,
            "image_size": self.image_size,
            "max_steal": self.max_steal,
            "steal_retries": self.steal_retries,
            "block_size": vublk_bench::BLOCK,
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

    // Systems left out of a cell, each reason said once in the report.
    let mut notes: Vec<String> = Vec::new();
    for cell in plan.all_cells() {
        for &system in &plan.systems {
            if let Some(why) = system.unsupported(&cell) {
                if !notes.iter().any(|n| n == why) {
                    eprintln!("vublk-bench: {why}; skipped");
                    notes.push(why.to_string());
                }
            }
        }
    }
    if plan.systems.contains(&System::Qsd) {
        let v = &setup["versions"]["qsd"];
        eprintln!(
            "vublk-bench: {}",
            v.as_str().unwrap_or("qsd: version unknown")
        );
    }

    let dir = tempfile::Builder::new().prefix("vublk-bench-").tempdir()?;
    let samples = match run_matrix(&exe, &plan, &args.disk_dir, dir.path(), &mut notes) {
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
    let table = report::markdown(&rows, &samples, &notes);
    print!("{table}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, &table).with_context(|| format!("write {}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        let title = format!(
            "vublk-bench: {}",
            plan.systems
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let subtitle = [
            format!(
                "4 KiB random I/O from a libblkio load generator; medians of {} round{} of {} s",
                plan.repetitions,
                if plan.repetitions == 1 { "" } else { "s" },
                plan.duration.as_secs_f64(),
            ),
            format!(
                "{} CPUs ({}), Linux {}",
                setup["machine"]["cpus"],
                setup["machine"]["cpu"].as_str().unwrap_or("?"),
                setup["machine"]["kernel"].as_str().unwrap_or("?"),
            ),
            // The backends' versions (io_uring's is the kernel's, on the line above).
            plan.systems
                .iter()
                .filter(|s| s.has_backend())
                .map(|s| setup["versions"][s.name()].as_str().unwrap_or("?"))
                .collect::<Vec<_>>()
                .join("; "),
        ];
        std::fs::write(path, svg::chart(&rows, &title, &subtitle))
            .with_context(|| format!("write {}", path.display()))?;
    }
    if let Some(path) = &args.json {
        let doc = report::json(setup, &samples, &rows, &notes);
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// Every run of the plan, in order: per medium, per cell, `repetitions` rounds of the systems.
/// A round in which the host stole more than `plan.max_steal` is run again (up to
/// `plan.steal_retries` times); what was re-run or kept anyway goes into `notes`.
fn run_matrix(
    exe: &Path,
    plan: &Plan,
    disk_dir: &Path,
    dir: &Path,
    notes: &mut Vec<String>,
) -> Result<Vec<Sample>> {
    let mut samples: Vec<Sample> = Vec::new();
    let mut progress = Progress {
        started: Instant::now(),
        total: plan.runs(),
        runs: 0,
    };
    let (mut rounds, mut rerun) = (0, 0);
    for (&medium, &vms) in plan
        .media
        .iter()
        .flat_map(|m| plan.vms.iter().map(move |v| (m, v)))
    {
        if vms == 1 {
            eprintln!(
                "vublk-bench: preparing {medium} ({} MiB)",
                plan.image_size >> 20
            );
        } else {
            eprintln!(
                "vublk-bench: preparing {medium} for {vms} VMs ({} MiB each)",
                media::share(plan.image_size, vms) >> 20
            );
        }
        let prepared = media::prepare(medium, plan.image_size, vms, disk_dir)?;
        for cell in plan.cells(medium, vms) {
            for rep in 0..plan.repetitions {
                rounds += 1;
                for attempt in 0.. {
                    let round = run_round(exe, &prepared, cell, rep, plan, dir, &mut progress)?;
                    let worst = round.iter().map(|s| s.host_steal).fold(0.0, f64::max);
                    match plan.after_round(worst, attempt) {
                        RoundVerdict::Again => {
                            eprintln!(
                                "vublk-bench: the host stole {:.0}% of the CPU in round {} of \
                                 {cell}: running it again",
                                worst * 100.0,
                                rep + 1
                            );
                            continue;
                        }
                        RoundVerdict::KeepStolen => notes.push(format!(
                            "{cell}, round {}: kept with {:.0}% of the CPU stolen by the host \
                             after {attempt} re-runs",
                            rep + 1,
                            worst * 100.0
                        )),
                        RoundVerdict::Keep => {}
                    }
                    if attempt > 0 {
                        rerun += 1;
                    }
                    samples.extend(round);
                    break;
                }
            }
        }
    }
    let steal: Vec<f64> = samples.iter().map(|s| s.host_steal * 100.0).collect();
    notes.push(format!(
        "host steal in the measured windows: median {:.1}%, at most {:.1}%; {rerun} of {rounds} \
         rounds run again for steal over {}",
        vublk_bench::median(&steal),
        steal.iter().copied().fold(0.0, f64::max),
        plan.max_steal
            .map_or("(off)".to_string(), |m| format!("{:.0}%", m * 100.0)),
    ));
    Ok(samples)
}

/// Where the matrix is: for the progress line of each run.
struct Progress {
    started: Instant,
    /// Runs planned (re-runs come on top) and done.
    total: usize,
    runs: usize,
}

/// One round of `cell`: each system once, in order, each run reported on stderr.
fn run_round(
    exe: &Path,
    prepared: &media::Prepared,
    cell: Cell,
    rep: usize,
    plan: &Plan,
    dir: &Path,
    progress: &mut Progress,
) -> Result<Vec<Sample>> {
    let mut round = Vec::new();
    for system in plan.systems_on(&cell) {
        let sample = measure(exe, prepared, cell, system, rep, plan, dir)
            .with_context(|| format!("{cell}, {system}, repetition {}", rep + 1))?;
        progress.runs += 1;
        let cpu = if system.has_backend() {
            format!("backend {:.2}", sample.backend_cpu_per_mio())
        } else {
            format!("client {:.2}", sample.client_cpu_per_mio())
        };
        let fairness = if sample.per_vm_iops.len() > 1 {
            format!(", Jain {:.3}", vublk_bench::jain(&sample.per_vm_iops))
        } else {
            String::new()
        };
        // rbd bench reports no latencies.
        let latency = if sample.load.p50_us.is_finite() {
            format!(
                ", p50 {:.1} µs, p99 {:.1} µs",
                sample.load.p50_us, sample.load.p99_us
            )
        } else {
            String::new()
        };
        eprintln!(
            "[{}/{} {:.0} s] {cell} {system} #{}: {:.0} IOPS{fairness}{latency}, {cpu} CPU s / \
             M I/O, host steal {:.0}%",
            progress.runs,
            progress.total,
            progress.started.elapsed().as_secs_f64(),
            rep + 1,
            sample.load.iops,
            sample.host_steal * 100.0,
        );
        round.push(sample);
    }
    Ok(round)
}

/// One run: a fresh backend, a load generator per VM against it, a clean stop. For io_uring, the
/// load generators alone on the images; for fio, fio alone.
fn measure(
    exe: &Path,
    prepared: &media::Prepared,
    cell: Cell,
    system: System,
    rep: usize,
    plan: &Plan,
    dir: &Path,
) -> Result<Sample> {
    // The cell's rate is the total over its VMs: each VM's generator gets its share.
    let rate = match cell.rate {
        Rate::Max => Rate::Max,
        Rate::Iops(n) => Rate::Iops((n / u32::from(cell.vms)).max(1)),
    };
    let spec = |target| LoadSpec {
        target,
        rw: cell.rw,
        iodepth: cell.iodepth,
        queues: cell.queues,
        client: cell.client,
        rate,
        warmup: plan.warmup,
        duration: plan.duration,
        size: prepared.size,
    };
    let measured = match system {
        System::Fio => vublk_bench::fio::run(&cell, prepared, plan.warmup, plan.duration, dir)?,
        System::RbdBench => {
            vublk_bench::rbd_bench::run(&cell, prepared, plan.warmup, plan.duration)?
        }
        System::IoUring => {
            if prepared.images.is_empty() {
                bail!("io_uring needs image files");
            }
            let specs: Vec<LoadSpec> = prepared
                .images
                .iter()
                .map(|path| {
                    spec(Target::IoUring {
                        path: path.clone(),
                        direct: prepared.medium.direct(),
                    })
                })
                .collect();
            load::run(exe, &specs, None)?
        }
        System::Vublk | System::VublkSingle | System::VublkQos | System::Qsd => {
            let mut backend = systems::start(system, prepared, cell.queues, dir, system.name())?;
            let specs: Vec<LoadSpec> = backend
                .sockets
                .iter()
                .map(|socket| {
                    spec(Target::VhostUser {
                        socket: socket.clone(),
                    })
                })
                .collect();
            let measured = load::run(exe, &specs, Some(backend.daemon.pid()))
                .with_context(|| format!("backend log:\n{}", backend.daemon.log()))?;
            backend.daemon.running()?;
            backend.daemon.try_stop()?;
            measured
        }
    };
    if measured.load.ios == 0 {
        bail!("no I/O completed in the measured window");
    }
    Ok(Sample {
        cell,
        system,
        rep,
        per_vm_iops: measured.per_vm.iter().map(|r| r.iops).collect(),
        load: measured.load,
        backend_cpu_s: measured.backend_cpu_s,
        host_steal: measured.host_steal,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Plan {
        Plan::new(&Args::parse_from([&["vublk-bench"], args].concat())).expect("a valid plan")
    }

    #[test]
    fn a_round_with_too_much_steal_is_run_again_until_the_retries_are_used_up() {
        let p = plan(&[]);
        assert_eq!(p.max_steal, Some(0.10));
        assert_eq!(p.after_round(0.05, 0), RoundVerdict::Keep);
        assert_eq!(p.after_round(0.10, 0), RoundVerdict::Keep, "at the limit");
        assert_eq!(p.after_round(0.11, 0), RoundVerdict::Again);
        assert_eq!(p.after_round(0.40, 2), RoundVerdict::Again);
        assert_eq!(p.after_round(0.40, 3), RoundVerdict::KeepStolen);

        let p = plan(&["--max-steal", "25", "--steal-retries", "1"]);
        assert_eq!(p.after_round(0.20, 0), RoundVerdict::Keep);
        assert_eq!(p.after_round(0.30, 0), RoundVerdict::Again);
        assert_eq!(p.after_round(0.30, 1), RoundVerdict::KeepStolen);
    }

    #[test]
    fn each_system_runs_where_it_can() {
        let p = plan(&[
            "--systems",
            "vublk,vublk-single,qsd,io_uring,fio",
            "--media",
            "tmpfs,disk,null",
            "--vms",
            "1,8",
            "--client",
            "interrupt,poll",
            "--iodepth",
            "8",
            "--queues",
            "1",
            "--rw",
            "randread",
        ]);
        let names = |c: &Cell| -> Vec<&str> { p.systems_on(c).map(|s| s.name()).collect() };
        let cells = p.all_cells();
        // Media, then VM counts, then the rest.
        assert_eq!(cells.len(), 3 * 2 * 2);
        assert_eq!((cells[0].medium, cells[0].vms), (Medium::Tmpfs, 1));
        assert_eq!((cells[2].medium, cells[2].vms), (Medium::Tmpfs, 8));
        let find = |m: Medium, vms: u16, client: ClientMode| {
            *cells
                .iter()
                .find(|c| c.medium == m && c.vms == vms && c.client == client)
                .unwrap()
        };
        use ClientMode::{Interrupt, Poll};
        assert_eq!(
            names(&find(Medium::Disk, 1, Interrupt)),
            ["vublk", "vublk-single", "qsd", "io_uring", "fio"]
        );
        assert_eq!(
            names(&find(Medium::Disk, 8, Poll)),
            ["vublk", "qsd", "io_uring"]
        );
        assert_eq!(names(&find(Medium::Null, 8, Interrupt)), ["vublk", "qsd"]);
        assert_eq!(names(&find(Medium::Tmpfs, 1, Poll)).len(), 4);
        // tmpfs 4+4+3+3, disk 5+4+4+3, null 3+3+2+2; three rounds.
        assert_eq!(p.runs(), (14 + 16 + 10) * 3);
    }

    #[test]
    fn vm_counts_must_fit_the_image_and_the_rate() {
        let bad = |args: &[&str]| {
            Plan::new(&Args::parse_from([&["vublk-bench"], args].concat())).is_err()
        };
        assert!(bad(&["--vms", "0"]));
        assert!(bad(&["--vms", "16", "--image-mib", "8"]));
        assert!(bad(&["--vms", "8", "--rate", "4"]));
        assert!(!bad(&["--vms", "16", "--image-mib", "16", "--rate", "16"]));
    }

    #[test]
    fn steal_checks_are_off_in_smoke_runs_and_with_zero() {
        for args in [&["--smoke"][..], &["--max-steal", "0"]] {
            let p = plan(args);
            assert_eq!(p.max_steal, None, "{args:?}");
            assert_eq!(p.after_round(0.9, 0), RoundVerdict::Keep, "{args:?}");
        }
        for bad in ["-1", "100", "250"] {
            let args = Args::parse_from(["vublk-bench".to_string(), format!("--max-steal={bad}")]);
            assert!(Plan::new(&args).is_err(), "--max-steal {bad}");
        }
    }
}
