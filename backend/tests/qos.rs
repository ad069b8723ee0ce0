//! QoS per export (`iops-limit=`, `bps-limit=`, `vublk export set`), end to end with libblkio as
//! the frontend under a closed-loop load on null disks: a limited export holds its limit
//! (within 10%, measured over a window after the burst), an unlimited export served by the same
//! worker at the same time gets far more, `export set` changes the limit of a connected VM and
//! the rate follows, a throttled worker sleeps rather than spins, and bad settings are refused
//! and change nothing.
//!
//! The limits are far below what the null disk serves here, so the rates measured are the
//! throttle's, not the machine's: these are behaviour checks, not speed targets.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// What the load did: after each batch, when it ended and the requests and bytes done so far.
type Samples = Vec<(Instant, u64, u64)>;

/// A closed loop on one queue until `end`: `depth` reads of `len` bytes at once, again as
/// soon as all completed.
fn closed_loop(queue: &mut Queue, depth: usize, len: usize, end: Instant) -> Samples {
    let reqs: Vec<Req> = (0..depth)
        .map(|i| Req::read((i * len) as u64, i * len, len))
        .collect();
    let (mut done, mut bytes) = (0, 0);
    let mut samples = vec![(Instant::now(), 0, 0)];
    while Instant::now() < end {
        let results = queue.run(&reqs);
        assert!(results.iter().all(|&r| r == 0), "{results:?}");
        done += depth as u64;
        bytes += (depth * len) as u64;
        samples.push((Instant::now(), done, bytes));
    }
    samples
}

/// Requests and bytes per second over `[from, to]`, from the samples nearest inside it.
fn rates(samples: &Samples, from: Instant, to: Instant) -> (f64, f64) {
    let first = samples
        .iter()
        .find(|s| s.0 >= from)
        .expect("a sample after the window opens");
    let last = samples
        .iter()
        .rev()
        .find(|s| s.0 <= to)
        .expect("a sample before it closes");
    let secs = last.0.duration_since(first.0).as_secs_f64();
    assert!(secs > 1.0, "the window has too few samples: {secs} s");
    (
        (last.1 - first.1) as f64 / secs,
        (last.2 - first.2) as f64 / secs,
    )
}

/// Loads every queue of `client` with a closed loop for `warmup + window`, and returns the
/// requests and bytes per second of all of them over the window (after the warm-up, which
/// takes in a burst's worth of slack).
fn measure(
    client: &mut Client,
    depth: usize,
    len: usize,
    warmup: Duration,
    window: Duration,
) -> (f64, f64) {
    let start = Instant::now();
    let (from, to) = (start + warmup, start + warmup + window);
    let samples: Vec<Samples> = std::thread::scope(|s| {
        let threads: Vec<_> = client
            .queues
            .iter_mut()
            .map(|q| s.spawn(move || closed_loop(q, depth, len, to)))
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    samples
        .iter()
        .map(|s| rates(s, from, to))
        .fold((0.0, 0.0), |(a, b), (c, d)| (a + c, b + d))
}

fn assert_near(what: &str, measured: f64, limit: f64) {
    assert!(
        (measured - limit).abs() <= limit * 0.1,
        "{what}: {measured:.0} per second, not within 10% of the limit {limit:.0}"
    );
}

/// utime + stime of a process, in seconds (`/proc/PID/stat`, all its threads).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("worker stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based, proc(5)).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

fn vublk(args: &[&str]) -> (Option<i32>, String, String) {
    let out = run_vublk(args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn set(control: &Path, socket: &Path, settings: &[&str]) -> (Option<i32>, String, String) {
    let mut args = vec![
        "export",
        "set",
        "--control-socket",
        control.to_str().unwrap(),
        socket.to_str().unwrap(),
    ];
    args.extend_from_slice(settings);
    vublk(&args)
}

/// The `qos` of every export, as `vublk export list --json` shows them.
fn listed_qos(control: &Path) -> serde_json::Value {
    let (code, out, err) = vublk(&[
        "export",
        "list",
        "--json",
        "--control-socket",
        control.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    list.iter().map(|e| e["qos"].clone()).collect()
}

const IOPS: f64 = 500.0;
const BPS: f64 = 4.0 * MIB as f64;
const WARMUP: Duration = Duration::from_millis(1500);
const WINDOW: Duration = Duration::from_secs(3);

/// An export limited in requests per second (two queues sharing the limit) and one limited in
/// bytes per second hold their limits, while an unlimited export of the same daemon, served
/// by the same worker at the same time, gets far more.
#[test]
fn limits_hold_and_leave_an_unlimited_export_alone() {
    let dir = test_dir();
    let bps_sock = dir.path().join("bps.sock");
    let free_sock = dir.path().join("free.sock");
    let daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &[
            "--null",
            "64M",
            "--num-queues",
            "2",
            "--iops-limit",
            "500",
            "--export",
            &format!("socket-path={},null=64M,bps-limit=4M", bps_sock.display()),
            "--export",
            &format!("socket-path={},null=64M", free_sock.display()),
        ],
    );
    let mut iops = Client::connect(daemon.socket(), 2);
    let mut bps = Client::connect(&bps_sock, 1);
    let mut free = Client::connect(&free_sock, 1);
    let ((iops_rate, _), (_, bps_rate), (free_rate, _)) = std::thread::scope(|s| {
        let a = s.spawn(|| measure(&mut iops, 8, 4096, WARMUP, WINDOW));
        let b = s.spawn(|| measure(&mut bps, 4, 64 * KIB as usize, WARMUP, WINDOW));
        let c = s.spawn(|| measure(&mut free, 8, 4096, WARMUP, WINDOW));
        (a.join().unwrap(), b.join().unwrap(), c.join().unwrap())
    });
    eprintln!("iops-limit=500: {iops_rate:.0}/s; bps-limit=4M: {bps_rate:.0} B/s; unlimited: {free_rate:.0}/s");
    assert_near("iops-limit=500 on two queues", iops_rate, IOPS);
    assert_near("bps-limit=4M", bps_rate, BPS);
    assert!(
        free_rate > 10.0 * IOPS,
        "the unlimited export served {free_rate:.0} requests per second beside the limited ones"
    );
}

/// `vublk export set` changes the limit of a connected VM and the rate follows it, up, and
/// away; a throttled worker sleeps (its CPU time is a small part of the window); bad keys and
/// values are refused and change nothing; `export list` and the status show the limits and
/// the time throttled.
#[test]
fn export_set_changes_the_limit_of_a_connected_vm() {
    let dir = test_dir();
    let control = dir.path().join("control.sock");
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &[
            "--null",
            "64M",
            "--num-queues",
            "2",
            "--iops-limit",
            "500",
            "--control-socket",
            control.to_str().unwrap(),
        ],
    );
    daemon.wait_for(&control);
    let socket = daemon.socket().to_path_buf();
    assert_eq!(listed_qos(&control)[0]["iops_limit"], 500);
    let mut client = Client::connect(&socket, 2);
    let worker = *workers_of(daemon.pid()).first().expect("a worker");

    // Throttled: the rate is the limit, and the worker sleeps through it.
    let cpu_before = cpu_seconds(worker);
    let started = Instant::now();
    let (rate, _) = measure(&mut client, 16, 4096, WARMUP, WINDOW);
    let cpu = cpu_seconds(worker) - cpu_before;
    let wall = started.elapsed().as_secs_f64();
    eprintln!("iops-limit=500: {rate:.0}/s, worker CPU {cpu:.2} s in {wall:.2} s");
    assert_near("iops-limit=500", rate, 500.0);
    assert!(
        cpu < 0.3 * wall,
        "a throttled worker used {cpu:.2} s of CPU in {wall:.2} s: it spins"
    );

    // Bad settings: refused, one line, nothing changed.
    for (bad, why) in [
        (&["iops-limit=fast"][..], "not a number"),
        (&["iops-limits=5"][..], "unknown QoS key 'iops-limits'"),
        (&["iops-burst=100"][..], "below iops-limit=500"),
        (&["bps-burst=1M"][..], "needs bps-limit="),
        (&["bps-limit=1M", "iops-limit"][..], "not KEY=VALUE"),
    ] {
        let (code, _, err) = set(&control, &socket, bad);
        assert_eq!(code, Some(1), "{bad:?} was accepted");
        assert!(
            err.contains(why) && err.trim().lines().count() == 1,
            "{bad:?}: {err}"
        );
    }
    let (code, _, err) = set(
        &control,
        &dir.path().join("nothing.sock"),
        &["iops-limit=1"],
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("is not an export"), "{err}");
    assert_eq!(
        listed_qos(&control)[0],
        serde_json::json!({"iops_limit": 500, "iops_burst": 0, "bps_limit": 0, "bps_burst": 0})
    );

    // Up: the connected VM's rate follows.
    let (code, out, err) = set(&control, &socket, &["iops-limit=1500"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("qos iops-limit=1500"), "{out}");
    let (rate, _) = measure(&mut client, 16, 4096, WARMUP, WINDOW);
    eprintln!("iops-limit=1500: {rate:.0}/s");
    assert_near("iops-limit=1500 set at run time", rate, 1500.0);

    // Away: 'none' removes it.
    let (code, _, err) = set(&control, &socket, &["iops-limit=none"]);
    assert_eq!(code, Some(0), "{err}");
    let (rate, _) = measure(&mut client, 16, 4096, Duration::from_millis(500), WINDOW);
    eprintln!("no limit: {rate:.0}/s");
    assert!(
        rate > 3.0 * 1500.0,
        "with the limit removed: {rate:.0} per second"
    );
    assert_eq!(listed_qos(&control)[0]["iops_limit"], 0);

    // The queues counted their waits (status, and so the metrics).
    let totals = device_totals(&control, |t| t["throttled"].as_u64().unwrap_or(0) > 0);
    assert!(
        totals["throttled_ns"].as_u64().unwrap() > 1_000_000_000,
        "{totals}"
    );
}
