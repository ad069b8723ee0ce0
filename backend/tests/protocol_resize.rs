//! `vublk export resize`, with the scripted frontend as the VMM: after the image grew, the
//! backend sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the backend request channel, GET_CONFIG
//! shows the new capacity, and I/O past the old end succeeds (it failed before). A smaller
//! image is refused: the capacity stays.

use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vublk_test_support::frontend::blk::{S_IOERR, S_OK};
use vublk_test_support::frontend::session::CONFIG_CHANGE_MSG;
use vublk_test_support::frontend::{Fixture, Session, SessionConfig, Step};

const VUBLK: &str = env!("CARGO_BIN_EXE_vublk");
const MIB: u64 = 1 << 20;

fn resize(control: &Path, socket: &Path) -> std::process::Output {
    let out = std::process::Command::new(VUBLK)
        .args(["export", "resize", "--control-socket"])
        .arg(control)
        .arg(socket)
        .output()
        .expect("run vublk export resize");
    assert!(
        out.status.success(),
        "vublk export resize failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn capacity(s: &mut Session) -> u64 {
    s.blk_config().expect("GET_CONFIG").capacity
}

#[test]
fn a_grown_image_reaches_the_frontend_and_shrinking_is_refused() {
    let control_dir = tempfile::tempdir().unwrap();
    let control = control_dir.path().join("control.sock");
    let mut fx = Fixture::start(
        VUBLK,
        8 * MIB,
        &["--control-socket", control.to_str().unwrap()],
    );
    let mut config = SessionConfig::default();
    config.protocol_features |= VhostUserProtocolFeatures::BACKEND_REQ;
    let steps = Step::qemu(config.num_queues);
    let mut s = fx.session_with(config, &steps);
    assert!(
        s.acked_protocol_features()
            .contains(VhostUserProtocolFeatures::BACKEND_REQ),
        "vublk does not offer BACKEND_REQ"
    );
    s.open_backend_channel().expect("SET_BACKEND_REQ_FD");
    assert_eq!(capacity(&mut s), 8 * MIB / 512);

    let old_end = 8 * MIB / 512;
    let data = vec![0x5a; 4096];
    assert_eq!(
        s.blk(0).write(old_end, &data).unwrap().status(),
        S_IOERR,
        "a write past the end must fail before the resize"
    );

    std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.image)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    resize(&control, &fx.socket);
    let request = s
        .recv_backend_request(Duration::from_secs(10))
        .expect("read the backend channel")
        .unwrap_or_else(|| {
            panic!(
                "no request on the backend channel\nlog:\n{}",
                fx.daemon.log()
            )
        });
    assert_eq!(request.code, CONFIG_CHANGE_MSG, "{request:?}");
    assert_eq!(request.size, 0, "{request:?}");
    assert_eq!(capacity(&mut s), 16 * MIB / 512);

    assert_eq!(s.blk(0).write(old_end, &data).unwrap().status(), S_OK);
    let last = 16 * MIB / 512 - 8;
    assert_eq!(s.blk(0).write(last, &data).unwrap().status(), S_OK);
    let back = s.blk(0).read(old_end, 4096).unwrap();
    assert_eq!(back.status(), S_OK);
    assert_eq!(back.data, data);
    assert_eq!(fx.image_bytes(8 * MIB, 4096), data);
    assert_eq!(
        s.blk(0).read(16 * MIB / 512, 512).unwrap().status(),
        S_IOERR,
        "the new end is an end too"
    );

    // Shrinking is refused: the capacity stays, the log says why.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.image)
        .unwrap()
        .set_len(12 * MIB)
        .unwrap();
    resize(&control, &fx.socket);
    fx.daemon
        .try_wait_for_log("vublk only grows a disk")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(capacity(&mut s), 16 * MIB / 512);
}
