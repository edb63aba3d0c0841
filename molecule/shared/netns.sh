#!/bin/sh
# Network-namespace hosts for the molecule scenarios (run as root on the
# controller). Only namespaces named mcs-m-* are ever touched, and only
# documentation addresses are used (192.0.2.0/24, 2001:db8::/64).
#
#   netns.sh create HOST PEER   fresh HOST and PEER joined by a veth pair:
#                               HOST eth0 192.0.2.10/24, 2001:db8::10/64,
#                               default routes via PEER;
#                               PEER eth0 192.0.2.20 + .21/24,
#                               2001:db8::20 + ::21/64
#   netns.sh delete NAME...     kill what runs inside, delete (missing: fine)
#   netns.sh reboot NAME MARK TABLE
#                               drop what a reboot drops: all netfilter
#                               rules, the TPROXY policy rules and routes of
#                               MARK/TABLE, ::6 on lo
#   netns.sh snapshot NAME [DIR]
#                               netfilter and policy-routing state, stable
#                               text (no counters, no timestamps); with DIR
#                               also the files below DIR (size, mtime)
set -eu

check_name() {
    case "$1" in
        mcs-m-?*) ;;
        *) echo "netns.sh: refusing to touch namespace '$1': not named mcs-m-*" >&2; exit 2 ;;
    esac
    case "$1" in
        */*|*" "*) echo "netns.sh: invalid namespace name '$1'" >&2; exit 2 ;;
    esac
}

delete() {
    for name in "$@"; do
        check_name "$name"
        [ -e "/run/netns/$name" ] || continue
        for pid in $(ip netns pids "$name" 2>/dev/null); do
            kill -9 "$pid" 2>/dev/null || true
        done
        ip netns delete "$name"
    done
}

create() {
    host=$1 peer=$2
    check_name "$host"
    check_name "$peer"
    delete "$host" "$peer"
    ip netns add "$host"
    if ! ip netns add "$peer"; then
        delete "$host"
        exit 1
    fi
    # From here on, remove both again if anything fails.
    trap 'delete "$host" "$peer"' EXIT
    for ns in "$host" "$peer"; do
        ip -n "$ns" link set lo up
    done
    ip -n "$host" link add eth0 type veth peer name eth0 netns "$peer"
    ip -n "$host" addr add 192.0.2.10/24 dev eth0
    ip -n "$host" addr add 2001:db8::10/64 dev eth0 nodad
    ip -n "$peer" addr add 192.0.2.20/24 dev eth0
    ip -n "$peer" addr add 192.0.2.21/24 dev eth0
    ip -n "$peer" addr add 2001:db8::20/64 dev eth0 nodad
    ip -n "$peer" addr add 2001:db8::21/64 dev eth0 nodad
    ip -n "$host" link set eth0 up
    ip -n "$peer" link set eth0 up
    ip -n "$host" -4 route add default via 192.0.2.20 dev eth0
    ip -n "$host" -6 route add default via 2001:db8::20 dev eth0
    trap - EXIT
}

reboot() {
    check_name "$1"
    # shellcheck disable=SC2016  # the inner script expands its own variables
    ip netns exec "$1" sh -c '
        nft flush ruleset
        if [ -n "$(cat /proc/net/ip_tables_names /proc/net/ip6_tables_names 2>/dev/null)" ]; then
            for cmd in iptables-legacy ip6tables-legacy; do
                for table in raw mangle nat filter; do
                    $cmd -t $table -F 2>/dev/null || true
                    $cmd -t $table -X 2>/dev/null || true
                done
            done
        fi
        for fam in 4 6; do
            while ip -$fam rule del fwmark "$1" lookup "$2" 2>/dev/null; do :; done
            ip -$fam route flush table "$2" 2>/dev/null || true
        done
        ip -6 addr del ::6/128 dev lo 2>/dev/null || true
    ' sh "$2" "$3"
}

snapshot() {
    check_name "$1"
    # shellcheck disable=SC2016  # the inner script expands its own variables
    ip netns exec "$1" sh -c '
        strip() { sed -e "/^#/d" -e "s/\[[0-9]*:[0-9]*\]/[-]/g" -e "s/counter packets [0-9]* bytes [0-9]*/counter/g"; }
        echo "== iptables-nft-save"; iptables-nft-save | strip
        echo "== ip6tables-nft-save"; ip6tables-nft-save | strip
        # Legacy tables only where they exist (listing them would create
        # them); /proc files have no size, so read them.
        if [ -n "$(cat /proc/net/ip_tables_names /proc/net/ip6_tables_names 2>/dev/null)" ]; then
            echo "== iptables-legacy-save"; iptables-legacy-save | strip
            echo "== ip6tables-legacy-save"; ip6tables-legacy-save | strip
        fi
        # Sorted: the order nft lists chains in depends on how they were
        # created; the rule order is in the *-save sections above.
        echo "== nft list ruleset (sorted)"; nft list ruleset 2>/dev/null | strip | sort
        echo "== ip -4 rule"; ip -4 rule show
        echo "== ip -6 rule"; ip -6 rule show
        echo "== ip -4 route"; ip -4 route show table all
        echo "== ip -6 route"; ip -6 route show table all | grep -v -e fe80 -e ff00 -e "^anycast" || true
        echo "== lo addresses"; ip -br addr show dev lo
    '
    if [ -n "${2:-}" ]; then
        echo "== files in $2"
        find "$2" -printf '%p %y %s %T@\n' | sort
    fi
}

case "${1:-}" in
    create) [ $# -eq 3 ] || { echo "usage: $0 create HOST PEER" >&2; exit 2; }; create "$2" "$3" ;;
    delete) shift; delete "$@" ;;
    reboot) [ $# -eq 4 ] || { echo "usage: $0 reboot NAME MARK TABLE" >&2; exit 2; }; reboot "$2" "$3" "$4" ;;
    snapshot)
        if [ $# -lt 2 ] || [ $# -gt 3 ]; then echo "usage: $0 snapshot NAME [DIR]" >&2; exit 2; fi
        snapshot "$2" "${3:-}" ;;
    *) echo "usage: $0 {create HOST PEER|delete NAME...|reboot NAME MARK TABLE|snapshot NAME [DIR]}" >&2; exit 2 ;;
esac
