# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""Istio release profiles of the capture rules (1.17 to 1.30).

A release's rules are the previous release's plus the named behaviour
changes listed for it in RELEASES.  The generator asks cfg.has(<name>)
(or has(version, <name>)) wherever a release changed something; there is
one generator for every release.  Pure Python, no Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import re

# (release, {behaviour name: what changed}), oldest first.  1.17 is the seed:
# its rules are those of the 1.17 port in capture_generator.
RELEASES = (
    ((1, 17), {}),
    ((1, 18), {
        "inredirect_skips_tunnel_port":
            "the -o lo ... -j ISTIO_IN_REDIRECT rules of ISTIO_OUTPUT match only TCP not to the inbound tunnel "
            "port (with DNS capture, the uid rule: -m multiport ! --dports 53,<tunnel>)",
    }),
    ((1, 19), {}),
    ((1, 20), {
        "dns_source_match":
            "the raw PREROUTING conntrack zone 1 rule matches the DNS server as source (-s), not as destination",
    }),
    ((1, 21), {
        "host_ipv4_loopback_cidr":
            "option host_ipv4_loopback_cidr replaces 127.0.0.1/32 in the TPROXY, loopback redirect, loopback "
            "RETURN and mangle mark rules",
    }),
    ((1, 22), {}),
    ((1, 23), {
        "dns_udp_in_istio_output":
            "with DNS capture, nat and raw OUTPUT jump to ISTIO_OUTPUT for UDP, and the DNS UDP rules move from "
            "the built-in OUTPUT chains into ISTIO_OUTPUT",
        "no_include_return":
            "no -j RETURN after the outbound CIDR include rules",
    }),
    ((1, 24), {
        "drop_invalid_chain":
            "drop_invalid jumps to a mangle chain ISTIO_DROP that drops",
        "nflog_prefix_unquoted":
            "the NFLOG prefix of trace logging is written without quotes",
        "restore_declares_with_new":
            "iptables-restore payloads: tables in alphabetical order, chains declared with -N (first use, then "
            "jump-only targets), '* <table>' headers",
    }),
    ((1, 25), {
        "output_jump_all_protocols":
            "nat OUTPUT jumps to ISTIO_OUTPUT for every protocol",
        "outbound_port_exclude_udp":
            "each outbound_ports_exclude port also gets a UDP RETURN rule",
        "dns_chains":
            "DNS capture in chains ISTIO_OUTPUT_DNS (nat, raw) and raw ISTIO_INBOUND; no nat UDP RETURN rules",
        "dns_needs_servers":
            "redirect_dns without servers and without capture_all_dns captures no DNS at all",
        "no_trace_logging_rules":
            "trace_logging adds no rules",
    }),
    ((1, 26), {}),
    ((1, 27), {
        "native_nftables":
            "native nftables capture (backend nftables with nft_layout istio)",
    }),
    ((1, 28), {
        "nft_counters":
            "every native nftables rule has a counter",
    }),
    ((1, 29), {}),
    ((1, 30), {}),
)

DEFAULT_RELEASE = RELEASES[0][0]
SUPPORTED = tuple(release for release, _changes in RELEASES)
BEHAVIOURS = dict((name, release) for release, changes in RELEASES for name in changes)

_VERSION_RE = re.compile(r"^([0-9]{1,3})\.([0-9]{1,3})(?:\.([0-9]{1,4}))?$")


def release_text(release):
    """(1, 26) -> '1.26'."""
    return "%d.%d" % tuple(release)


def supported_text():
    return ", ".join(release_text(r) for r in SUPPORTED)


def parse_version(value):
    """'1.28' or '1.28.3' -> ((1, 28), patch or None); None if not a supported release."""
    match = _VERSION_RE.match(value) if isinstance(value, str) else None
    if not match:
        return None
    release = (int(match.group(1)), int(match.group(2)))
    if release not in SUPPORTED or release_text(release) != "%s.%s" % match.group(1, 2):
        return None
    patch = match.group(3)
    if patch is not None and str(int(patch)) != patch:
        return None
    return release, (None if patch is None else int(patch))


def has(release, behaviour):
    """Whether the rules of release (a (major, minor) tuple) have the named behaviour change."""
    return tuple(release) >= BEHAVIOURS[behaviour]


def behaviours(release):
    """The names of every behaviour change up to and including release."""
    return frozenset(name for name, first in BEHAVIOURS.items() if tuple(release) >= first)
