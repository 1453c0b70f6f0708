#!/usr/bin/env bash
# Install the system packages hypyr needs on Debian/Ubuntu (as root; a no-op for what is present).
#   python3-venv       the project's virtualenv
#   qemu-system-x86    the nested lab (hosts without VT-x/AMD-V) and the benchmarks' QEMU baseline
#   dpkg / apt         apt-get download + dpkg-deb build the guest image and the lab's L1 initramfs
#   e2fsprogs          mkfs.ext4 -d builds the default rootfs; debugfs/e2fsck check disks in tests
#   dnsmasq-base       DHCP on networks made with hypyr net-create --dhcp
#   nftables           NAT on networks made with hypyr net-create --nat
#   iperf3             host/L1 end of the network throughput tests (the guest image carries its own)
set -euo pipefail
need=()
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v dpkg-deb >/dev/null || need+=(dpkg)
{ command -v mkfs.ext4 || [ -x /sbin/mkfs.ext4 ]; } >/dev/null || need+=(e2fsprogs)
[ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
{ command -v nft || [ -x /usr/sbin/nft ]; } >/dev/null || need+=(nftables)
command -v iperf3 >/dev/null || need+=(iperf3)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "hypyr: please install these packages first: ${need[*]}" >&2
    exit 1
fi
echo "hypyr: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${need[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/dev/null; }
