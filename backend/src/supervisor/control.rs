//! The control socket (`--control-socket`, owner-only): `vublk status` and `vublk export
//! add|remove|list|resize|set`. A client sends one JSON [`Request`] and shuts down its writing side
//! (nothing at all asks for the status), then reads the answer until the supervisor closes.
//!
//! The supervisor serves it from its event loop without ever blocking: sockets are
//! non-blocking; a request is read up to [`MAX_REQUEST`] bytes; at most [`MAX_CLIENTS`] are open
//! at once (a new one past that closes the oldest); a client that has not sent its request and
//! taken its answer within [`CLIENT_TIMEOUT`] is closed.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::event_loop::clients::{Clients, Fill, Flush};

/// Longest request read; an export spec is a few hundred bytes.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Control connections open at once.
pub const MAX_CLIENTS: usize = 8;
/// How long a client may take to send its request and read the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a control client asks.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// The whole [`super::Status`] (also what an empty request asks).
    Status,
    /// Serve one more export, `spec` as `--export` takes it.
    ExportAdd { spec: String },
    /// Stop serving the export on `socket`; with `force`, even while VMs use it.
    ExportRemove { socket: PathBuf, force: bool },
    /// The backing of the export on `socket` grew: its devices re-read its size and tell their
    /// frontends.
    ExportResize { socket: PathBuf },
    /// The exports served now.
    ExportList,
    /// Change the QoS limits of the export on `socket`: `KEY=VALUE` items (qos/).
    ExportSet { socket: PathBuf, changes: String },
    /// Start `binary` (default: the path this daemon was started from) with this daemon's
    /// arguments on its listening sockets, and hand the VMs over to it (upgrade.rs).
    Upgrade { binary: Option<PathBuf> },
    /// The numbers `GET /metrics` shows, per VM and export ([`crate::metrics::Snapshot`]), for
    /// `vublk top`: built from what the supervisor holds, never by asking a worker.
    Counters,
}

/// The answer to an upgrade: the new daemon's pid, or why this daemon goes on serving.
pub type UpgradeReply = Result<u32, String>;

/// `vublk upgrade`: asks the daemon behind `control` to hand over to `binary`; prints the new
/// daemon's pid. `Err` is the line to print (the old daemon goes on serving).
pub fn upgrade_command(control: &Path, binary: Option<&Path>) -> Result<(), String> {
    let binary = binary
        .map(|b| std::path::absolute(b).map_err(|e| format!("{}: {e}", b.display())))
        .transpose()?;
    let body = ask(control, &Request::Upgrade { binary })
        .map_err(|e| format!("cannot ask the daemon on {}: {e}", control.display()))?;
    let reply: UpgradeReply = serde_json::from_slice(&body).map_err(|e| {
        format!(
            "the daemon on {} gave an answer that is not one: {e}",
            control.display()
        )
    })?;
    let pid = reply?;
    println!("{pid}");
    Ok(())
}

/// One export, as `vublk export list` shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExportInfo {
    pub socket: String,
    pub disk: String,
    pub read_only: bool,
    pub num_queues: u16,
    /// Connections of VMs to it, served or on their way to a worker.
    pub connections: usize,
    /// Its QoS limits (0: none).
    #[serde(default)]
    pub qos: crate::qos::QosLimits,
}

/// The answer to an export request: the exports afterwards, or why nothing changed.
pub type ExportReply = Result<Vec<ExportInfo>, String>;

/// Sends `request` to the supervisor behind `control` and returns its raw answer.
pub fn ask(control: &Path, request: &Request) -> io::Result<Vec<u8>> {
    let mut stream = UnixStream::connect(control)?;
    stream.write_all(&serde_json::to_vec(request).map_err(io::Error::other)?)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body)?;
    Ok(body)
}

/// `vublk export add|remove|list`: asks the supervisor behind the control socket and prints
/// the exports it serves afterwards; `Err` is the line to print (nothing changed).
pub fn export_command(command: &crate::cli::ExportCommand) -> Result<(), String> {
    use crate::cli::ExportCommand;
    let (control, request, json) = match command {
        ExportCommand::Add {
            control_socket,
            spec,
        } => (
            control_socket,
            Request::ExportAdd { spec: spec.clone() },
            false,
        ),
        ExportCommand::Remove {
            control_socket,
            socket,
            force,
        } => (
            control_socket,
            Request::ExportRemove {
                socket: socket.clone(),
                force: *force,
            },
            false,
        ),
        ExportCommand::List {
            control_socket,
            json,
        } => (control_socket, Request::ExportList, *json),
        ExportCommand::Set {
            control_socket,
            socket,
            settings,
        } => (
            control_socket,
            Request::ExportSet {
                socket: socket.clone(),
                changes: settings.join(","),
            },
            false,
        ),
        ExportCommand::Resize {
            control_socket,
            socket,
        } => (
            control_socket,
            Request::ExportResize {
                socket: socket.clone(),
            },
            false,
        ),
    };
    let body = ask(control, &request)
        .map_err(|e| format!("cannot ask the daemon on {}: {e}", control.display()))?;
    let reply: ExportReply = serde_json::from_slice(&body).map_err(|e| {
        format!(
            "the daemon on {} gave an answer that is not one: {e}",
            control.display()
        )
    })?;
    let exports = reply?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&exports).map_err(|e| e.to_string())?
        );
    } else if let Request::ExportResize { socket } = &request {
        let connections = exports
            .iter()
            .find(|e| std::path::Path::new(&e.socket) == socket.as_path())
            .map_or(0, |e| e.connections);
        println!(
            "{}: {connections} connected device(s) told to read the size again (the daemon's log \
             says what each found); new connections get the new size",
            socket.display()
        );
    } else if let Request::ExportSet { socket, .. } = &request {
        if let Some(e) = exports
            .iter()
            .find(|e| std::path::Path::new(&e.socket) == socket.as_path())
        {
            println!(
                "{}: qos {} ({} connection(s) told)",
                e.socket,
                e.qos.describe(),
                e.connections
            );
        }
    } else if matches!(request, Request::ExportList) {
        for e in &exports {
            println!(
                "{}  {}{}  {} queue(s)  {} connection(s)  qos: {}",
                e.socket,
                e.disk,
                if e.read_only { " (read-only)" } else { "" },
                e.num_queues,
                e.connections,
                e.qos.describe()
            );
        }
    }
    Ok(())
}

/// What the loop must do about a client after an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Wait until it is readable again.
    Read,
    /// Its request is complete: answer it with [`ControlClients::answer`].
    Answer(Vec<u8>),
    /// Wait until it has room to write.
    Write,
    /// It is done (or broken): it was closed.
    Closed,
}

/// The control connections open now: the shared client table (closing, deadlines), with the
/// control protocol's reading and answering added here.
pub type ControlClients = Clients<UnixStream>;

impl Default for ControlClients {
    fn default() -> ControlClients {
        Clients::new(MAX_CLIENTS, CLIENT_TIMEOUT)
    }
}

impl ControlClients {
    /// Accepts one waiting client; returns its id and stream, to be watched for reading.
    pub fn accept(&mut self, listener: &UnixListener, now: Instant) -> Option<(u64, &UnixStream)> {
        let (stream, _) = listener.accept().ok()?;
        stream.set_nonblocking(true).ok()?;
        let (id, _) = self.insert(stream, now);
        self.stream(id).map(|s| (id, s))
    }

    /// Client `id` is ready: reads its request until the client stops sending, or writes
    /// what fits of its answer. A client that is done is closed.
    pub fn on_ready(&mut self, id: u64) -> Next {
        let next = self.serve(id);
        if next == Next::Closed {
            self.close(id);
        }
        next
    }

    fn serve(&mut self, id: u64) -> Next {
        if !self.answered(id) {
            // The request ends where the client stops sending; past the bound it is refused.
            return match self.read(id, MAX_REQUEST + 1, |_| false) {
                Fill::Ended => Next::Answer(self.take_request(id)),
                Fill::Pending => Next::Read,
                Fill::Complete | Fill::Full | Fill::Broken => Next::Closed,
            };
        }
        match self.write(id) {
            Flush::Blocked => Next::Write,
            Flush::Done | Flush::Broken => Next::Closed,
        }
    }

    /// Gives client `id` its answer and writes what fits.
    pub fn answer(&mut self, id: u64, answer: Vec<u8>) -> Next {
        self.set_answer(id, answer);
        self.on_ready(id)
    }
}
