//! `--metrics-addr`, end to end: libblkio drives I/O through the daemon, and what
//! `GET /metrics` shows moves with it, passes `promtool check metrics`, is scraped by a real
//! Prometheus server, and is still served while a worker is stopped (SIGSTOP).
//!
//! promtool and prometheus come from Debian's `prometheus` package (scripts/prereqs.sh, test).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A port nobody listens on now (bound and released: another process could take it in
/// between, which would fail the test loudly, not wrongly).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on 127.0.0.1:`port`: the status code and the body.
fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// The value of the sample whose name and labels start with `prefix`, summed over every
/// sample that does (labels in the order vublk writes them).
fn value(text: &str, prefix: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Scrapes until `ready` accepts the text; panics after 10 s with the last one.
fn scrape_until(port: u16, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(port, "/metrics").expect("scrape");
        assert_eq!(status, 200, "{body}");
        if ready(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never got there:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn need(tool: &str) -> String {
    let path = format!("/usr/bin/{tool}");
    assert!(
        Path::new(&path).exists(),
        "{tool} is not installed: these tests need Debian's prometheus package \
         (scripts/prereqs.sh test installs it)"
    );
    path
}

/// The daemon with a 64 MiB null disk, metrics on a free port; returns it and the port once
/// it is ready.
fn start(dir: &Path) -> (Daemon, u16) {
    start_with(dir, &[])
}

/// [`start`] with more options.
fn start_with(dir: &Path, extra: &[&str]) -> (Daemon, u16) {
    let port = free_port();
    let control = dir.join("control.sock");
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--null",
        "64M",
        "--metrics-addr",
        &addr,
        "--control-socket",
        control.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut daemon = Daemon::start(vublk_bin(), dir, &args);
    daemon.wait_for(&control);
    (daemon, port)
}

/// `promtool check metrics` accepts `text`.
fn promtool_accepts(text: &str) {
    let mut check = Command::new(need("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// 16 reads of 4 KiB, 8 writes of 4 KiB and a flush.
fn some_io(client: &mut Client) {
    let q = client.q(0);
    let reads: Vec<Req> = (0..16)
        .map(|i| Req::read(i * 4096, i as usize * 4096, 4096))
        .collect();
    assert!(q.run(&reads).iter().all(|&r| r == 0));
    let writes: Vec<Req> = (0..8)
        .map(|i| Req::write(i * 4096, i as usize * 4096, 4096))
        .collect();
    assert!(q.run(&writes).iter().all(|&r| r == 0));
    assert_eq!(q.flush(), 0);
}

/// I/O moves the counters; the exposition passes promtool.
#[test]
fn scrapes_show_the_io_and_pass_promtool() {
    let dir = test_dir();
    let (mut daemon, port) = start(dir.path());
    let before = scrape_until(port, |_| true);
    assert_eq!(value(&before, "vublk_workers_started_total"), Some(0.0));
    assert_eq!(value(&before, "vublk_requests_total{"), None, "no VM yet");

    let mut client = Client::connect(daemon.socket(), 1);
    some_io(&mut client);
    // The main export is named after its socket.
    let export = daemon.socket().display().to_string();
    let text = scrape_until(port, |t| value(t, "vublk_requests_total{") >= Some(25.0));
    let ours = std::process::id();
    let got = |name: &str, extra: &str| {
        let line = format!("{name}{{export=\"{export}\",vmm_pid=\"{ours}\",uid=\"0\"{extra}}}");
        value(&text, &line).unwrap_or_else(|| panic!("no {line} in\n{text}"))
    };
    assert_eq!(got("vublk_requests_total", ",type=\"read\""), 16.0);
    assert_eq!(got("vublk_requests_total", ",type=\"write\""), 8.0);
    assert_eq!(got("vublk_requests_total", ",type=\"flush\""), 1.0);
    assert_eq!(got("vublk_read_bytes_total", ""), 16.0 * 4096.0);
    assert_eq!(got("vublk_written_bytes_total", ""), 8.0 * 4096.0);
    assert_eq!(got("vublk_errors_total", ",status=\"ioerr\""), 0.0);
    assert_eq!(got("vublk_requests_in_flight", ""), 0.0);
    // libblkio reads the serial (GET_ID) at connect.
    let completed = got("vublk_request_latency_seconds_count", "");
    assert!(completed >= 25.0, "{completed} latencies for 25 requests");
    assert!(got("vublk_request_latency_seconds_sum", "") > 0.0);
    assert!(
        value(&text, "vublk_worker_cpu_seconds_total{").is_some(),
        "{text}"
    );
    assert_eq!(value(&text, "vublk_workers_started_total"), Some(1.0));
    assert_eq!(
        value(
            &text,
            &format!("vublk_connections_total{{export=\"{export}\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            &format!("vublk_reconnects_total{{export=\"{export}\"}}")
        ),
        Some(0.0)
    );

    // The same VMM connecting again is a reconnect.
    drop(client);
    let client = Client::connect(daemon.socket(), 1);
    let text = scrape_until(port, |t| {
        value(t, &format!("vublk_reconnects_total{{export=\"{export}\"}}")) == Some(1.0)
    });
    assert_eq!(
        value(
            &text,
            &format!("vublk_connections_total{{export=\"{export}\"}}")
        ),
        Some(2.0)
    );

    promtool_accepts(&text);
    drop(client);
    daemon.stop();
}

/// A 2-queue device: the per-queue families count each queue's own requests under its
/// `queue` label, and the exposition still passes promtool.
#[test]
fn each_queue_is_counted_under_its_queue_label() {
    let dir = test_dir();
    let (mut daemon, port) = start_with(dir.path(), &["--num-queues", "2"]);
    let mut client = Client::connect(daemon.socket(), 2);
    let reads = |n: u64| -> Vec<Req> {
        (0..n)
            .map(|i| Req::read(i * 4096, i as usize * 4096, 4096))
            .collect()
    };
    assert!(client.q(0).run(&reads(3)).iter().all(|&r| r == 0));
    assert!(client.q(1).run(&reads(5)).iter().all(|&r| r == 0));
    let writes: Vec<Req> = (0..2)
        .map(|i| Req::write(i * 4096, i as usize * 4096, 4096))
        .collect();
    assert!(client.q(1).run(&writes).iter().all(|&r| r == 0));
    let export = daemon.socket().display().to_string();
    let ours = std::process::id();
    let series = |name: &str, queue: u32, extra: &str| {
        format!(
            "{name}{{export=\"{export}\",vmm_pid=\"{ours}\",uid=\"0\",queue=\"{queue}\"{extra}}}"
        )
    };
    let reads_on = |queue| series("vublk_queue_requests_total", queue, ",type=\"read\"");
    let text = scrape_until(port, |t| value(t, &reads_on(1)) == Some(5.0));
    assert_eq!(value(&text, &reads_on(0)), Some(3.0), "{text}");
    let writes_on = |queue| series("vublk_queue_requests_total", queue, ",type=\"write\"");
    assert_eq!(value(&text, &writes_on(0)), Some(0.0), "{text}");
    assert_eq!(value(&text, &writes_on(1)), Some(2.0), "{text}");
    assert_eq!(
        value(&text, &series("vublk_queue_read_bytes_total", 1, "")),
        Some(5.0 * 4096.0)
    );
    assert_eq!(
        value(&text, &series("vublk_queue_written_bytes_total", 1, "")),
        Some(2.0 * 4096.0)
    );
    for queue in 0..2 {
        assert_eq!(
            value(&text, &series("vublk_queue_requests_in_flight", queue, "")),
            Some(0.0)
        );
    }
    assert_eq!(
        value(&text, "vublk_queue_requests_total{"),
        value(&text, "vublk_requests_total{")
    );
    promtool_accepts(&text);
    drop(client);
    daemon.stop();
}

/// A stopped worker cannot hold a scrape: its numbers stay (as old as its last report) and
/// the scrape is answered.
#[test]
fn a_stopped_worker_does_not_block_a_scrape() {
    let dir = test_dir();
    let (mut daemon, port) = start(dir.path());
    let mut client = Client::connect(daemon.socket(), 1);
    some_io(&mut client);
    scrape_until(port, |t| value(t, "vublk_requests_total{") >= Some(25.0));
    let workers = workers_of(daemon.pid());
    assert_eq!(workers.len(), 1, "{workers:?}");
    let worker = workers[0] as i32;
    // SAFETY: signals our daemon's worker.
    assert_eq!(unsafe { libc::kill(worker, libc::SIGSTOP) }, 0);
    // Past a report interval, so the worker would have been asked by now.
    std::thread::sleep(Duration::from_millis(1500));
    let text = scrape_until(port, |t| {
        value(t, "vublk_worker_report_age_seconds{") > Some(1.0)
    });
    assert!(
        value(&text, "vublk_requests_total{") >= Some(25.0),
        "{text}"
    );
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(worker, libc::SIGCONT) }, 0);
    drop(client);
    daemon.stop();
}

/// Connections that send nothing cannot lock a scraper out.
#[test]
fn idle_connections_do_not_lock_scrapers_out() {
    let dir = test_dir();
    let (mut daemon, port) = start(dir.path());
    let idle: Vec<TcpStream> = (0..32)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let (status, body) = get(port, "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    drop(idle);
    daemon.stop();
}

/// A real Prometheus server scrapes the daemon: its query API shows a vublk metric.
#[test]
fn prometheus_scrapes_the_daemon() {
    let prometheus = need("prometheus");
    let dir = test_dir();
    let (mut daemon, port) = start(dir.path());
    let mut client = Client::connect(daemon.socket(), 1);
    some_io(&mut client);
    let web = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: vublk\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let mut server = Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{web}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let query = "/api/v1/query?query=sum(vublk_requests_total%7Btype%3D%22read%22%7D)";
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    let found = loop {
        if let Ok((200, body)) = get(web, query) {
            // {"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[t,"16"]}]}}
            if body.contains("\"16\"]") {
                break true;
            }
            last = body;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        found,
        "Prometheus never showed the reads: {last}\n{}",
        std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );
    drop(client);
    daemon.stop();
}
