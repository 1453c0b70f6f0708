#!/usr/bin/env bash
# `make demo`: boot two VMs side by side from the default image, each running a short scripted
# session, natively when the host has hardware virtualisation, otherwise inside the lab.
# DEMO_SHELL=1 boots one VM with an interactive shell instead (Ctrl-] leaves).
set -uo pipefail
PY=${PY:-.venv/bin/python}
here=$(cd "$(dirname "$0")" && pwd)

if [ "${HYPYR_IN_LAB:-}" != 1 ] && ! "$PY" -m hypyr doctor --native >/dev/null 2>&1; then
    echo "hypyr: this host has no usable hardware virtualisation ($("$PY" -m hypyr doctor --backend)); running the demo inside the lab." >&2
    if [ "${DEMO_SHELL:-}" = 1 ]; then
        exec "$PY" -m hypyr lab -- "$PY" -m hypyr run --vcpus 2
    fi
    exec "$PY" -m hypyr lab -- bash "$here/demo.sh"
fi

if [ "${DEMO_SHELL:-}" = 1 ]; then
    exec "$PY" -m hypyr run --vcpus 2
fi

session='echo "hello from $(hostname): $(uname -sr), $(nproc) vCPU(s), $(grep MemTotal /proc/meminfo | tr -s " ")"
echo "uptime: $(cut -d" " -f1 /proc/uptime) s; rng: $(cat /sys/class/misc/hw_random/rng_current 2>/dev/null || echo none)"
echo 3 2 1 | tr " " "\n" | while read n; do echo "countdown $n"; sleep 0.2; done'

# The two VMs share a bridge (a hypyr network made for the demo, removed at the end) and ping each other.
net=()
if "$PY" -m hypyr net-create hypyrdemo0 --subnet 10.79.0.1/24 >/dev/null; then
    trap '"$PY" -m hypyr net-destroy hypyrdemo0 >/dev/null' EXIT
    net=(hypyrdemo0)
else
    echo "hypyr demo: could not make the demo network; the VMs run without NICs" >&2
fi

run_vm() {  # name vcpus memory address peer
    local nic=() cmd="$session"
    if [ ${#net[@]} = 1 ]; then
        nic=(--net "bridge=${net[0]},ip=$4/24")
        cmd="$session
for i in \$(seq 1 40); do ping -c 1 -W 1 $5 >/dev/null && break; sleep 0.5; done
echo \"eth0 \$(cat /sys/class/net/eth0/address) $4 -> $5: \$(ping -c 3 $5 | tail -1)\""
    fi
    "$PY" -m hypyr run --no-input --vcpus "$2" --memory "$3" --append "hypyr.hostname=$1" "${nic[@]}" --exec "$cmd" 2>&1 \
        | sed -u "s/^/[$1] /"
    return "${PIPESTATUS[0]}"
}

echo "hypyr demo: booting two VMs at once on one bridge (vm1: 1 vCPU 256M, vm2: 2 vCPUs 384M)"
start=$(date +%s.%N)
run_vm vm1 1 256M 10.79.0.11 10.79.0.12 & p1=$!
run_vm vm2 2 384M 10.79.0.12 10.79.0.11 & p2=$!
wait $p1; rc1=$?
wait $p2; rc2=$?
end=$(date +%s.%N)
printf 'hypyr demo: vm1 exited %d, vm2 exited %d, %.1f s in all\n' "$rc1" "$rc2" "$(echo "$end - $start" | bc 2>/dev/null || echo 0)"
[ "$rc1" = 0 ] && [ "$rc2" = 0 ]
