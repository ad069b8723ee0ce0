//! Connection lifecycle: reconnecting after a frontend goes away (cleanly or with requests in
//! flight), and serving sockets handed over with `--fd` (listening and already connected).

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::time::Duration;

use common::*;

/// Successive clients (with different queue counts) see what the previous ones wrote, flushed
/// or not, and the daemon keeps serving the same socket.
#[test]
fn a_new_client_sees_the_previous_clients_data() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let size = 8 * MIB;
    let mut model = create_image(&img, size, 10);
    let mut daemon = Daemon::start(
        dir.path(),
        &["--blk-file", img.to_str().unwrap(), "--num-queues", "2"],
    );

    let region = MIB;
    for (cycle, nq) in [2, 1, 2, 1].into_iter().enumerate() {
        let mut client = Client::connect(&daemon.socket, nq);
        assert_eq!(client.capacity(), size, "capacity on connection {cycle}");
        // Everything written so far is visible, through the last queue of this connection.
        let last = nq as usize - 1;
        let got = client.q(last).read_range(0, size);
        assert_same(
            &got,
            &model,
            &format!("disk at the start of connection {cycle}"),
        );

        let offset = cycle as u64 * region + 4096;
        let data = pattern(200 + cycle as u64, offset, region as usize);
        assert_eq!(
            client.q(last).write_at(offset, &data),
            0,
            "write on connection {cycle}"
        );
        model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        if cycle % 2 == 0 {
            assert_eq!(client.q(0).flush(), 0, "flush on connection {cycle}");
        }
        drop(client);
        daemon.assert_running();
    }
    let mut client = Client::connect(&daemon.socket, 1);
    assert_same(
        &client.q(0).read_range(0, size),
        &model,
        "disk on the last connection",
    );
    drop(client);
    daemon.stop();
    assert_same(&std::fs::read(&img).unwrap(), &model, "image file");
}

/// A frontend that disappears with many requests in flight must not take the daemon down or
/// corrupt anything outside the ranges it was writing; the next client works normally.
#[test]
fn disconnect_with_requests_in_flight_leaves_the_daemon_serving() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let size = 48 * MIB;
    let model = create_image(&img, size, 11);
    let mut daemon = Daemon::start(dir.path(), &["--blk-file", img.to_str().unwrap()]);

    // The abandoned writes all go to the first 32 MiB; the rest must stay untouched.
    let busy = 32 * MIB;
    for attempt in 0..3u64 {
        let mut client = Client::connect_with(
            &daemon.socket,
            ClientOpts {
                buf_per_queue: 32 * MIB as usize,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("connect {attempt}: {e}"));
        let q = client.q(0);
        let data = pattern(300 + attempt, 0, busy as usize);
        q.buf()[..busy as usize].copy_from_slice(&data);
        let mut reqs = Vec::new();
        for i in 0..32u64 {
            reqs.push(Req::write(i * MIB, (i * MIB) as usize, MIB as usize));
            if i % 4 == 0 {
                reqs.push(Req::read(busy + i * 4096, (i * MIB) as usize, 4096));
            }
        }
        reqs.push(Req::Flush);
        q.submit_and_abandon(&reqs);
        drop(client);
        daemon.assert_running();
    }

    let mut client = Client::connect(&daemon.socket, 1);
    let q = client.q(0);
    let got = q.read_range(busy, size - busy);
    assert_same(
        &got,
        &model[busy as usize..],
        "the range no abandoned request touched",
    );
    let data = pattern(400, 0, 4 * MIB as usize);
    assert_eq!(q.write_at(0, &data), 0, "write after abandoned connections");
    assert_eq!(q.flush(), 0);
    assert_eq!(q.read_at(0, data.len()).expect("read back"), data);
    drop(client);
    daemon.stop();
}

/// `--fd N` with a listening socket: vublk accepts on it (more than once) and, not having
/// created it, leaves the socket file in place when it stops.
#[test]
fn fd_with_a_listening_socket() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let size = 4 * MIB;
    let mut model = create_image(&img, size, 12);
    let socket = dir.path().join("inherited.sock");
    let listener = UnixListener::bind(&socket).expect("bind");

    let mut cmd = Command::new(vublk_bin());
    cmd.args(["--fd", "3", "--blk-file", img.to_str().unwrap()]);
    pass_fd(&mut cmd, listener.as_raw_fd(), 3);
    let mut daemon = Daemon::spawn(cmd, dir.path(), socket.clone(), false);
    drop(listener); // only vublk's copy remains

    for cycle in 0..2u64 {
        let mut client = Client::connect(&socket, 1);
        assert_eq!(client.capacity(), size);
        let q = client.q(0);
        let data = pattern(500 + cycle, cycle * MIB, 64 * KIB as usize);
        assert_eq!(
            q.write_at(cycle * MIB, &data),
            0,
            "write on connection {cycle}"
        );
        model[(cycle * MIB) as usize..(cycle * MIB) as usize + data.len()].copy_from_slice(&data);
        assert_same(
            &q.read_range(0, size),
            &model,
            &format!("connection {cycle}"),
        );
        drop(client);
        daemon.assert_running();
    }
    // stop() checks the exit status and that the socket file is still there.
    daemon.stop();
    assert_same(&std::fs::read(&img).unwrap(), &model, "image file");
}

/// `--fd N` with an already-connected socket: vublk serves that one connection and exits 0 when
/// it ends. libblkio 0.5.1 cannot use a connected fd for vhost-user (its "fd" property is
/// vhost-vdpa only), so the test relays between a path libblkio connects to and one end of a
/// socketpair whose other end vublk inherits, passing SCM_RIGHTS fds along.
#[test]
fn fd_with_a_connected_socket_serves_one_connection_then_exits_0() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let size = 4 * MIB;
    let mut model = create_image(&img, size, 13);
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let relay_path = dir.path().join("relay.sock");
    let listener = UnixListener::bind(&relay_path).expect("bind relay");

    let mut cmd = Command::new(vublk_bin());
    cmd.args(["--fd", "3", "--blk-file", img.to_str().unwrap()]);
    pass_fd(&mut cmd, theirs.as_raw_fd(), 3);
    let mut daemon = Daemon::spawn(cmd, dir.path(), relay_path.clone(), false);
    drop(theirs);

    let relay = std::thread::spawn(move || {
        let (frontend, _) = listener.accept().expect("accept libblkio");
        let a = frontend.try_clone().unwrap();
        let b = ours.try_clone().unwrap();
        let to_vublk = std::thread::spawn(move || relay_one_way(&a, &b));
        relay_one_way(&ours, &frontend);
        to_vublk.join().unwrap();
    });

    let mut client = Client::connect(&relay_path, 1);
    assert_eq!(client.capacity(), size);
    let q = client.q(0);
    let data = pattern(600, MIB, 256 * KIB as usize);
    assert_eq!(
        q.write_at(MIB, &data),
        0,
        "write over the inherited connection"
    );
    assert_eq!(q.flush(), 0);
    model[MIB as usize..MIB as usize + data.len()].copy_from_slice(&data);
    assert_same(
        &q.read_range(0, size),
        &model,
        "disk over the inherited connection",
    );
    drop(client);

    let status = daemon.wait_exit(DAEMON_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "vublk --fd (connected) still running {DAEMON_TIMEOUT:?} after its connection ended; log:\n{}",
            daemon.log()
        )
    });
    daemon.check_clean_exit(status, "after its inherited connection ended");
    relay.join().expect("relay thread");
    assert_same(&std::fs::read(&img).unwrap(), &model, "image file");
}

/// Copies bytes and SCM_RIGHTS fds from `from` to `to` until EOF, then shuts `to` down for
/// writing so the peer sees the end too. vhost-user frontends wait for each reply before sending
/// a message with fds, so a message never shares a read with another's fds.
fn relay_one_way(from: &UnixStream, to: &UnixStream) {
    const MAX_FDS: usize = 16;
    let (from, to) = (from.as_raw_fd(), to.as_raw_fd());
    let mut buf = vec![0u8; 1 << 16];
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut cmsg_buf = [0u64; 64];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: all-zero is a valid msghdr.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg_buf) as _;
        // SAFETY: msg points at `iov`, `buf` and `cmsg_buf`, all live and large enough.
        let n = unsafe { libc::recvmsg(from, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            break;
        }
        let mut fds: Vec<RawFd> = Vec::new();
        // SAFETY: walking the control buffer recvmsg just filled, with the libc macros.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<RawFd>();
                    let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                        / std::mem::size_of::<RawFd>();
                    for i in 0..count {
                        fds.push(data.add(i).read_unaligned());
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        assert!(fds.len() <= MAX_FDS);
        if !send_with_fds(to, &buf[..n as usize], &fds) {
            break;
        }
        for fd in fds {
            // SAFETY: the fds came to us with the message and have been sent on; we own them.
            unsafe { libc::close(fd) };
        }
    }
    // SAFETY: shutdown(2) on a socket we own.
    unsafe { libc::shutdown(to, libc::SHUT_WR) };
}

fn send_with_fds(to: RawFd, mut data: &[u8], fds: &[RawFd]) -> bool {
    let mut first = true;
    while !data.is_empty() {
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut _,
            iov_len: data.len(),
        };
        let mut cmsg_buf = [0u64; 64];
        // SAFETY: all-zero is a valid msghdr.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if first && !fds.is_empty() {
            let payload = std::mem::size_of_val(fds);
            // SAFETY: cmsg_buf (512 bytes) holds one header plus up to 16 fds; the macros only
            // compute offsets into it.
            unsafe {
                msg.msg_control = cmsg_buf.as_mut_ptr().cast();
                msg.msg_controllen = libc::CMSG_SPACE(payload as u32) as _;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(c),
                    payload,
                );
            }
        }
        // SAFETY: msg points at live buffers set up above.
        let n = unsafe { libc::sendmsg(to, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        first = false;
        data = &data[n as usize..];
    }
    true
}

/// The daemon survives a client that connects and goes away without a word, and one that
/// fails to start (asks for too many queues).
#[test]
fn idle_and_failed_connections_do_not_disturb_the_daemon() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let model = create_image(&img, 2 * MIB, 14);
    let mut daemon = Daemon::start(dir.path(), &["--blk-file", img.to_str().unwrap()]);
    let deadline = std::time::Instant::now() + DAEMON_TIMEOUT;
    loop {
        match UnixStream::connect(&daemon.socket) {
            Ok(s) => {
                drop(s);
                break;
            }
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("connect: {e}"),
        }
    }
    let bad = Client::connect_with(
        &daemon.socket,
        ClientOpts {
            num_queues: 2,
            ..Default::default()
        },
    );
    assert!(bad.is_err(), "two queues started on a one-queue vublk");
    daemon.assert_running();
    let mut client = Client::connect(&daemon.socket, 1);
    assert_same(&client.q(0).read_range(0, 2 * MIB), &model, "disk");
    drop(client);
    daemon.stop();
}
