# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""Istio's own native nftables capture (istio-iptables --native-nftables, 1.27+).

A port of the rule decisions of Istio's tools/istio-nftables capture, built
directly from the validated configuration:

* three `inet` tables, istio-proxy-nat, istio-proxy-mangle and
  istio-proxy-raw, each written as `add table`, `flush table`, its chains
  (only those that get rules), then its rules in the order they are built;
  a table without rules is left out;
* both families share one table: a rule with a fixed address is followed by
  its IPv6 twin, lists come IPv4 first, IPv6 rules only with
  enable_inbound_ipv6;
* an insert at index N becomes an append when the chain has no more than N
  rules at that point (as Istio 1.27.4 / 1.28.1 and later do);
* from 1.28 on every rule carries a `counter` right before its final
  statement.

render_tables(cfg) -> {table name: `nft -f` text} (the nftables engine's
wanted tables); render_transaction(cfg) -> the whole `nft -f` text.
Pure Python, no Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from collections import OrderedDict

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import ConfigError

NFT_FAMILY = "inet"
NAT, MANGLE, RAW = "istio-proxy-nat", "istio-proxy-mangle", "istio-proxy-raw"
TABLE_ORDER = (NAT, MANGLE, RAW)

PREROUTING, OUTPUT = "prerouting", "output"
INBOUND, OUTPUT_CHAIN, OUTPUT_DNS = "istio-inbound", "istio-output", "istio-output-dns"
REDIRECT, IN_REDIRECT = "istio-redirect", "istio-in-redirect"
DIVERT, TPROXY_CHAIN, DROP = "istio-divert", "istio-tproxy", "istio-drop"

# Per table: the chains in the order they are declared; base chains carry
# their `{ type ... hook ... priority ... ; }` spec.
CHAINS = {
    NAT: ((PREROUTING, "{ type nat hook prerouting priority -100 ; }"),
          (OUTPUT, "{ type nat hook output priority -100 ; }"),
          (INBOUND, None), (REDIRECT, None), (IN_REDIRECT, None), (OUTPUT_CHAIN, None), (OUTPUT_DNS, None)),
    MANGLE: ((PREROUTING, "{ type filter hook prerouting priority -150 ; }"),
             (OUTPUT, "{ type route hook output priority -150 ; }"),
             (DIVERT, None), (TPROXY_CHAIN, None), (INBOUND, None), (DROP, None)),
    RAW: ((PREROUTING, "{ type filter hook prerouting priority -300 ; }"),
          (OUTPUT, "{ type filter hook output priority -300 ; }"),
          (INBOUND, None), (OUTPUT_DNS, None)),
}

OUTBOUND_MARK = "1338"
AGENT_DNS_PORT = "15053"
DNS_PORT = "53"
LOOPBACK_V6 = "::1/128"
PASSTHROUGH_V4, PASSTHROUGH_V6 = "127.0.0.6/32", "::6/128"
DEFAULT_LOOPBACK_V4 = "127.0.0.1/32"

# The first release with Istio's native nftables capture, and the first
# whose rules carry counters.
FIRST_RELEASE = (1, 27)
COUNTERS_FROM = (1, 28)


class _Rule(object):
    """One rule: matches, then the final statement; index None appends."""

    __slots__ = ("chain", "index", "matches", "final")

    def __init__(self, chain, index, matches, final):
        self.chain = chain
        self.index = index
        self.matches = matches
        self.final = final

    def text(self, counters):
        words = list(self.matches) + (["counter"] if counters else []) + list(self.final)
        return " ".join(words)


class _Builder(object):
    """Rules per table in build order (Istio's NftablesRuleBuilder)."""

    def __init__(self, ipv6):
        self.ipv6 = ipv6
        self.rules = dict((table, []) for table in TABLE_ORDER)

    def append(self, table, chain, matches, final):
        self.rules[table].append(_Rule(chain, None, matches, final))

    def append6(self, table, chain, matches, final):
        if self.ipv6:
            self.append(table, chain, matches, final)

    def insert(self, table, chain, index, matches, final):
        self.rules[table].append(_Rule(chain, index, matches, final))

    def insert6(self, table, chain, index, matches, final):
        if self.ipv6:
            self.insert(table, chain, index, matches, final)


def _split_ranges(value):
    """(wildcard, v4 cidrs, v6 cidrs, has loopback) of an outbound range option."""
    if value == "*":
        return True, [], [], False
    cidrs = list(value or [])
    v4 = [c for c in cidrs if c.version == 4]
    v6 = [c for c in cidrs if c.version == 6]
    return False, v4, v6, any(c.is_loopback for c in cidrs)


def release(cfg):
    """The (major, minor) release the layout is rendered for."""
    version = getattr(cfg, "istio_version", None)
    if version is None or tuple(version) < FIRST_RELEASE:
        raise ConfigError("istio_version", ".".join(str(v) for v in version) if version else version,
                          "Istio's native nftables layout exists from 1.27 on")
    return tuple(version)


def build(cfg):
    """{table: [_Rule]} of Istio's native nftables capture for cfg."""
    b = _Builder(cfg.enable_inbound_ipv6)
    loopback = getattr(cfg, "host_ipv4_loopback_cidr", None) or DEFAULT_LOOPBACK_V4
    tproxy = cfg.inbound_interception_mode == "TPROXY"
    mark = str(cfg.inbound_tproxy_mark)
    tunnel = cfg.inbound_tunnel_port
    tcp = ["meta", "l4proto", "tcp"]

    # An exclude list has no wildcard (capture_config refuses '*' there).
    excl4, excl6 = _split_ranges(cfg.outbound_ip_ranges_exclude)[1:3]
    wildcard, incl4, incl6, include_loopback = _split_ranges(cfg.outbound_ip_ranges_include)
    v4_servers, v6_servers = list(cfg.dns_servers_v4), list(cfg.dns_servers_v6)
    redirect_dns = cfg.redirect_dns and (cfg.capture_all_dns or bool(v4_servers or v6_servers))

    # Interfaces whose traffic is never captured.
    for nic in cfg.exclude_interfaces:
        b.append(NAT, PREROUTING, ["iifname", nic], ["return"])
        b.append(NAT, OUTPUT, ["oifname", nic], ["return"])
    if tproxy:
        for nic in cfg.exclude_interfaces:
            b.append(MANGLE, PREROUTING, ["iifname", nic], ["return"])
            b.append(MANGLE, OUTPUT, ["oifname", nic], ["return"])
    for nic in cfg.kube_virt_interfaces:
        b.insert(NAT, PREROUTING, 0, ["iifname", nic], ["return"])

    if cfg.drop_invalid:
        b.append(MANGLE, PREROUTING, tcp + ["ct", "state", "invalid"], ["jump", DROP])
        b.append(MANGLE, DROP, [], ["drop"])

    b.append(NAT, INBOUND, tcp + ["tcp", "dport", tunnel], ["return"])
    b.append(NAT, REDIRECT, tcp, ["redirect", "to", ":" + cfg.proxy_port])
    b.append(NAT, IN_REDIRECT, tcp, ["redirect", "to", ":" + cfg.inbound_capture_port])

    _inbound(b, cfg, tproxy, mark, loopback, tcp)

    b.append(NAT, OUTPUT, [], ["jump", OUTPUT_CHAIN])
    for port in cfg.outbound_ports_exclude:
        b.append(NAT, OUTPUT_CHAIN, ["tcp", "dport", port], ["return"])
        b.append(NAT, OUTPUT_CHAIN, ["udp", "dport", port], ["return"])

    b.append(NAT, OUTPUT_CHAIN, ["oifname", "lo", "ip", "saddr", PASSTHROUGH_V4], ["return"])
    b.append6(NAT, OUTPUT_CHAIN, ["oifname", "lo", "ip6", "saddr", PASSTHROUGH_V6], ["return"])

    for kind, owners in (("skuid", cfg.proxy_uid), ("skgid", cfg.proxy_gid)):
        for owner in owners:
            if redirect_dns and kind == "skuid":
                dports = ["tcp", "dport", "!=", "{", DNS_PORT + ",", tunnel, "}"]
            else:
                dports = ["tcp", "dport", "!=", tunnel]
            to_self = ["jump", IN_REDIRECT]
            b.append(NAT, OUTPUT_CHAIN, ["oifname", "lo"] + tcp + ["ip", "daddr", "!=", loopback] + dports
                     + [kind, owner], to_self)
            b.append6(NAT, OUTPUT_CHAIN, ["oifname", "lo"] + tcp + ["ip6", "daddr", "!=", LOOPBACK_V6] + dports
                      + [kind, owner], to_self)
            if not include_loopback:
                if redirect_dns:
                    b.append(NAT, OUTPUT_CHAIN, ["oifname", "lo"] + tcp + ["tcp", "dport", "!=", DNS_PORT,
                                                                           kind, "!=", owner], ["return"])
                else:
                    b.append(NAT, OUTPUT_CHAIN, ["oifname", "lo", kind, "!=", owner], ["return"])
            b.append(NAT, OUTPUT_CHAIN, [kind, owner], ["return"])

    # Owner groups: all but the excluded ones, or only the included ones.
    if cfg.owner_groups_include == ["*"]:
        for group in cfg.owner_groups_exclude:
            b.append(NAT, OUTPUT_CHAIN, ["skgid", group], ["return"])
    else:
        none_of = []
        for group in cfg.owner_groups_include:
            none_of += ["skgid", "!=", group]
        b.append(NAT, OUTPUT_CHAIN, none_of, ["return"])

    if redirect_dns:
        _dns(b, cfg, v4_servers, v6_servers, tcp)

    b.append(NAT, OUTPUT_CHAIN, ["ip", "daddr", loopback], ["return"])
    b.append6(NAT, OUTPUT_CHAIN, ["ip6", "daddr", LOOPBACK_V6], ["return"])
    for cidr in excl4:
        b.append(NAT, OUTPUT_CHAIN, ["ip", "daddr", str(cidr)], ["return"])
    for cidr in excl6:
        b.append6(NAT, OUTPUT_CHAIN, ["ip6", "daddr", str(cidr)], ["return"])

    for port in cfg.outbound_ports_include:
        b.append(NAT, OUTPUT_CHAIN, ["tcp", "dport", port], ["jump", REDIRECT])

    if wildcard:
        b.append(NAT, OUTPUT_CHAIN, [], ["jump", REDIRECT])
        for nic in cfg.kube_virt_interfaces:
            b.insert(NAT, PREROUTING, 0, ["iifname", nic], ["jump", REDIRECT])
    elif incl4 or incl6:
        for cidr in incl4:
            for nic in cfg.kube_virt_interfaces:
                b.insert(NAT, PREROUTING, 0, ["iifname", nic, "ip", "daddr", str(cidr)], ["jump", REDIRECT])
            b.append(NAT, OUTPUT_CHAIN, ["ip", "daddr", str(cidr)], ["jump", REDIRECT])
        for cidr in incl6:
            for nic in cfg.kube_virt_interfaces:
                b.insert6(NAT, PREROUTING, 0, ["iifname", nic, "ip6", "daddr", str(cidr)], ["jump", REDIRECT])
            b.append6(NAT, OUTPUT_CHAIN, ["ip6", "daddr", str(cidr)], ["jump", REDIRECT])

    if tproxy:
        _tproxy_marks(b, cfg, mark, loopback, tcp)
    return b.rules


def _inbound(b, cfg, tproxy, mark, loopback, tcp):
    """Inbound capture: nat REDIRECT, or the mangle TPROXY chains."""
    ports = cfg.inbound_ports_include
    if not ports:
        return
    wildcard = ports == ["*"]
    if not tproxy:
        b.append(NAT, PREROUTING, tcp, ["jump", INBOUND])
        if wildcard:
            for port in cfg.inbound_ports_exclude:
                b.append(NAT, INBOUND, tcp + ["tcp", "dport", port], ["return"])
            b.append(NAT, INBOUND, tcp, ["jump", IN_REDIRECT])
        else:
            for port in ports:
                b.append(NAT, INBOUND, tcp + ["tcp", "dport", port], ["jump", IN_REDIRECT])
        return
    b.append(MANGLE, DIVERT, [], ["meta", "mark", "set", mark])
    b.append(MANGLE, DIVERT, [], ["accept"])
    port = ":" + cfg.inbound_capture_port
    b.append(MANGLE, TPROXY_CHAIN, tcp + ["ip", "daddr", "!=", loopback, "tproxy", "ip", "to", port,
                                          "meta", "mark", "set", mark], ["accept"])
    b.append6(MANGLE, TPROXY_CHAIN, tcp + ["ip6", "daddr", "!=", LOOPBACK_V6, "tproxy", "ip6", "to", port,
                                           "meta", "mark", "set", mark], ["accept"])
    b.append(MANGLE, PREROUTING, tcp, ["jump", INBOUND])
    established = ["ct", "state", "related,established"]
    if wildcard:
        for port in cfg.inbound_ports_exclude:
            b.append(MANGLE, INBOUND, tcp + ["tcp", "dport", port], ["return"])
        b.append(MANGLE, INBOUND, tcp + established, ["jump", DIVERT])
        b.append(MANGLE, INBOUND, tcp, ["jump", TPROXY_CHAIN])
    else:
        for port in ports:
            b.append(MANGLE, INBOUND, tcp + established + ["tcp", "dport", port], ["jump", DIVERT])
            b.append(MANGLE, INBOUND, tcp + ["tcp", "dport", port], ["jump", TPROXY_CHAIN])


def _dns(b, cfg, v4_servers, v6_servers, tcp):
    """DNS capture: nat redirects to the agent, raw conntrack zones."""
    to_agent = ["redirect", "to", ":" + AGENT_DNS_PORT]
    b.append(RAW, OUTPUT, [], ["jump", OUTPUT_DNS])
    if cfg.capture_all_dns or v4_servers or v6_servers:
        b.append(NAT, OUTPUT_CHAIN, [], ["jump", OUTPUT_DNS])
    for proto in ("tcp", "udp"):
        if cfg.capture_all_dns:
            b.append(NAT, OUTPUT_DNS, (tcp if proto == "tcp" else []) + [proto, "dport", DNS_PORT], to_agent)
            continue
        for server in v4_servers:
            b.append(NAT, OUTPUT_DNS, ["ip", "daddr", server + "/32", proto, "dport", DNS_PORT], to_agent)
        for server in v6_servers:
            b.append6(NAT, OUTPUT_DNS, ["ip6", "daddr", server + "/128", proto, "dport", DNS_PORT], to_agent)

    # Conntrack zones: the proxy's upstream queries in zone 1, its answers to
    # the applications in zone 2.
    for kind, owners in (("skuid", cfg.proxy_uid), ("skgid", cfg.proxy_gid)):
        for owner in owners:
            b.append(RAW, OUTPUT_DNS, ["udp", "dport", DNS_PORT, "meta", kind, owner], ["ct", "zone", "set", "1"])
            b.append(RAW, OUTPUT_DNS, ["udp", "sport", AGENT_DNS_PORT, "meta", kind, owner],
                     ["ct", "zone", "set", "2"])
    if cfg.capture_all_dns:
        b.append(RAW, PREROUTING, [], ["jump", INBOUND])
        b.append(RAW, OUTPUT_DNS, ["udp", "dport", DNS_PORT], ["ct", "zone", "set", "2"])
        b.append(RAW, INBOUND, ["udp", "sport", DNS_PORT], ["ct", "zone", "set", "1"])
        return
    if v4_servers or v6_servers:
        b.append(RAW, PREROUTING, [], ["jump", INBOUND])
    for server in v4_servers:
        b.append(RAW, OUTPUT_DNS, ["udp", "dport", DNS_PORT, "ip", "daddr", server + "/32"], ["ct", "zone", "set", "2"])
        b.append(RAW, INBOUND, ["udp", "sport", DNS_PORT, "ip", "saddr", server + "/32"], ["ct", "zone", "set", "1"])
    for server in v6_servers:
        b.append6(RAW, OUTPUT_DNS, ["udp", "dport", DNS_PORT, "ip6", "daddr", server + "/128"],
                  ["ct", "zone", "set", "2"])
        b.append6(RAW, INBOUND, ["udp", "sport", DNS_PORT, "ip6", "saddr", server + "/128"],
                  ["ct", "zone", "set", "1"])


def _tproxy_marks(b, cfg, mark, loopback, tcp):
    """TPROXY mode: connection marks, the proxy's marks on loopback, and the
    rules that keep the proxy's own and local traffic out of istio-inbound."""
    b.append(MANGLE, PREROUTING, tcp + ["mark", mark], ["ct", "mark", "set", "mark"])
    b.append(MANGLE, OUTPUT, ["oifname", "lo"] + tcp + ["mark", mark], ["return"])
    for kind, owners in (("skuid", cfg.proxy_uid), ("skgid", cfg.proxy_gid)):
        for owner in owners:
            b.append(MANGLE, OUTPUT, ["oifname", "lo"] + tcp + ["ip", "daddr", "!=", loopback, kind, owner],
                     ["meta", "mark", "set", OUTBOUND_MARK])
            b.append6(MANGLE, OUTPUT, ["oifname", "lo"] + tcp + ["ip6", "daddr", "!=", LOOPBACK_V6, kind, owner],
                      ["meta", "mark", "set", OUTBOUND_MARK])
    b.append(MANGLE, OUTPUT, tcp + ["ct", "mark", mark], ["meta", "mark", "set", "ct", "mark"])
    b.insert(MANGLE, INBOUND, 0, tcp + ["mark", mark], ["return"])
    b.insert(MANGLE, INBOUND, 1, ["iifname", "lo"] + tcp + ["ip", "saddr", PASSTHROUGH_V4], ["return"])
    b.insert6(MANGLE, INBOUND, 1, ["iifname", "lo"] + tcp + ["ip6", "saddr", PASSTHROUGH_V6], ["return"])
    b.insert(MANGLE, INBOUND, 2, ["iifname", "lo"] + tcp + ["mark", "!=", OUTBOUND_MARK], ["return"])


def _table_text(table, rules, counters):
    """The `nft -f` lines of one table (empty when it has no rules)."""
    used = set(rule.chain for rule in rules)
    if not used:
        return ""
    prefix = "%s %s" % (NFT_FAMILY, table)
    lines = ["add table " + prefix, "flush table " + prefix]
    for name, spec in CHAINS[table]:
        if name in used:
            lines.append("add chain %s %s%s" % (prefix, name, " " + spec if spec else ""))
    count = {}
    for rule in rules:
        n = count.get(rule.chain, 0)
        body = rule.text(counters)
        # nft numbers rules from 0 and rejects an index past the end: such an
        # insert is an append.
        if rule.index is not None and rule.index < n:
            lines.append("insert rule %s %s index %d %s" % (prefix, rule.chain, rule.index, body))
        else:
            lines.append("add rule %s %s %s" % (prefix, rule.chain, body))
        count[rule.chain] = n + 1
    return "\n".join(lines) + "\n"


def render_tables(cfg):
    """OrderedDict {table name: its `nft -f` text} of the tables that get rules,
    in Istio's order (nat, mangle, raw)."""
    counters = release(cfg) >= COUNTERS_FROM
    rules = build(cfg)
    out = OrderedDict()
    for table in TABLE_ORDER:
        text = _table_text(table, rules[table], counters)
        if text:
            out[table] = text
    return out


def render_transaction(cfg):
    """The nft -f text of Istio's native nftables capture for cfg (a CaptureConfig)."""
    return "".join(render_tables(cfg).values())
