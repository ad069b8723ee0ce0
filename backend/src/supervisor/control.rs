//! The control socket (`--control-socket`, owner-only): `vublk status` and `vublk export
//! add|remove|list|resize|set`. A client sends one JSON [`Request`] and shuts down its writing side
//! (nothing at all asks for the status), then reads the answer until the supervisor closes.
//! Every command asks through [`ask`], which gives up after a timeout (a stopped or wedged
//! daemon never answers, and a command must not hang on it).
//!
//! The supervisor serves it from its event loop without ever blocking: sockets are
//! non-blocking; a request is read up to [`MAX_REQUEST`] bytes; at most [`MAX_CLIENTS`] are open
//! at once (a new one past that closes the oldest); a client that has not sent its request and
//! taken its answer within [`CLIENT_TIMEOUT`] is closed, except one that asked for an upgrade,
//! which is kept until the upgrade's outcome ([`super::upgrade::UPGRADE_CLIENT_HOLD`]).

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::event_loop::clients::{Clients, Fill, Flush};

/// Longest request read; an export spec is a few hundred bytes.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Control connections open at once.
pub const MAX_CLIENTS: usize = 8;
/// How long a client may take to send its request and read the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `vublk status`, `vublk export` and `vublk top` wait for the daemon: it answers
/// from its event loop at once, so only a stopped or wedged daemon takes longer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `vublk upgrade` waits for the daemon: it answers once the new daemon said it is
/// ready, or, when it did not within [`super::upgrade::UPGRADE_DEADLINE`], once it killed it,
/// and keeps the client that long ([`super::upgrade::UPGRADE_CLIENT_HOLD`]); the rest is room
/// for a loaded machine. Its workers stop after it answered.
pub const UPGRADE_ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
const _: () = assert!(
    UPGRADE_ANSWER_TIMEOUT.as_secs() > super::upgrade::UPGRADE_CLIENT_HOLD.as_secs(),
    "vublk upgrade must outwait the daemon's hold on it"
);

/// Why a control command got no answer.
#[derive(Debug, Error)]
pub enum AskError {
    #[error("cannot ask the daemon on {path}")]
    Ask {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the daemon on {path} did not answer within {} s", .timeout.as_secs_f64())]
    NoAnswer { path: PathBuf, timeout: Duration },
}

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
    let body = ask(
        control,
        &Request::Upgrade { binary },
        UPGRADE_ANSWER_TIMEOUT,
    )
    .map_err(|e| crate::error_line(&e))?;
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

/// Sends `request` to the supervisor behind `control` and returns its raw answer; gives up
/// when connecting, sending and reading the answer took `timeout` together.
pub fn ask(control: &Path, request: &Request, timeout: Duration) -> Result<Vec<u8>, AskError> {
    exchange(control, request, Instant::now() + timeout).map_err(|source| match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => AskError::NoAnswer {
            path: control.to_path_buf(),
            timeout,
        },
        _ => AskError::Ask {
            path: control.to_path_buf(),
            source,
        },
    })
}

/// [`ask`]'s exchange; past `deadline`, an error of kind `WouldBlock` or `TimedOut`.
fn exchange(control: &Path, request: &Request, deadline: Instant) -> io::Result<Vec<u8>> {
    let request = serde_json::to_vec(request).map_err(io::Error::other)?;
    let mut stream = connect(control, time_left(deadline)?)?;
    stream.set_write_timeout(Some(time_left(deadline)?))?;
    stream.write_all(&request)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut body = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        stream.set_read_timeout(Some(time_left(deadline)?))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(body),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Connects to `control` within `timeout`. A daemon that stopped accepting leaves its
/// connections in the listening socket's backlog, and once that is full a unix socket's
/// connect waits for room, for at most the socket's send timeout (SO_SNDTIMEO), which
/// `UnixStream::connect` cannot set beforehand.
fn connect(control: &Path, timeout: Duration) -> io::Result<UnixStream> {
    use rustix::net::{sockopt, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    sockopt::set_socket_timeout(&fd, sockopt::Timeout::Send, Some(timeout))?;
    rustix::net::connect(&fd, &SocketAddrUnix::new(control)?)?;
    Ok(UnixStream::from(fd))
}

/// The time left until `deadline`; none left is a `TimedOut` error.
fn time_left(deadline: Instant) -> io::Result<Duration> {
    match deadline.saturating_duration_since(Instant::now()) {
        left if left.is_zero() => Err(io::ErrorKind::TimedOut.into()),
        left => Ok(left),
    }
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
    let body = ask(control, &request, ANSWER_TIMEOUT).map_err(|e| crate::error_line(&e))?;
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

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// How long a test waits for `ask` to give up before it calls it hung.
    const HUNG: Duration = Duration::from_secs(20);

    /// `ask` for the status on a thread, so that a hang fails the test instead of holding it.
    fn ask_within(control: &Path, timeout: Duration) -> Result<Vec<u8>, AskError> {
        let (tx, rx) = mpsc::channel();
        let control = control.to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(ask(&control, &Request::Status, timeout));
        });
        rx.recv_timeout(HUNG)
            .expect("ask did not give up within its timeout")
    }

    fn assert_no_answer(result: Result<Vec<u8>, AskError>, control: &Path) {
        match result {
            Err(e @ AskError::NoAnswer { .. }) => {
                let line = e.to_string();
                assert!(line.contains(&control.display().to_string()), "{line}");
                assert!(line.contains("did not answer within 0.2 s"), "{line}");
            }
            other => panic!("not a timeout: {other:?}"),
        }
    }

    #[test]
    fn the_answer_is_what_the_daemon_wrote_until_it_closed() {
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("control.sock");
        let listener = UnixListener::bind(&control).unwrap();
        let daemon = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            stream.read_to_end(&mut request).unwrap();
            stream.write_all(b"the answer").unwrap();
            request
        });
        let answer = ask_within(&control, Duration::from_secs(10)).unwrap();
        assert_eq!(answer, b"the answer");
        let request: Request = serde_json::from_slice(&daemon.join().unwrap()).unwrap();
        assert!(matches!(request, Request::Status), "{request:?}");
    }

    /// A daemon that accepts (or whose socket accepts for it) and never answers.
    #[test]
    fn a_daemon_that_does_not_answer_is_given_up_on() {
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("control.sock");
        let _listener = UnixListener::bind(&control).unwrap();
        assert_no_answer(ask_within(&control, Duration::from_millis(200)), &control);
    }

    /// A daemon stopped long enough has its backlog full of the connections it did not
    /// accept; a connect then waits for room, and must not wait longer than the timeout.
    #[test]
    fn a_full_backlog_does_not_hold_the_connect() {
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("control.sock");
        let socket = || {
            rustix::net::socket_with(
                AddressFamily::UNIX,
                SocketType::STREAM,
                SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
                None,
            )
            .unwrap()
        };
        let address = SocketAddrUnix::new(&control).unwrap();
        let listener = socket();
        rustix::net::bind(&listener, &address).unwrap();
        rustix::net::listen(&listener, 0).unwrap();
        let mut waiting = Vec::new();
        loop {
            let client = socket();
            match rustix::net::connect(&client, &address) {
                Ok(()) => waiting.push(client),
                Err(rustix::io::Errno::AGAIN) => break,
                Err(e) => panic!("connect: {e}"),
            }
            assert!(waiting.len() < 100, "the backlog never filled");
        }
        assert_no_answer(ask_within(&control, Duration::from_millis(200)), &control);
    }
}
