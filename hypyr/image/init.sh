#!/bin/sh
# hypyr guest /init (busybox sh). The first line it prints is measured by a benchmark: keep it
# first, and the kernel's uptime ahead of "hypyr: init started" on it (bench/boot.py tells the
# guest's own time from the VMM's by it).
[ -e /proc/self ] || mount -t proc proc /proc
read -r uptime _ < /proc/uptime
echo "[${uptime:-?}] hypyr: init started"
export PATH=/sbin:/bin:/usr/sbin:/usr/bin

# `hypyr shutdown` presses the ACPI power button (a watcher below turns it into SIGUSR1) or, if
# the kernel's ACPI does not listen to it, sends Ctrl-Alt-Del: both mean power off cleanly.  With
# ctrl-alt-del set to 0 the kernel sends SIGINT to init instead of rebooting at once.
graceful_poweroff() {
    echo "hypyr: $1, powering off"
    sync
    poweroff -f
}
trap 'graceful_poweroff "Ctrl-Alt-Del received"' INT
trap 'graceful_poweroff "power button pressed"' USR1

# (the same script is /sbin/init on the default rootfs, where these may already be mounted)
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

# The ACPI power button (the button and evdev modules): any event from it means power off.
for d in /sys/class/input/input*; do
    [ "$(cat "$d/name" 2>/dev/null)" = "Power Button" ] || continue
    for e in "$d"/event*; do
        [ -r "$e/dev" ] || continue
        dev="/dev/input/${e##*/}"
        [ -c "$dev" ] || { mkdir -p /dev/input; mknod "$dev" c $(tr : ' ' < "$e/dev"); }
        (dd if="$dev" of=/dev/null bs=24 count=1 2>/dev/null && kill -USR1 1) &
    done
done

exec_b64=""
console=/dev/console
host=hypyr
host_set=""
root=""
ipconf=""
netcfg=""
netgw=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root="${arg#root=}" ;;
        hypyr.exec=*) exec_b64="${arg#hypyr.exec=}" ;;
        hypyr.console=*) console="/dev/${arg#hypyr.console=}" ;;
        hypyr.hostname=*) host="${arg#hypyr.hostname=}"; host_set=1 ;;
        ip=*) ipconf="${arg#ip=}" ;;
        hypyr.ip.*=*) a="${arg#hypyr.ip.}"; netcfg="$netcfg eth${a%%=*}=${a#*=}" ;;
        hypyr.gw=*) netgw="${arg#hypyr.gw=}" ;;
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

# Networking. The cloud kernel's NIC driver is a module, so the kernel's own ip= autoconfiguration
# never sees the NIC: init does it with busybox, from the same command-line syntax:
#   ip=CLIENT:SERVER:GW:NETMASK:HOSTNAME:DEV:AUTOCONF[:DNS0:DNS1]
#       static CLIENT on DEV (default eth0); NETMASK dotted or empty (classful, as the kernel does);
#       GW becomes the default route, HOSTNAME the host name (unless hypyr.hostname= is given),
#       DNS0/DNS1 go to /etc/resolv.conf; an empty CLIENT with AUTOCONF dhcp/on/any/both means DHCP
#   ip=dhcp (or on, any, both)   DHCP on eth0 (busybox udhcpc)
#   ip=off, ip=none              nothing
#   hypyr.ip.N=ADDR/PREFIX       static address on ethN (hypyr.ip.N=dhcp: DHCP on ethN)
#   hypyr.gw=ADDR                default route (with hypyr.ip.N)
net_wait() {
    n=0
    while [ ! -e "/sys/class/net/$1" ] && [ $n -lt 20 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    [ -e "/sys/class/net/$1" ] || { echo "hypyr: no network interface $1"; return 1; }
}
net_dhcp() {
    net_wait "$1" || return 1
    ip link set "$1" up
    # Up to three runs of 10 tries 1 s apart.  In the lab a first run has given up within a few
    # seconds while a second one got a lease at once (docs/networking.md); each failure is shown.
    for run in 1 2 3; do
        out=$(udhcpc -i "$1" -q -n -t 10 -T 1 -s /etc/hypyr/udhcpc.script 2>&1) && return 0
        echo "hypyr: DHCP on $1 failed (run $run, uptime $(cut -d' ' -f1 /proc/uptime) s): $(echo "$out" | tail -n 1)"
    done
    echo "hypyr: no DHCP lease on $1"
}
net_static() {  # DEV ADDR/PREFIX
    net_wait "$1" || return 1
    ip addr add "$2" dev "$1" && ip link set "$1" up
}
net_kernel_ip() {
    case "$1" in
        off|none|"") return 0 ;;
        dhcp|on|any|both|bootp|rarp) net_dhcp eth0; return ;;
    esac
    oldifs=$IFS
    IFS=:
    set -f
    set -- $1
    set +f
    IFS=$oldifs
    client=$1 gw=$3 mask=$4 name=$5 dev=${6:-eth0} auto=$7 dns0=$8 dns1=$9
    if [ -z "$client" ]; then
        case "$auto" in dhcp|on|any|both) net_dhcp "$dev" ;; esac
        return
    fi
    prefix=$(ipcalc -p "$client" $mask 2>/dev/null)
    prefix=${prefix#PREFIX=}
    net_static "$dev" "$client/${prefix:-24}" || return 1
    [ -n "$gw" ] && ip route add default via "$gw" dev "$dev"
    [ -n "$name" ] && [ -z "$host_set" ] && hostname "$name"
    if [ -n "$dns0$dns1" ]; then
        : >/etc/resolv.conf
        for d in $dns0 $dns1; do echo "nameserver $d" >>/etc/resolv.conf; done
    fi
    return 0
}
ip link set lo up 2>/dev/null
net_kernel_ip "$ipconf"
for c in $netcfg; do
    case "${c#*=}" in
        dhcp) net_dhcp "${c%%=*}" ;;
        *) net_static "${c%%=*}" "${c#*=}" ;;
    esac
done
[ -z "$netgw" ] || ip route add default via "$netgw"

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
