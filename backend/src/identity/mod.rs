//! Who is behind a connection, and how a worker process becomes them.
//!
//! [`peer`] identifies the VMM at the other end of a socket (SO_PEERCRED and a pidfd).
//! [`VmmIdentity::read`] reads everything a worker inherits from it: ids, every rlimit, every
//! cgroup membership, CPU affinity, nice value, io priority. [`apply`] makes the current
//! process carry that identity; the supervisor runs it in a freshly forked worker.

pub mod apply;
pub mod peer;
pub mod proc;

use std::io;
use std::path::PathBuf;

use serde::Serialize;
use thiserror::Error;

pub use peer::Peer;
use proc::{CgroupMembership, Ids, Limit};

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot parse {0}")]
    Parse(PathBuf),
    #[error("cannot read the CPU affinity of pid {pid}")]
    Affinity {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("the VMM (pid {0}) exited while it was being identified")]
    Gone(i32),
    #[error(
        "VMM pid {pid} changed its credentials since it connected (uid {uid} gid {gid} groups {groups:?} at connect; now uids {now_uids:?} gids {now_gids:?} groups {now_groups:?}, real/effective/saved/filesystem): did it run a setuid program?"
    )]
    CredentialsChanged {
        pid: i32,
        uid: u32,
        gid: u32,
        groups: Vec<u32>,
        now_uids: [u32; 4],
        now_gids: [u32; 4],
        now_groups: Vec<u32>,
    },
}

/// Everything a worker inherits from its VMM, read when the worker is spawned. The ids are
/// those the kernel vouched for at connect ([`VmmIdentity::read_for`] checks /proc agrees).
#[derive(Debug, Clone, Serialize)]
pub struct VmmIdentity {
    pub pid: i32,
    pub ids: Ids,
    pub limits: Vec<Limit>,
    pub cgroups: Vec<CgroupMembership>,
    /// `cgroup.procs` files to write the worker's pid into, one per mounted hierarchy the VMM
    /// is in (v1 controllers and v2).
    pub cgroup_procs: Vec<PathBuf>,
    /// CPUs the VMM may run on.
    pub affinity: Vec<usize>,
    pub nice: i32,
    /// The raw ioprio value (class << 13 | data).
    pub ioprio: i32,
}

fn read(path: PathBuf) -> Result<String, IdentityError> {
    std::fs::read_to_string(&path).map_err(|source| IdentityError::Read { path, source })
}

impl VmmIdentity {
    /// Reads the identity of the process behind `peer`, for what the socket's credentials
    /// cannot give (rlimits, cgroups, affinity, nice, io priority), and refuses it unless
    /// every uid and gid /proc shows (real, effective, saved, filesystem) and its supplementary
    /// groups are still those the kernel recorded at connect.
    pub fn read_for(peer: &Peer) -> Result<VmmIdentity, IdentityError> {
        let identity = VmmIdentity::read(peer.pid)?;
        // The reads above were of this process only if it is still alive now.
        if peer.exited() {
            return Err(IdentityError::Gone(peer.pid));
        }
        let ids = &identity.ids;
        let mut now_groups = ids.groups.clone();
        let mut groups = peer.groups.clone();
        now_groups.sort_unstable();
        now_groups.dedup();
        groups.sort_unstable();
        groups.dedup();
        if ids.uid.iter().any(|&u| u != peer.uid)
            || ids.gid.iter().any(|&g| g != peer.gid)
            || now_groups != groups
        {
            return Err(IdentityError::CredentialsChanged {
                pid: peer.pid,
                uid: peer.uid,
                gid: peer.gid,
                groups: peer.groups.clone(),
                now_uids: ids.uid,
                now_gids: ids.gid,
                now_groups: ids.groups.clone(),
            });
        }
        Ok(identity)
    }

    /// The soft limit of `resource` (`None`: unlimited or unknown).
    pub fn soft_limit(&self, resource: libc::__rlimit_resource_t) -> Option<u64> {
        self.limits
            .iter()
            .find(|l| l.resource == resource as i32)
            .and_then(|l| l.soft)
    }

    /// Reads the identity of process `pid` (which the caller holds a pidfd for).
    fn read(pid: i32) -> Result<VmmIdentity, IdentityError> {
        let dir = PathBuf::from(format!("/proc/{pid}"));
        let status_path = dir.join("status");
        let ids = proc::parse_status_ids(&read(status_path.clone())?)
            .ok_or(IdentityError::Parse(status_path))?;
        let limits_path = dir.join("limits");
        let limits = proc::parse_limits(&read(limits_path.clone())?)
            .ok_or(IdentityError::Parse(limits_path))?;
        let cgroups = proc::parse_cgroup(&read(dir.join("cgroup"))?);
        let mounts = proc::parse_cgroup_mounts(&read(PathBuf::from("/proc/self/mountinfo"))?);
        let cgroup_procs = cgroups
            .iter()
            .filter_map(|m| {
                let path = proc::cgroup_procs_path(m, &mounts);
                if path.is_none() {
                    tracing::debug!(
                        "VMM pid {pid}: cgroup {:?}:{} is not mounted here; not joined",
                        m.controllers,
                        m.path
                    );
                }
                path
            })
            .collect();
        Ok(VmmIdentity {
            pid,
            ids,
            limits,
            cgroups,
            cgroup_procs,
            affinity: affinity_of(pid)?,
            nice: nice_of(pid)?,
            ioprio: ioprio_of(pid)?,
        })
    }
}

fn affinity_of(pid: i32) -> Result<Vec<usize>, IdentityError> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most size_of(cpu_set_t) bytes into `set`.
    if unsafe { libc::sched_getaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) }
        != 0
    {
        return Err(IdentityError::Affinity {
            pid,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: CPU_ISSET only reads the set.
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

fn nice_of(pid: i32) -> Result<i32, IdentityError> {
    // getpriority returns -1 both as a value and as an error: clear errno to tell them apart.
    // SAFETY: errno is thread-local; getpriority only reads its arguments.
    let nice = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, pid as libc::id_t)
    };
    let err = io::Error::last_os_error();
    if nice == -1 && err.raw_os_error() != Some(0) {
        return Err(IdentityError::Gone(pid));
    }
    Ok(nice)
}

const IOPRIO_WHO_PROCESS: libc::c_long = 1;

fn ioprio_of(pid: i32) -> Result<i32, IdentityError> {
    // SAFETY: ioprio_get only reads its scalar arguments.
    let prio = unsafe {
        libc::syscall(
            libc::SYS_ioprio_get,
            IOPRIO_WHO_PROCESS,
            pid as libc::c_long,
        )
    };
    if prio < 0 {
        return Err(IdentityError::Gone(pid));
    }
    Ok(prio as i32)
}
