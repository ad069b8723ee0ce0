//! Exports at run time (`vublk export add|remove|resize|set|list` on the control socket): the supervisor
//! checks a new export as it checks those on its command line, binds its socket and accepts
//! on it; removes one no VM uses (or, forced, tells the workers to stop its devices). Nothing
//! is persisted: the orchestrator owns the configuration.

use std::path::PathBuf;

use crate::disk::{Disk, DiskSpec};
use crate::endpoint::{Endpoint, Listener, SocketAccess};
use crate::export::{ExportSpec, OpenAs};
use crate::handoff::{self, ToWorker};

use super::control::{ExportInfo, ExportReply, Request};
use super::{Event, Export, Supervisor};

/// What `--export` specs take from the daemon-wide options unless they set their own; the
/// same for those added at run time.
#[derive(Debug, Clone, Default)]
pub struct ExportDefaults {
    pub retire_timeout_ms: u64,
    pub poll_max_us: u64,
    pub socket: SocketAccess,
    /// Test only (`--test-io-gate`, `--test-io-gate-offset`).
    pub test_io_gate: Option<PathBuf>,
    pub test_io_gate_offset: Option<u64>,
}

impl ExportDefaults {
    pub fn apply(&self, spec: &mut ExportSpec) {
        spec.retire_timeout_ms = self.retire_timeout_ms;
        spec.poll_max_us = self.poll_max_us;
        spec.test_io_gate = self.test_io_gate.clone();
        spec.test_io_gate_offset = self.test_io_gate_offset;
        spec.socket.mode = spec.socket.mode.or(self.socket.mode);
        spec.socket.group = spec.socket.group.or(self.socket.group);
    }
}

impl Supervisor {
    /// Answers an export request; `Err` says why nothing changed.
    pub(super) fn export_request(&mut self, request: Request) -> ExportReply {
        match request {
            Request::Status | Request::Counters | Request::Upgrade { .. } => {
                Err("not an export request".into())
            }
            Request::ExportList => Ok(self.export_list()),
            Request::ExportAdd { spec } => self.add_export(&spec).map(|()| self.export_list()),
            Request::ExportRemove { socket, force } => self
                .remove_export(&socket, force)
                .map(|()| self.export_list()),
            Request::ExportResize { socket } => {
                self.resize_export(&socket).map(|()| self.export_list())
            }
            Request::ExportSet { socket, changes } => self
                .set_export_qos(&socket, &changes)
                .map(|()| self.export_list()),
        }
    }

    fn export_list(&self) -> Vec<ExportInfo> {
        self.exports
            .iter()
            .enumerate()
            .filter(|(_, e)| e.listener.is_some())
            .map(|(index, e)| ExportInfo {
                socket: e.spec.name.clone(),
                disk: match &e.spec.disk {
                    DiskSpec::Path(path) => path.display().to_string(),
                    DiskSpec::Null { size } => format!("null:{size}"),
                    DiskSpec::Rbd(rbd) => format!("rbd:{}/{}", rbd.pool, rbd.image),
                },
                read_only: e.spec.open.read_only,
                num_queues: e.spec.device.num_queues,
                connections: self.connections_to(index),
                qos: e.spec.qos,
            })
            .collect()
    }

    /// Connections of VMs to export `index`: served, sent, or waiting for a worker.
    fn connections_to(&self, index: usize) -> usize {
        self.vms
            .values()
            .map(|vm| {
                vm.live.values().filter(|&&e| e == index).count()
                    + vm.outbox.iter().filter(|h| h.export == index).count()
                    + vm.pending
                        .iter()
                        .filter(|h| h.export == index && !vm.live.contains_key(&h.connection))
                        .count()
            })
            .sum()
    }

    fn add_export(&mut self, spec: &str) -> Result<(), String> {
        let (endpoint, mut spec) = crate::cli::parse_export(spec)?;
        let Endpoint::Path(path) = &endpoint else {
            return Err("an export added at run time needs socket-path= (not fd=)".into());
        };
        if self.find_export(path).is_some() {
            return Err(format!("{} is already an export", path.display()));
        }
        self.export_defaults.apply(&mut spec);
        // As at start-up: the image must open before anyone may connect.
        if let DiskSpec::Path(image) = &spec.disk {
            if spec.open_as == OpenAs::Daemon {
                let (_, id) = Disk::open_for_daemon(image, spec.open, None)
                    .map_err(|e| crate::error_line(&e))?;
                spec.daemon_file = Some(id);
            } else {
                Disk::open_file(image, spec.open).map_err(|e| crate::error_line(&e))?;
            }
        }
        let listener = endpoint
            .open(spec.socket)
            .map_err(|e| crate::error_line(&e))?;
        let Listener::Listening {
            listener: socket, ..
        } = &listener
        else {
            return Err("not a listening socket".into());
        };
        let index = self.exports.len();
        let watched = socket
            .set_nonblocking(true)
            .and_then(|()| self.events.watch(socket, Event::Listener(index)));
        if let Err(e) = watched {
            listener.cleanup();
            return Err(format!("cannot accept on {}: {e}", path.display()));
        }
        tracing::info!("export {} added", spec.name);
        self.exports.push(Export::new(spec, listener));
        Ok(())
    }

    fn remove_export(&mut self, socket: &std::path::Path, force: bool) -> Result<(), String> {
        let index = self
            .find_export(socket)
            .ok_or_else(|| format!("{} is not an export", socket.display()))?;
        let connections = self.connections_to(index);
        if connections > 0 && !force {
            return Err(format!(
                "{} has {connections} VM connection(s); --force stops them",
                socket.display()
            ));
        }
        if connections > 0 {
            self.stop_export_devices(index);
        }
        if let Some(listener) = self.exports[index].listener.take() {
            if let Listener::Listening { listener: l, .. } = &listener {
                self.events.unwatch(l);
            }
            listener.cleanup();
        }
        tracing::info!("export {} removed", socket.display());
        Ok(())
    }

    /// Tells the workers serving the export on `socket` to read its backing's size again. The
    /// workers probe it (the supervisor may not be able to open a backing a VMM's user owns)
    /// and log what they found; connections not served yet open the backing afresh anyway.
    fn resize_export(&mut self, socket: &std::path::Path) -> Result<(), String> {
        let index = self
            .find_export(socket)
            .ok_or_else(|| format!("{} is not an export", socket.display()))?;
        for vm in self.vms.values() {
            let mut connections: Vec<u64> = vm
                .live
                .iter()
                .filter(|(_, &e)| e == index)
                .map(|(&c, _)| c)
                .collect();
            connections.sort_unstable();
            for connection in connections {
                if let Err(e) = handoff::send(&vm.control, &ToWorker::Resize { connection }, &[]) {
                    tracing::warn!(
                        "cannot tell worker pid {} to resize connection {connection}: {e}",
                        vm.worker_pid
                    );
                }
            }
        }
        tracing::info!("export {}: resize asked", socket.display());
        Ok(())
    }

    /// Changes the QoS limits of the export on `socket`: for connections from now on (its
    /// spec) and for the devices served or on their way to a worker (which take messages in
    /// order, so a device handed over before this gets the change after it started).
    fn set_export_qos(&mut self, socket: &std::path::Path, changes: &str) -> Result<(), String> {
        let index = self
            .find_export(socket)
            .ok_or_else(|| format!("{} is not an export", socket.display()))?;
        let qos = self.exports[index].spec.qos.with_changes(changes)?;
        self.exports[index].spec.qos = qos;
        for vm in self.vms.values() {
            for connection in vm.sent_connections(index) {
                let message = ToWorker::SetQos { connection, qos };
                if let Err(e) = handoff::send(&vm.control, &message, &[]) {
                    tracing::warn!(
                        "cannot give worker pid {} the new limits of connection {connection}: {e}",
                        vm.worker_pid
                    );
                }
            }
        }
        tracing::info!("export {}: qos {}", socket.display(), qos.describe());
        Ok(())
    }

    /// Tells the workers serving export `index` to stop its devices (the ends come back as
    /// `Ended` reports); closes its connections still waiting for a worker.
    fn stop_export_devices(&mut self, index: usize) {
        for vm in self.vms.values_mut() {
            vm.outbox.retain(|h| h.export != index);
            for connection in vm.sent_connections(index) {
                if let Err(e) = handoff::send(&vm.control, &ToWorker::Stop { connection }, &[]) {
                    // A worker that cannot take the message is full or gone: its VM keeps
                    // the connection until it ends; the socket is gone all the same.
                    tracing::warn!(
                        "cannot tell worker pid {} to stop connection {connection}: {e}",
                        vm.worker_pid
                    );
                }
            }
        }
    }

    /// The export listening on `socket` (as given on its command line or to `export add`).
    fn find_export(&self, socket: &std::path::Path) -> Option<usize> {
        self.exports.iter().position(|e| {
            matches!(&e.listener, Some(Listener::Listening { created: Some(p), .. }) if p == socket)
                || (e.listener.is_some() && e.spec.name == socket.display().to_string())
        })
    }
}
