#!/bin/busybox sh
# /init of the guest-tests initramfs (guest-tests/src/init.sh, packed by image.rs).
#
# Mounts the usual file systems, loads the virtio modules listed in /etc/vublk/modules, waits for
# the number of virtio disks given in /job/disks, runs /job/run.sh (appended to the initramfs
# per boot by the harness), dumps dmesg and powers off. Everything the harness reads is printed
# on the serial console between marker lines (see console.rs):
#
#   @@VUBLK@@ OUT <name>    the step's stdout follows
#   @@VUBLK@@ ERR <name>    its stderr follows
#   @@VUBLK@@ RC <name> <exit code>
#   @@VUBLK@@ DONE          init reached the end (a boot without it failed)

/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null

M='@@VUBLK@@'

# step NAME CMD...: runs CMD with stdout and stderr kept apart, then prints both and the exit code
# between markers. Output goes to files first so kernel messages printed meanwhile cannot land in
# the middle of it.
step() {
    name=$1
    shift
    "$@" </dev/null >"/tmp/step.$name.out" 2>"/tmp/step.$name.err"
    rc=$?
    echo "$M OUT $name"
    cat "/tmp/step.$name.out"
    echo
    echo "$M ERR $name"
    cat "/tmp/step.$name.err"
    echo
    echo "$M RC $name $rc"
    return $rc
}

load_modules() {
    for m in $(cat /etc/vublk/modules); do
        if [ -e "/lib/modules/vublk/$m.ko" ]; then
            insmod "/lib/modules/vublk/$m.ko" || return 1
        elif [ -e "/lib/modules/vublk/$m.ko.xz" ]; then
            xz -d -c "/lib/modules/vublk/$m.ko.xz" >"/tmp/$m.ko" && insmod "/tmp/$m.ko" || return 1
        fi
        # Neither: built into the kernel (a custom kernel), nothing to load.
    done
}

wait_disks() {
    want=$(cat /job/disks)
    i=0
    while [ $i -lt 300 ]; do
        n=0
        for d in /sys/block/vd*; do
            [ -e "$d" ] && [ -b "/dev/${d##*/}" ] && n=$((n + 1))
        done
        [ "$n" -ge "$want" ] && { ls /sys/block; return 0; }
        sleep 0.1
        i=$((i + 1))
    done
    echo "only $n of $want virtio disks appeared" >&2
    ls /sys/block >&2
    return 1
}

echo "$M BOOTED $(cut -d' ' -f1 /proc/uptime)"
if step modules load_modules && step disks wait_disks; then
    cd /job
    . /job/run.sh
fi
step dmesg dmesg
echo "$M DONE"
sync
poweroff -f
