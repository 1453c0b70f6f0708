#!/usr/bin/env bash
# Install the system packages hypyr needs on Debian/Ubuntu (as root; a no-op for what is present).
#   python3-venv       the project's virtualenv
#   qemu-system-x86    the nested lab (hosts without VT-x/AMD-V) and the benchmarks' QEMU baseline
#   dpkg / apt         apt-get download + dpkg-deb build the guest image and the lab's L1 initramfs
#   e2fsprogs          mkfs.ext4 -d builds the default rootfs; debugfs/e2fsck check disks in tests
#   dnsmasq-base       DHCP on networks made with hypyr net-create --dhcp
#   nftables           NAT on networks made with hypyr net-create --nat
#   iperf3             host/L1 end of the network throughput tests (the guest image carries its own)
#   libseccomp2        the VMM threads' seccomp filters (hypyr/vmm/seccomp.py, through ctypes)
# On Debian 12, QEMU comes from bookworm-backports (QEMU 10): the lab under bookworm's QEMU 7.2
# wedges and corrupts L2 network rings under load (measured: docs/lab.md).
set -euo pipefail
qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n '1s/.*version \([0-9]*\)\..*/\1/p'; }
old_qemu() { local v; v=$(qemu_major); [ -n "$v" ] && [ "$v" -lt 8 ]; }
# bookworm-backports in apt's sources (QEMU 10 below; the lab's second kernel series, 6.12, for
# its kernel matrix: make test-lab builds an image with linux-image-6.12-cloud-amd64)
backports_source() {
    grep -qs '^VERSION_CODENAME=bookworm$' /etc/os-release || return 0
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 0
    grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d && return 0
    printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
        'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
        > /etc/apt/sources.list.d/hypyr-bookworm-backports.sources
    echo "hypyr: added bookworm-backports to apt's sources" >&2
    apt-get update -q >/dev/null
}
backports_qemu() {
    grep -qs '^VERSION_CODENAME=bookworm$' /etc/os-release || return 0
    old_qemu || return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "hypyr: QEMU $(qemu_major) wedges the lab often; install qemu-system-x86 from bookworm-backports (docs/lab.md)" >&2
        return 0
    fi
    echo "hypyr: installing qemu-system-x86 from bookworm-backports (QEMU 7.2 wedges the lab)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
}
need=()
"${PYTHON:-python3}" -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v dpkg-deb >/dev/null || need+=(dpkg)
{ command -v mkfs.ext4 || [ -x /sbin/mkfs.ext4 ]; } >/dev/null || need+=(e2fsprogs)
[ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
{ command -v nft || [ -x /usr/sbin/nft ]; } >/dev/null || need+=(nftables)
command -v iperf3 >/dev/null || need+=(iperf3)
/sbin/ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2' || need+=(libseccomp2)
command -v iasl >/dev/null || need+=(acpica-tools)  # tests check the DSDT with ACPICA's disassembler
backports_source
if [ ${#need[@]} -eq 0 ]; then backports_qemu; exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "hypyr: please install these packages first: ${need[*]}" >&2
    exit 1
fi
echo "hypyr: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${need[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/dev/null; }
backports_qemu
