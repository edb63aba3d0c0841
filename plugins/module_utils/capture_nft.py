# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""The capture Ruleset as native nftables: one `inet` table per iptables table.

render_nft(ruleset) turns the same model the iptables renderer uses
(capture_rules.Ruleset) into Istio's native nftables layout: tables
istio-proxy-raw / -mangle / -nat of family inet, base chains prerouting
and output at the iptables priorities (raw -300, mangle -150, nat -100),
user chains with Istio's nft names (ISTIO_OUTPUT -> istio-output).

* Inserts are replayed in order, as iptables would apply them.
* A run of consecutive rules that differ only in one -d/-s CIDR or one
  --dport/--sport value, with the same terminating verdict, becomes one
  rule that looks the value up in a named set (per-packet cost flat in
  the list length; first-match over the run == set membership).
* IPv4 and IPv6 lists of a chain are merged (longest common subsequence
  of the family-neutral rules): shared rules are written once, the others
  keep their family through their ip/ip6 match or `meta nfproto`, so each
  family sees exactly its own rules in its own order.  Without IPv6 rules
  every rule is IPv4-only: IPv6 traffic is not captured.

The payload is an `nft -f` text in the form `nft list table` prints
(nft 1.0.x), so a listing of the loaded tables reads back equal to
NftRuleset.table_text().  Pure Python, no Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import difflib
import ipaddress
import socket
from collections import OrderedDict

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_nft_rules import (
    SET_TYPES,
    Match,
    NftRenderError,
    NftRule,
    SetRef,
    format_address,
    nft_chain_name,
    text,
    translate,
)
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_rules import (
    BUILTIN_CHAINS,
    FAMILIES,
    IPV4,
    IPV6,
    TABLES,
)

__all__ = ("NFT_FAMILY", "NFT_TABLES", "NftRenderError", "NftRuleset", "render_nft", "render_nft_payload",
           "render_nft_delete")

NFT_FAMILY = "inet"
# Istio's own native nftables table names (tools/istio-nftables constants).
NFT_TABLES = OrderedDict((("raw", "istio-proxy-raw"), ("mangle", "istio-proxy-mangle"),
                          ("nat", "istio-proxy-nat")))
# (table, built-in chain) -> (nft chain, its `type ... hook ... priority ...;` line), as nft lists it.
BASE_CHAINS = {
    ("raw", "PREROUTING"): ("prerouting", "type filter hook prerouting priority raw; policy accept;"),
    ("raw", "OUTPUT"): ("output", "type filter hook output priority raw; policy accept;"),
    ("mangle", "PREROUTING"): ("prerouting", "type filter hook prerouting priority mangle; policy accept;"),
    ("mangle", "OUTPUT"): ("output", "type route hook output priority mangle; policy accept;"),
    ("nat", "PREROUTING"): ("prerouting", "type nat hook prerouting priority dstnat; policy accept;"),
    ("nat", "OUTPUT"): ("output", "type nat hook output priority -100; policy accept;"),
}
_BASE_ORDER = ("PREROUTING", "OUTPUT")
# Verdicts after which the packet leaves the chain: a run of them is first-match.
_TERMINAL = ("return", "accept", "drop", "redirect")
# nft list puts this many elements of a type on one line (calculate_delim in nft 1.0.x).
_ELEMENTS_PER_LINE = {"ipv4_addr": 2, "ipv6_addr": 1, "inet_service": 5}
_ELEMENT_INDENT = "\n\t\t\t     "
# Above this many cells the family merge uses difflib's matching instead of a full LCS table.
_LCS_CELLS = 250000


# ------------------------------------------------------------ chain order
def final_order(ruleset):
    """{family: OrderedDict((table, chain) -> [Rule])} after replaying appends/inserts."""
    out = {}
    for family in FAMILIES:
        chains = OrderedDict()
        for rule in ruleset[family]:
            rules = chains.setdefault((rule.table, rule.chain), [])
            if rule.position is None:
                rules.append(rule)
            elif 1 <= rule.position <= len(rules) + 1:
                rules.insert(rule.position - 1, rule)
            else:
                raise NftRenderError("insert position %s of %s rule '%s' is out of range for %s/%s (%d rules)" % (
                    rule.position, family, " ".join(rule.params), rule.table, rule.chain, len(rules)))
        out[family] = chains
    return out


# ------------------------------------------------------------- coalescing
def _slot_kind(rule, match):
    if match.negated:
        return None
    if match.kind in ("daddr", "saddr") and not isinstance(match.value, SetRef):
        return match.kind + ("4" if rule.family == IPV4 else "6")
    if match.kind in ("dport", "sport") and not isinstance(match.value[1], SetRef) \
            and not match.value[1].startswith("{"):
        return match.kind
    return None


def _key(rule, index, kind):
    if index >= len(rule.matches) or _slot_kind(rule, rule.matches[index]) != kind:
        return None
    match = rule.matches[index]
    blank = Match(match.kind, False, (match.value[0], None) if match.kind in ("dport", "sport") else None)
    return (rule.family, rule.matches[:index] + (blank,) + rule.matches[index + 1:], rule.statement)


def _intervals(values):
    """Sorted (low, high) integer intervals; the second result tells whether any overlapped."""
    spans = sorted(values)
    merged, overlap = [], False
    for low, high in spans:
        if merged and low <= merged[-1][1]:
            overlap = True
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged, overlap


def _address_elements(networks):
    version = networks[0].version
    merged, overlap = _intervals((int(n.network_address), int(n.broadcast_address)) for n in networks)
    factory = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    elements = []
    bits = 32 if version == 4 else 128
    for low, high in merged:
        size = high - low + 1
        if size & (size - 1) == 0 and low % size == 0:  # exactly one prefix
            network = ipaddress.ip_network((factory(low), bits - size.bit_length() + 1))
            elements.append(format_address(network))
        else:
            elements.append("%s-%s" % (socket.inet_ntop(family, factory(low).packed),
                                       socket.inet_ntop(family, factory(high).packed)))
    return tuple(elements), overlap


def _port_elements(ports):
    spans = []
    for port in ports:
        low, dummy, high = port.partition("-")
        spans.append((int(low), int(high or low)))
    merged, overlap = _intervals(spans)
    return tuple("%d" % lo if lo == hi else "%d-%d" % (lo, hi) for lo, hi in merged), overlap


def _set_rule(run, index, kind):
    first = run[0]
    match = first.matches[index]
    if kind in ("dport", "sport"):
        elements, overlap = _port_elements([r.matches[index].value[1] for r in run])
        value = (match.value[0], SetRef(kind, elements))
    else:
        elements, overlap = _address_elements([r.matches[index].value for r in run])
        value = SetRef(kind, elements)
    if overlap and first.statement[0] not in _TERMINAL:
        return None  # a jump would run twice for a packet in two overlapping entries
    matches = first.matches[:index] + (Match(match.kind, False, value),) + first.matches[index + 1:]
    return NftRule(first.family, matches, first.statement)


def coalesce(rules):
    """Runs of rules that differ in one CIDR or port value -> one rule with a SetRef."""
    out, i, n = [], 0, len(rules)
    while i < n:
        rule = rules[i]
        best = (1, None, None)
        if rule.statement[0] in _TERMINAL or rule.statement[0] == "jump":
            for index, match in enumerate(rule.matches):
                kind = _slot_kind(rule, match)
                if kind is None:
                    continue
                key, j = _key(rule, index, kind), i + 1
                while j < n and _key(rules[j], index, kind) == key:
                    j += 1
                if j - i > best[0]:
                    best = (j - i, index, kind)
        length, index, kind = best
        merged = _set_rule(rules[i:i + length], index, kind) if length > 1 else None
        if merged is None:
            out.append(rule)
            i += 1
        else:
            out.append(merged)
            i += length
    return out


# ----------------------------------------------------------- family merge
def _lcs_pairs(a, b):
    """Index pairs of a longest common subsequence of a and b (lists of hashables)."""
    if not a or not b:
        return []
    if len(a) * len(b) > _LCS_CELLS:
        matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
        return [(blk.a + k, blk.b + k) for blk in matcher.get_matching_blocks() for k in range(blk.size)]
    rows, cols = len(a), len(b)
    table = [[0] * (cols + 1) for dummy in range(rows + 1)]
    for i in range(rows - 1, -1, -1):
        row, below = table[i], table[i + 1]
        for j in range(cols - 1, -1, -1):
            row[j] = below[j + 1] + 1 if a[i] == b[j] else max(below[j], row[j + 1])
    pairs, i, j = [], 0, 0
    while i < rows and j < cols:
        if a[i] == b[j]:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif table[i + 1][j] >= table[i][j + 1]:
            i += 1
        else:
            j += 1
    return pairs


def merge_families(v4, v6):
    """[(NftRule, restrict_to)]: v4 and v6 rule lists as one inet chain.

    A family-neutral rule that both lists share (in a common subsequence)
    is written once (restrict_to None); every other rule is limited to its
    family.  Between two shared rules the IPv4 rules come first: they never
    see an IPv6 packet and the reverse, so each family keeps its order.
    """
    neutral4 = [i for i, r in enumerate(v4) if r.family is None]
    neutral6 = [j for j, r in enumerate(v6) if r.family is None]
    # Common prefix / suffix first: dual-stack chains are mostly identical.
    head = 0
    while head < min(len(neutral4), len(neutral6)) and v4[neutral4[head]] == v6[neutral6[head]]:
        head += 1
    tail = 0
    while (tail < min(len(neutral4), len(neutral6)) - head
           and v4[neutral4[-1 - tail]] == v6[neutral6[-1 - tail]]):
        tail += 1
    mid4 = neutral4[head:len(neutral4) - tail]
    mid6 = neutral6[head:len(neutral6) - tail]
    pairs = [(neutral4[k], neutral6[k]) for k in range(head)]
    pairs += [(mid4[i], mid6[j]) for i, j in _lcs_pairs([v4[i] for i in mid4], [v6[j] for j in mid6])]
    pairs += [(neutral4[len(neutral4) - tail + k], neutral6[len(neutral6) - tail + k]) for k in range(tail)]
    out, i, j = [], 0, 0
    for pi, pj in pairs + [(len(v4), len(v6))]:
        out.extend((r, IPV4) for r in v4[i:pi])
        out.extend((r, IPV6) for r in v6[j:pj])
        if pi < len(v4):
            out.append((v4[pi], None))
        i, j = pi + 1, pj + 1
    return out


# ---------------------------------------------------------------- the result
class NftTable(object):
    """One inet table: named sets and chains (name -> (hook line or None, [rule text]))."""

    def __init__(self, name):
        self.name = name
        self.sets = OrderedDict()  # name -> SetRef
        self.chains = OrderedDict()

    def text(self):
        """The table as `nft list table inet NAME` prints it."""
        blocks = [_set_text(name, ref) for name, ref in self.sets.items()]
        for chain, (hook, rules) in self.chains.items():
            lines = ["\tchain %s {" % chain]
            if hook:
                lines.append("\t\t" + hook)
            lines.extend("\t\t" + rule for rule in rules)
            lines.append("\t}")
            blocks.append("\n".join(lines))
        return "table %s %s {\n%s\n}\n" % (NFT_FAMILY, self.name, "\n\n".join(blocks))


def _set_text(name, ref):
    set_type = SET_TYPES[ref.kind]
    interval = set_type != "inet_service" or any("-" in e for e in ref.elements)
    lines = ["\tset %s {" % name, "\t\ttype %s" % set_type]
    if interval:
        lines += ["\t\tflags interval", "\t\tauto-merge"]
    per_line = _ELEMENTS_PER_LINE[set_type]
    parts = []
    for k, element in enumerate(ref.elements):
        if k:
            parts.append("," + _ELEMENT_INDENT if k % per_line == 0 else ", ")
        parts.append(element)
    lines += ["\t\telements = { %s }" % "".join(parts), "\t}"]
    return "\n".join(lines)


class NftRuleset(object):
    """The rendered capture: `.tables` lists the nft table names that have content."""

    def __init__(self, tables):
        self._tables = OrderedDict((t.name, t) for t in tables)

    @property
    def tables(self):
        return list(self._tables)

    def table(self, name):
        return self._tables[name]

    def table_text(self, name):
        """One table in `nft list table inet NAME` form."""
        return self._tables[name].text()

    def payload(self):
        return render_nft_payload(self)

    def rule_count(self):
        return sum(len(rules) for t in self._tables.values() for dummy, rules in t.chains.values())


def _set_refs(rule):
    for match in rule.matches:
        value = match.value
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], SetRef):
            value = value[1]
        if isinstance(value, SetRef):
            yield value


def _build_table(table, nft_name, chain_order, chains):
    """chains: {iptables chain: [(NftRule, restrict_to)]} -> NftTable."""
    out = NftTable(nft_name)
    names = {}
    for chain in chain_order:
        nft_chain = BASE_CHAINS[(table, chain)][0] if chain in BUILTIN_CHAINS else nft_chain_name(chain)
        if nft_chain in names.values() and names.get(chain) != nft_chain:
            raise NftRenderError("chains %s map to the same nftables chain %r" % (chain, nft_chain))
        names[chain] = nft_chain
    set_names = OrderedDict()
    for chain in chain_order:
        for rule, dummy in chains.get(chain, ()):
            for ref in _set_refs(rule):
                if ref not in set_names:
                    base = "%s-%s" % (names[chain], ref.kind)
                    name, k = base, 1
                    while name in set_names.values():
                        k += 1
                        name = "%s-%d" % (base, k)
                    set_names[ref] = name
    for ref, name in set_names.items():
        out.sets[name] = ref
    for chain in chain_order:
        hook = BASE_CHAINS[(table, chain)][1] if chain in BUILTIN_CHAINS else None
        out.chains[names[chain]] = (hook, [text(r, restrict, set_names) for r, restrict in chains.get(chain, ())])
    return out


def render_nft(ruleset, resolve_owner=None):
    """The NftRuleset for a capture_rules.Ruleset.

    resolve_owner (optional) maps a user/group name to its numeric id, as
    `nft list` shows ids; without it names are written quoted and nft
    resolves them when loading.  Raises NftRenderError on anything the
    renderer does not know.
    """
    ordered = final_order(ruleset)
    for family in FAMILIES:
        for table, chain in ordered[family]:
            if table not in NFT_TABLES:
                raise NftRenderError("table %s (chain %s) is not supported by the nftables renderer" % (table, chain))
    tables = []
    for table in TABLES:
        keys = [k for family in FAMILIES for k in ordered[family] if k[0] == table]
        if not keys:
            continue
        for dummy, chain in keys:
            if chain in BUILTIN_CHAINS and (table, chain) not in BASE_CHAINS:
                raise NftRenderError("built-in chain %s of table %s is not supported by the nftables renderer"
                                     % (chain, table))
        merged, jumps = {}, []
        for dummy, chain in OrderedDict.fromkeys(keys):
            per_family = []
            for family in FAMILIES:
                rules = []
                for rule in ordered[family].get((table, chain), ()):
                    rules.extend(translate(rule, resolve_owner))
                per_family.append(coalesce(rules))
            merged[chain] = merge_families(*per_family)
            jumps.extend(r.statement[1] for r, dummy in merged[chain] if r.statement[0] == "jump")
        chain_order = [c for c in _BASE_ORDER if c in merged]
        chain_order += [c for c in merged if c not in BUILTIN_CHAINS]
        known = set(nft_chain_name(c) for c in chain_order if c not in BUILTIN_CHAINS)
        for target in jumps:
            if target in ("prerouting", "output"):
                raise NftRenderError("jump to the built-in chain %r in table %s" % (target, table))
            if target not in known:  # a chain jumped to but without rules: empty, as in iptables
                known.add(target)
                chain_order.append(target.upper().replace("-", "_"))
        tables.append(_build_table(table, NFT_TABLES[table], chain_order, merged))
    return NftRuleset(tables)


def render_nft_payload(nft_ruleset):
    """The `nft -f` text that creates the tables (no flush/delete lines)."""
    return "".join(nft_ruleset.table_text(name) for name in nft_ruleset.tables)


def render_nft_delete(table_names):
    """`nft -f` lines that delete the given capture tables."""
    return "".join("delete table %s %s\n" % (NFT_FAMILY, name) for name in table_names)
