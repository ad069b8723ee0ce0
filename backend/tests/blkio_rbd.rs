//! The RBD backing end to end: vublk serves `rbd:rbd/IMAGE` from a real one-node Ceph cluster
//! (scripts/ceph-dev.sh, started once for this test binary and killed when it exits), libblkio
//! drives it, and the image is checked afterwards with `rbd export`, through librbd without
//! vublk, against a model built from the writes the test made.
//!
//! The tests skip, saying so, when Ceph is not installed (`scripts/prereqs.sh`'s `rbd` and
//! `test` modes install it; scripts/test.sh does).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use common::*;

use vublk_test_support::ceph::{self, Cluster};

/// The cluster of this test binary, under the target directory (a leftover of a killed run is
/// replaced); `None` without Ceph.
fn cluster() -> Option<&'static Cluster> {
    ceph::cluster(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ceph-blkio-rbd"))
}

/// Tests that stop the OSD (or the whole cluster) hold this for writing, the others for reading: they share one
/// cluster and run in parallel.
static OSD: RwLock<()> = RwLock::new(());

fn sharing_the_osd() -> RwLockReadGuard<'static, ()> {
    OSD.read().unwrap_or_else(|e| e.into_inner())
}

fn stopping_the_osd() -> RwLockWriteGuard<'static, ()> {
    OSD.write().unwrap_or_else(|e| e.into_inner())
}

/// The cluster and a guard: `cluster_or_skip!()` shares the OSD, `cluster_or_skip!(stop)` may
/// stop it.
macro_rules! cluster_or_skip {
    () => {
        cluster_or_skip!(@ sharing_the_osd())
    };
    (stop) => {
        cluster_or_skip!(@ stopping_the_osd())
    };
    (@ $guard:expr) => {
        match cluster() {
            Some(c) => (c, $guard),
            None => {
                eprintln!("skipping: {}", ceph::NOT_INSTALLED);
                return;
            }
        }
    };
}

/// Starts vublk on `image` (an `rbd:` spec) of `cluster` with `extra` options.
fn serve(cluster: &Cluster, dir: &Path, image: &str, extra: &[&str]) -> Daemon {
    let conf = cluster.conf();
    let mut args = vec!["--blk-file", image, "--ceph-conf", conf.to_str().unwrap()];
    args.extend_from_slice(extra);
    Daemon::start(vublk_bin(), dir, &args)
}

/// Writes non-overlapping patterns of many sizes from every queue at once (each queue its own
/// region), reads them back through vublk, then checks the image through librbd.
fn data_verify(queues: usize) {
    let (cluster, _osd) = cluster_or_skip!();
    let dir = test_dir();
    let name = format!("data-{queues}q");
    let size = 32 * MIB;
    let image = cluster.create_image(&name, size);
    let nq = queues.to_string();
    let daemon = serve(cluster, dir.path(), &image, &["--num-queues", &nq]);
    let mut client = Client::connect_with(
        daemon.socket(),
        ClientOpts {
            num_queues: queues as i32,
            buf_per_queue: 8 * MIB as usize,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("connect: {e}"));
    assert_eq!(client.capacity(), size, "capacity from rbd_get_size");

    let mut model = vec![0u8; size as usize];
    let region = size / queues as u64;
    let sizes = [512usize, 4096, 7680, 65536 + 512, 131072, 1 << 20];
    let mut rng = Rng::new(7);
    let mut batches = Vec::new();
    for q in 0..queues {
        let start = q as u64 * region;
        let mut reqs = Vec::new();
        let mut offset = start;
        let mut buf_off = 0usize;
        loop {
            let len = rng.pick(&sizes);
            offset += rng.below(8) * 512;
            if offset + len as u64 > start + region || buf_off + len > client.q(q).buf_len() {
                break;
            }
            let data = pattern(q as u64 + 1, offset, len);
            client.q(q).buf()[buf_off..buf_off + len].copy_from_slice(&data);
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
            reqs.push(Req::write(offset, buf_off, len));
            offset += len as u64;
            buf_off = (buf_off + len + 4095) & !4095;
        }
        assert!(reqs.len() > 8, "too few writes to test anything");
        batches.push(reqs);
    }
    // Every queue at once (a thread each), so the queues' completions arrive interleaved: each
    // must reach the queue that submitted it.
    let model = &model;
    std::thread::scope(|s| {
        for (q, reqs) in client.queues.iter_mut().zip(&batches) {
            s.spawn(move || {
                let results = q.run(reqs);
                assert!(
                    results.iter().all(|&r| r == 0),
                    "writes failed: {results:?}"
                );
                assert_eq!(q.flush(), 0, "flush");
            });
        }
    });
    std::thread::scope(|s| {
        for q in client.queues.iter_mut() {
            s.spawn(move || {
                let start = q.index as u64 * region;
                let got = q.read_range(start, region);
                assert_same(
                    &got,
                    &model[start as usize..(start + region) as usize],
                    &format!("queue {}'s region read back through vublk", q.index),
                );
            });
        }
    });
    drop(client);
    assert_same(
        &cluster.export(&name, dir.path()),
        model,
        "the image, read by librbd",
    );
    drop(daemon);
}

#[test]
fn data_written_through_one_queue_is_in_the_image() {
    data_verify(1);
}

#[test]
fn data_written_through_two_queues_is_in_the_image() {
    data_verify(2);
}

/// Flush succeeds; write-zeroes zeroes (with and without unmap); a discard of a whole object
/// (librbd ignores those under its 64 KiB granularity) reads back as zeroes.
#[test]
fn flush_write_zeroes_and_discard() {
    let (cluster, _osd) = cluster_or_skip!();
    let dir = test_dir();
    let size = 16 * MIB;
    let image = cluster.create_image("zeroes", size);
    let daemon = serve(cluster, dir.path(), &image, &[]);
    let mut client = Client::connect(daemon.socket(), 1);
    let q = client.q(0);
    let data = pattern(3, 0, size as usize);
    for chunk in 0..size / MIB {
        let at = (chunk * MIB) as usize;
        assert_eq!(q.write_at(chunk * MIB, &data[at..at + MIB as usize]), 0);
    }
    assert_eq!(q.flush(), 0, "flush");
    let mut model = data.clone();

    // Unaligned, inside one object, without unmap: zeroes still.
    assert_eq!(q.write_zeroes(4096 + 512, 12288, true), 0, "write-zeroes");
    model[4096 + 512..4096 + 512 + 12288].fill(0);
    // With unmap, across an object boundary.
    assert_eq!(
        q.write_zeroes(4 * MIB - 8192, 16384, false),
        0,
        "write-zeroes (unmap)"
    );
    model[(4 * MIB - 8192) as usize..(4 * MIB + 8192) as usize].fill(0);
    // The third 4 MiB object, whole.
    assert_eq!(q.discard(8 * MIB, 4 * MIB), 0, "discard");
    model[(8 * MIB) as usize..(12 * MIB) as usize].fill(0);
    assert_eq!(q.flush(), 0, "flush");

    assert_same(&q.read_range(0, size), &model, "read back through vublk");
    drop(client);
    assert_same(
        &cluster.export("zeroes", dir.path()),
        &model,
        "the image, read by librbd",
    );
}

/// --read-only: the device says RO, reads see the image, writes fail and the image is
/// unchanged.
#[test]
fn read_only_serves_reads_and_refuses_writes() {
    let (cluster, _osd) = cluster_or_skip!();
    let dir = test_dir();
    let size = 4 * MIB;
    let data = pattern(5, 0, size as usize);
    let file = dir.path().join("import");
    std::fs::write(&file, &data).unwrap();
    let image = cluster.import_image("read-only", &file);

    let daemon = serve(cluster, dir.path(), &image, &["--read-only"]);
    let mut client = Client::connect_with(
        daemon.socket(),
        ClientOpts {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("connect: {e}"));
    assert!(client.prop_bool("read-only"), "the device says read-only");
    let q = client.q(0);
    assert_same(&q.read_range(0, size), &data, "reads of a read-only image");
    let results = q.run(&[Req::write(0, 0, 4096)]);
    assert!(results[0] < 0, "a write on a read-only device succeeded");
    drop(client);
    assert_same(
        &cluster.export("read-only", dir.path()),
        &data,
        "the image after a read-only export",
    );
}

/// An image that does not exist: the connection is refused, and the worker's log says why in
/// one line.
#[test]
fn a_missing_image_is_refused_with_a_clear_error() {
    let (cluster, _osd) = cluster_or_skip!();
    let dir = test_dir();
    let daemon = serve(cluster, dir.path(), "rbd:rbd/no-such-image", &[]);
    let result = Client::connect_with(daemon.socket(), ClientOpts::default());
    assert!(
        result.is_err(),
        "a connection to a missing image was served"
    );
    drop(result);
    let mut daemon = daemon;
    daemon
        .try_wait_for_log(
            "cannot open rbd:rbd/no-such-image as client.admin: No such file or directory",
        )
        .unwrap_or_else(|e| panic!("the log does not say which image: {e}"));
}

/// The OSD stops answering (SIGSTOP) with requests in flight and before more are submitted;
/// without --ceph-timeout they wait, and complete with the right data once it is back.
#[test]
fn requests_wait_for_a_stopped_osd_and_complete_when_it_is_back() {
    let (cluster, _osd) = cluster_or_skip!(stop);
    let dir = test_dir();
    let size = 8 * MIB;
    let image = cluster.create_image("paused", size);
    let daemon = serve(cluster, dir.path(), &image, &["--num-queues", "2"]);
    let mut client = Client::connect(daemon.socket(), 2);
    let data = pattern(9, 0, size as usize);
    let half = size / 2;

    let _stopped = cluster.stop_osd();
    // Resumes the OSD after a while, from another thread: the writes below are submitted while
    // it is stopped, so they cannot complete before this.
    let resume = std::thread::spawn({
        let cluster = cluster.clone();
        move || {
            std::thread::sleep(std::time::Duration::from_secs(3));
            cluster.signal_osd(libc::SIGCONT);
        }
    });
    for q in 0..2 {
        let start = q as u64 * half;
        let mut reqs = Vec::new();
        for i in 0..half / MIB {
            let at = (start + i * MIB) as usize;
            client.q(q).buf()[(i * MIB) as usize..((i + 1) * MIB) as usize]
                .copy_from_slice(&data[at..at + MIB as usize]);
            reqs.push(Req::write(
                start + i * MIB,
                (i * MIB) as usize,
                MIB as usize,
            ));
        }
        // Queue 0's batch runs (and waits) while the OSD is stopped.
        let results = client.q(q).run(&reqs);
        assert!(results.iter().all(|&r| r == 0), "queue {q}: {results:?}");
    }
    resume.join().unwrap();
    assert_eq!(client.q(0).flush(), 0, "flush");
    assert_same(&client.q(1).read_range(0, size), &data, "read back");
    drop(client);
    assert_same(&cluster.export("paused", dir.path()), &data, "the image");
}

/// With --ceph-timeout, a request the cluster does not answer fails with an I/O error; another
/// export of the same daemon is served meanwhile, and the RBD export serves again once the
/// OSD is back.
#[test]
fn a_timeout_fails_requests_and_other_exports_keep_being_served() {
    let (cluster, _osd) = cluster_or_skip!(stop);
    let dir = test_dir();
    let image = cluster.create_image("timeout", 4 * MIB);
    let null_socket = dir.path().join("null.sock");
    let null_export = format!("socket-path={},null=64M", null_socket.display());
    let daemon = serve(
        cluster,
        dir.path(),
        &image,
        &["--ceph-timeout", "3", "--export", &null_export],
    );
    let rbd_socket = daemon.socket().to_owned();
    // Connected before the OSD stops (connecting needs the OSD: the image header is an object).
    let mut rbd = Client::connect(&rbd_socket, 1);
    let mut null = Client::connect(&null_socket, 1);

    let stopped = cluster.stop_osd();
    let stalled = std::thread::spawn(move || {
        let result = rbd.q(0).write_at(0, &[7u8; 4096]);
        (rbd, result)
    });
    // The null export answers while the RBD write waits for the cluster.
    for _ in 0..50 {
        assert_eq!(null.q(0).write_at(0, &[1u8; 4096]), 0, "the null export");
    }
    let (mut rbd, result) = stalled.join().unwrap();
    drop(stopped);
    assert_eq!(
        result,
        neg(blkio::Errno::IO),
        "a write the cluster did not answer"
    );
    assert_eq!(
        rbd.q(0).write_at(0, &[8u8; 4096]),
        0,
        "a write once the OSD is back"
    );
    assert_eq!(rbd.q(0).read_at(0, 4096), Ok(vec![8u8; 4096]));
}

/// A cluster nobody answers for: the connection is refused after --ceph-timeout with a line that
/// says what vublk tried, and the daemon keeps running (the VMM may try again).
#[test]
fn an_unreachable_cluster_is_refused_with_a_clear_error() {
    let (cluster, _osd) = cluster_or_skip!();
    let dir = test_dir();
    // The cluster's configuration, with the monitor moved to a port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let conf = std::fs::read_to_string(cluster.conf()).unwrap();
    let conf: String = conf
        .lines()
        .map(|l| {
            if l.starts_with("mon host") {
                format!("mon host = [v2:127.0.0.1:{port}]\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let conf_path = dir.path().join("unreachable.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &[
            "--blk-file",
            "rbd:rbd/anything",
            "--ceph-conf",
            conf_path.to_str().unwrap(),
            "--ceph-timeout",
            "2",
        ],
    );
    let result = Client::connect_with(daemon.socket(), ClientOpts::default());
    assert!(
        result.is_err(),
        "a connection to an unreachable cluster was served"
    );
    drop(result);
    daemon
        .try_wait_for_log(&format!(
            "cannot connect to the Ceph cluster of {} as client.admin",
            conf_path.display()
        ))
        .unwrap_or_else(|e| panic!("the log does not say what failed: {e}"));
    daemon.assert_running();
}

/// A frontend that disconnects and connects again (a VMM restarting, a migration's second
/// QEMU) finds what it wrote: each connection opens the image anew, and the first one's close
/// released it.
#[test]
fn a_reconnected_frontend_reads_what_it_wrote() {
    let (cluster, _osd) = cluster_or_skip!();
    let dir = test_dir();
    let image = cluster.create_image("reconnect", 4 * MIB);
    let daemon = serve(cluster, dir.path(), &image, &[]);
    let data = pattern(13, 0, MIB as usize);
    for round in 0..3u64 {
        let mut client = Client::connect(daemon.socket(), 1);
        let q = client.q(0);
        if round > 0 {
            assert_same(
                &q.read_range((round - 1) * MIB, MIB),
                &data,
                &format!("what connection {round} wrote"),
            );
        }
        assert_eq!(q.write_at(round * MIB, &data), 0, "write");
        assert_eq!(q.flush(), 0, "flush");
    }
}

/// How long a request of [`closed_loop`] may wait: longer than the cluster takes to restart.
const RESTART_WAIT: Duration = Duration::from_secs(120);

/// Rounds of writes and read-backs on `q` until `stop`, over `model` (the device's bytes from
/// `start`): each round writes 8 requests of 4 to 64 KiB, one in each eighth of the model, with
/// the round's pattern, then reads them back in one batch and compares. Every request must
/// succeed. Counts rounds in `rounds`; returns the instant each round ended.
fn closed_loop(
    q: &mut Queue,
    start: u64,
    model: &mut [u8],
    seed: u64,
    stop: &AtomicBool,
    rounds: &AtomicU64,
) -> Vec<Instant> {
    const PER_ROUND: usize = 8;
    const MAX_LEN: usize = 64 * KIB as usize;
    let stripe = model.len() / PER_ROUND;
    let mut rng = Rng::new(seed);
    let mut ends = Vec::new();
    for round in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let mut writes = Vec::new();
        let mut reads = Vec::new();
        let mut placed = Vec::new();
        for i in 0..PER_ROUND {
            let len = (1 + rng.below(16) as usize) * 4096;
            let at = i * stripe + rng.below(((stripe - len) / 4096) as u64) as usize * 4096;
            let data = pattern(seed * 1_000_000 + round, start + at as u64, len);
            let buf_off = i * MAX_LEN;
            q.buf()[buf_off..buf_off + len].copy_from_slice(&data);
            model[at..at + len].copy_from_slice(&data);
            writes.push(Req::write(start + at as u64, buf_off, len));
            let read_off = (PER_ROUND + i) * MAX_LEN;
            reads.push(Req::read(start + at as u64, read_off, len));
            placed.push((at, read_off, len));
        }
        let results = q.run_within(&writes, RESTART_WAIT);
        assert!(
            results.iter().all(|&r| r == 0),
            "queue {} round {round}: writes failed: {results:?}",
            q.index
        );
        let results = q.run_within(&reads, RESTART_WAIT);
        assert!(
            results.iter().all(|&r| r == 0),
            "queue {} round {round}: reads failed: {results:?}",
            q.index
        );
        for (at, read_off, len) in placed {
            let got = q.buf()[read_off..read_off + len].to_vec();
            assert_same(
                &got,
                &model[at..at + len],
                &format!(
                    "queue {} round {round}: read back at {}",
                    q.index,
                    start + at as u64
                ),
            );
        }
        ends.push(Instant::now());
        rounds.fetch_add(1, Ordering::Relaxed);
    }
    ends
}

/// Waits until `counter` reaches `n`, panicking with `what` after `timeout`, or at once when a
/// load has ended (it failed: a load runs until told to stop).
fn wait_for_count(
    counter: &AtomicU64,
    n: u64,
    timeout: Duration,
    what: &str,
    loads: &[&std::thread::ScopedJoinHandle<'_, Vec<Instant>>],
) {
    let deadline = Instant::now() + timeout;
    while counter.load(Ordering::Relaxed) < n {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        assert!(
            !loads.iter().any(|l| l.is_finished()),
            "a load failed while waiting: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sets its flag when dropped: a load told to stop, also when the test fails before it does.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The whole cluster (OSD, manager and monitor) stops cleanly and starts again on its data
/// while a closed loop of writes and read-backs runs on two queues: the requests in flight, and
/// those submitted while it is down, wait, and complete successfully once it is back (within
/// --ceph-timeout); every read matches what was written; a file export of the same daemon is
/// served while the cluster is down; and the image, read by librbd, holds every write.
#[test]
fn requests_wait_for_a_restarted_cluster_and_complete_when_it_is_back() {
    let (cluster, _osd) = cluster_or_skip!(stop);
    let dir = test_dir();
    const QUEUES: usize = 2;
    let size = 16 * MIB;
    let region = size / QUEUES as u64;
    let image = cluster.create_image("restart", size);
    let file = dir.path().join("beside.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let file_socket = dir.path().join("file.sock");
    let export = format!(
        "socket-path={},blk-file={}",
        file_socket.display(),
        file.display()
    );
    let daemon = serve(
        cluster,
        dir.path(),
        &image,
        &[
            "--num-queues",
            "2",
            "--ceph-timeout",
            "110",
            "--export",
            &export,
        ],
    );
    let mut rbd = Client::connect(daemon.socket(), QUEUES as i32);
    let mut beside = Client::connect(&file_socket, 1);

    let stop = AtomicBool::new(false);
    let (rbd_rounds, file_rounds) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut models = vec![vec![0u8; region as usize]; QUEUES];
    let mut file_model = vec![0u8; 4 * MIB as usize];
    // When the halt began, when every daemon had exited, when they were started again, and
    // when the cluster was healthy.
    let (times, rbd_ends) = std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let loads: Vec<_> = rbd
            .queues
            .iter_mut()
            .zip(models.iter_mut())
            .map(|(q, model)| {
                let (stop, rounds) = (&stop, &rbd_rounds);
                s.spawn(move || {
                    let start = q.index as u64 * region;
                    closed_loop(q, start, model, q.index as u64 + 1, stop, rounds)
                })
            })
            .collect();
        let file_load =
            s.spawn(|| closed_loop(beside.q(0), 0, &mut file_model, 9, &stop, &file_rounds));
        let all: Vec<_> = loads.iter().chain([&file_load]).collect();

        wait_for_count(
            &rbd_rounds,
            20,
            Duration::from_secs(30),
            "the rbd load did not start",
            &all,
        );
        let halt_at = Instant::now();
        let halted = cluster.halt();
        let down_at = Instant::now();
        let rbd_down = rbd_rounds.load(Ordering::Relaxed);
        let file_down = file_rounds.load(Ordering::Relaxed);
        wait_for_count(
            &file_rounds,
            file_down + 20,
            Duration::from_secs(20),
            "the file export was not served while the cluster was down",
            &all,
        );
        // An outage of a few seconds, all daemons gone.
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(
            rbd_rounds.load(Ordering::Relaxed),
            rbd_down,
            "a round of the rbd load ended while the cluster was down: the test did not stop it"
        );
        let resume_at = Instant::now();
        halted.resume();
        let up_at = Instant::now();
        wait_for_count(
            &rbd_rounds,
            rbd_down + 20,
            Duration::from_secs(60),
            "the rbd load did not go on once the cluster was back",
            &all,
        );
        stop.store(true, Ordering::Relaxed);
        drop(all);
        let ends: Vec<Vec<Instant>> = loads.into_iter().map(|l| l.join().unwrap()).collect();
        file_load.join().unwrap();
        ([halt_at, down_at, resume_at, up_at], ends)
    });

    // How long the load stalled (the longest wait between two rounds of a queue) against how
    // long the cluster was away, for the record.
    let [halt_at, down_at, resume_at, up_at] = times;
    let stalled = rbd_ends
        .iter()
        .flat_map(|ends| ends.windows(2).map(|w| (w[0], w[1])))
        .max_by_key(|(before, after)| *after - *before)
        .unwrap();
    let secs = |from: Instant, to: Instant| to.duration_since(from).as_secs_f64();
    eprintln!(
        "restart: halt {:.2} s, all daemons down {:.2} s, resume to active {:.2} s; I/O \
         stalled {:.2} s, from {:.2} s before the halt began to {:.2} s after the daemons were \
         started again",
        secs(halt_at, down_at),
        secs(down_at, resume_at),
        secs(resume_at, up_at),
        secs(stalled.0, stalled.1),
        secs(stalled.0, halt_at),
        secs(resume_at, stalled.1),
    );

    let model = models.concat();
    assert_same(
        &rbd.q(0).read_range(0, size),
        &model,
        "the image read back through vublk",
    );
    drop(rbd);
    drop(beside);
    assert_same(
        &cluster.export("restart", dir.path()),
        &model,
        "the image, read by librbd",
    );
    assert_same(
        &std::fs::read(&file).unwrap(),
        &file_model,
        "the file export",
    );
}
