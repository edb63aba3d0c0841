#!/bin/sh
# Managed by Ansible (meshcapture.sidecar.capture).
# Restores the Istio sidecar traffic capture at boot (systemd unit
# meshcapture-capture.service): the iptables rules from rules.v4 / rules.v6
# or, with the nftables backend, the nftables tables from rules.nft,
# the TPROXY policy routing and the IPv6 inbound address from routes.env,
# all in the directory of this script. The script itself is the same on
# every host; routes.env holds the settings.
# Idempotent: a ruleset already in place (ISTIO_OUTPUT in the nat table, or
# an inet istio-proxy-* table) is left alone, and routing objects are added
# only when missing.
set -u
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH LC_ALL=C

DIR=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd) || exit 1
status=0

log() { echo "meshcapture-restore: $*"; }
fail() { log "ERROR: $*" >&2; status=1; }

# shellcheck disable=SC1091
. "$DIR/routes.env" || { log "ERROR: cannot read $DIR/routes.env" >&2; exit 1; }
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
    restore_nft "$DIR/rules.nft"
    exit "$status"
fi
restore_rules iptables "$DIR/rules.v4"
if [ -s "$DIR/rules.v6" ]; then
    if [ -e /proc/net/if_inet6 ]; then
        restore_rules ip6tables "$DIR/rules.v6"
    else
        log "WARNING: no IPv6 in this kernel: rules.v6 not restored" >&2
    fi
fi
exit "$status"
