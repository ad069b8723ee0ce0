//! Layer 1: namespaces that cost nothing. A worker needs no network (its connections arrive as
//! descriptors over its control socket, and a descriptor works whatever namespace holds it) and
//! no System V IPC (guest memory comes as memfds), so it gets an empty network namespace (only a
//! loopback that is down) and an IPC namespace of its own: a taken-over worker can reach no
//! socket by address, abstract unix sockets included, and no host shared memory segment.
//!
//! Creating them needs CAP_SYS_ADMIN, which the worker gives up with its identity: this runs in
//! the forked child before identity/apply.rs, the one layer applied before the identity. An
//! unprivileged supervisor (its workers run as itself) gets none; a user namespace would give it
//! the privilege but also a new view of every uid, which the identity model does not want.

/// Enters new namespaces where it can; returns the names of those entered.
pub fn enter() -> Vec<String> {
    let mut entered = Vec::new();
    for (flag, name) in [(libc::CLONE_NEWNET, "net"), (libc::CLONE_NEWIPC, "ipc")] {
        // SAFETY: unshare with a scalar flag, in the single-threaded forked child.
        if unsafe { libc::unshare(flag) } == 0 {
            entered.push(name.to_string());
        }
    }
    entered
}
