# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""Istio sidecar capture ruleset (a port of istio-iptables' capture/run.go, 1.17 to 1.30).

generate(cfg) returns the Ruleset istio-iptables of cfg.istio_version would
build for the same configuration, rule for rule and in the same order.  The
rules of 1.17 are the seed; every later release changes them only where
cfg.has(<behaviour>) names its change (capture_releases.RELEASES).  Pure
Python, no Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_rules import (
    FAMILIES,
    Builder,
    VERSIONED,
    render_restore,
    render_restore_declared,
)

# Istio's chain names; istio-clean-iptables relies on them.
ISTIO_INBOUND = "ISTIO_INBOUND"
ISTIO_REDIRECT = "ISTIO_REDIRECT"
ISTIO_IN_REDIRECT = "ISTIO_IN_REDIRECT"
ISTIO_OUTPUT = "ISTIO_OUTPUT"
ISTIO_DIVERT = "ISTIO_DIVERT"
ISTIO_TPROXY = "ISTIO_TPROXY"
ISTIO_DROP = "ISTIO_DROP"  # 1.24+
ISTIO_OUTPUT_DNS = "ISTIO_OUTPUT_DNS"  # 1.25+
ISTIO_CHAINS = frozenset((ISTIO_INBOUND, ISTIO_REDIRECT, ISTIO_IN_REDIRECT, ISTIO_OUTPUT, ISTIO_DIVERT, ISTIO_TPROXY,
                          ISTIO_DROP, ISTIO_OUTPUT_DNS))

PREROUTING, OUTPUT = "PREROUTING", "OUTPUT"
NAT, MANGLE, RAW = "nat", "mangle", "raw"
TPROXY = "TPROXY"

DNS_PORT = "53"
AGENT_DNS_PORT = "15053"
# TPROXY mode: envoy outbound -> app traffic by pod IP is marked with this.
OUTBOUND_MARK = "1338"
LOOPBACK_V4, LOOPBACK_V6 = "127.0.0.1/32", "::1/128"
INBOUND_PASSTHROUGH_V4, INBOUND_PASSTHROUGH_V6 = "127.0.0.6/32", "::6/128"

# istio-iptables trace-logging identifiers (pkg/log).
JUMP_INBOUND = "JumpInbound"
JUMP_OUTBOUND = "JumpOutbound"
EXCLUDE_INBOUND_PORT = "ExcludeInboundPort"
INCLUDE_INBOUND_PORT = "IncludeInboundPort"
INBOUND_CAPTURE = "InboundCapture"
KUBEVIRT = "KubevirtCommand"
EXCLUDE_INTERFACE = "ExcludeInterfaceCommand"


class _Ranges(object):
    """One family's share of an outbound range option (istio NetworkRange)."""

    def __init__(self, wildcard=False, cidrs=(), has_loopback=False):
        self.wildcard = wildcard
        self.cidrs = list(cidrs)
        self.has_loopback = has_loopback


def _split_families(value):
    if value == "*":
        return _Ranges(wildcard=True), _Ranges(wildcard=True)
    v4 = [c for c in value if c.version == 4]
    v6 = [c for c in value if c.version == 6]
    return (_Ranges(cidrs=[str(c) for c in v4], has_loopback=any(c.is_loopback for c in v4)),
            _Ranges(cidrs=[str(c) for c in v6], has_loopback=any(c.is_loopback for c in v6)))


def _owner_group_filter(cfg):
    """(except_, groups): istio's config.ParseInterceptFilter."""
    if cfg.owner_groups_include == ["*"]:
        return True, list(cfg.owner_groups_exclude)
    return False, list(cfg.owner_groups_include)


def _groups_none_of(groups):
    words = []
    for group in groups:
        words.extend(("-m", "owner", "!", "--gid-owner", group))
    return tuple(words)


class _Configurator(object):
    def __init__(self, cfg):
        self.cfg = cfg
        self.has = cfg.has
        self.tproxy = cfg.inbound_interception_mode == TPROXY
        self.b = Builder(ipv6=cfg.enable_inbound_ipv6,
                         trace_logging=cfg.trace_logging and not self.has("no_trace_logging_rules"),
                         quote_nflog_prefix=not self.has("nflog_prefix_unquoted"))
        # The IPv4 loopback range of the loopback rules.
        self.loopback_v4 = cfg.host_ipv4_loopback_cidr if self.has("host_ipv4_loopback_cidr") else LOOPBACK_V4
        self.redirect_dns = cfg.redirect_dns
        if (self.has("dns_needs_servers") and not cfg.capture_all_dns
                and not cfg.dns_servers_v4 and not cfg.dns_servers_v6):
            # Istio 1.25+: DNS capture without servers is no DNS capture.
            self.redirect_dns = False

    # -- inbound ---------------------------------------------------------
    def inbound_ports_include(self):
        cfg, b = self.cfg, self.b
        if not cfg.inbound_ports_include:
            return
        if self.tproxy:
            b.append(ISTIO_DIVERT, MANGLE, "-j", "MARK", "--set-mark", cfg.inbound_tproxy_mark)
            b.append(ISTIO_DIVERT, MANGLE, "-j", "ACCEPT")
            b.append_versioned(self.loopback_v4, LOOPBACK_V6, ISTIO_TPROXY, MANGLE,
                               "!", "-d", VERSIONED, "-p", "tcp", "-j", "TPROXY",
                               "--tproxy-mark", cfg.inbound_tproxy_mark + "/0xffffffff",
                               "--on-port", cfg.inbound_capture_port)
            table = MANGLE
        else:
            table = NAT
        b.append(PREROUTING, table, "-p", "tcp", "-j", ISTIO_INBOUND, log=JUMP_INBOUND)

        if cfg.inbound_ports_include == ["*"]:
            for port in cfg.inbound_ports_exclude:
                b.append(ISTIO_INBOUND, table, "-p", "tcp", "--dport", port, "-j", "RETURN",
                         log=EXCLUDE_INBOUND_PORT)
            if self.tproxy:
                b.append(ISTIO_INBOUND, MANGLE, "-p", "tcp", "-m", "conntrack", "--ctstate",
                         "RELATED,ESTABLISHED", "-j", ISTIO_DIVERT)
                b.append(ISTIO_INBOUND, MANGLE, "-p", "tcp", "-j", ISTIO_TPROXY)
            else:
                b.append(ISTIO_INBOUND, NAT, "-p", "tcp", "-j", ISTIO_IN_REDIRECT)
            return
        for port in cfg.inbound_ports_include:
            if self.tproxy:
                b.append(ISTIO_INBOUND, MANGLE, "-p", "tcp", "--dport", port, "-m", "conntrack",
                         "--ctstate", "RELATED,ESTABLISHED", "-j", ISTIO_DIVERT, log=INCLUDE_INBOUND_PORT)
                b.append(ISTIO_INBOUND, MANGLE, "-p", "tcp", "--dport", port, "-j", ISTIO_TPROXY,
                         log=INCLUDE_INBOUND_PORT)
            else:
                b.append(ISTIO_INBOUND, NAT, "-p", "tcp", "--dport", port, "-j", ISTIO_IN_REDIRECT,
                         log=INCLUDE_INBOUND_PORT)

    # -- outbound --------------------------------------------------------
    def outbound_include(self, ranges, append, insert):
        interfaces = self.cfg.kube_virt_interfaces
        if ranges.wildcard:
            append(ISTIO_OUTPUT, NAT, "-j", ISTIO_REDIRECT)
            for iface in interfaces:
                insert(PREROUTING, NAT, 1, "-i", iface, "-j", ISTIO_REDIRECT, log=KUBEVIRT)
        elif ranges.cidrs:
            for cidr in ranges.cidrs:
                for iface in interfaces:
                    insert(PREROUTING, NAT, 1, "-i", iface, "-d", cidr, "-j", ISTIO_REDIRECT, log=KUBEVIRT)
                append(ISTIO_OUTPUT, NAT, "-d", cidr, "-j", ISTIO_REDIRECT)
            if not self.has("no_include_return"):
                # All other traffic is not redirected.
                append(ISTIO_OUTPUT, NAT, "-j", "RETURN")

    def short_circuit_exclude_interfaces(self):
        b = self.b
        for iface in self.cfg.exclude_interfaces:
            b.append(PREROUTING, NAT, "-i", iface, "-j", "RETURN", log=EXCLUDE_INTERFACE)
            b.append(OUTPUT, NAT, "-o", iface, "-j", "RETURN", log=EXCLUDE_INTERFACE)
        if self.tproxy:
            for iface in self.cfg.exclude_interfaces:
                b.append(PREROUTING, MANGLE, "-i", iface, "-j", "RETURN", log=EXCLUDE_INTERFACE)
                b.append(OUTPUT, MANGLE, "-o", iface, "-j", "RETURN", log=EXCLUDE_INTERFACE)

    def short_circuit_kube_internal_interfaces(self):
        for iface in self.cfg.kube_virt_interfaces:
            self.b.insert(PREROUTING, NAT, 1, "-i", iface, "-j", "RETURN", log=KUBEVIRT)

    def capture_by_owner_group(self, except_, groups):
        if except_:
            for group in groups:
                self.b.append(ISTIO_OUTPUT, NAT, "-m", "owner", "--gid-owner", group, "-j", "RETURN")
        else:
            self.b.append(ISTIO_OUTPUT, NAT, *(_groups_none_of(groups) + ("-j", "RETURN")))

    def _inredirect_ports(self, dns_aware):
        """The port match of the -o lo ... -j ISTIO_IN_REDIRECT rules."""
        tunnel = self.cfg.inbound_tunnel_port
        if self.has("inredirect_skips_tunnel_port"):
            if dns_aware:
                return ("-p", "tcp", "-m", "multiport", "!", "--dports", DNS_PORT + "," + tunnel)
            return ("-p", "tcp", "!", "--dport", tunnel)
        if dns_aware:
            return ("-p", "tcp", "!", "--dport", DNS_PORT)
        return ()

    def proxy_owner_rules(self, match, owners, v4_include, v6_include, dns_aware_inredirect):
        """The per-uid / per-gid rules of ISTIO_OUTPUT (loops in run.go)."""
        b, redirect_dns = self.b, self.redirect_dns
        ports = self._inredirect_ports(redirect_dns and dns_aware_inredirect)
        for owner in owners:
            b.append_versioned(self.loopback_v4, LOOPBACK_V6, ISTIO_OUTPUT, NAT,
                               *(("-o", "lo", "!", "-d", VERSIONED) + ports
                                 + ("-m", "owner", match, owner, "-j", ISTIO_IN_REDIRECT)))
            if not v4_include.has_loopback and not v6_include.has_loopback:
                if redirect_dns:
                    b.append(ISTIO_OUTPUT, NAT, "-o", "lo", "-p", "tcp", "!", "--dport", DNS_PORT,
                             "-m", "owner", "!", match, owner, "-j", "RETURN")
                else:
                    b.append(ISTIO_OUTPUT, NAT, "-o", "lo", "-m", "owner", "!", match, owner, "-j", "RETURN")
            b.append(ISTIO_OUTPUT, NAT, "-m", "owner", match, owner, "-j", "RETURN")

    def dns_tcp(self):
        cfg, b = self.cfg, self.b
        if cfg.capture_all_dns:
            b.append(ISTIO_OUTPUT, NAT, "-p", "tcp", "--dport", DNS_PORT, "-j", "REDIRECT",
                     "--to-ports", AGENT_DNS_PORT)
            return
        for server in cfg.dns_servers_v4:
            b.append_v4(ISTIO_OUTPUT, NAT, "-p", "tcp", "--dport", DNS_PORT, "-d", server + "/32",
                        "-j", "REDIRECT", "--to-ports", AGENT_DNS_PORT)
        for server in cfg.dns_servers_v6:
            b.append_v6(ISTIO_OUTPUT, NAT, "-p", "tcp", "--dport", DNS_PORT, "-d", server + "/128",
                        "-j", "REDIRECT", "--to-ports", AGENT_DNS_PORT)

    def dns_udp(self, except_, groups):
        """istio's HandleDNSUDP with AppendOps (up to 1.24)."""
        cfg, b = self.cfg, self.b
        # 1.23+: the UDP rules live in ISTIO_OUTPUT, which OUTPUT enters for UDP.
        chain = ISTIO_OUTPUT if self.has("dns_udp_in_istio_output") else OUTPUT
        if chain == ISTIO_OUTPUT:
            b.append(OUTPUT, NAT, "-p", "udp", "-j", ISTIO_OUTPUT, log=JUMP_OUTBOUND)
            b.append(OUTPUT, RAW, "-p", "udp", "-j", ISTIO_OUTPUT, log=JUMP_OUTBOUND)
        udp53 = ("-p", "udp", "--dport", DNS_PORT)
        for uid in cfg.proxy_uid:
            b.append(chain, NAT, *(udp53 + ("-m", "owner", "--uid-owner", uid, "-j", "RETURN")))
        for gid in cfg.proxy_gid:
            b.append(chain, NAT, *(udp53 + ("-m", "owner", "--gid-owner", gid, "-j", "RETURN")))
        if except_:
            for group in groups:
                b.append(chain, NAT, *(udp53 + ("-m", "owner", "--gid-owner", group, "-j", "RETURN")))
        else:
            b.append(chain, NAT, *(udp53 + _groups_none_of(groups) + ("-j", "RETURN")))
        if cfg.capture_all_dns:
            b.append(chain, NAT, *(udp53 + ("-j", "REDIRECT", "--to-port", AGENT_DNS_PORT)))
        else:
            for server in cfg.dns_servers_v4:
                b.append_v4(chain, NAT, *(udp53 + ("-d", server + "/32", "-j", "REDIRECT",
                                                   "--to-port", AGENT_DNS_PORT)))
            for server in cfg.dns_servers_v6:
                b.append_v6(chain, NAT, *(udp53 + ("-d", server + "/128", "-j", "REDIRECT",
                                                   "--to-port", AGENT_DNS_PORT)))
        self.dns_conntrack_zones(chain, PREROUTING, prerouting_jump=False)

    def dns_conntrack_zones(self, output_chain, inbound_chain, prerouting_jump):
        """istio's addConntrackZoneDNSUDP / addDNSConntrackZones: split DNS UDP into
        conntrack zones 1 and 2.  output_chain / inbound_chain: the raw chains of
        the outgoing and the response rules; prerouting_jump: raw PREROUTING jumps
        to inbound_chain (1.25+)."""
        cfg, b = self.cfg, self.b
        for match, owners in (("--uid-owner", cfg.proxy_uid), ("--gid-owner", cfg.proxy_gid)):
            for owner in owners:
                b.append(output_chain, RAW, "-p", "udp", "--dport", DNS_PORT, "-m", "owner", match, owner,
                         "-j", "CT", "--zone", "1")
                b.append(output_chain, RAW, "-p", "udp", "--sport", AGENT_DNS_PORT, "-m", "owner", match, owner,
                         "-j", "CT", "--zone", "2")
        if cfg.capture_all_dns:
            if prerouting_jump:
                b.append(PREROUTING, RAW, "-j", inbound_chain)
            b.append(output_chain, RAW, "-p", "udp", "--dport", DNS_PORT, "-j", "CT", "--zone", "2")
            b.append(inbound_chain, RAW, "-p", "udp", "--sport", DNS_PORT, "-j", "CT", "--zone", "1")
            return
        # 1.20+: the responses are matched by their source, the server.
        response = "-s" if self.has("dns_source_match") else "-d"
        for servers, append, suffix in ((cfg.dns_servers_v4, b.append_v4, "/32"),
                                        (cfg.dns_servers_v6, b.append_v6, "/128")):
            if prerouting_jump and servers:
                append(PREROUTING, RAW, "-j", inbound_chain)
            for server in servers:
                append(output_chain, RAW, "-p", "udp", "--dport", DNS_PORT, "-d", server + suffix,
                       "-j", "CT", "--zone", "2")
                append(inbound_chain, RAW, "-p", "udp", "--sport", DNS_PORT, response, server + suffix,
                       "-j", "CT", "--zone", "1")

    def dns_chains(self):
        """istio's SetupDNSRedir (1.25+): DNS capture in its own chains."""
        cfg, b = self.cfg, self.b
        b.append(OUTPUT, RAW, "-j", ISTIO_OUTPUT_DNS)
        if cfg.capture_all_dns or cfg.dns_servers_v4:
            b.append_v4(ISTIO_OUTPUT, NAT, "-j", ISTIO_OUTPUT_DNS)
        if cfg.capture_all_dns or cfg.dns_servers_v6:
            b.append_v6(ISTIO_OUTPUT, NAT, "-j", ISTIO_OUTPUT_DNS)
        for proto, to_ports in (("tcp", "--to-ports"), ("udp", "--to-port")):
            if cfg.capture_all_dns:
                b.append(ISTIO_OUTPUT_DNS, NAT, "-p", proto, "--dport", DNS_PORT, "-j", "REDIRECT",
                         to_ports, AGENT_DNS_PORT)
                continue
            for server in cfg.dns_servers_v4:
                b.append_v4(ISTIO_OUTPUT_DNS, NAT, "-p", proto, "--dport", DNS_PORT, "-d", server + "/32",
                            "-j", "REDIRECT", to_ports, AGENT_DNS_PORT)
            for server in cfg.dns_servers_v6:
                b.append_v6(ISTIO_OUTPUT_DNS, NAT, "-p", proto, "--dport", DNS_PORT, "-d", server + "/128",
                            "-j", "REDIRECT", to_ports, AGENT_DNS_PORT)
        self.dns_conntrack_zones(ISTIO_OUTPUT_DNS, ISTIO_INBOUND, prerouting_jump=True)

    def tproxy_marks(self):
        cfg, b = self.cfg, self.b
        mark = cfg.inbound_tproxy_mark
        b.append(PREROUTING, MANGLE, "-p", "tcp", "-m", "mark", "--mark", mark, "-j", "CONNMARK", "--save-mark")
        b.append(OUTPUT, MANGLE, "-p", "tcp", "-o", "lo", "-m", "mark", "--mark", mark, "-j", "RETURN")
        for match, owners in (("--uid-owner", cfg.proxy_uid), ("--gid-owner", cfg.proxy_gid)):
            for owner in owners:
                b.append_versioned(self.loopback_v4, LOOPBACK_V6, OUTPUT, MANGLE,
                                   "!", "-d", VERSIONED, "-p", "tcp", "-o", "lo",
                                   "-m", "owner", match, owner, "-j", "MARK", "--set-mark", OUTBOUND_MARK)
        b.append(OUTPUT, MANGLE, "-p", "tcp", "-m", "connmark", "--mark", mark, "-j", "CONNMARK", "--restore-mark")
        b.insert(ISTIO_INBOUND, MANGLE, 1, "-p", "tcp", "-m", "mark", "--mark", mark, "-j", "RETURN")
        b.insert_v4(ISTIO_INBOUND, MANGLE, 2, "-p", "tcp", "-s", INBOUND_PASSTHROUGH_V4, "-i", "lo", "-j", "RETURN")
        b.insert_v6(ISTIO_INBOUND, MANGLE, 2, "-p", "tcp", "-s", INBOUND_PASSTHROUGH_V6, "-i", "lo", "-j", "RETURN")
        b.insert(ISTIO_INBOUND, MANGLE, 3, "-p", "tcp", "-i", "lo", "-m", "mark", "!", "--mark", OUTBOUND_MARK,
                 "-j", "RETURN")

    def run(self):
        cfg, b = self.cfg, self.b
        v4_exclude, v6_exclude = _split_families(cfg.outbound_ip_ranges_exclude)
        v4_include, v6_include = _split_families(cfg.outbound_ip_ranges_include)

        self.short_circuit_exclude_interfaces()
        self.short_circuit_kube_internal_interfaces()
        if cfg.drop_invalid:
            if self.has("drop_invalid_chain"):
                b.append(PREROUTING, MANGLE, "-m", "conntrack", "--ctstate", "INVALID", "-j", ISTIO_DROP)
                b.append(ISTIO_DROP, MANGLE, "-j", "DROP")
            else:
                b.append(PREROUTING, MANGLE, "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")

        b.append(ISTIO_INBOUND, NAT, "-p", "tcp", "--dport", cfg.inbound_tunnel_port, "-j", "RETURN")
        b.append(ISTIO_REDIRECT, NAT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", cfg.proxy_port)
        b.append(ISTIO_IN_REDIRECT, NAT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", cfg.inbound_capture_port,
                 log=INBOUND_CAPTURE)
        self.inbound_ports_include()

        if self.has("output_jump_all_protocols"):
            b.append(OUTPUT, NAT, "-j", ISTIO_OUTPUT, log=JUMP_OUTBOUND)
        else:
            b.append(OUTPUT, NAT, "-p", "tcp", "-j", ISTIO_OUTPUT, log=JUMP_OUTBOUND)
        for port in cfg.outbound_ports_exclude:
            b.append(ISTIO_OUTPUT, NAT, "-p", "tcp", "--dport", port, "-j", "RETURN")
            if self.has("outbound_port_exclude_udp"):
                b.append(ISTIO_OUTPUT, NAT, "-p", "udp", "--dport", port, "-j", "RETURN")
        b.append_versioned(INBOUND_PASSTHROUGH_V4, INBOUND_PASSTHROUGH_V6, ISTIO_OUTPUT, NAT,
                           "-o", "lo", "-s", VERSIONED, "-j", "RETURN")
        # Only the uid rules skip port 53 when redirecting back to the inbound listener.
        self.proxy_owner_rules("--uid-owner", cfg.proxy_uid, v4_include, v6_include, dns_aware_inredirect=True)
        self.proxy_owner_rules("--gid-owner", cfg.proxy_gid, v4_include, v6_include, dns_aware_inredirect=False)

        except_, groups = _owner_group_filter(cfg)
        self.capture_by_owner_group(except_, groups)
        if self.redirect_dns:
            if self.has("dns_chains"):
                self.dns_chains()
            else:
                self.dns_tcp()

        b.append_versioned(self.loopback_v4, LOOPBACK_V6, ISTIO_OUTPUT, NAT, "-d", VERSIONED, "-j", "RETURN")
        for cidr in v4_exclude.cidrs:
            b.append_v4(ISTIO_OUTPUT, NAT, "-d", cidr, "-j", "RETURN")
        for cidr in v6_exclude.cidrs:
            b.append_v6(ISTIO_OUTPUT, NAT, "-d", cidr, "-j", "RETURN")

        for port in cfg.outbound_ports_include:
            b.append(ISTIO_OUTPUT, NAT, "-p", "tcp", "--dport", port, "-j", ISTIO_REDIRECT)
        self.outbound_include(v4_include, b.append_v4, b.insert_v4)
        self.outbound_include(v6_include, b.append_v6, b.insert_v6)

        if self.redirect_dns and not self.has("dns_chains"):
            self.dns_udp(except_, groups)
        if self.tproxy:
            self.tproxy_marks()
        return b.build()


def generate(cfg):
    """The capture Ruleset for a validated CaptureConfig."""
    return _Configurator(cfg).run()


def restore_payloads(cfg, ruleset):
    """{family: iptables-restore payload} of the ruleset in the form of cfg's release:
    Istio's own payloads from 1.24 on (render_restore_declared), the
    collection's ':CHAIN - [0:0]' payloads before."""
    render = render_restore_declared if cfg.has("restore_declares_with_new") else render_restore
    return dict((family, render(ruleset, family)) for family in FAMILIES)
