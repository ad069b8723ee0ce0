//! Protocol tests, layer 2: a VMM cannot flood the host's log, which every tenant shares.
//!
//! Whatever a frontend makes vublk log over and over (the same bad message, a connection that
//! comes and goes) is written as a burst of lines in full, then counted; one line says how many
//! were left out. The worker writes that count at the latest when it exits.

use std::time::{Duration, Instant};

use vhost::VhostBackend;
use vublk_test_support::frontend::{Fixture, SessionConfig, Step};

const VUBLK: &str = env!("CARGO_BIN_EXE_vublk");
const MIB: u64 = 1 << 20;

/// Lines a VMM may cause per [`INTERVAL`] (backend/src/ratelimit.rs).
const BURST: u64 = 10;
const INTERVAL: Duration = Duration::from_secs(10);

/// Stops the daemon the way an operator does (the supervisor closes its workers' control
/// sockets, they stop their devices and exit) and returns everything it logged.
fn stop_and_read_log(fx: &mut Fixture) -> String {
    fx.daemon.signal(libc::SIGTERM).unwrap();
    let status = fx.daemon.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some(),
        "vublk did not stop after SIGTERM\nlog:\n{}",
        fx.daemon.log()
    );
    fx.daemon.log()
}

/// Lines containing `what`.
fn count(log: &str, what: &str) -> u64 {
    log.lines().filter(|l| l.contains(what)).count() as u64
}

/// The counts of the summary lines ("N earlier line(s) caused by the VMM left out").
fn left_out(log: &str) -> Vec<u64> {
    const SUMMARY: &str = " earlier line(s) caused by the VMM left out";
    log.lines()
        .filter_map(|l| l.find(SUMMARY).map(|at| &l[..at]))
        .map(|before| before.rsplit(' ').next().unwrap().parse().unwrap())
        .collect()
}

/// How many budgets a run that took `elapsed` may have spent: one per interval begun.
fn windows(elapsed: Duration) -> u64 {
    elapsed.as_secs() / INTERVAL.as_secs() + 1
}

#[test]
fn a_bad_message_sent_in_a_loop_is_logged_as_a_burst_and_a_count() {
    const BAD: u64 = 200;
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut s = fx.session_with(SessionConfig::default(), &Step::negotiate());
    let start = Instant::now();
    for _ in 0..BAD {
        // NEED_REPLY is on: each refusal has been handled (and logged) when its NACK arrives.
        assert!(
            s.frontend().set_vring_num(0, 100).is_err(),
            "SET_VRING_NUM 100 (not a power of two) accepted"
        );
    }
    let windows = windows(start.elapsed());
    s.close();
    let log = stop_and_read_log(&mut fx);

    let written = count(&log, "queue 0: size 100 refused");
    let left_out = left_out(&log);
    let summary =
        format!("{written} refusal line(s) written, left out: {left_out:?}\nstderr:\n{log}");
    assert!(
        written >= 1,
        "the first lines of a burst are written in full: {summary}"
    );
    assert!(
        written <= BURST * windows,
        "more than {BURST} lines per {INTERVAL:?}: {summary}"
    );
    assert!(
        // One per interval, and the last one when the worker exits.
        !left_out.is_empty() && left_out.len() as u64 <= windows + 1,
        "one count per interval, not one per line: {summary}"
    );
    assert!(
        written + left_out.iter().sum::<u64>() >= BAD,
        "every refusal is written or counted: {summary}"
    );
    assert_eq!(
        count(&log, "request refused"),
        0,
        "a refusal the session explained is logged once: {summary}"
    );
}

#[test]
fn connecting_in_a_loop_is_logged_as_a_burst_and_a_count() {
    const CONNECTIONS: u64 = 30;
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let start = Instant::now();
    for _ in 0..CONNECTIONS {
        // A full handshake: the worker has taken the connection when it completes.
        fx.session_with(SessionConfig::default(), &Step::negotiate())
            .close();
    }
    let windows = windows(start.elapsed());
    let log = stop_and_read_log(&mut fx);

    let written = count(&log, "serving ") + count(&log, "frontend disconnected");
    let left_out = left_out(&log);
    let summary =
        format!("{written} connection line(s) written, left out: {left_out:?}\nstderr:\n{log}");
    assert!(
        written >= 1,
        "the first lines of a burst are written in full: {summary}"
    );
    assert!(
        written <= BURST * windows,
        "more than {BURST} lines per {INTERVAL:?}: {summary}"
    );
    assert!(
        !left_out.is_empty(),
        "the lines left out are counted: {summary}"
    );
}
