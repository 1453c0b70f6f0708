#!/bin/sh
# Inside the lab: boot the system image (`make system-image`) under hypyr and under QEMU/KVM in
# turn, ROUNDS times each, to the login prompt and HOLD seconds after, and print per boot whether
# the guest lived, how long it took and how many IPIs L1 took meanwhile (docs/lab.md, "QEMU's L2
# guests fault too"). Run from the repository root:
#   .venv/bin/python -m hypyr lab --timeout 2400 -- sh scripts/lab-fault-ab.sh [ROUNDS] [HOLD]
set -u
ROUNDS=${1:-6}; HOLD=${2:-40}
IMG=${HYPYR_SYSTEM_IMAGE:-$HOME/.cache/hypyr/system/system.img}
PY=${PY:-.venv/bin/python}
[ -f "$IMG" ] || { echo "no system image at $IMG (make system-image)" >&2; exit 1; }
W=$(mktemp -d)
release=$(debugfs -R "ls /boot" "$IMG" 2>/dev/null | tr ' ' '\n' | sed -n 's/^vmlinuz-//p' | head -n1)
debugfs -R "dump /boot/vmlinuz-$release $W/vmlinuz" "$IMG" 2>/dev/null
debugfs -R "dump /boot/initrd.img-$release $W/initrd" "$IMG" 2>/dev/null
[ -s "$W/vmlinuz" ] && [ -s "$W/initrd" ] || { echo "cannot read the kernel and initrd from $IMG" >&2; exit 1; }
ipis() { awk '/CAL:/ {n = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i; print n}' /proc/interrupts; }
for r in $(seq 1 "$ROUNDS"); do
  for vmm in hypyr qemu; do
    cp --sparse=always "$IMG" "$W/disk.img"
    log=$W/$vmm-$r.log; : >"$log"
    if [ $vmm = hypyr ]; then
      $PY -m hypyr run --disk "$W/disk.img" --boot disk --vcpus 2 --memory 512M --no-input >"$log" 2>&1 &
    else
      qemu-system-x86_64 -M pc -accel kvm -cpu host -smp 2 -m 512 -nodefaults -no-user-config -no-reboot \
        -display none -serial "file:$log" -kernel "$W/vmlinuz" -initrd "$W/initrd" \
        -append "root=/dev/vda ro console=ttyS0" -drive "file=$W/disk.img,format=raw,if=virtio" >/dev/null 2>&1 &
    fi
    pid=$!; ipi0=$(ipis); start=$(date +%s); state=timeout
    while [ $(( $(date +%s) - start )) -lt 400 ]; do
      if ! kill -0 $pid 2>/dev/null; then state=died; break; fi
      if grep -q "login:" "$log"; then state=login; break; fi
      sleep 1
    done
    took=$(( $(date +%s) - start ))
    if [ $state = login ]; then
      sleep "$HOLD"
      kill -0 $pid 2>/dev/null || state=died-after-login
    fi
    echo "round $r $vmm: $state after ${took} s, $(( $(ipis) - ipi0 )) function-call IPIs in L1"
    kill $pid 2>/dev/null; wait $pid 2>/dev/null
  done
done
rm -rf "$W"
