//! Layer 5: seccomp. The worker may make the system calls in [`ALLOWED`] (some only with the
//! arguments [`argument_rules`] lets through); any other traps. The trap handler writes a
//! `Forbidden` report with the call's number on the worker's report pipe (the supervisor logs
//! it in one line, naming the call) and the worker dies of SIGSYS, which the supervisor sees as
//! the exit status. `clone3` fails with ENOSYS instead, so glibc creates threads with `clone`,
//! whose flags a filter can check (clone3 passes them in memory).
//!
//! The list was found by running the workers through the test suites under strace. To allow a
//! call, add it to [`ALLOWED`] (with the comment naming who makes it); [`name_of`] gives the
//! supervisor the names of the calls it logs.
//!
//! A worker of the rbd profile also may make the calls in [`RBD_ALLOWED`]: librados connects
//! to the Ceph cluster itself, with `socket` limited to internet (and unix) sockets.
//!
//! Only x86_64 and aarch64 have the tables; elsewhere the worker runs without the filter and
//! says so.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use thiserror::Error;

use super::Profile;

#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    #[error("cannot compile the seccomp filter")]
    Compile(#[source] seccompiler::BackendError),
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] io::Error),
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// `(name, number)` pairs from the libc crate's `SYS_*` constants.
macro_rules! syscalls {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), sys::$name)),*]
    };
}

/// The syscall numbers, by name, for this architecture.
#[allow(non_upper_case_globals)]
mod sys {
    #[cfg(target_arch = "x86_64")]
    pub use libc::{SYS_access as access, SYS_epoll_create as epoll_create};
    pub use libc::{
        SYS_brk as brk, SYS_clock_gettime as clock_gettime, SYS_clock_nanosleep as clock_nanosleep,
        SYS_clone as clone, SYS_clone3 as clone3, SYS_close as close, SYS_dup as dup,
        SYS_dup3 as dup3, SYS_epoll_create1 as epoll_create1, SYS_epoll_ctl as epoll_ctl,
        SYS_epoll_pwait as epoll_pwait, SYS_epoll_pwait2 as epoll_pwait2, SYS_eventfd2 as eventfd2,
        SYS_exit as exit, SYS_exit_group as exit_group, SYS_fallocate as fallocate,
        SYS_fcntl as fcntl, SYS_fdatasync as fdatasync, SYS_fstat as fstat, SYS_fstatfs as fstatfs,
        SYS_fsync as fsync, SYS_ftruncate as ftruncate, SYS_futex as futex, SYS_getpid as getpid,
        SYS_getrandom as getrandom, SYS_gettid as gettid, SYS_io_uring_enter as io_uring_enter,
        SYS_io_uring_register as io_uring_register, SYS_io_uring_setup as io_uring_setup,
        SYS_ioctl as ioctl, SYS_lseek as lseek, SYS_madvise as madvise,
        SYS_membarrier as membarrier, SYS_memfd_create as memfd_create, SYS_mmap as mmap,
        SYS_mprotect as mprotect, SYS_mremap as mremap, SYS_munmap as munmap,
        SYS_nanosleep as nanosleep, SYS_newfstatat as newfstatat, SYS_openat as openat,
        SYS_openat2 as openat2, SYS_ppoll as ppoll, SYS_prctl as prctl, SYS_pread64 as pread64,
        SYS_preadv as preadv, SYS_preadv2 as preadv2, SYS_prlimit64 as prlimit64,
        SYS_pwrite64 as pwrite64, SYS_pwritev as pwritev, SYS_pwritev2 as pwritev2,
        SYS_read as read, SYS_readlinkat as readlinkat, SYS_readv as readv,
        SYS_recvfrom as recvfrom, SYS_recvmsg as recvmsg, SYS_restart_syscall as restart_syscall,
        SYS_rseq as rseq, SYS_rt_sigaction as rt_sigaction, SYS_rt_sigprocmask as rt_sigprocmask,
        SYS_rt_sigreturn as rt_sigreturn, SYS_sched_getaffinity as sched_getaffinity,
        SYS_sched_yield as sched_yield, SYS_sendmsg as sendmsg, SYS_sendto as sendto,
        SYS_set_robust_list as set_robust_list, SYS_shutdown as shutdown,
        SYS_sigaltstack as sigaltstack, SYS_statx as statx, SYS_tgkill as tgkill,
        SYS_timerfd_create as timerfd_create, SYS_timerfd_settime as timerfd_settime,
        SYS_write as write, SYS_writev as writev,
    };
    pub use libc::{
        SYS_getpeername as getpeername, SYS_getsockname as getsockname,
        SYS_getsockopt as getsockopt, SYS_pipe2 as pipe2, SYS_setsockopt as setsockopt,
        SYS_statfs as statfs,
    };
    // aarch64 has only the newer calls, already listed under their own names.
    #[cfg(not(target_arch = "x86_64"))]
    pub use libc::{SYS_epoll_create1 as epoll_create, SYS_faccessat as access};
    #[cfg(target_arch = "x86_64")]
    pub use libc::{SYS_epoll_wait as epoll_wait, SYS_poll as poll, SYS_readlink as readlink};
    // aarch64 has only the newer calls, already listed under their own names.
    #[cfg(not(target_arch = "x86_64"))]
    pub use libc::{SYS_epoll_pwait as epoll_wait, SYS_ppoll as poll, SYS_readlinkat as readlink};
    // Forbidden, named so the supervisor's line says which.
    pub use libc::{
        SYS_bind as bind, SYS_bpf as bpf, SYS_connect as connect, SYS_execve as execve,
        SYS_execveat as execveat, SYS_getuid as getuid, SYS_kill as kill,
        SYS_landlock_create_ruleset as landlock_create_ruleset, SYS_mount as mount,
        SYS_pidfd_getfd as pidfd_getfd, SYS_pidfd_open as pidfd_open,
        SYS_process_vm_readv as process_vm_readv, SYS_ptrace as ptrace, SYS_seccomp as seccomp,
        SYS_setuid as setuid, SYS_socket as socket, SYS_uname as uname, SYS_unlinkat as unlinkat,
        SYS_unshare as unshare, SYS_wait4 as wait4, SYS_waitid as waitid,
    };
}

/// The system calls a worker makes.
pub const ALLOWED: &[(&str, i64)] = syscalls![
    // Files and descriptors: the image, the disk's probes, eventfds, the control socket.
    read,
    write,
    readv,
    writev,
    pread64,
    pwrite64,
    preadv,
    pwritev,
    preadv2,
    pwritev2,
    lseek,
    close,
    dup,
    dup3,
    fcntl,
    ioctl,
    fstat,
    fstatfs,
    newfstatat,
    statx,
    openat,
    openat2,
    fsync,
    fdatasync,
    fallocate,
    ftruncate,
    // Guest memory and the allocator; memfd_create and ftruncate size the inflight region a
    // frontend asks for (GET_INFLIGHT_FD), sealed with fcntl.
    memfd_create,
    mmap,
    munmap,
    mremap,
    madvise,
    mprotect,
    brk,
    membarrier,
    // io_uring: one ring per queue thread.
    io_uring_setup,
    io_uring_enter,
    io_uring_register,
    // Event loops and timers.
    epoll_create1,
    epoll_ctl,
    epoll_wait,
    epoll_pwait,
    epoll_pwait2,
    eventfd2,
    poll,
    ppoll,
    timerfd_create,
    timerfd_settime,
    nanosleep,
    clock_nanosleep,
    clock_gettime,
    // The vhost-user connection and the report pipe.
    recvmsg,
    sendmsg,
    recvfrom,
    sendto,
    shutdown,
    // SET_BACKEND_REQ_FD: the vhost crate checks the frontend's fd is a unix stream socket
    // (SO_DOMAIN, SO_TYPE) before keeping it for config-change messages.
    getsockopt,
    // Threads (clone only for threads: see argument_rules), locks, signals.
    clone,
    clone3,
    futex,
    set_robust_list,
    rseq,
    gettid,
    getpid,
    tgkill,
    sched_yield,
    sched_getaffinity,
    prctl,
    prlimit64,
    getrandom,
    rt_sigaction,
    rt_sigprocmask,
    rt_sigreturn,
    sigaltstack,
    restart_syscall,
    // Leaving; a panicking thread's backtrace finds the binary with readlink(/proc/self/exe)
    // (reading it is up to landlock), and the worker goes on without that thread.
    readlink,
    readlinkat,
    exit,
    exit_group,
];

/// What a worker of the rbd profile makes besides [`ALLOWED`]: librados and librbd, measured
/// under strace through the RBD tests (connecting, its messenger's event loop, reading its
/// configuration). `socket` only for the domains [`SOCKET_DOMAINS`] lists.
pub const RBD_ALLOWED: &[(&str, i64)] = syscalls![
    socket,
    connect,
    setsockopt,
    getsockname,
    getpeername,
    pipe2,
    epoll_create,
    uname,
    access,
    statfs,
];

/// The socket domains an rbd worker may create: IPv4 and IPv6 to reach the cluster. Unix
/// sockets pass this filter only to fail with EACCES in [`filters`]' first one: librados makes
/// one when a configuration asks for an admin socket, and glibc one to ask nscd; both go on
/// without it, while a trap would kill the worker.
const SOCKET_DOMAINS: &[i32] = &[libc::AF_INET, libc::AF_INET6, libc::AF_UNIX];

/// The calls allowed to a worker of `profile`.
fn allowed(profile: Profile) -> impl Iterator<Item = &'static (&'static str, i64)> {
    let rbd: &[(&str, i64)] = match profile {
        Profile::Files => &[],
        Profile::Rbd => RBD_ALLOWED,
    };
    ALLOWED.iter().chain(rbd)
}

/// Names of calls a worker must not make, for the supervisor's log line.
const FORBIDDEN_NAMED: &[(&str, i64)] = syscalls![
    bpf,
    execve,
    execveat,
    kill,
    mount,
    pidfd_getfd,
    pidfd_open,
    ptrace,
    setuid,
    unshare,
    unlinkat,
    getuid,
    bind,
    process_vm_readv,
    seccomp,
    landlock_create_ruleset,
    wait4,
    waitid,
];

/// The name of system call `nr`, when the tables know it.
pub fn name_of(nr: i64) -> Option<&'static str> {
    ALLOWED
        .iter()
        .chain(RBD_ALLOWED)
        .chain(FORBIDDEN_NAMED)
        .find(|(_, n)| *n == nr)
        .map(|(name, _)| *name)
}

fn condition(
    arg: u8,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
}

/// The ioctls a worker makes: non-blocking mode and close-on-exec (std, vmm-sys-util), the
/// terminal check of the log writer, a block device's size and logical block size
/// (disk/probe.rs).
const IOCTLS: &[u64] = &[
    libc::FIONBIO,
    libc::FIOCLEX,
    libc::TCGETS,
    crate::disk::probe::BLKGETSIZE64,
    crate::disk::probe::BLKSSZGET,
];

/// Argument checks on some allowed calls: `clone` only makes threads (no fork), memory is
/// never made executable, `prctl` only names threads, `tgkill` only signals this process,
/// `ioctl` only does what [`IOCTLS`] lists, and (rbd profile) `socket` only creates what
/// [`SOCKET_DOMAINS`] lists.
fn argument_rules(
    pid: i64,
    profile: Profile,
) -> Result<Vec<(i64, Vec<SeccompRule>)>, seccompiler::BackendError> {
    let thread = libc::CLONE_THREAD as u64;
    let exec = libc::PROT_EXEC as u64;
    let one = |c: SeccompCondition| SeccompRule::new(vec![c]).map(|r| vec![r]);
    let ioctls = IOCTLS
        .iter()
        .map(|&request| {
            SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
                .and_then(|c| SeccompRule::new(vec![c]))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let sockets = SOCKET_DOMAINS
        .iter()
        .map(|&domain| {
            SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, domain as u64)
                .and_then(|c| SeccompRule::new(vec![c]))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut rules = vec![
        (libc::SYS_ioctl, ioctls),
        (
            libc::SYS_clone,
            one(condition(0, SeccompCmpOp::MaskedEq(thread), thread)?)?,
        ),
        (
            libc::SYS_mmap,
            one(condition(2, SeccompCmpOp::MaskedEq(exec), 0)?)?,
        ),
        (
            libc::SYS_mprotect,
            one(condition(2, SeccompCmpOp::MaskedEq(exec), 0)?)?,
        ),
        (
            libc::SYS_prctl,
            one(condition(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)?)?,
        ),
        (
            libc::SYS_tgkill,
            one(condition(0, SeccompCmpOp::Eq, pid as u64)?)?,
        ),
    ];
    if profile == Profile::Rbd {
        rules.push((libc::SYS_socket, sockets));
    }
    Ok(rules)
}

#[cfg(target_arch = "x86_64")]
const ARCH: Option<TargetArch> = Some(TargetArch::x86_64);
#[cfg(target_arch = "aarch64")]
const ARCH: Option<TargetArch> = Some(TargetArch::aarch64);
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ARCH: Option<TargetArch> = None;

/// The filters: `clone3` → ENOSYS, for the rbd profile unix sockets → EACCES (installed
/// first: the last one forbids `seccomp`; an error wins over the last one's allow), then the
/// allow-list, trapping everything else.
fn filters(pid: i64, profile: Profile) -> Result<Vec<BpfProgram>, SeccompError> {
    let arch = ARCH.expect("only called where there is a table");
    let no_clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(SeccompError::Build)?;
    let mut programs: Vec<BpfProgram> =
        vec![no_clone3.try_into().map_err(SeccompError::Compile)?];
    if profile == Profile::Rbd {
        let unix = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AF_UNIX as u64,
        )
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(SeccompError::Build)?;
        let no_unix = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_socket, vec![unix])]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
            arch,
        )
        .map_err(SeccompError::Build)?;
        programs.push(no_unix.try_into().map_err(SeccompError::Compile)?);
    }
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed(profile).map(|(_, nr)| (*nr, vec![])).collect();
    rules.extend(argument_rules(pid, profile).map_err(SeccompError::Build)?);
    let allow = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch)
        .map_err(SeccompError::Build)?;
    programs.push(allow.try_into().map_err(SeccompError::Compile)?);
    Ok(programs)
}

/// Where the SIGSYS handler reports (the worker's report pipe).
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

/// Installs the SIGSYS handler and the filters on every thread; returns what is on.
pub fn install(reports: RawFd, profile: Profile) -> Result<String, SeccompError> {
    if ARCH.is_none() {
        return Ok("none (no table for this architecture)".into());
    }
    let programs = filters(i64::from(std::process::id()), profile)?;
    REPORT_FD.store(reports, Ordering::Relaxed);
    // SAFETY: an all-zero sigaction is valid; sigaction reads it.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(io::Error::last_os_error()));
        }
    }
    for program in &programs {
        seccompiler::apply_filter_all_threads(program).map_err(SeccompError::Install)?;
    }
    let calls: std::collections::BTreeSet<i64> = allowed(profile).map(|(_, n)| *n).collect();
    Ok(format!("filter ({} system calls)", calls.len()))
}

/// The report the handler writes: `{"Forbidden":{"syscall":N}}` and a newline, built without
/// allocating (a signal handler may not).
fn forbidden_report(nr: i64, buf: &mut [u8; 64]) -> usize {
    const HEAD: &[u8] = b"{\"Forbidden\":{\"syscall\":";
    const TAIL: &[u8] = b"}}\n";
    let mut len = HEAD.len();
    buf[..len].copy_from_slice(HEAD);
    let mut digits = [0u8; 20];
    let (mut n, mut count) = (nr.unsigned_abs(), 0);
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if nr < 0 {
        buf[len] = b'-';
        len += 1;
    }
    for d in digits[..count].iter().rev() {
        buf[len] = *d;
        len += 1;
    }
    buf[len..len + TAIL.len()].copy_from_slice(TAIL);
    len + TAIL.len()
}

/// SIGSYS: a forbidden call trapped. Reports it and dies of SIGSYS. Only async-signal-safe
/// calls, all on the allow-list.
extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // The kernel's siginfo for SIGSYS: after signo, errno, code and padding (16 bytes), the
    // call's address (a pointer), then the call's number (an int).
    const SYSCALL_OFFSET: usize = 16 + std::mem::size_of::<usize>();
    // SAFETY: `info` is the siginfo the kernel passed to this SA_SIGINFO handler, at least 128
    // bytes; the number is an int at this offset for SIGSYS.
    let nr = unsafe { info.cast::<u8>().add(SYSCALL_OFFSET).cast::<i32>().read() };
    let mut buf = [0u8; 64];
    let len = forbidden_report(i64::from(nr), &mut buf);
    // SAFETY: writes our buffer to our report pipe; resets SIGSYS to its default action and
    // raises it, which kills the process once this handler returns (SIGSYS is blocked until
    // then).
    unsafe {
        libc::write(REPORT_FD.load(Ordering::Relaxed), buf.as_ptr().cast(), len);
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::raise(libc::SIGSYS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_is_a_message() {
        for nr in [0, 7, 101, 435, -1, i64::from(i32::MAX)] {
            let mut buf = [0u8; 64];
            let len = forbidden_report(nr, &mut buf);
            assert_eq!(buf[len - 1], b'\n');
            let message: crate::handoff::ToSupervisor =
                serde_json::from_slice(&buf[..len - 1]).unwrap();
            assert!(
                matches!(message, crate::handoff::ToSupervisor::Forbidden { syscall } if syscall == nr)
            );
        }
    }

    #[test]
    fn the_filters_compile_and_name_their_calls() {
        if ARCH.is_none() {
            return;
        }
        filters(1, Profile::Files).unwrap();
        filters(1, Profile::Rbd).unwrap();
        assert_eq!(name_of(libc::SYS_ptrace), Some("ptrace"));
        assert_eq!(name_of(libc::SYS_connect), Some("connect"));
        assert_eq!(name_of(libc::SYS_io_uring_enter), Some("io_uring_enter"));
        if cfg!(target_arch = "x86_64") {
            let mut numbers: Vec<i64> = allowed(Profile::Rbd).map(|(_, n)| *n).collect();
            let listed = numbers.len();
            numbers.sort_unstable();
            numbers.dedup();
            assert_eq!(numbers.len(), listed, "a call listed twice");
            assert!(!allowed(Profile::Files).any(|(_, n)| *n == libc::SYS_socket));
        }
    }
}
