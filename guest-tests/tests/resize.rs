//! `vublk export resize` with a real guest: the image grows while the guest runs, vublk tells
//! QEMU (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG), and the guest's `/sys/block/vda/size` changes
//! without a reboot; the guest then writes past the old end, and the host finds it in the
//! image.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use guest_tests::{guest_test, paths, read_at, sparse_image, start_vublk, Job, Vm, MIB};

/// Printed on the console (outside the step's captured output) once the guest has read the
/// size it starts with: the host grows the image then.
const READY: &str = "@@RESIZE-READY@@";

const OLD: u64 = 64 * MIB;
const NEW: u64 = 128 * MIB;
const STAMP_AT: u64 = 100 * MIB;

fn script() -> String {
    format!(
        "before=$(cat /sys/block/vda/size)
echo \"before $before\"
echo {READY} >/dev/console
i=0
while [ \"$(cat /sys/block/vda/size)\" = \"$before\" ] && [ $i -lt 300 ]; do
    sleep 1
    i=$((i + 1))
done
echo \"after $(cat /sys/block/vda/size)\"
echo resized-stamp | dd of=/dev/vda bs=512 seek={} conv=notrunc,fsync 2>/dev/null
",
        STAMP_AT / 512
    )
}

#[test]
fn a_grown_image_grows_the_guest_disk_without_a_reboot() {
    guest_test("resize", |dir| {
        let image = dir.join("disk.img");
        sparse_image(&image, OLD)?;
        let control = dir.join("control.sock");
        let mut vublk = start_vublk(
            dir,
            "vublk",
            &[
                "--blk-file",
                image.to_str().unwrap(),
                "--control-socket",
                control.to_str().unwrap(),
            ],
        )?;
        let socket = vublk.socket().to_path_buf();
        let mut job = Job::new();
        job.sh("resize", &script());
        let vm = Vm::default().disk(&socket, 1);
        let console = dir.join("resize.console");
        let boot = std::thread::scope(|s| -> Result<_> {
            let guest = s.spawn(|| vm.boot(dir, "resize", &job));
            let deadline = Instant::now() + Duration::from_secs(900);
            let mut resized = false;
            while !guest.is_finished() {
                let seen = std::fs::read_to_string(&console).unwrap_or_default();
                if !resized && seen.contains(READY) {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&image)?
                        .set_len(NEW)?;
                    let out = std::process::Command::new(paths::vublk_bin()?)
                        .args(["export", "resize", "--control-socket"])
                        .arg(&control)
                        .arg(&socket)
                        .output()
                        .context("vublk export resize")?;
                    ensure!(
                        out.status.success(),
                        "vublk export resize: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    resized = true;
                }
                if Instant::now() > deadline {
                    bail!("the guest did not finish");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let boot = guest.join().expect("guest thread")?;
            ensure!(resized, "the guest never said it was ready for the resize");
            Ok(boot)
        })?;
        let out = boot.ok("resize")?;
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        let want = [
            format!("before {}", OLD / 512),
            format!("after {}", NEW / 512),
        ];
        ensure!(
            lines == want,
            "guest saw {lines:?}, want {want:?}\nvublk log:\n{}",
            vublk.log()
        );
        ensure!(
            read_at(&image, STAMP_AT, 13)? == b"resized-stamp",
            "the guest's write past the old end is not in the image"
        );
        boot.check_kernel(&[])?;
        Ok(vublk.try_stop()?)
    });
}
