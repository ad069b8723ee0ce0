//! The HTTP side of `--metrics-addr`: `GET /metrics` answered from the daemon's own event
//! loop, without threads and without ever blocking.
//!
//! Not a crate (tiny_http, hyper): they serve from threads of their own, and the supervisor
//! must stay single-threaded to fork its workers (supervisor/spawn.rs). What is needed is
//! small: one request line per connection, one response, then close.
//!
//! A scraper cannot hold the daemon: sockets are non-blocking; a request is read up to
//! [`MAX_REQUEST`] bytes; at most [`MAX_CLIENTS`] connections are open at once, and a new one
//! past that closes the oldest (so idle connections cannot lock scrapers out: one must keep
//! opening connections faster than a scrape takes, milliseconds); a connection that has not
//! sent its request and taken its response within [`CLIENT_TIMEOUT`] is closed. Responses are
//! `Connection: close`.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::event_loop::clients::{Clients, Fill, Flush};

/// Longest request (line and headers) read; Prometheus sends about 300 bytes.
pub const MAX_REQUEST: usize = 8 * 1024;
/// Connections open at once; Prometheus uses one per scrape.
pub const MAX_CLIENTS: usize = 8;
/// How long a connection may take to send its request and read the response.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections accepted per wakeup, so a flood of them does not hold the loop.
const ACCEPTS_PER_WAKEUP: usize = 16;

/// The content type of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the loop must do about a connection after an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Wait until it is readable again.
    Read,
    /// Wait until it has room to write.
    Write,
    /// It is done (or broken): it was closed.
    Closed,
}

/// The listening socket and its connections.
pub struct MetricsServer {
    listener: TcpListener,
    clients: Clients<TcpStream>,
}

impl MetricsServer {
    /// Listens on `addr` (non-blocking).
    pub fn bind(addr: SocketAddr) -> io::Result<MetricsServer> {
        // Passed by the daemon this one replaces (`vublk upgrade`), or bound here.
        let listener = match crate::endpoint::inherited::take_tcp_listener(addr) {
            Some(listener) => listener,
            None => TcpListener::bind(addr)?,
        };
        listener.set_nonblocking(true)?;
        Ok(MetricsServer {
            listener,
            clients: Clients::new(MAX_CLIENTS, CLIENT_TIMEOUT),
        })
    }

    pub fn listener(&self) -> &TcpListener {
        &self.listener
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts what is waiting; returns the new connections, to be watched for reading.
    /// Past [`MAX_CLIENTS`] a connection is closed at once.
    pub fn accept(&mut self, now: Instant) -> Vec<(u64, &TcpStream)> {
        let mut ids = Vec::new();
        for _ in 0..ACCEPTS_PER_WAKEUP {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Nothing more waiting, or a failure (out of descriptors) the next scrape
                // retries.
                Err(_) => break,
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let (id, evicted) = self.clients.insert(stream, now);
            if let Some(oldest) = evicted {
                ids.retain(|&id| id != oldest);
            }
            ids.push(id);
        }
        ids.into_iter()
            .filter_map(|id| self.clients.stream(id).map(|s| (id, s)))
            .collect()
    }

    /// The stream of connection `id`, to change how it is watched.
    pub fn stream(&self, id: u64) -> Option<&TcpStream> {
        self.clients.stream(id)
    }

    /// Connection `id` is ready: reads its request, answers it with `body()` for
    /// `GET /metrics`, writes what fits. A connection that is done is closed (which takes it
    /// out of any epoll set: the stream is never duplicated).
    pub fn on_ready(&mut self, id: u64, body: impl FnOnce() -> String) -> Next {
        let next = self.serve(id, body);
        if next == Next::Closed {
            self.close(id);
        }
        next
    }

    fn serve(&mut self, id: u64, body: impl FnOnce() -> String) -> Next {
        if !self.clients.answered(id) {
            let answer = match self.clients.read(id, MAX_REQUEST, |request| {
                find(request, b"\r\n\r\n").is_some()
            }) {
                Fill::Complete => {
                    let request = self.clients.take_request(id);
                    let end = find(&request, b"\r\n\r\n").unwrap_or(request.len());
                    ResponseFor::of(&request[..end])
                }
                Fill::Full => ResponseFor::Status(431, "Request Header Fields Too Large"),
                Fill::Pending => return Next::Read,
                // The peer stopped sending before a whole request: nothing to answer.
                Fill::Ended | Fill::Broken => return Next::Closed,
            };
            self.clients.set_answer(id, answer.render(body));
        }
        match self.clients.write(id) {
            Flush::Blocked => Next::Write,
            Flush::Done | Flush::Broken => Next::Closed,
        }
    }

    /// Forgets connection `id`, closing it (never blocks: no SO_LINGER).
    pub fn close(&mut self, id: u64) {
        self.clients.close(id);
    }

    /// Connections past their deadline at `now`.
    pub fn overdue(&self, now: Instant) -> Vec<u64> {
        self.clients.overdue(now)
    }

    /// The earliest deadline of a connection.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.clients.next_deadline()
    }
}

/// The answer a request gets.
enum ResponseFor {
    Metrics { head: bool },
    Status(u16, &'static str),
}

impl ResponseFor {
    fn of(head: &[u8]) -> ResponseFor {
        let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
        let mut words = line.split(|&b| b == b' ');
        let (method, target) = (words.next(), words.next());
        let path = target.map(|t| t.split(|&b| b == b'?').next().unwrap_or_default());
        match (method, path) {
            (Some(b"GET"), Some(b"/metrics")) => ResponseFor::Metrics { head: false },
            (Some(b"HEAD"), Some(b"/metrics")) => ResponseFor::Metrics { head: true },
            (Some(b"GET" | b"HEAD"), Some(_)) => ResponseFor::Status(404, "Not Found"),
            (Some(_), Some(_)) => ResponseFor::Status(405, "Method Not Allowed"),
            _ => ResponseFor::Status(400, "Bad Request"),
        }
    }

    /// The whole response; `body` is called only for `/metrics`.
    fn render(self, body: impl FnOnce() -> String) -> Vec<u8> {
        let (status, reason, content_type, body, head) = match self {
            ResponseFor::Metrics { head } => (200, "OK", CONTENT_TYPE, body(), head),
            ResponseFor::Status(status, reason) => (
                status,
                reason,
                "text/plain; charset=utf-8",
                format!("{reason}\n"),
                false,
            ),
        };
        let mut response = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        if !head {
            response.extend_from_slice(body.as_bytes());
        }
        response
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn server() -> MetricsServer {
        MetricsServer::bind("127.0.0.1:0".parse().unwrap()).unwrap()
    }

    /// Connects, sends `request`, and has the server answer it (polling it, as the loop would).
    fn exchange(server: &mut MetricsServer, request: &[u8]) -> String {
        let mut client = TcpStream::connect(server.local_addr().unwrap()).unwrap();
        client.write_all(request).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut ids = Vec::new();
        while ids.is_empty() && Instant::now() < deadline {
            ids = server
                .accept(Instant::now())
                .into_iter()
                .map(|(id, _)| id)
                .collect();
        }
        let id = ids[0];
        while server.on_ready(id, || "vublk_up 1\n".into()) != Next::Closed {
            assert!(Instant::now() < deadline, "no answer");
        }
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        answer
    }

    #[test]
    fn get_metrics_gets_the_body_and_anything_else_a_status() {
        let mut s = server();
        let ok = exchange(&mut s, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains(CONTENT_TYPE) && ok.ends_with("\r\n\r\nvublk_up 1\n"),
            "{ok}"
        );
        let head = exchange(&mut s, b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n");
        assert!(
            head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        for (request, status) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], "404"),
            (b"POST /metrics HTTP/1.1\r\n\r\n", "405"),
            (b"\r\n\r\n", "400"),
        ] {
            let answer = exchange(&mut s, request);
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status} ")),
                "{answer}"
            );
        }
    }

    #[test]
    fn a_request_past_the_limit_is_refused_unread() {
        let mut s = server();
        let mut request = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        request.resize(MAX_REQUEST + 100, b'a');
        let answer = exchange(&mut s, &request);
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    }

    /// Idle connections cannot lock scrapers out: past the limit the oldest goes, and a
    /// connection that sends nothing goes at its deadline.
    #[test]
    fn idle_connections_make_room() {
        let mut s = server();
        let now = Instant::now();
        let idle: Vec<TcpStream> = (0..MAX_CLIENTS + 1)
            .map(|_| TcpStream::connect(s.local_addr().unwrap()).unwrap())
            .collect();
        // Ids count the connections accepted.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !s.clients.contains(idle.len() as u64) && Instant::now() < deadline {
            s.accept(now);
        }
        assert_eq!(s.clients.len(), MAX_CLIENTS);
        assert!(!s.clients.contains(1), "the oldest is closed");
        assert!(s.overdue(now).is_empty());
        assert_eq!(s.overdue(now + CLIENT_TIMEOUT).len(), MAX_CLIENTS);
        assert_eq!(s.next_deadline(), Some(now + CLIENT_TIMEOUT));
    }
}
