#!/bin/sh
# A "VM" reached over real SSH, for the SSH scenario (molecule/ssh) and
# tests/integration/test_ssh_operator.py (run as root on the controller).
#
#   sshvm.sh config VM CTRL DIR   keys and configuration files only
#   sshvm.sh start VM CTRL DIR    config, then sshd started in VM, in the
#                                 background; returns once it accepts
#                                 connections
#
# VM and CTRL are existing namespaces joined by a veth pair, VM with
# 192.0.2.10 (molecule/shared/netns.sh create, or tests/netns.py). In DIR
# (which must exist) it makes a host key and a client key for this run, an
# sshd_config and an ssh_config, and starts the real OpenSSH sshd inside VM
# (-D, its own -f config, listening on 192.0.2.10:22 only, root login with
# the client key only), then waits until it accepts connections. sshd is
# stopped by deleting the namespace (netns.sh delete, Netns.delete kill
# every process inside).
#
# DIR/ssh_config is what the controller uses, Ansible included
# (ansible_ssh_common_args: -F DIR/ssh_config): host 192.0.2.10 is reached
# through a ProxyCommand that runs relay.py inside CTRL, so the TCP
# connection enters VM through its veth and its PREROUTING chains like a
# connection from another machine. The controller stays in this machine's
# own network namespace, which is never changed: no veth, no address there.
#
# Only namespaces named mcs-* are used; /run/sshd (sshd's privilege
# separation directory, a compile-time path) is created when missing.
set -eu

VM_ADDR=192.0.2.10
HERE="$(cd "$(dirname "$0")" && pwd)"

check_name() {
    case "$1" in
        mcs-?*) ;;
        *) echo "sshvm.sh: refusing to use namespace '$1': not named mcs-*" >&2; exit 2 ;;
    esac
    case "$1" in
        */*|*" "*) echo "sshvm.sh: invalid namespace name '$1'" >&2; exit 2 ;;
    esac
    [ -e "/run/netns/$1" ] || { echo "sshvm.sh: no namespace '$1'" >&2; exit 2; }
}

config() {
    vm=$1 ctrl=$2 dir=$(cd "$3" && pwd)
    check_name "$vm"
    check_name "$ctrl"
    sshd=$(command -v sshd || echo /usr/sbin/sshd)
    [ -x "$sshd" ] || { echo "sshvm.sh: sshd not found (scripts/setup.sh installs openssh-server)" >&2; exit 2; }
    python=$(command -v python3)

    rm -f "$dir/ssh_host_ed25519_key" "$dir/ssh_host_ed25519_key.pub" "$dir/client_key" "$dir/client_key.pub"
    ssh-keygen -q -t ed25519 -N '' -C meshcapture-test-host -f "$dir/ssh_host_ed25519_key"
    ssh-keygen -q -t ed25519 -N '' -C meshcapture-test-client -f "$dir/client_key"
    cp "$dir/client_key.pub" "$dir/authorized_keys"
    printf '%s %s\n' "$VM_ADDR" "$(cut -d' ' -f1-2 "$dir/ssh_host_ed25519_key.pub")" >"$dir/known_hosts"

    # StrictModes no: the files live in a temporary directory below /tmp
    # (mode 1777), which StrictModes refuses for authorized_keys.
    cat >"$dir/sshd_config" <<CONF
ListenAddress $VM_ADDR:22
HostKey $dir/ssh_host_ed25519_key
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
LogLevel VERBOSE
CONF

    cat >"$dir/ssh_config" <<CONF
Host $VM_ADDR
    User root
    IdentityFile $dir/client_key
    IdentitiesOnly yes
    UserKnownHostsFile $dir/known_hosts
    StrictHostKeyChecking yes
    ProxyCommand ip netns exec $ctrl $python $HERE/relay.py %h %p
    ConnectTimeout 10
    # A connection that died (a reset the client did not see) fails in
    # about 15 s instead of hanging.
    ServerAliveInterval 5
    ServerAliveCountMax 3
CONF

    [ -d /run/sshd ] || install -d -m 0755 /run/sshd
    "$sshd" -t -f "$dir/sshd_config"
}

start() {
    config "$@"
    ip netns exec "$vm" "$sshd" -D -f "$dir/sshd_config" -E "$dir/sshd.log" </dev/null >/dev/null 2>&1 &
    i=0
    until ip netns exec "$ctrl" "$python" -c '
import socket, sys
socket.create_connection((sys.argv[1], 22), timeout=1).close()' "$VM_ADDR" 2>/dev/null; do
        i=$((i + 1))
        if [ "$i" -ge 100 ]; then
            echo "sshvm.sh: sshd in $vm does not accept connections on $VM_ADDR:22:" >&2
            cat "$dir/sshd.log" >&2 || true
            exit 1
        fi
        sleep 0.1
    done
}

case "${1:-}" in
    config|start)
        [ $# -eq 4 ] || { echo "usage: $0 {config|start} VM CTRL DIR" >&2; exit 2; }
        "$1" "$2" "$3" "$4" ;;
    *) echo "usage: $0 {config|start} VM CTRL DIR" >&2; exit 2 ;;
esac
