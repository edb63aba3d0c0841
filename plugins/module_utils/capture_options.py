# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""The one table of the capture's options.

Every option of meshcapture.sidecar.rules is declared here once: name,
type, default, the cluster.env key it is read from, the first and last
Istio release that has it, and its documentation.  Derived from it: the
rules module's argument spec, the core's defaults (capture_config), the
cluster.env mapping (the cluster_env filter), and, through
scripts/sync_options.py (checked by a unit test), the option documentation
of the rules module and of the capture doc fragment, and the role's
argument specs and defaults.  Pure Python, no Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class Option(object):
    """One option.

    core: a capture option (CaptureConfig reads it); otherwise it only
    steers the module.  role: the role has a variable capture_<name>.
    fragment: documented in the meshcapture.sidecar.capture doc fragment
    (shared with the routes module) instead of the rules module.
    role_doc replaces, role_note adds to, the documentation of the role's
    variable.
    first/last: the first and last Istio release (a (major, minor) tuple)
    whose istio-iptables has the option; None: every supported release.
    """

    __slots__ = ("name", "type", "default", "env", "first", "last", "doc", "elements", "choices", "core",
                 "role", "fragment", "role_default", "role_doc", "role_note")

    def __init__(self, name, type, default=None, env=None, first=None, last=None, doc=(), elements=None,
                 choices=None, core=True, role=True, fragment=False, role_default=None, role_doc=None, role_note=()):
        self.name = name
        self.type = type
        self.default = default
        self.env = env
        self.first = first
        self.last = last
        self.doc = list(doc)
        self.elements = elements
        self.choices = list(choices) if choices else None
        self.core = core
        self.role = role
        self.fragment = fragment
        self.role_default = role_default
        self.role_doc = list(role_doc) if role_doc else None
        self.role_note = list(role_note)

    def spec(self):
        """The AnsibleModule argument spec entry."""
        out = dict(type=self.type)
        if self.elements:
            out["elements"] = self.elements
        if self.choices:
            out["choices"] = list(self.choices)
        if self.default is not None:
            out["default"] = list(self.default) if isinstance(self.default, list) else self.default
        return out

    def documentation(self):
        """The option's entry of a module's DOCUMENTATION."""
        out = dict(description=list(self.doc))
        out.update(self.spec())
        return out


def _list(name, default, env=None, doc=(), **kw):
    return Option(name, "list", default=default, env=env, doc=doc, elements="str", **kw)


OPTIONS = (
    # The module's own options (not istio-iptables').
    Option("state", "str", "present", choices=("present", "absent", "rendered"), core=False, role=False, doc=(
        "V(present) converges to the ruleset, V(absent) removes the capture, V(rendered) computes only.",)),
    Option("backend", "str", "auto", choices=("auto", "iptables-nft", "iptables-legacy", "nftables"), core=False,
           doc=(
               "Which iptables binaries to use. V(auto) uses C(iptables-legacy) only where legacy tables already "
               "hold rules (as istio does), C(iptables-nft) otherwise.",
               "V(nftables) writes native nftables tables (family C(inet)) with C(nft) instead of iptables rules.",
               "Only one backend's capture can be in place. When a capture of another backend is found, "
               "O(state=present) fails before changing anything, unless O(migrate) is set."),
           role_note=("With V(nftables) the boot-time restore loads the persisted C(rules.nft) with C(nft -f). See "
                      "docs/backends.md.",)),
    Option("migrate", "bool", False, core=False, doc=(
        "With O(state=present), replace a capture of another backend (iptables backends and V(nftables)) in "
        "this run. The new capture is applied first, in one transaction, then the old one removed, in another.",
        "With O(state=absent), remove the captures of both kinds.")),
    Option("compact_result", "bool", False, core=False, role=False, doc=(
        "Return the list options in RV(config), and in the C(invocation) Ansible keeps of the task, as "
        "comma-separated strings (the form the options also accept) instead of lists. A list with no items "
        "stays an empty list.",
        "Ansible handles every item of a result's lists one by one (masking C(no_log) values, serialising, "
        "passing it to the controller); with 10,000 CIDRs the two copies of the options are most of the result "
        "a re-run returns.",
        "With O(state=present) and O(state=absent) it also leaves RV(commands) out of the result (the largest list "
        "a result holds: one item per rule); O(state=rendered) always returns it. RV(restore), RV(added), "
        "RV(removed) and the diff stay as they are.",
        "The role meshcapture.sidecar.capture sets it.")),
    Option("state_dir", "path", "/run/meshcapture", core=False, doc=(
        "Where the module keeps its apply journal (per network namespace, to tell an apply that was cut short), "
        "its cache of canonical rule forms and the rendering of the last applied configuration (so that a re-run "
        "with the same options skips validation and generation). Which rules the capture owns is marked in the "
        "tables themselves (chain C(MESHCAPTURE_OWNED)), so nothing here is needed after a reboot.",
        "It must be a directory only root can change: created 0700 when missing; a symbolic link, a directory "
        "not owned by root or writable by group or others, or one under such a directory, is refused before "
        "anything is read or changed.",)),
    Option("istio_version", "str", None, role_default="auto", doc=(
        "The Istio release whose C(istio-iptables) rules to reproduce, V(1.17) to V(1.30); a patch version "
        "such as V(1.28.3) selects its release line.",
        "Unset, the rules of Istio 1.17.",
        "Each release's rules are those of the previous one plus its changes, listed in docs/versions.md. From "
        "V(1.24) on, RV(restore) holds Istio's own C(iptables-restore) payloads (C(* nat), chains declared "
        "with C(-N)).",
        "Options a release does not have are refused with a value other than their default.",
    ), role_doc=(
        "The Istio release whose capture rules to apply (rules option C(istio_version)), V(1.17) to V(1.30) or "
        "a patch version such as V(1.28.3).",
        "V(auto) (the default): the version of the installed Istio sidecar (the C(istio-sidecar) package or "
        "C(pilot-agent version)); V(1.17) when none is installed.",
        "Null: the module's default, the rules of Istio 1.17.")),
    Option("nft_layout", "str", None, choices=("istio", "sets"), doc=(
        "With O(backend=nftables), which nftables ruleset to write.",
        "V(istio): the ruleset of Istio's native nftables capture (C(istio-iptables --native-nftables)), "
        "Istio 1.27 and later only.",
        "V(sets): the collection's translation of the iptables rules, with named sets for port and CIDR lists.",
        "Unset: V(istio) with O(istio_version) 1.27 or later, V(sets) otherwise.")),
    # istio-iptables' options.
    Option("proxy_port", "int", 15001, env="ENVOY_PORT", doc=(
        "Port the proxy's outbound listener captures on (C(-p) / E(ENVOY_PORT)).",)),
    Option("inbound_capture_port", "int", 15006, env="INBOUND_CAPTURE_PORT", doc=(
        "Port inbound traffic is redirected to (C(-z) / E(INBOUND_CAPTURE_PORT)).",)),
    Option("inbound_tunnel_port", "int", 15008, env="INBOUND_TUNNEL_PORT", doc=(
        "Tunnel port that bypasses inbound capture (C(-e) / E(INBOUND_TUNNEL_PORT)).",)),
    _list("proxy_uid", ["1337"], doc=(
        "User IDs or names whose traffic is never captured, the proxy's (C(-u)).",)),
    _list("proxy_gid", None, doc=(
        "Group IDs or names whose traffic is never captured (C(-g)). Defaults to O(proxy_uid).",)),
    Option("inbound_interception_mode", "str", "REDIRECT", env="ISTIO_INBOUND_INTERCEPTION_MODE",
           choices=("REDIRECT", "TPROXY"), doc=(
               "How inbound traffic is captured (C(-m) / E(ISTIO_INBOUND_INTERCEPTION_MODE)).",),
           role_note=("V(TPROXY) also sets up the policy routing.",)),
    Option("inbound_tproxy_mark", "int", 1337, env="ISTIO_INBOUND_TPROXY_MARK", fragment=True, doc=(
        "Packet mark of inbound connections in TPROXY mode (C(-t) / E(ISTIO_INBOUND_TPROXY_MARK)).",
        "A 32-bit value from 1 to 4294967295.")),
    Option("inbound_tproxy_route_table", "int", 133, env="ISTIO_INBOUND_TPROXY_ROUTE_TABLE", fragment=True, doc=(
        "Policy routing table that delivers TPROXY-marked packets locally (C(-r) / "
        "E(ISTIO_INBOUND_TPROXY_ROUTE_TABLE)).",
        "1 to 4294967295, except the kernel's reserved tables 253, 254 and 255.")),
    _list("inbound_ports_include", [], env="ISTIO_INBOUND_PORTS", doc=(
        "Inbound ports to capture, or V(*) for all (C(-b) / E(ISTIO_INBOUND_PORTS)). Empty captures no inbound "
        "traffic.",)),
    _list("inbound_ports_exclude", [], env="ISTIO_LOCAL_EXCLUDE_PORTS", doc=(
        "Inbound ports not captured when O(inbound_ports_include=*) (C(-d) / E(ISTIO_LOCAL_EXCLUDE_PORTS)).",),
        role_note=("The connection guard adds the Ansible port here.",)),
    _list("outbound_ports_include", [], env="ISTIO_OUTBOUND_PORTS", doc=(
        "Outbound ports always captured (C(-q) / E(ISTIO_OUTBOUND_PORTS)).",)),
    _list("outbound_ports_exclude", [], env="ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", doc=(
        "Outbound ports never captured (C(-o) / E(ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE)). From Istio 1.25 on, "
        "for UDP as well as TCP.",)),
    _list("outbound_ip_ranges_include", [], env="ISTIO_SERVICE_CIDR", doc=(
        "Destination CIDRs whose traffic is captured, or V(*) for all (C(-i) / E(ISTIO_SERVICE_CIDR)).",
        "Addresses are normalised to their network, like istio does (V(10.1.2.3/8) becomes V(10.0.0.0/8)).")),
    _list("outbound_ip_ranges_exclude", [], env="ISTIO_SERVICE_EXCLUDE_CIDR", doc=(
        "Destination CIDRs never captured (C(-x) / E(ISTIO_SERVICE_EXCLUDE_CIDR)).",)),
    _list("kube_virt_interfaces", [], doc=(
        "Interfaces whose inbound traffic is treated as outbound (C(-k)), as for KubeVirt VMs.",)),
    _list("exclude_interfaces", [], env="ISTIO_EXCLUDE_INTERFACES", doc=(
        "Interfaces whose traffic is never captured (C(-c) / E(ISTIO_EXCLUDE_INTERFACES)).",)),
    _list("owner_groups_include", ["*"], env="ISTIO_OUTBOUND_OWNER_GROUPS", doc=(
        "Groups whose outbound traffic is captured, or V(*) for all (E(ISTIO_OUTBOUND_OWNER_GROUPS)). At most "
        "64.",)),
    _list("owner_groups_exclude", [], env="ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", doc=(
        "Groups whose outbound traffic is not captured (E(ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE)).",)),
    Option("redirect_dns", "bool", False, env="ISTIO_META_DNS_CAPTURE", doc=(
        "Capture DNS (TCP and UDP port 53) to the agent on port 15053 (E(ISTIO_META_DNS_CAPTURE)).",
        "From Istio 1.25 on, DNS is captured only when there are DNS servers or O(capture_all_dns) is set.")),
    Option("capture_all_dns", "bool", False, doc=(
        "With O(redirect_dns), capture DNS to every server, not only those of O(dns_servers_v4)/"
        "O(dns_servers_v6).",)),
    _list("dns_servers_v4", None, doc=(
        "IPv4 DNS servers whose traffic is captured. Unset, the target's C(/etc/resolv.conf) is read when "
        "O(redirect_dns) is on; V([]) means none.",)),
    _list("dns_servers_v6", None, doc=(
        "IPv6 DNS servers whose traffic is captured, like O(dns_servers_v4).",)),
    Option("drop_invalid", "bool", False, env="INVALID_DROP", doc=(
        "Drop packets conntrack finds INVALID instead of resetting connections (E(INVALID_DROP)).",)),
    Option("enable_inbound_ipv6", "bool", False, fragment=True, doc=(
        "Capture IPv6 as well (istio does when the pod IP is IPv6). Adds the ip6tables rules, and the "
        "C(::6/128) inbound source address on C(lo).",)),
    Option("trace_logging", "bool", False, last=(1, 25), doc=(
        "Add NFLOG rules (group 1337) that trace which capture rules match (C(--iptables-trace-logging)).",
        "Istio 1.25 adds no rules for it, and 1.26 removed it: V(true) fails with O(istio_version) 1.26 or "
        "later.")),
    Option("host_ipv4_loopback_cidr", "str", "127.0.0.1/32", env="ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", first=(1, 21),
           doc=(
               "The IPv4 loopback range of the host that is never captured (E(ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR)); "
               "an IPv4 loopback address with a prefix length from 8 to 32, used in the rules as written.",
               "Istio 1.21 and later: another value fails with an older O(istio_version).")),
)

BY_NAME = dict((option.name, option) for option in OPTIONS)
CORE_OPTIONS = tuple(option for option in OPTIONS if option.core)


def argument_spec():
    """The rules module's argument spec."""
    return dict((option.name, option.spec()) for option in OPTIONS)


def core_defaults():
    """name -> default of the capture options, in table order (None: computed by the core)."""
    return dict((option.name, list(option.default) if isinstance(option.default, list) else option.default)
                for option in CORE_OPTIONS)


def cluster_env_keys():
    """cluster.env variable -> rules option name."""
    return dict((option.env, option.name) for option in OPTIONS if option.env)
