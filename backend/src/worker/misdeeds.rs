//! Test only (`--test-worker-arg`): a worker misbehaving on purpose when it is handed a
//! connection, as a worker taken over by its tenant would, to prove that the sandbox and the
//! supervisor's distrust are on (backend/tests/sandbox.rs, tenants.rs).

use crate::handoff::{DeviceStatus, ReportPipe, ToSupervisor};
use crate::sandbox::{SandboxStatus, TestMisdeed};

/// Reports sent in a row by `forge-reports` after the forged ones: more than the supervisor
/// takes from one worker.
const FLOOD: usize = 4096;

/// Does what `misdeeds` ask for a connection of `export`.
pub(super) fn commit(
    misdeeds: &[TestMisdeed],
    export: &str,
    connection: u64,
    reports: &ReportPipe,
) {
    for misdeed in misdeeds.iter().filter(|m| m.applies_to(export)) {
        match misdeed {
            TestMisdeed::ForbiddenSyscall { .. } => {
                tracing::warn!("test: making a forbidden system call (socket)");
                // SAFETY: socket with scalar arguments; the filter traps it.
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                tracing::error!("test: the forbidden system call returned {fd}");
            }
            TestMisdeed::Open { path, .. } => match std::fs::File::open(path) {
                Ok(_) => tracing::warn!("test: opened {}", path.display()),
                Err(e) => tracing::warn!("test: cannot open {}: {e}", path.display()),
            },
            TestMisdeed::ForgeReports { .. } => forge(connection, reports),
        }
    }
}

/// Reports about connections this worker does not own, then a flood.
fn forge(own: u64, reports: &ReportPipe) {
    tracing::warn!("test: forging reports\n\x1b[31mFORGED supervisor line\x1b[0m");
    let others = (0..=64).chain([u64::MAX]).filter(|&c| c != own);
    for connection in others.clone() {
        let _ = reports.send(&ToSupervisor::Ended { connection });
        let _ = reports.send(&ToSupervisor::Accepted { connection });
        let _ = reports.send(&ToSupervisor::WriteCache {
            connection,
            write_cache: false,
        });
    }
    let _ = reports.send(&ToSupervisor::Refused {
        connection: u64::MAX,
        export: "\nFORGED".into(),
        reason: "\u{1b}[31m\nFORGED".into(),
    });
    let devices = others
        .map(|connection| DeviceStatus {
            connection,
            export: "FORGED".into(),
            queues: u16::MAX,
            write_cache: None,
            totals: Default::default(),
            memory: Default::default(),
            per_queue: Vec::new(),
        })
        .collect();
    let _ = reports.send(&ToSupervisor::Stats { devices });
    let _ = reports.send(&ToSupervisor::Sandbox(SandboxStatus {
        landlock: "FORGED".into(),
        ..Default::default()
    }));
    for _ in 0..FLOOD {
        let _ = reports.send(&ToSupervisor::Stats { devices: vec![] });
    }
}
