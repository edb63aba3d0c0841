#!/bin/sh
# Tests the role's boot-time restore script in a namespace host (run as root
# on the controller):
#
#   restore_test.sh NAME PERSIST_DIR [MARK TABLE]
#
# 1. On the live host the script must change nothing.
#    (iptables backends: rules.v4 / rules.v6; nftables: rules.nft)
# 2. With MARK and TABLE: a simulated reboot (netns.sh reboot) drops the
#    capture; the script must bring back exactly the state before, and a
#    second run must change nothing.
# Prints what it did; exits 1 with a diff when a step fails.
set -eu
ns=$1 dir=$2
here=$(cd "$(dirname "$0")" && pwd)
snap="$here/netns.sh snapshot $ns"
script="$dir/meshcapture-restore.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
run_script() {  # output file
    ip netns exec "$ns" "$script" >"$1" 2>&1 || { cat "$1"; fail "$script exited with $?"; }
    sed 's/^/    /' "$1"
}
same() {  # expected actual what
    diff -u "$1" "$2" >"$tmp/diff" || { cat "$tmp/diff"; fail "$3"; }
}

$snap >"$tmp/applied"
echo "restore script on the live host:"
run_script "$tmp/out-live"
grep -q "already in place" "$tmp/out-live" || fail "the script did not notice the capture in place"
$snap >"$tmp/live"
same "$tmp/applied" "$tmp/live" "the restore script changed the live capture"
echo "ok: the live capture was left alone"

if [ $# -ge 4 ]; then
    "$here/netns.sh" reboot "$ns" "$3" "$4"
    $snap >"$tmp/rebooted"
    if grep -Eq 'ISTIO|istio-proxy-' "$tmp/rebooted"; then fail "the simulated reboot left capture rules"; fi
    echo "restore script after a simulated reboot:"
    run_script "$tmp/out-boot"
    $snap >"$tmp/restored"
    same "$tmp/applied" "$tmp/restored" "the restored state differs from the applied capture"
    echo "ok: the capture is back exactly as applied"
    echo "restore script once more:"
    run_script "$tmp/out-again"
    if grep -Eq ' added|(v[46]|nft) restored' "$tmp/out-again"; then fail "the second run changed something"; fi
    $snap >"$tmp/again"
    same "$tmp/applied" "$tmp/again" "the second run changed the state"
    echo "ok: the second run changed nothing"
fi
