#!/bin/sh
# hypyr guest /init (busybox sh). The first line it prints is measured by a benchmark: keep it first.
echo "hypyr: init started"
export PATH=/sbin:/bin:/usr/sbin:/usr/bin

# Ctrl-Alt-Del (what `hypyr shutdown` sends) means: power off cleanly.  With ctrl-alt-del set
# to 0 the kernel sends SIGINT to init instead of rebooting at once.
graceful_poweroff() {
    echo "hypyr: Ctrl-Alt-Del received, powering off"
    sync
    poweroff -f
}
trap graceful_poweroff INT

# (the same script is /sbin/init on the default rootfs, where these may already be mounted)
[ -e /proc/self ] || mount -t proc proc /proc
mounted() { grep -q " $1 " /proc/mounts; }
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev 2>/dev/null
mounted /tmp || mount -t tmpfs -o mode=1777 tmpfs /tmp
echo 0 > /proc/sys/kernel/ctrl-alt-del 2>/dev/null
[ -e /dev/console ] || mknod -m 600 /dev/console c 5 1
[ -e /dev/null ] || mknod -m 666 /dev/null c 1 3
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd

if [ -f /etc/hypyr/modules ]; then
    while read -r mod; do
        [ -n "$mod" ] || continue
        insmod "/lib/modules/$mod" 2>/dev/null || echo "hypyr: could not load module $mod"
    done < /etc/hypyr/modules
fi

exec_b64=""
console=/dev/console
host=hypyr
root=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root="${arg#root=}" ;;
        hypyr.exec=*) exec_b64="${arg#hypyr.exec=}" ;;
        hypyr.console=*) console="/dev/${arg#hypyr.console=}" ;;
        hypyr.hostname=*) host="${arg#hypyr.hostname=}" ;;
    esac
done
hostname "$host"

# root=/dev/vdX: the initramfs has loaded the drivers; mount the disk and switch to it.
if [ -n "$root" ] && [ ! -e /etc/hypyr/rootfs ] && [ "$$" = 1 ]; then
    n=0
    while [ ! -b "$root" ] && [ $n -lt 100 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    mkdir -p /newroot
    if mount -t ext4 -o rw "$root" /newroot; then
        for m in dev proc sys; do
            mkdir -p "/newroot/$m"
            mount --move "/$m" "/newroot/$m"
        done
        umount /tmp 2>/dev/null
        exec switch_root /newroot /sbin/init
    fi
    echo "hypyr: could not mount the root filesystem $root; staying in the initramfs"
fi

# A console device created by a module (hvc0) may take a moment to appear.
n=0
while [ ! -e "$console" ] && [ $n -lt 50 ]; do
    sleep 0.1
    n=$((n + 1))
done
[ -e "$console" ] || console=/dev/console

if [ -n "$exec_b64" ]; then
    cmd="$(echo "$exec_b64" | base64 -d)"
    # in the background, so that the INT trap runs while we wait
    sh -c "$cmd" <"$console" >"$console" 2>&1 &
    wait $!
    rc=$?
    # hypyr's paravirtual exit port: one byte, the exit status, to I/O port 0xf4.
    # /dev/port is missing from kernels built without CONFIG_DEVPORT (the Debian cloud
    # kernel), so the image carries a tiny helper that does the write with ioperm + out.
    if [ -e /dev/port ]; then
        printf "\\$(printf %03o "$((rc & 255))")" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
    else
        /bin/hypyr-exit "$((rc & 255))"
    fi
    poweroff -f
fi

echo "hypyr guest ready"
if [ "$console" = /dev/console ]; then
    setsid cttyhack sh &
else
    setsid sh -c "exec sh <$console >$console 2>&1" &
fi
wait $!
poweroff -f
