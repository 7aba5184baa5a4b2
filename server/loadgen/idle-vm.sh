#!/usr/bin/env bash
# `confab-bench compare idle` at more connections than this machine's open-file limit lets
# one process hold (a hard limit of 20,000 here, and raising it needs CAP_SYS_RESOURCE):
# inside a throwaway QEMU guest that boots Debian's kernel straight into an initramfs
# holding the release binaries, nats-server, busybox and taskset, with the guest's limit
# set to 300,000. Memory per connection is the same binaries' allocations on the same
# glibc, so it carries over; CPU does not when the guest is emulated (TCG, the default
# here: KVM inside this machine's own VM does not boot the guest kernel). Transparent huge
# pages are set to `madvise`, as on this machine: with Debian's default, `always`, huge
# pages fill in the untouched tails of every connection's buffers (38.9 KiB per connection
# at 50,000 instead of 29.5; BENCHMARKS.md).
#   bash server/loadgen/idle-vm.sh                      # 10,000 then 50,000 connections
#   CONNS=50000 QUIET=120s MEMORY=16G bash server/loadgen/idle-vm.sh
#   ACCEL=kvm bash server/loadgen/idle-vm.sh            # where nested KVM works
#   SERVER=/path/to/confab-server bash server/loadgen/idle-vm.sh   # another build (before/after)
# Needs root (apt-get) and about 2 GiB of guest memory per 10,000 connections. Prints
# each run's JSON, as `compare --json` does, or the bench's error (and then exits 1).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q --release -p confab-server -p confab-bench
conns=${CONNS:-10000 50000}
quiet=${QUIET:-30s}
memory=${MEMORY:-16G}
accel=${ACCEL:-tcg}
server=${SERVER:-target/release/confab-server}
# How the bench's failure reads: its own error line, or clap's for a bad argument.
failed='confab-bench:|error:'
command -v qemu-system-x86_64 >/dev/null ||
  apt-get install -y --no-install-recommends qemu-system-x86 >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Debian's kernel and a static busybox, unpacked rather than installed.
(
  cd "$work"
  kernel=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  apt-get download "$kernel" busybox-static >/dev/null 2>&1 ||
    { echo "idle-vm: apt-get download $kernel busybox-static failed" >&2; exit 1; }
  for deb in ./*.deb; do dpkg-deb -x "$deb" unpacked; done
)
root=$work/root
mkdir -p "$root"/{bin,usr/bin,usr/sbin,opt,lib64,lib/x86_64-linux-gnu,proc,sys,dev,tmp}
cp "$work"/unpacked/bin/busybox "$root"/bin/
cp "$(command -v taskset)" "$root"/usr/bin/
cp "$(command -v nats-server)" "$root"/usr/sbin/
cp "$server" "$root"/opt/confab-server
cp target/release/confab-bench "$root"/opt/
for binary in "$root"/opt/* "$root"/usr/bin/taskset "$root"/usr/sbin/nats-server; do
  ldd "$binary" | awk '/=> \//{print $3} /^[ \t]*\/lib64/{print $1}'
done | sort -u | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cat >"$root"/init <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
# The console is a terminal: no colour, so that clap's error line starts with "error:".
export PATH=/bin:/usr/bin:/usr/sbin:/opt HOME=/tmp NO_COLOR=1
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
ifconfig lo 127.0.0.1 up
# Two runs of 50,000 client sockets back to back: reuse the first run's TIME_WAIT ports.
echo 1 >/proc/sys/net/ipv4/tcp_tw_reuse
# Past 32,256 connections (half this range) connect() slows to 20-50 a second: it scans the
# ports of one parity first. So a 50,000 run takes over 30 minutes (BENCHMARKS.md).
echo "1024 65535" >/proc/sys/net/ipv4/ip_local_port_range
echo 65535 >/proc/sys/net/core/somaxconn
ulimit -Hn 300000; ulimit -Sn 300000
cd /tmp
for n in $conns; do
  echo "== compare idle --connections \$n"
  /opt/confab-bench compare idle --connections \$n --duration $quiet --json
done
poweroff -f
EOF
chmod +x "$root"/init
(cd "$root" && find . | "$work"/unpacked/bin/busybox cpio -o -H newc 2>/dev/null) |
  gzip -1 >"$work"/initrd.gz
qemu-system-x86_64 -accel "$accel" -cpu max -smp 2 -m "$memory" -nographic -no-reboot \
  -kernel "$work"/unpacked/boot/vmlinuz-* -initrd "$work"/initrd.gz \
  -append "console=ttyS0 quiet random.trust_cpu=on panic=-1 transparent_hugepage=madvise" |
  grep -a -E "^(==|\{|$failed)" | tee "$work"/out
# The guest powers off whether or not the bench succeeded: its error line is what says so.
! grep -q -a -E "^($failed)" "$work"/out
