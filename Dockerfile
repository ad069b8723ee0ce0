# vublk in a container: the release binary and the few libraries it links, on an empty base.
#
# Build it with scripts/container-image.sh, which builds the release binary and hands this file
# a context holding rootfs/usr/local/bin/vublk plus the files `ldd` names (libc.so.6,
# libgcc_s.so.1 and the dynamic loader), copied from the build machine:
#
#   scripts/container-image.sh            # podman build --pull=never -t vublk ...
#
# Why FROM scratch and not a distribution base: no registry is reachable from the build
# machines, so a base would have to be made locally (debootstrap --variant=minbase, then
# `podman import`), which costs minutes and a mirror on every CI run, for files vublk never
# uses. The image is ~21 MB and holds no shell: debug from the host (`podman logs`, /proc).
# Without /etc/group, `--socket-group` takes a numeric gid (or bind-mount /etc/group).
#
# Running it, as docs/deploy.md ("Containers") explains option by option; vmm-glue/tests/
# container.rs runs it so with podman 4.3 and runc:
#
#   podman --runtime runc run -d --name vublk --network none \
#       --pid=host --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup --cap-add SYS_NICE \
#       --security-opt seccomp=/etc/vublk/seccomp.json \
#       --ulimit nofile=16384:16384 --ulimit nproc=4096:4096 \
#       -v /srv/images:/images -v /run/vublk:/run/vublk vublk
#   qemu-system-x86_64 ... -chardev socket,id=c0,path=/run/vublk/vublk.sock \
#       -device vhost-user-blk-pci,chardev=c0
#
# - vublk runs as the supervisor and forks a worker per VM that takes the VMM's uid, gids,
#   rlimits and cgroups. It finds the VMM in /proc, so it needs the host's pids (--pid=host; in
#   a pid namespace of its own it closes every connection), and it joins the VMM's cgroups
#   through the host's cgroup tree, mounted writable. Without those, append --single-process.
# - The seccomp profile is podman's default plus io_uring_setup, io_uring_enter and
#   io_uring_register: podman's default profile (like Docker's since 25 and containerd 2's)
#   refuses them, and vublk cannot start a queue without io_uring.
# - runc, because crun refuses hybrid cgroup hierarchies; explicit ulimits, because podman's
#   defaults are above the hard limits of a host without CAP_SYS_RESOURCE to give.
# - vublk is the container's main process and handles SIGTERM itself (podman stop): it stops
#   its workers, which finish in-flight I/O, removes the socket and exits 0. It reaps its
#   workers, so no init process is needed.
#
# Arguments after the image name replace the default command line, e.g.
#   podman run ... vublk --socket-path /run/vublk/vublk.sock --blk-file /images/disk.img --num-queues 4
FROM scratch

COPY rootfs/ /

VOLUME ["/run/vublk", "/images"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/vublk"]
CMD ["--socket-path", "/run/vublk/vublk.sock", "--blk-file", "/images/disk.img"]
