//! vublk-test-support: what vublk's tests (and its benchmark) share. Not published.
//!
//! - [`frontend`]: a scripted vhost-user-blk frontend that talks to the backend the way QEMU or
//!   cloud-hypervisor would (and the way a hostile guest would not be allowed to).
//! - [`daemon`]: the backend under test as a child process (the one harness every test that
//!   runs vublk uses), on [`process`]: children tied to the test's thread.
//! - [`pattern`]: the data every test writes and checks, and the comparison that names the first
//!   difference.
//! - [`vublk_binary`]: the vublk binary of this workspace, found or built.
//! - [`io_gate`]: the FIFO behind `--test-io-gate`, to hold a request in flight.
//! - [`ceph`]: a throwaway Ceph cluster (scripts/ceph-dev.sh) for the RBD backing's tests.

pub mod ceph;
pub mod daemon;
pub mod frontend;
pub mod io_gate;
pub mod pattern;
pub mod process;
pub mod vublk_binary;

pub use daemon::Daemon;
