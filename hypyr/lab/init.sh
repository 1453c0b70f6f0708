#!/bin/sh
# hypyr lab: /init of the L1 Linux VM (busybox sh).
# Mounts the host's / (read-only 9p "hostroot") as the new root, the job directory (read-write 9p
# "hypyrjob") at its host path, then runs <job>/job.sh chrooted with stdio on the serial console
# and leaves its exit status in <job>/exit-status. Stays silent unless something goes wrong.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin

fail() {
    echo "hypyr lab (L1): $*" >/dev/console
    sync
    echo 0 >/proc/sys/kernel/printk
    poweroff -f
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
[ -e /dev/stdin ] || ln -s /proc/self/fd/0 /dev/stdin
[ -e /dev/stdout ] || ln -s /proc/self/fd/1 /dev/stdout
[ -e /dev/stderr ] || ln -s /proc/self/fd/2 /dev/stderr

while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/$mod" || echo "hypyr lab (L1): could not load $mod" >/dev/console
done < /etc/hypyr/modules

JOB=""
NINEP_OPTS="trans=virtio,version=9p2000.L,msize=262144"
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        hypyr.job=*) JOB="${arg#hypyr.job=}" ;;
        hypyr.9p=*) NINEP_OPTS="$NINEP_OPTS,${arg#hypyr.9p=}" ;;
    esac
done
[ -n "$JOB" ] || fail "no hypyr.job= on the kernel command line"

mkdir -p /job /newroot
mount -t 9p -o "$NINEP_OPTS" hypyrjob /job || fail "cannot mount the job directory"
# The host root is read-only, so the guest may cache it freely (measured: Python starts
# ~2.5x faster than with the default cache=none).
mount -t 9p -o "$NINEP_OPTS,ro,cache=loose" hostroot /newroot || fail "cannot mount the host root"

# lab.conf sets STTY (console flags), KEEP (host paths under /tmp to keep visible) and SHARE
# (a host directory L1 may write to, exported read-write as 9p "hypyrshare").
KEEP=""
STTY=""
SHARE=""
KALLSYMS=0
[ -f /job/lab.conf ] && . /job/lab.conf

# A writable /tmp hides the host's /tmp: carry the paths the job needs across it.
i=0
for p in $KEEP; do
    mkdir -p "/keep/$i" && mount --bind "/newroot$p" "/keep/$i"
    i=$((i + 1))
done
mount -t tmpfs -o mode=1777,size=${TMPSIZE:-50%} tmpfs /newroot/tmp
i=0
for p in $KEEP; do
    mkdir -p "/newroot$p" && mount --move "/keep/$i" "/newroot$p"
    i=$((i + 1))
done

mount -t tmpfs -o mode=755 tmpfs /newroot/run 2>/dev/null
mount --bind /proc /newroot/proc
mount --bind /sys /newroot/sys
# cgroup2 (unified hierarchy) for the jobs, as on a modern host: hypyr's scheduler knobs use it.
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup || echo "hypyr lab (L1): could not mount cgroup2" >/dev/console
mount --bind /dev /newroot/dev
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts && ln -sf pts/ptmx /newroot/dev/ptmx
mkdir -p "/newroot$JOB" 2>/dev/null
mount --bind /job "/newroot$JOB" || fail "cannot mount the job directory at $JOB"
if [ -n "$SHARE" ]; then
    mkdir -p "/newroot$SHARE" 2>/dev/null
    mount -t 9p -o "$NINEP_OPTS" hypyrshare "/newroot$SHARE" || fail "cannot mount the shared directory $SHARE"
fi

# Heartbeat: the host sees L1 alive while this file's mtime moves. Nested KVM under QEMU TCG
# sometimes wedges L1 with no kernel message at all; the host then stops the lab within
# --stall seconds instead of waiting for --timeout.
(while :; do touch /job/heartbeat; sleep 5; done) </dev/null >/dev/null 2>&1 &
# Once per kernel release the host asks for L1's text symbols, to name where a wedged CPU was.
if [ "$KALLSYMS" = 1 ]; then
    (grep ' [tTwW] ' /proc/kallsyms >/job/kallsyms.part && mv /job/kallsyms.part /job/kallsyms) </dev/null >/dev/null 2>&1 &
fi

hostname hypyr-lab
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up 2>/dev/null
con=/dev/ttyS0
[ -n "$STTY" ] && stty $STTY <"$con"
: >/job/started

# setsid -c makes the console the job's controlling terminal, so ^C reaches it.
setsid -c chroot /newroot /bin/sh "$JOB/job.sh" <"$con" >"$con" 2>&1
echo "$?" >/job/exit-status
sync
echo 0 >/proc/sys/kernel/printk  # no "reboot: Power down" in the command's output
poweroff -f
