# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""Which rules of a live iptables state belong to the capture.

The ISTIO_* chains are the capture's; in built-in chains a rule is ours by
its shape (what only a capture writes), by its values (a capture shape
with the values found in the ISTIO_* chains: Signature), or by the table's
ownership marker (capture_marker).  Pure Python, no Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import re
from collections import Counter

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_rules import BUILTIN_CHAINS
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_save import Table


def is_capture_chain(chain):
    """Chains in Istio's namespace belong to the capture."""
    return chain.startswith("ISTIO_") and chain not in BUILTIN_CHAINS


# Rules only a capture writes (in iptables-save's canonical form).
_ISTIO_ONLY = re.compile(
    r"(?:^| )-j ISTIO_[A-Z0-9_]+(?: |$)"
    r"|-j NFLOG --nflog-prefix \"?(?:JumpInbound|JumpOutbound|ExcludeInboundPort|IncludeInboundPort|"
    r"InboundCapture|KubevirtCommand|ExcludeInterfaceCommand)\"? --nflog-group 1337 "
    r"|^(?:-d \S+ )?-p udp -m udp --dport 53 -j REDIRECT --to-ports 15053$"
    r"|^-p udp -m udp --sport 15053 -m owner --[ug]id-owner \S+ -j CT --zone 2$"
    r"|^! -d \S+ -o lo -p tcp -m owner --[ug]id-owner \S+ -j MARK --set-xmark 0x53a/0xffffffff$")
# Rules of capture shape whose values must match the capture's (Signature).
_UDP53_OWNER_RETURN = re.compile(r"^-p udp -m udp --dport 53 ((?:-m owner (?:! )?--[ug]id-owner \S+ ?)+)-j RETURN$")
_UDP53_OWNER_ZONE1 = re.compile(r"^-p udp -m udp --dport 53 (-m owner --[ug]id-owner \S+) -j CT --zone 1$")
_DNS_ZONE = re.compile(r"^(?:-[sd] (\S+) )?-p udp -m udp --(dport 53 -j CT --zone 2|sport 53 -j CT --zone 1)$")
_MARK_RULE = re.compile(
    r"^(?:-p tcp -m mark --mark (\S+) -j CONNMARK --save-mark"
    r"|-p tcp -m connmark --mark (\S+) -j CONNMARK --restore-mark"
    r"|-o lo -p tcp -m mark --mark (\S+) -j RETURN$)")
# Shapes other software could share too: ours only by the ownership marker,
# or when istio-iptables left a capture behind (ISTIO_* chains, no marker).
_IFACE_RETURN = re.compile(r"^-[io] (\S+) -j RETURN$")
_INVALID_DROP = "-m conntrack --ctstate INVALID -j DROP"
# What the ISTIO_* chains tell about the capture's values.
_OWNER_RETURN = re.compile(r"^((?:-m owner (?:! )?--[ug]id-owner \S+ ?)+)-j RETURN$")
_TCP_DNS_REDIRECT = re.compile(r"^(?:-d (\S+) )?-p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053$")
_MARK_VALUE = re.compile(r"(?:--set-xmark|--tproxy-mark|-m mark --mark) (0x[0-9a-f]+)")
_KUBEVIRT_JUMP = re.compile(r"^(?:-d \S+ )?-i (\S+) (?:-d \S+ )?-j ISTIO_REDIRECT$")


class Signature(object):
    """The values of a capture, read from the live ISTIO_* chains: which
    owner matches, marks, DNS servers and kube-virt interfaces it uses."""

    def __init__(self, tables):
        self.owners, self.marks, self.dns, self.kubevirt = set(), set(), set(), set()
        self.capture_all_dns = False
        self.present = False
        for table in tables.values():
            for chain, specs in table.rules.items():
                if is_capture_chain(chain):
                    self._read_chain(specs)
                elif chain == "PREROUTING" and table.name == "nat":
                    self.kubevirt.update(m.group(1) for m in map(_KUBEVIRT_JUMP.match, specs) if m)
            self.present = self.present or any(is_capture_chain(c) for c in table.policies)
        # istio's excluded interfaces come in pairs: nat PREROUTING -i X and OUTPUT -o X.
        nat = tables.get("nat") or Table("nat")
        self.excluded = (self._iface_returns(nat, "PREROUTING") & self._iface_returns(nat, "OUTPUT"))

    @staticmethod
    def _iface_returns(table, chain):
        return set(m.group(1) for m in map(_IFACE_RETURN.match, table.rules.get(chain, [])) if m)

    def _read_chain(self, specs):
        for spec in specs:
            owner = _OWNER_RETURN.match(spec)
            if owner:
                self.owners.add(owner.group(1).strip())
            dns = _TCP_DNS_REDIRECT.match(spec)
            if dns:
                if dns.group(1):
                    self.dns.add(dns.group(1))
                else:
                    self.capture_all_dns = True
            self.marks.update(_MARK_VALUE.findall(spec))

    def matches(self, table, chain, spec):
        """True when a built-in chain rule has a capture shape with this capture's values."""
        if table == "nat" and chain == "OUTPUT":
            m = _UDP53_OWNER_RETURN.match(spec)
            return bool(m) and m.group(1).strip() in self.owners
        if table == "nat" and chain == "PREROUTING":
            m = _IFACE_RETURN.match(spec)
            return bool(m) and m.group(1) in self.kubevirt
        if table == "raw":
            m = _UDP53_OWNER_ZONE1.match(spec)
            if m and chain == "OUTPUT":
                return m.group(1) in self.owners
            m = _DNS_ZONE.match(spec)
            if m and (chain == "OUTPUT") == m.group(2).startswith("dport"):
                return m.group(1) in self.dns if m.group(1) else self.capture_all_dns
            return False
        if table == "mangle":
            m = _MARK_RULE.match(spec)
            return bool(m) and next(v for v in m.groups() if v) in self.marks
        return False

    def left_by_istio(self, table, chain, spec):
        """Shapes other software could share, taken only for a capture that
        istio-iptables left: interface RETURNs of istio's excluded-interface
        pairs, and the INVALID DROP."""
        if table not in ("nat", "mangle") or chain not in ("PREROUTING", "OUTPUT"):
            return False
        m = _IFACE_RETURN.match(spec)
        if m:
            return spec.startswith("-i " if chain == "PREROUTING" else "-o ") and m.group(1) in self.excluded
        return table == "mangle" and chain == "PREROUTING" and spec == _INVALID_DROP


def owned_builtin(table, chain, specs, signature, recorded, trust_generic):
    """[(index, spec)] (1-based) of the capture's rules in a built-in chain.

    A rule is ours when only a capture writes it; when it has a capture
    shape with the values of the capture found in the ISTIO_* chains;
    when the table's ownership marker names it (`recorded`: the latest
    copies of a spec are taken, ours having been added last); or, for shapes
    other software could share, when trust_generic (istio-iptables left a
    capture: no marker in the family).
    """
    owned = set()
    for index, spec in enumerate(specs, 1):
        if (_ISTIO_ONLY.search(spec) or signature.matches(table, chain, spec)
                or (trust_generic and signature.left_by_istio(table, chain, spec))):
            owned.add(index)
    spare = Counter(recorded)
    for index in range(len(specs), 0, -1):
        spec = specs[index - 1]
        if index not in owned and spare[spec] > 0:
            spare[spec] -= 1
            owned.add(index)
    return [(i, specs[i - 1]) for i in sorted(owned)]
