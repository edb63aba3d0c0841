#!/bin/sh
# Managed by Ansible (meshcapture.sidecar.capture).
# Restores the Istio sidecar traffic capture at boot (systemd unit
# meshcapture-capture.service): the iptables rules from rules.v4 / rules.v6
# or, with the nftables backend, the nftables tables from rules.nft,
# the TPROXY policy routing and the IPv6 inbound address from routes.env.
# It reads them from the active file set of its directory (.current, which
# meshcapture.sidecar.persist replaces in one step), or from the directory
# itself when there is no .current. The script itself is the same on every
# host; routes.env holds the settings.
# It holds the host lock of meshcapture.sidecar.rules (flock on
# /run/meshcapture/lock-<network namespace>) while it runs, waiting for it
# up to 60 s, and refuses a directory that another user could change.
# Idempotent: a ruleset already in place (ISTIO_OUTPUT in the nat table, or
# an inet istio-proxy-* table) is left alone, and routing objects are added
# only when missing.
set -u
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH LC_ALL=C

LOCK_DIR=/run/meshcapture
LOCK_WAIT=60
status=0

log() { echo "meshcapture-restore: $*"; }
fail() { log "ERROR: $*" >&2; status=1; }
die() { log "ERROR: $*" >&2; exit 1; }

# A directory owned by this user, not writable by group or others, not a symbolic link.
private_dir() {
    [ -d "$1" ] && [ ! -L "$1" ] || return 1
    # shellcheck disable=SC2046  # owner and mode: two words
    set -- "$1" $(stat -c '%u %a' -- "$1" 2>/dev/null)
    [ $# -eq 3 ] && [ "$2" = "$(id -u)" ] || return 1
    case $3 in *[2367]? | *[2367]) return 1 ;; esac
}

# The host lock: the same file, and the same flock, as meshcapture.sidecar.rules.
take_lock() {
    if ! command -v flock >/dev/null 2>&1; then
        log "WARNING: flock not found (util-linux): running without the host lock" >&2
        return 0
    fi
    ns=$(stat -L -c '%d-%i' /proc/self/ns/net) || die "cannot identify the network namespace"
    (umask 077 && mkdir -p "$LOCK_DIR") || die "cannot create $LOCK_DIR"
    private_dir "$LOCK_DIR" || die "$LOCK_DIR: not a directory only $(id -un) can change: refusing it"
    lock=$LOCK_DIR/lock-$ns
    mask=$(umask)
    umask 077
    exec 9>>"$lock" || die "cannot open $lock"
    umask "$mask"
    flock -w "$LOCK_WAIT" 9 || die "$lock: held by another run for $LOCK_WAIT s"
}
take_lock

DIR=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd) || exit 1
if [ -L "$DIR/.current" ]; then
    SET=$(CDPATH='' cd -P -- "$DIR/.current" && pwd -P) || die "$DIR/.current: the active file set is missing"
else
    SET=$(CDPATH='' cd -P -- "$DIR" && pwd -P) || exit 1
fi
for d in "$DIR" "$SET"; do
    private_dir "$d" || die "$d: not a directory only $(id -un) can change: refusing it"
done

# shellcheck disable=SC1091
. "$SET/routes.env" || die "cannot read $SET/routes.env"
# The backend the rules were applied with (iptables-nft-restore,
# iptables-legacy-restore, or nft -f for nftables); routes.env of older
# releases does not say: iptables-nft.
BACKEND=${MESHCAPTURE_IPTABLES_BACKEND:-iptables-nft}
case "$BACKEND" in
    iptables-legacy) SUFFIX=legacy ;;
    *) SUFFIX=nft ;;
esac

ipv6_usable() {
    [ -e /proc/net/if_inet6 ] && [ "$(cat /proc/sys/net/ipv6/conf/lo/disable_ipv6 2>/dev/null || echo 1)" = 0 ]
}

ensure_routes() {  # 4 or 6
    fam=$1
    table=$MESHCAPTURE_TPROXY_ROUTE_TABLE mark=$MESHCAPTURE_TPROXY_MARK
    if [ -z "$(ip -"$fam" route show table "$table" type local exact default dev lo 2>/dev/null)" ]; then
        # proto static, as meshcapture.sidecar.routes adds it
        if ip -"$fam" route add local default dev lo table "$table" proto static; then
            log "ip -$fam route: local default dev lo table $table added"
        else
            fail "ip -$fam route add local default dev lo table $table failed"
        fi
    fi
    if [ -z "$(ip -"$fam" rule show fwmark "$mark" lookup "$table" 2>/dev/null)" ]; then
        if ip -"$fam" rule add fwmark "$mark" lookup "$table"; then
            log "ip -$fam rule: fwmark $mark lookup $table added"
        else
            fail "ip -$fam rule add fwmark $mark lookup $table failed"
        fi
    fi
}

restore_rules() {  # iptables or ip6tables, payload file
    cmd=$1 file=$2
    [ -s "$file" ] || return 0
    if "$cmd-$SUFFIX-save" -t nat 2>/dev/null | grep -q '^:ISTIO_OUTPUT '; then
        log "$cmd: the capture is already in place, $file not restored"
        return 0
    fi
    if "$cmd-$SUFFIX-restore" --noflush "$file"; then
        log "$cmd: $file restored"
    else
        fail "$cmd-$SUFFIX-restore --noflush $file failed"
    fi
}

restore_nft() {  # payload file (nft -f, one transaction)
    file=$1
    [ -s "$file" ] || return 0
    if nft list tables inet 2>/dev/null | grep -q '^table inet istio-proxy-'; then
        log "nft: the capture is already in place, $file not restored"
        return 0
    fi
    if nft -f "$file"; then
        log "nft: $file restored"
    else
        fail "nft -f $file failed"
    fi
}

# Addresses and routes first, then rules (as meshcapture.sidecar.routes does).
if [ "$MESHCAPTURE_INBOUND_IPV6" = true ]; then
    if ! ipv6_usable; then
        log "WARNING: IPv6 is disabled on lo: ::6/128 and the IPv6 policy routing skipped" >&2
    elif [ -z "$(ip -6 addr show dev lo to ::6/128 2>/dev/null)" ]; then
        if ip -6 addr add ::6/128 dev lo; then
            log "::6/128 added on lo"
        else
            fail "ip -6 addr add ::6/128 dev lo failed"
        fi
    fi
fi
if [ "$MESHCAPTURE_TPROXY_ROUTES" = true ]; then
    ensure_routes 4
    if [ "$MESHCAPTURE_INBOUND_IPV6" = true ] && ipv6_usable; then
        ensure_routes 6
    fi
fi

if [ "$BACKEND" = nftables ]; then
    restore_nft "$SET/rules.nft"
    exit "$status"
fi
restore_rules iptables "$SET/rules.v4"
if [ -s "$SET/rules.v6" ]; then
    if [ -e /proc/net/if_inet6 ]; then
        restore_rules ip6tables "$SET/rules.v6"
    else
        log "WARNING: no IPv6 in this kernel: rules.v6 not restored" >&2
    fi
fi
exit "$status"
