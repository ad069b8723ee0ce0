//! The control socket (`--control-socket`, owner-only): `vublk status` and `vublk export
//! add|remove|list|resize`. A client sends one JSON [`Request`] and shuts down its writing side
//! (nothing at all asks for the status), then reads the answer until the supervisor closes.
//!
//! The supervisor serves it from its event loop without ever blocking: sockets are
//! non-blocking; a request is read up to [`MAX_REQUEST`] bytes; at most [`MAX_CLIENTS`] are open
//! at once (a new one past that closes the oldest); a client that has not sent its request and
//! taken its answer within [`CLIENT_TIMEOUT`] is closed.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

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
    } else if matches!(request, Request::ExportList) {
        for e in &exports {
            println!(
                "{}  {}{}  {} queue(s)  {} connection(s)",
                e.socket,
                e.disk,
                if e.read_only { " (read-only)" } else { "" },
                e.num_queues,
                e.connections
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

struct Client {
    stream: UnixStream,
    request: Vec<u8>,
    /// The answer and how much of it was written.
    answer: Option<(Vec<u8>, usize)>,
    deadline: Instant,
}

/// The control connections open now.
#[derive(Default)]
pub struct ControlClients {
    clients: HashMap<u64, Client>,
    next_id: u64,
}

impl ControlClients {
    /// Accepts one waiting client; returns its id and stream, to be watched for reading.
    pub fn accept(&mut self, listener: &UnixListener, now: Instant) -> Option<(u64, &UnixStream)> {
        let (stream, _) = listener.accept().ok()?;
        stream.set_nonblocking(true).ok()?;
        if self.clients.len() >= MAX_CLIENTS {
            // Ids grow with time: the smallest is the oldest.
            if let Some(&oldest) = self.clients.keys().min() {
                self.close(oldest);
            }
        }
        self.next_id += 1;
        let id = self.next_id;
        self.clients.insert(
            id,
            Client {
                stream,
                request: Vec::new(),
                answer: None,
                deadline: now + CLIENT_TIMEOUT,
            },
        );
        self.clients.get(&id).map(|c| (id, &c.stream))
    }

    pub fn stream(&self, id: u64) -> Option<&UnixStream> {
        self.clients.get(&id).map(|c| &c.stream)
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
        let Some(client) = self.clients.get_mut(&id) else {
            return Next::Closed;
        };
        if client.answer.is_none() {
            let mut buf = [0u8; 4096];
            loop {
                if client.request.len() > MAX_REQUEST {
                    return Next::Closed;
                }
                match client.stream.read(&mut buf) {
                    Ok(0) => return Next::Answer(std::mem::take(&mut client.request)),
                    Ok(n) => client.request.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Read,
                    Err(_) => return Next::Closed,
                }
            }
        }
        let Some((answer, written)) = &mut client.answer else {
            return Next::Closed;
        };
        while *written < answer.len() {
            match client.stream.write(&answer[*written..]) {
                Ok(0) => return Next::Closed,
                Ok(n) => *written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Write,
                Err(_) => return Next::Closed,
            }
        }
        Next::Closed
    }

    /// Gives client `id` its answer and writes what fits.
    pub fn answer(&mut self, id: u64, answer: Vec<u8>) -> Next {
        if let Some(client) = self.clients.get_mut(&id) {
            client.answer = Some((answer, 0));
        }
        self.on_ready(id)
    }

    /// Forgets client `id`, closing it.
    pub fn close(&mut self, id: u64) {
        if let Some(client) = self.clients.remove(&id) {
            let _ = client.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Clients past their deadline at `now`.
    pub fn overdue(&self, now: Instant) -> Vec<u64> {
        self.clients
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.clients.values().map(|c| c.deadline).min()
    }
}
