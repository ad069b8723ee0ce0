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

use super::Profile;

/// Enters new namespaces where it can; returns the names of those entered. A worker of the
/// [`Profile::Rbd`] profile keeps the host's network: librados connects to the monitors and OSDs
/// by address.
pub fn enter(profile: Profile) -> Vec<String> {
    let mut entered = Vec::new();
    let net = (profile == Profile::Files).then_some((libc::CLONE_NEWNET, "net"));
    for (flag, name) in net.into_iter().chain([(libc::CLONE_NEWIPC, "ipc")]) {
        // SAFETY: unshare with a scalar flag, in the single-threaded forked child.
        if unsafe { libc::unshare(flag) } == 0 {
            entered.push(name.to_string());
        }
    }
    entered
}
