# vublk in a container: the release binary built on the host, on a Debian 12 base made locally.
#
# No registry is reachable from the build machines, so there is no multi-stage build from a
# rust:* image. Instead:
#
# 1. The base image, once, from Debian's own packages (needs the debootstrap package):
#
#      debootstrap --variant=minbase bookworm /tmp/rootfs
#      tar -C /tmp/rootfs -c . | podman import - vublk-base
#
# 2. The binary, on a Debian 12 host (so it links the same glibc as the base):
#
#      cargo build --release
#
#    `ldd target/release/vublk` lists only libc.so.6, libgcc_s.so.1 and the dynamic loader
#    (plus the vDSO). minbase contains all of them (libc6 and libgcc-s1 are required packages),
#    so nothing else is copied. Check again after adding a dependency that links a C library.
#
# 3. The image, from a build context holding just the binary (not the multi-GB target/):
#
#      ctx=$(mktemp -d) && cp target/release/vublk "$ctx"/
#      podman build --pull=never -t vublk -f Dockerfile "$ctx"
#
# Running it: the image directory and the socket directory are volumes; the VMM on the host
# connects to <socket dir>/vublk.sock. vublk is PID 1 and handles SIGTERM itself (podman stop):
# it finishes in-flight I/O, removes the socket and exits 0. It starts no children, so no init
# process is needed.
#
#   truncate -s 10G /srv/images/disk.img
#   podman run -d --name vublk -v /srv/images:/images -v /run/vublk:/run/vublk vublk
#   qemu-system-x86_64 ... -chardev socket,id=c0,path=/run/vublk/vublk.sock \
#       -device vhost-user-blk-pci,chardev=c0
#
# Arguments after the image name replace the default command line, e.g.
#   podman run ... vublk --socket-path /run/vublk/vublk.sock --blk-file /images/disk.img --num-queues 4
#
# io_uring must be allowed: Docker's default seccomp profile (since Docker 25, moby#46762) and
# containerd 2's block io_uring_setup, io_uring_enter and io_uring_register, and vublk cannot
# serve without them. Check the profile of the runtime in use; pass one that allows the three
# (or --security-opt seccomp=unconfined while trying it out).
ARG BASE=vublk-base
FROM ${BASE}

COPY vublk /usr/local/bin/vublk

# Runs as root for now: it must open whatever image and socket directory it is given. Per-VM
# workers with the VMM's identity are the next step.
VOLUME ["/run/vublk", "/images"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/vublk"]
CMD ["--socket-path", "/run/vublk/vublk.sock", "--blk-file", "/images/disk.img"]
