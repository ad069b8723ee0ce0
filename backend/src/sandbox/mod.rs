//! The worker's sandbox: what a worker may still do once it carries its VMM's identity
//! (identity/apply.rs). A worker runs as its tenant, maps that tenant's guest memory and parses
//! what that tenant's guest and VMM send it; if either takes it over, the sandbox is what stands
//! between the tenant and the host. One layer per file, applied in this order
//! ([`enter`]; docs/security.md says why each one is there):
//!
//! 1. [`namespaces`]: in the forked child, while it still has the privilege to (an empty
//!    network and IPC namespace; the host's network for the [`Profile::Rbd`] profile); the only
//!    layer applied before the identity.
//! 2. [`dumpable`]: the worker is made non-dumpable as the first thing after exec, and refuses
//!    to serve if a tracer attached before that.
//! 3. [`fds`]: stdin and stdout on /dev/null, stderr a pipe the supervisor relays into its own
//!    log line by line (supervisor/worker_log.rs), every other inherited descriptor closed.
//! 4. [`landlock`]: file access only to the export images, the paths of `--worker-allow`, and
//!    /dev/null (and, for the rbd profile, the Ceph configuration and keyrings); no TCP (TCP
//!    connect for the rbd profile), no abstract unix sockets, no signals outside the worker.
//! 5. [`seccomp`]: an allow-list of system calls (the rbd profile adds the socket calls librados
//!    makes); anything else traps, the worker reports the call to the supervisor on its report
//!    pipe and dies of SIGSYS.
//!
//! An rbd worker loads librbd before layer 2 (lib.rs): the filter forbids mapping code later.
//!
//! The supervisor builds a [`Plan`] for each worker and passes it on the worker's command line;
//! the worker reports what it got ([`SandboxStatus`]) for `vublk status`.

pub mod dumpable;
pub mod fds;
pub mod landlock;
pub mod namespaces;
pub mod seccomp;

use std::os::fd::RawFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What a worker's sandbox allows, decided by the supervisor.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Plan {
    /// The files (and directories, with what is beneath them) the worker may open.
    pub paths: Vec<PathRule>,
    /// The namespaces the child entered before exec ([`namespaces::enter`]).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Which rights beyond files the worker keeps.
    #[serde(default)]
    pub profile: Profile,
    /// Test only (`--test-worker-arg`): what the worker does wrong on purpose.
    #[serde(default)]
    pub test: Vec<TestMisdeed>,
}

/// What a worker talks to besides its files and its descriptors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Profile {
    /// Files only: an empty network namespace, no TCP in landlock, no socket calls.
    #[default]
    Files,
    /// It serves an `rbd:` export, so librados connects to the Ceph cluster by address: the
    /// host's network namespace, TCP connect allowed by landlock, the socket calls librados makes
    /// in the seccomp filter (docs/security.md, "The rbd profile").
    Rbd,
}

/// One path a worker may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathRule {
    pub path: PathBuf,
    /// Read and write (and truncate, and device ioctls); otherwise read only.
    pub write: bool,
}

/// Test only: a worker misbehaving on purpose, to prove each layer is on
/// (`--test-worker-arg`, hidden from `--help`). Each takes effect when the worker is handed a
/// connection of an export whose name ends with `export` (any export if it is empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TestMisdeed {
    /// Make a system call the filter forbids (`forbidden-syscall[@EXPORT]`).
    ForbiddenSyscall { export: String },
    /// Open a path for reading and log how it went (`open:PATH[@EXPORT]`).
    Open { path: PathBuf, export: String },
    /// Send the supervisor reports about connections it does not own, unknown ids, oversized
    /// and endless messages (`forge-reports[@EXPORT]`).
    ForgeReports { export: String },
}

impl TestMisdeed {
    /// Parses one `--test-worker-arg`.
    pub fn parse(arg: &str) -> Result<TestMisdeed, String> {
        let (what, export) = arg.split_once('@').unwrap_or((arg, ""));
        let export = export.to_string();
        match what.split_once(':') {
            None if what == "forbidden-syscall" => Ok(TestMisdeed::ForbiddenSyscall { export }),
            None if what == "forge-reports" => Ok(TestMisdeed::ForgeReports { export }),
            Some(("open", path)) if !path.is_empty() => Ok(TestMisdeed::Open {
                path: path.into(),
                export,
            }),
            _ => Err(format!(
                "unknown test worker argument '{arg}' (forbidden-syscall, open:PATH, forge-reports, each with an optional @EXPORT)"
            )),
        }
    }

    /// Whether it applies to a connection of `export`.
    pub fn applies_to(&self, export: &str) -> bool {
        let wanted = match self {
            TestMisdeed::ForbiddenSyscall { export }
            | TestMisdeed::Open { export, .. }
            | TestMisdeed::ForgeReports { export } => export,
        };
        export.ends_with(wanted.as_str())
    }
}

/// What a worker's sandbox turned out to be, as the worker reports it (`vublk status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxStatus {
    /// Whether the worker is dumpable (ptrace-able, its fds takeable by its tenant).
    pub dumpable: bool,
    /// Namespaces of its own ("net", "ipc"), empty when the supervisor had no privilege.
    pub namespaces: Vec<String>,
    /// Its network: "empty namespace", "host (rbd)" for the rbd profile, or "host (no
    /// privilege)" when a files-only worker could not get its own namespace.
    #[serde(default)]
    pub network: String,
    /// "ABI N" when enforced, "unsupported" when the kernel has no landlock.
    pub landlock: String,
    /// "filter (N system calls)" once the filter is on.
    pub seccomp: String,
}

/// The layer that failed; the worker exits instead of serving unconfined.
#[derive(Debug, Error)]
pub enum SandboxError {
    #[error(transparent)]
    Dumpable(#[from] dumpable::DumpableError),
    #[error(transparent)]
    Fds(#[from] fds::FdsError),
    #[error(transparent)]
    Landlock(#[from] landlock::LandlockError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
}

/// In a worker, right after exec: applies layers 2 to 5 in order. `keep` are the descriptors
/// the worker needs (its control socket and report pipe); `reports` is where a trapped system
/// call is reported.
pub fn enter(plan: &Plan, keep: &[RawFd], reports: RawFd) -> Result<SandboxStatus, SandboxError> {
    dumpable::forbid()?;
    let dumpable = dumpable::is_dumpable();
    fds::clean(keep)?;
    let landlock = landlock::restrict(&plan.paths, plan.profile)?;
    let seccomp = seccomp::install(reports, plan.profile)?;
    let network = if plan.namespaces.iter().any(|n| n == "net") {
        "empty namespace"
    } else if plan.profile == Profile::Rbd {
        "host (rbd)"
    } else {
        "host (no privilege)"
    };
    Ok(SandboxStatus {
        dumpable,
        namespaces: plan.namespaces.clone(),
        network: network.to_string(),
        landlock,
        seccomp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_misdeeds_parse() {
        assert_eq!(
            TestMisdeed::parse("forbidden-syscall@/tmp/a.sock"),
            Ok(TestMisdeed::ForbiddenSyscall {
                export: "/tmp/a.sock".into()
            })
        );
        let open = TestMisdeed::parse("open:/etc/passwd").unwrap();
        assert_eq!(
            open,
            TestMisdeed::Open {
                path: "/etc/passwd".into(),
                export: String::new()
            }
        );
        assert!(open.applies_to("/any/export"));
        assert!(TestMisdeed::parse("forge-reports@b.sock")
            .unwrap()
            .applies_to("/tmp/x/b.sock"));
        assert!(!TestMisdeed::parse("forge-reports@b.sock")
            .unwrap()
            .applies_to("/tmp/x/a.sock"));
        assert!(TestMisdeed::parse("open:").is_err());
        assert!(TestMisdeed::parse("reboot").is_err());
    }
}
