//! The `vmm-glue` binary: the exact text it prints, its refusals and exit codes, and `install`
//! against the real vublk binary.

mod common;

use common::{vmm_glue, vublk};
use vmm_glue::descriptor::{self, Descriptor, BLOCK_FEATURES};

#[test]
fn qemu_prints_the_fragment_as_shell_lines() {
    let (code, out, err) = vmm_glue(&[
        "qemu",
        "--socket",
        "/run/vublk/disk.sock",
        "--queues",
        "4",
        "--mem",
        "4G",
        "--qemu-version",
        "7.2",
        "--reconnect",
        "5",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "-m 4G \\\n\
         -object memory-backend-memfd,id=mem,size=4G,share=on \\\n\
         -numa node,memdev=mem \\\n\
         -chardev socket,id=vublk0,path=/run/vublk/disk.sock,reconnect=5 \\\n\
         -device vhost-user-blk-pci,chardev=vublk0,num-queues=4\n"
    );
}

#[test]
fn qemu_json_and_newer_versions() {
    let (code, out, err) = vmm_glue(&[
        "qemu",
        "--socket",
        "/run/vublk/disk.sock",
        "--queues",
        "1",
        "--mem",
        "512M",
        "--qemu-version",
        "10.2",
        "--reconnect",
        "2",
        "--queue-size",
        "256",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let args: Vec<String> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        args,
        [
            "-m",
            "512M",
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-numa",
            "node,memdev=mem",
            "-chardev",
            "socket,id=vublk0,path=/run/vublk/disk.sock,reconnect-ms=2000",
            "-device",
            "vhost-user-blk-pci,chardev=vublk0,num-queues=1,queue-size=256",
        ]
    );
}

#[test]
fn cloud_hypervisor_prints_the_fragment() {
    let (code, out, err) = vmm_glue(&[
        "cloud-hypervisor",
        "--socket",
        "/run/vublk/disk.sock",
        "--queues",
        "2",
        "--queue-size",
        "256",
        "--mem",
        "1G",
        "--cpus",
        "2",
        "--",
        "--kernel",
        "/boot/vmlinux",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "--memory size=1G,shared=on \\\n\
         --cpus boot=2 \\\n\
         --disk vhost_user=true,socket=/run/vublk/disk.sock,num_queues=2,queue_size=256 \\\n\
         --kernel /boot/vmlinux\n"
    );
}

#[test]
fn impossible_combinations_are_usage_errors_on_one_line() {
    let cases: [(&[&str], &str); 6] = [
        (
            &[
                "qemu",
                "--socket",
                "/s",
                "--queues",
                "4",
                "--backend-queues",
                "2",
                "--mem",
                "1G",
            ],
            "4 queues is more than the export offers (2, vublk --num-queues)",
        ),
        (
            &[
                "qemu",
                "--socket",
                "/s",
                "--queues",
                "1",
                "--mem",
                "1G",
                "--",
                "-object",
                "memory-backend-file,id=m1,size=1G,mem-path=/dev/shm/m1",
            ],
            "guest memory that is not shared cannot be mapped by vublk; add share=on",
        ),
        (
            &[
                "qemu", "--socket", "/s", "--queues", "1", "--mem", "1000001",
            ],
            "is not a multiple of the 4096-byte page",
        ),
        (
            &[
                "cloud-hypervisor",
                "--socket",
                "/s",
                "--queues",
                "1",
                "--queue-size",
                "100",
                "--mem",
                "1G",
            ],
            "queue size 100 is not a power of two",
        ),
        (
            &[
                "cloud-hypervisor",
                "--socket",
                "/s",
                "--queues",
                "2",
                "--queue-size",
                "128",
                "--mem",
                "1G",
            ],
            "cloud-hypervisor refuses a disk with more queues than boot vCPUs; pass --cpus 2",
        ),
        (
            &[
                "cloud-hypervisor",
                "--socket",
                "/s",
                "--queues",
                "1",
                "--queue-size",
                "128",
                "--mem",
                "1G",
                "--",
                "--memory",
                "size=1G",
            ],
            "--memory: vmm-glue sets --memory from --mem",
        ),
    ];
    for (args, want) in cases {
        let (code, out, err) = vmm_glue(args);
        assert_eq!(code, 2, "{args:?}: exit {code}, stderr {err}");
        assert!(out.is_empty(), "{args:?} printed {out}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("vmm-glue: ") && err.contains(want),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn reconnect_without_a_known_version_says_how_to_give_one() {
    let (code, _, err) = vmm_glue(&[
        "qemu",
        "--socket",
        "/s",
        "--queues",
        "1",
        "--mem",
        "1G",
        "--reconnect",
        "1",
        "--qemu",
        "/nonexistent/qemu",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("pass --qemu-version X.Y"), "{err}");
}

#[test]
fn run_refuses_a_socket_nobody_created() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let (code, _, err) = vmm_glue(&[
        "qemu",
        "--socket",
        sock.to_str().unwrap(),
        "--queues",
        "1",
        "--mem",
        "1G",
        "--run",
        "--qemu",
        "/bin/false",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("start vublk first"), "{err}");
}

/// The installed descriptor parses as QEMU's `VhostUserBackend`, names the binary it was given,
/// and that binary's `--print-capabilities` is the block backend with the schema's features.
#[test]
fn install_writes_a_descriptor_matching_vublk_capabilities() {
    let vublk = vublk();
    let prefix = tempfile::tempdir().unwrap();
    let (code, out, err) = vmm_glue(&[
        "install",
        "--prefix",
        prefix.path().to_str().unwrap(),
        "--binary",
        vublk.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let path = prefix.path().join("share/qemu/vhost-user/50-vublk.json");
    assert_eq!(out.trim(), path.to_str().unwrap());
    assert!(
        err.contains("not search"),
        "a temp prefix is not searched: {err}"
    );

    let d: Descriptor = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(d.binary, vublk);
    let caps = descriptor::capabilities(&vublk).unwrap();
    assert_eq!(caps.kind, d.kind);
    let mut features = caps.features.clone();
    features.sort();
    let mut all = BLOCK_FEATURES.map(String::from).to_vec();
    all.sort();
    assert_eq!(features, all, "vublk supports --read-only and --blk-file");
}
