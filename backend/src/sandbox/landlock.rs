//! Layer 4: landlock. The worker may open the export images (read-only exports for reading
//! only), the paths given with `--worker-allow`, the block device queue limits it reads from
//! sysfs, and /dev/null; nothing else, whatever the tenant's uid could open. It may not bind or
//! connect TCP sockets, connect to abstract unix sockets, or signal processes outside itself,
//! on kernels that know these rights. A worker of the rbd profile may connect TCP sockets (to
//! the Ceph cluster), still not bind them, and reads the Ceph configuration and keyrings the
//! supervisor put in its plan (supervisor/confine.rs).
//!
//! Best effort: on a kernel without landlock the worker serves unconfined by it and says so
//! (`vublk status`, and the supervisor logs it once); rights a kernel's ABI does not know are
//! left out. Rules are bound to the inodes found when the worker starts: an image replaced
//! afterwards is reachable by the next worker, not this one.

use landlock::{
    path_beneath_rules, Access, AccessFs, AccessNet, CompatLevel, Compatible, LandlockStatus,
    Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetError, RulesetStatus, Scope, ABI,
};
use thiserror::Error;

use super::{PathRule, Profile};

/// The newest ABI whose rights the worker asks for; the crate leaves out what the running kernel
/// lacks.
const ABI_WANTED: ABI = ABI::V6;

#[derive(Debug, Error)]
pub enum LandlockError {
    #[error("cannot set up landlock")]
    Ruleset(#[source] RulesetError),
}

/// The network rights landlock denies: every TCP bind and connect, or only binds for a worker
/// that connects to a Ceph cluster.
fn denied_net(profile: Profile) -> landlock::BitFlags<AccessNet> {
    match profile {
        Profile::Files => AccessNet::from_all(ABI_WANTED),
        Profile::Rbd => AccessNet::BindTcp.into(),
    }
}

/// Restricts the process to `paths` (and /dev/null); returns what is enforced ("ABI N",
/// "partial (ABI N)" or "unsupported").
pub fn restrict(paths: &[PathRule], profile: Profile) -> Result<String, LandlockError> {
    let all = AccessFs::from_all(ABI_WANTED);
    let read = AccessFs::from_read(ABI_WANTED);
    let writable: Vec<_> = paths
        .iter()
        .filter(|p| p.write)
        .map(|p| p.path.as_path())
        .chain([std::path::Path::new("/dev/null")])
        .collect();
    let readable: Vec<_> = paths
        .iter()
        .filter(|p| !p.write)
        .map(|p| p.path.as_path())
        .collect();
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)
        .and_then(|r| r.handle_access(denied_net(profile)))
        .and_then(|r| r.scope(Scope::from_all(ABI_WANTED)))
        .and_then(|r| r.create())
        // A path that cannot be opened now gets no rule: the worker cannot open it either.
        .and_then(|r| r.add_rules(path_beneath_rules(&writable, all)))
        .and_then(|r| r.add_rules(path_beneath_rules(&readable, read)))
        .and_then(|r| r.restrict_self())
        .map_err(LandlockError::Ruleset)?;
    Ok(match (status.ruleset, status.landlock) {
        (RulesetStatus::NotEnforced, _) => "unsupported".to_string(),
        (RulesetStatus::FullyEnforced, LandlockStatus::Available { effective_abi, .. }) => {
            format!("ABI {}", effective_abi as i32)
        }
        (RulesetStatus::PartiallyEnforced, LandlockStatus::Available { effective_abi, .. }) => {
            format!("partial (ABI {})", effective_abi as i32)
        }
        (_, _) => "enforced".to_string(),
    })
}
