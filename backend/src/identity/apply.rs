//! Making the current process carry a VMM's identity. Runs in a freshly forked worker, before
//! it touches any guest data, in an order that needs privileges only while it still has them:
//!
//! 1. cgroups (writing `cgroup.procs` needs root), CPU affinity, nice, io priority;
//! 2. rlimits: the VMM's, or ours where the VMM's hard limit is above what we may set;
//! 3. the capability bounding set emptied (needs CAP_SETPCAP, so before the uid changes);
//! 4. supplementary groups, gid, uid;
//! 5. parent-death signal (the uid change clears it), no_new_privs, no capabilities left.

use std::fmt;
use std::io;

use super::VmmIdentity;

/// A step that failed, and why.
#[derive(Debug)]
pub struct ApplyError {
    pub step: String,
    pub source: io::Error,
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step, self.source)
    }
}

impl std::error::Error for ApplyError {}

fn check(ret: libc::c_long, step: impl FnOnce() -> String) -> Result<(), ApplyError> {
    if ret < 0 {
        Err(ApplyError {
            step: step(),
            source: io::Error::last_os_error(),
        })
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
        return Err(ApplyError {
            step: format!(
                "becoming uid {} gid {} (the supervisor runs as uid {euid}, not root)",
                identity.ids.uid[1], identity.ids.gid[1]
            ),
            source: io::Error::from_raw_os_error(libc::EPERM),
        });
    }

    for path in &identity.cgroup_procs {
        std::fs::write(path, b"0").map_err(|source| ApplyError {
            step: format!("joining {}", path.display()),
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
        check(ret.into(), || "setting the CPU affinity".into())?;
    }
    // SAFETY: scalar arguments only.
    let ret = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, identity.nice) };
    check(ret.into(), || format!("setting nice {}", identity.nice))?;
    // SAFETY: scalar arguments only.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            identity.ioprio as libc::c_long,
        )
    };
    check(ret, || {
        format!("setting io priority {:#x}", identity.ioprio)
    })?;

    for limit in &identity.limits {
        let mut ours = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the local.
        let ret = unsafe { libc::getrlimit(limit.resource as _, &mut ours) };
        check(ret.into(), || format!("reading {}", limit.name))?;
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
        check(ret.into(), || format!("setting {}", limit.name))?;
    }

    let ids = &identity.ids;
    if privileged {
        // Emptying the bounding set needs CAP_SETPCAP; an unprivileged supervisor has nothing
        // to drop, and no_new_privs below keeps it that way.
        for cap in 0..=last_cap() {
            // SAFETY: prctl with scalar arguments.
            let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            check(ret.into(), || {
                format!("dropping capability {cap} from the bounding set")
            })?;
        }
        let groups: Vec<libc::gid_t> = ids.groups.clone();
        // SAFETY: setgroups reads `groups.len()` entries from the vector.
        let ret = unsafe { libc::setgroups(groups.len(), groups.as_ptr()) };
        check(ret.into(), || format!("setting groups {groups:?}"))?;
    }
    // SAFETY: scalar arguments only.
    let ret = unsafe { libc::setresgid(ids.gid[0], ids.gid[1], ids.gid[2]) };
    check(ret.into(), || format!("setting gid {}", ids.gid[1]))?;
    // SAFETY: scalar arguments only.
    let ret = unsafe { libc::setresuid(ids.uid[0], ids.uid[1], ids.uid[2]) };
    check(ret.into(), || format!("setting uid {}", ids.uid[1]))?;

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
            || "arming the parent-death signal".into(),
        )?;
        if libc::getppid() != parent {
            return Err(ApplyError {
                step: "checking the supervisor is alive".into(),
                source: io::Error::from_raw_os_error(libc::ESRCH),
            });
        }
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into(),
            || "setting no_new_privs".into(),
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
            || "clearing ambient capabilities".into(),
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
    check(ret, || "dropping capabilities".into())?;

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
