//! Making the current process carry a VMM's identity. Runs in a freshly forked worker, before
//! it touches any guest data, in an order that needs privileges only while it still has them:
//!
//! 1. cgroups (writing `cgroup.procs` needs root), CPU affinity, nice, io priority;
//! 2. rlimits: the VMM's, or ours where the VMM's hard limit is above what we may set;
//! 3. the capability bounding set emptied (needs CAP_SETPCAP, so before the uid changes);
//! 4. supplementary groups, gid, uid;
//! 5. parent-death signal (the uid change clears it), no_new_privs, no capabilities left.

use std::borrow::Cow;
use std::io;
use std::path::PathBuf;

use thiserror::Error;

use super::VmmIdentity;

/// The step that failed (in the order above), and why.
#[derive(Debug, Error)]
pub enum ApplyError {
    #[error("becoming uid {uid} gid {gid} (the supervisor runs as uid {euid}, not root)")]
    NotRoot {
        uid: u32,
        gid: u32,
        euid: u32,
        #[source]
        source: io::Error,
    },
    #[error("joining {}", path.display())]
    JoinCgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("setting the CPU affinity")]
    Affinity(#[source] io::Error),
    #[error("setting nice {nice}")]
    Nice {
        nice: i32,
        #[source]
        source: io::Error,
    },
    #[error("setting io priority {ioprio:#x}")]
    IoPriority {
        ioprio: i32,
        #[source]
        source: io::Error,
    },
    #[error("reading {name}")]
    ReadLimit {
        name: Cow<'static, str>,
        #[source]
        source: io::Error,
    },
    #[error("setting {name}")]
    SetLimit {
        name: Cow<'static, str>,
        #[source]
        source: io::Error,
    },
    #[error("dropping capability {cap} from the bounding set")]
    BoundingSet {
        cap: u32,
        #[source]
        source: io::Error,
    },
    #[error("setting groups {groups:?}")]
    Groups {
        groups: Vec<u32>,
        #[source]
        source: io::Error,
    },
    #[error("setting gid {gid}")]
    Gid {
        gid: u32,
        #[source]
        source: io::Error,
    },
    #[error("setting uid {uid}")]
    Uid {
        uid: u32,
        #[source]
        source: io::Error,
    },
    #[error("arming the parent-death signal")]
    ParentDeathSignal(#[source] io::Error),
    #[error("checking the supervisor is alive")]
    SupervisorGone(#[source] io::Error),
    #[error("setting no_new_privs")]
    NoNewPrivs(#[source] io::Error),
    #[error("clearing ambient capabilities")]
    AmbientCapabilities(#[source] io::Error),
    #[error("dropping capabilities")]
    Capabilities(#[source] io::Error),
}

/// A system call's return value: below zero, the step failed with errno.
fn check(ret: libc::c_long, step: impl FnOnce(io::Error) -> ApplyError) -> Result<(), ApplyError> {
    if ret < 0 {
        Err(step(io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

const IOPRIO_WHO_PROCESS: libc::c_long = 1;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// What was adjusted rather than copied (limits above ours); for the log.
pub struct Applied {
    pub notes: Vec<String>,
}

/// Applies `identity` to the calling process. `parent` is the supervisor's pid, to detect that
/// it died before the parent-death signal was armed.
pub fn apply(identity: &VmmIdentity, parent: i32) -> Result<Applied, ApplyError> {
    let mut notes = Vec::new();
    // SAFETY: geteuid/getegid cannot fail.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let privileged = euid == 0;
    if !privileged && (identity.ids.uid[1] != euid || identity.ids.gid[1] != egid) {
        return Err(ApplyError::NotRoot {
            uid: identity.ids.uid[1],
            gid: identity.ids.gid[1],
            euid,
            source: io::Error::from_raw_os_error(libc::EPERM),
        });
    }

    for path in &identity.cgroup_procs {
        std::fs::write(path, b"0").map_err(|source| ApplyError::JoinCgroup {
            path: path.clone(),
            source,
        })?;
    }

    if !identity.affinity.is_empty() {
        // SAFETY: an all-zero cpu_set_t is a valid empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &cpu in &identity.affinity {
            // SAFETY: cpu < CPU_SETSIZE (it came from CPU_ISSET over that range).
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
        // SAFETY: reads the set we own.
        let ret =
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        check(ret.into(), ApplyError::Affinity)?;
    }
    // SAFETY: scalar arguments only.
    let ret = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, identity.nice) };
    check(ret.into(), |source| ApplyError::Nice {
        nice: identity.nice,
        source,
    })?;
    // SAFETY: scalar arguments only.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            identity.ioprio as libc::c_long,
        )
    };
    check(ret, |source| ApplyError::IoPriority {
        ioprio: identity.ioprio,
        source,
    })?;

    for limit in &identity.limits {
        let mut ours = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the local.
        let ret = unsafe { libc::getrlimit(limit.resource as _, &mut ours) };
        check(ret.into(), |source| ApplyError::ReadLimit {
            name: limit.name.clone(),
            source,
        })?;
        let want_hard = limit.hard.unwrap_or(libc::RLIM_INFINITY);
        let want_soft = limit.soft.unwrap_or(libc::RLIM_INFINITY);
        // Without CAP_SYS_RESOURCE a hard limit can only go down: keep ours where it is lower.
        let hard = want_hard.min(ours.rlim_max);
        if hard < want_hard {
            notes.push(format!(
                "{}: the VMM's hard limit {} is above ours; kept {}",
                limit.name,
                show(want_hard),
                show(hard)
            ));
        }
        let new = libc::rlimit {
            rlim_cur: want_soft.min(hard),
            rlim_max: hard,
        };
        // SAFETY: reads the local.
        let ret = unsafe { libc::setrlimit(limit.resource as _, &new) };
        check(ret.into(), |source| ApplyError::SetLimit {
            name: limit.name.clone(),
            source,
        })?;
    }

    let ids = &identity.ids;
    if privileged {
        // Emptying the bounding set needs CAP_SETPCAP; an unprivileged supervisor has nothing
        // to drop, and no_new_privs below keeps it that way.
        for cap in 0..=last_cap() {
            // SAFETY: prctl with scalar arguments.
            let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            check(ret.into(), |source| ApplyError::BoundingSet { cap, source })?;
        }
        let groups: Vec<libc::gid_t> = ids.groups.clone();
        // SAFETY: setgroups reads `groups.len()` entries from the vector.
        let ret = unsafe { libc::setgroups(groups.len(), groups.as_ptr()) };
        check(ret.into(), |source| ApplyError::Groups { groups, source })?;
    }
    // SAFETY: scalar arguments only.
    let ret = unsafe { libc::setresgid(ids.gid[0], ids.gid[1], ids.gid[2]) };
    check(ret.into(), |source| ApplyError::Gid {
        gid: ids.gid[1],
        source,
    })?;
    // SAFETY: scalar arguments only.
    let ret = unsafe { libc::setresuid(ids.uid[0], ids.uid[1], ids.uid[2]) };
    check(ret.into(), |source| ApplyError::Uid {
        uid: ids.uid[1],
        source,
    })?;

    // SAFETY: prctl and getppid with scalar arguments.
    unsafe {
        check(
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            )
            .into(),
            ApplyError::ParentDeathSignal,
        )?;
        if libc::getppid() != parent {
            return Err(ApplyError::SupervisorGone(io::Error::from_raw_os_error(
                libc::ESRCH,
            )));
        }
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into(),
            ApplyError::NoNewPrivs,
        )?;
        check(
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            )
            .into(),
            ApplyError::AmbientCapabilities,
        )?;
    }
    // A VMM running as root keeps uid 0: take its capabilities away explicitly.
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads the header and two data structs, all live locals.
    let ret =
        unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) };
    check(ret, ApplyError::Capabilities)?;

    Ok(Applied { notes })
}

fn show(limit: u64) -> String {
    if limit == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        limit.to_string()
    }
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}
