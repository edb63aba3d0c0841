#!/usr/bin/env bash
# Builds the Debian image of the VM scenario once and caches it outside the
# repository (run as root):
#
#   scripts/vm/build-image.sh [RELEASE]     # bookworm (default) or trixie
#
# prints the image directory, /var/cache/meshcapture-vm/RELEASE/KEY
# (MESHCAPTURE_VM_CACHE overrides /var/cache/meshcapture-vm), where KEY is a
# hash of this script: a changed script builds a new image, an unchanged one
# is reused. The directory holds
#   disk.qcow2        the root file system (ext4, no partition table, /dev/vda);
#                     tests boot a throw-away overlay of it, never it
#   vmlinuz, initrd.img   the image's own kernel and initramfs (direct boot)
#   host_key.pub      the VM's SSH host key (for known_hosts)
#   cmdline           the kernel command line the image expects
#   manifest.txt      the installed packages and the local repository's
#
# The image is debootstrap's minbase of RELEASE from the Debian mirror this
# machine's apt uses (MESHCAPTURE_VM_MIRROR overrides it) with the kernel
# (linux-image-amd64), systemd, udev, dbus, openssh-server, python3,
# python3-apt (Ansible's apt module needs it in check mode; Debian servers
# usually have it), iproute2 and ifupdown, and nothing the capture role
# installs itself:
# iptables, nftables and python3-pyroute2 are NOT installed. The VM has no
# internet, so the image carries a local apt repository,
# file:/opt/meshcapture-apt (trusted=yes, indexed with dpkg-scanpackages, the
# only apt source), holding exactly the .debs that `apt-get install iptables
# nftables python3-pyroute2` needs on this image; its package lists are
# already fetched, so the role's apt install works offline as on a host with
# a mirror.
#
# Network (eth0, net.ifnames=0): 192.0.2.10/24 and 2001:db8::10/64, gateway
# .1/::1, nameserver 192.0.2.1, written for ifupdown (/etc/network/interfaces,
# enabled) and for systemd-networkd (/etc/systemd/network/10-eth0.network,
# disabled); `meshcapture-vm-net networkd|ifupdown` in the VM switches which
# one brings the network up at the next boot. The root account's SSH key
# comes from the kernel command line (meshcapture.authorized_key=<base64 of
# an authorized_keys line>, written by meshcapture-test-key.service before
# sshd starts), so every test makes its own key.
set -euo pipefail

RELEASE="${1:-bookworm}"
case "$RELEASE" in
    bookworm|trixie) ;;
    *) echo "build-image.sh: unsupported release '$RELEASE' (bookworm or trixie)" >&2; exit 2 ;;
esac
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_ROOT="${MESHCAPTURE_VM_CACHE:-/var/cache/meshcapture-vm}"
KEY="$(sha256sum "$HERE/build-image.sh" | cut -c1-16)"
OUT="$CACHE_ROOT/$RELEASE/$KEY"
say() { printf 'vm-image: %s\n' "$*" >&2; }

if [ -e "$OUT/done" ]; then
    printf '%s\n' "$OUT"
    exit 0
fi

[ "$(id -u)" = 0 ] || { echo "build-image.sh: run as root" >&2; exit 2; }
bash "$HERE/setup-host.sh" >&2

mkdir -p "$CACHE_ROOT/$RELEASE"
exec 9>"$CACHE_ROOT/$RELEASE/.lock"
flock 9
if [ -e "$OUT/done" ]; then  # built by another process meanwhile
    printf '%s\n' "$OUT"
    exit 0
fi

mirror() {
    if [ -n "${MESHCAPTURE_VM_MIRROR:-}" ]; then
        printf '%s\n' "$MESHCAPTURE_VM_MIRROR"
        return
    fi
    # The first Debian (not -security) archive in apt's sources: deb822
    # "URIs:" lines or one-line "deb URI suite" entries.
    local uri
    uri="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
        | sed -n -e 's/^URIs:[[:space:]]*//p' -e 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\2/p' \
        | tr ' ' '\n' | grep -E '/debian/?$' | head -n1)"
    printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}
MIRROR="$(mirror)"
WORK="$(mktemp -d "$CACHE_ROOT/$RELEASE/.build.XXXXXX")"
ROOT="$WORK/root"
cleanup() {
    for m in proc sys dev/pts dev; do
        mountpoint -q "$ROOT/$m" 2>/dev/null && umount -l "$ROOT/$m"
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
start=$SECONDS
say "debootstrap $RELEASE from $MIRROR into $ROOT"
debootstrap --variant=minbase --components=main \
    --include=systemd-sysv,udev,dbus,kmod,linux-image-amd64,initramfs-tools,openssh-server,python3,python3-apt,iproute2,ifupdown,netbase,procps \
    "$RELEASE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 40 "$WORK/debootstrap.log" >&2; exit 1; }
say "debootstrap done ($((SECONDS - start))s)"

in_root() { chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"; }
mount -t proc proc "$ROOT/proc"

# The local repository: exactly what installing the role's packages needs here.
printf 'deb %s %s main\n' "$MIRROR" "$RELEASE" >"$ROOT/etc/apt/sources.list"
in_root apt-get update -qq
in_root apt-get clean
in_root apt-get install -y -qq --download-only iptables nftables python3-pyroute2 >/dev/null
mkdir -p "$ROOT/opt/meshcapture-apt"
mv "$ROOT"/var/cache/apt/archives/*.deb "$ROOT/opt/meshcapture-apt/"
(cd "$ROOT/opt/meshcapture-apt" && dpkg-scanpackages --multiversion . /dev/null >Packages 2>/dev/null)
printf 'deb [trusted=yes] file:/opt/meshcapture-apt ./\n' >"$ROOT/etc/apt/sources.list"
rm -f "$ROOT"/etc/apt/sources.list.d/*
rm -rf "$ROOT"/var/lib/apt/lists/*
in_root apt-get update -qq
in_root apt-get clean
for pkg in iptables nftables python3-pyroute2; do
    if in_root dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        echo "build-image.sh: $pkg is installed in the image; the role must install it itself" >&2
        exit 1
    fi
done

# Identity, file systems, console.
echo meshcapture-vm >"$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 meshcapture-vm\n::1 localhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
printf '/dev/vda / ext4 defaults,errors=remount-ro 0 1\n' >"$ROOT/etc/fstab"
od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$ROOT/etc/machine-id"
echo >>"$ROOT/etc/machine-id"
printf 'nameserver 192.0.2.1\n' >"$ROOT/etc/resolv.conf.meshcapture"
rm -f "$ROOT/etc/resolv.conf"
mv "$ROOT/etc/resolv.conf.meshcapture" "$ROOT/etc/resolv.conf"

# The network: ifupdown (enabled) and systemd-networkd (disabled), same addresses.
cat >"$ROOT/etc/network/interfaces" <<'IFACES'
auto lo
iface lo inet loopback

auto eth0
iface eth0 inet static
    address 192.0.2.10/24
    gateway 192.0.2.1
iface eth0 inet6 static
    address 2001:db8::10/64
    gateway 2001:db8::1
    dad-attempts 0
    accept_ra 0
IFACES
mkdir -p "$ROOT/etc/systemd/network"
cat >"$ROOT/etc/systemd/network/10-eth0.network" <<'NETWORKD'
[Match]
Name=eth0

[Network]
Address=192.0.2.10/24
Address=2001:db8::10/64
Gateway=192.0.2.1
Gateway=2001:db8::1
IPv6AcceptRA=no
LinkLocalAddressing=ipv6
NETWORKD
cat >"$ROOT/usr/local/sbin/meshcapture-vm-net" <<'NETSWITCH'
#!/bin/sh
# meshcapture-vm-net networkd|ifupdown: which one configures eth0 from the
# next boot on (the test VM image carries both configurations).
set -eu
case "${1:-}" in
    networkd)
        systemctl disable --quiet networking.service
        systemctl enable --quiet systemd-networkd.service systemd-networkd.socket
        ;;
    ifupdown)
        systemctl disable --quiet systemd-networkd.service systemd-networkd.socket
        systemctl enable --quiet networking.service
        ;;
    *) echo "usage: meshcapture-vm-net networkd|ifupdown" >&2; exit 2 ;;
esac
NETSWITCH
chmod 0755 "$ROOT/usr/local/sbin/meshcapture-vm-net"
# ifupdown-pre.service waits for every udev event (udevadm settle), which
# takes tens of seconds under TCG; networking.service only needs eth0.
mkdir -p "$ROOT/etc/systemd/system/ifupdown-pre.service.d"
cat >"$ROOT/etc/systemd/system/ifupdown-pre.service.d/meshcapture-vm.conf" <<'IFPRE'
[Service]
ExecStart=
ExecStart=/bin/udevadm wait --timeout=120 /sys/class/net/eth0
IFPRE
in_root systemctl disable --quiet systemd-networkd.service systemd-networkd.socket 2>/dev/null || true
in_root systemctl enable --quiet networking.service

# SSH: one host key (its public half is published next to the image), root
# login with the key from the kernel command line only.
rm -f "$ROOT"/etc/ssh/ssh_host_*
ssh-keygen -q -t ed25519 -N '' -C meshcapture-vm -f "$ROOT/etc/ssh/ssh_host_ed25519_key"
cat >"$ROOT/etc/ssh/sshd_config.d/meshcapture-vm.conf" <<'SSHD'
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
SSHD
cat >"$ROOT/usr/local/sbin/meshcapture-test-key" <<'TESTKEY'
#!/bin/sh
# Writes root's authorized_keys from meshcapture.authorized_key=<base64> on
# the kernel command line (the test VM image; each test makes its own key).
set -eu
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        meshcapture.authorized_key=*)
            install -d -m 0700 /root/.ssh
            printf '%s' "${arg#meshcapture.authorized_key=}" | base64 -d >/root/.ssh/authorized_keys.new
            chmod 0600 /root/.ssh/authorized_keys.new
            mv /root/.ssh/authorized_keys.new /root/.ssh/authorized_keys
            ;;
    esac
done
TESTKEY
chmod 0755 "$ROOT/usr/local/sbin/meshcapture-test-key"
cat >"$ROOT/etc/systemd/system/meshcapture-test-key.service" <<'UNIT'
[Unit]
Description=Root's SSH key from the kernel command line (test VM)
Before=ssh.service
ConditionKernelCommandLine=|meshcapture.authorized_key

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/meshcapture-test-key

[Install]
WantedBy=multi-user.target
UNIT
in_root systemctl enable --quiet meshcapture-test-key.service ssh.service
# Nothing periodic that could run apt or disk jobs during a test.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
            e2scrub_reap.service systemd-timesyncd.service; do
    in_root systemctl mask --quiet "$unit" 2>/dev/null || true
done
# A small initramfs (virtio disk, ext4): quicker to load under TCG than
# Debian's MODULES=most one.
printf 'MODULES=list\n' >"$ROOT/etc/initramfs-tools/conf.d/meshcapture-vm.conf"
printf 'virtio_pci\nvirtio_blk\next4\n' >>"$ROOT/etc/initramfs-tools/modules"
in_root update-initramfs -u -k all >/dev/null 2>&1
# Serial console only.
in_root systemctl enable --quiet serial-getty@ttyS0.service 2>/dev/null || true
umount -l "$ROOT/proc"

# Kernel, initramfs, disk.
mkdir -p "$WORK/out"
cp "$(readlink -f "$ROOT/vmlinuz")" "$WORK/out/vmlinuz"
cp "$(readlink -f "$ROOT/initrd.img")" "$WORK/out/initrd.img"
cp "$ROOT/etc/ssh/ssh_host_ed25519_key.pub" "$WORK/out/host_key.pub"
printf 'root=/dev/vda rw console=ttyS0,115200 net.ifnames=0 panic=-1 quiet systemd.show_status=1\n' >"$WORK/out/cmdline"
{
    printf 'release %s\nmirror %s\nbuilt %s\n\n# installed\n' "$RELEASE" "$MIRROR" "$(date -u +%FT%TZ)"
    in_root dpkg-query -W -f '${Package} ${Version}\n'
    printf '\n# local repository (file:/opt/meshcapture-apt)\n'
    (cd "$ROOT/opt/meshcapture-apt" && ls *.deb)
} >"$WORK/out/manifest.txt"
say "mke2fs -d (root file system image)"
size_mb=$(( $(du -sm "$ROOT" | cut -f1) + 1536 ))
mke2fs -q -t ext4 -L meshcapture-vm -d "$ROOT" "$WORK/disk.raw" "${size_mb}M"
qemu-img convert -O qcow2 "$WORK/disk.raw" "$WORK/out/disk.qcow2"
rm -f "$WORK/disk.raw"
touch "$WORK/out/done"
rm -rf "$OUT"
mv "$WORK/out" "$OUT"
# Images of earlier versions of this script are not used any more.
find "$CACHE_ROOT/$RELEASE" -mindepth 1 -maxdepth 1 -type d -name '[0-9a-f]*' ! -name "$KEY" -exec rm -rf {} +
say "image ready in $OUT ($((SECONDS - start))s)"
printf '%s\n' "$OUT"
