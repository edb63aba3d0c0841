# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""The ownership marker the iptables backends keep in each table they use.

Every table the capture has rules in also holds a user chain MARKER_CHAIN
that nothing jumps to (so no packet ever traverses it).  Its rules are
comment-only rules naming what of the table is the capture's:

  -A MESHCAPTURE_OWNED -m comment --comment "meshcapture rule CHAIN HASH"
      one per capture rule in a built-in chain (HASH: of CHAIN and the
      rule as iptables-save prints it), so a rule other software could
      also have (an interface RETURN, an INVALID DROP) is told apart;
  -A MESHCAPTURE_OWNED -m comment --comment "meshcapture created-table"
      the capture created the table (iptables-nft: deleted when the
      capture leaves it and nothing else is in it);
  -A MESHCAPTURE_OWNED -m comment --comment "meshcapture created-chain CHAIN"
      the capture created that base chain in a table that was there.

The marker is written in the same table commit as the rules it names, so
it can never disagree with them, and it is part of what is persisted for
boot (boot_payload), so it survives reboots.  Pure Python, no Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import re
from collections import Counter, OrderedDict

MARKER_CHAIN = "MESHCAPTURE_OWNED"
CHAIN_ORDER = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
_ENTRY = re.compile(r'^-m comment --comment "?meshcapture (rule (\S+) ([0-9a-f]{16})|created-table|created-chain ([^\s"]+))"?$')


def rule_hash(chain, spec):
    return hashlib.sha256(("%s %s" % (chain, spec)).encode("utf-8")).hexdigest()[:16]


def _comment(text):
    return '-m comment --comment "meshcapture %s"' % text


class Marker(object):
    """What a table's marker chain says (or will say)."""

    def __init__(self, rules=None, created_table=False, created_chains=()):
        self.rules = OrderedDict(rules or ())  # chain -> [spec] (live) or Counter of hashes (parsed)
        self.created_table = created_table
        self.created_chains = set(created_chains)

    def specs(self):
        """The marker chain's rules, as iptables-save prints them."""
        out = [_comment("created-table")] if self.created_table else []
        out.extend(_comment("created-chain %s" % c) for c in sorted(self.created_chains))
        for chain in sorted(self.rules, key=_chain_key):
            out.extend(_comment("rule %s %s" % (chain, rule_hash(chain, spec))) for spec in self.rules[chain])
        return out

    @property
    def empty(self):
        return not (self.created_table or self.created_chains or any(self.rules.values()))


def _chain_key(chain):
    return (CHAIN_ORDER.index(chain) if chain in CHAIN_ORDER else len(CHAIN_ORDER), chain)


def read_marker(table):
    """(hashes {chain: Counter}, created_table, created_chains) of a parsed
    table's marker chain, or None when the table has none."""
    if table is None or MARKER_CHAIN not in table.policies:
        return None
    hashes, created_table, created_chains = {}, False, set()
    for spec in table.rules.get(MARKER_CHAIN, []):
        m = _ENTRY.match(spec)
        if not m:
            continue
        if m.group(2):
            hashes.setdefault(m.group(2), Counter())[m.group(3)] += 1
        elif m.group(4):
            created_chains.add(m.group(4))
        else:
            created_table = True
    return hashes, created_table, created_chains


def recorded_rules(table, hashes):
    """{chain: [spec]}: the built-in chain rules of a live table the marker
    names (as many copies of a spec as it names)."""
    out = {}
    for chain, wanted in hashes.items():
        left = Counter(wanted)
        specs = []
        for spec in table.rules.get(chain, []):
            h = rule_hash(chain, spec)
            if left[h] > 0:
                left[h] -= 1
                specs.append(spec)
        out[chain] = specs
    return out


def with_markers(payload, markers):
    """A restore payload with each table's marker added in its own block:
    declared after the payload's chains, its rules before COMMIT.

    markers: {table: [spec]}.  What the boot-time restore applies, so the
    ownership marker survives a reboot.
    """
    if not payload:
        return payload
    out, table = [], None
    for line in payload.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.strip() == "COMMIT" and markers.get(table):
            out.extend("-A %s %s" % (MARKER_CHAIN, spec) for spec in markers[table])
        out.append(line)
        if line.startswith("*") and markers.get(table):
            out.append(":%s - [0:0]" % MARKER_CHAIN)
    return "\n".join(out) + "\n"
