# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""iptables-save text: parsing, selecting tables, and what a restore added.

Pure Python, no Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import difflib
import re
from collections import OrderedDict

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import CaptureError
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_rules import BUILTIN_CHAINS


def count_rules(save_text):
    return sum(1 for line in save_text.splitlines() if line.startswith("-A "))


_COUNTERS = re.compile(r"^\[\d+:\d+\] ")


class Table(object):
    """One table of an iptables-save dump: chains in order, with their rules."""

    def __init__(self, name):
        self.name = name
        self.policies = OrderedDict()  # chain -> policy ('-' for user chains)
        self.rules = OrderedDict()  # chain -> [spec, ...]

    def add_chain(self, chain, policy):
        self.policies[chain] = policy
        self.rules.setdefault(chain, [])

    def user_chains(self):
        return [c for c, p in self.policies.items() if c not in BUILTIN_CHAINS]


def parse_save(text):
    """{table: Table} from iptables-save output (comments ignored)."""
    tables = OrderedDict()
    table = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):  # iptables-save -c: "[pkts:bytes] -A ..."
            line = _COUNTERS.sub("", line)
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = tables.setdefault(line[1:], Table(line[1:]))
        elif line == "COMMIT":
            table = None
        elif table is None:
            raise CaptureError("unexpected iptables-save line outside a table: %r" % line)
        elif line.startswith(":"):
            chain, policy = line[1:].split(" ", 2)[:2]
            table.add_chain(chain, policy)
        elif line.startswith("-A "):
            chain, spec = (line[3:].split(" ", 1) + [""])[:2]
            table.rules.setdefault(chain, []).append(spec)
            table.policies.setdefault(chain, "-")
        else:
            raise CaptureError("unexpected iptables-save line: %r" % line)
    return tables


def format_owned(view):
    """iptables-save-like text of capture-owned chains ({table: {chain: [spec]}})."""
    lines = []
    for table, chains in view.items():
        lines.append("*%s" % table)
        lines.extend(":%s - [0:0]" % c for c in chains if c not in BUILTIN_CHAINS)
        for chain, specs in chains.items():
            lines.extend("-A %s %s" % (chain, spec) for spec in specs)
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


def select_tables(save_text, tables):
    """The blocks of an iptables-save dump that belong to the given tables."""
    out, keep = [], False
    for line in save_text.splitlines():
        if line.startswith("*"):
            keep = line[1:] in tables
        if keep and not line.startswith("#"):
            out.append(line)
        if line == "COMMIT":
            keep = False
    return "\n".join(out) + "\n" if out else ""


def added_by_restore(before, after):
    """{table: Table} of the rules and chains a --noflush restore added:
    per chain, the rules of `after` that are not in `before` (rules that
    were there keep their relative order, so a sequence match finds them)."""
    out = OrderedDict()
    for name, t_after in after.items():
        t_before = before.get(name) or Table(name)
        added = Table(name)
        for chain in t_after.policies:
            old, new = t_before.rules.get(chain, []), t_after.rules.get(chain, [])
            if chain not in t_before.policies:
                added.add_chain(chain, t_after.policies[chain])
                added.rules[chain] = list(new)
                continue
            matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
            specs = [spec for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag in ("insert", "replace")
                     for spec in new[j1:j2]]
            if specs:
                added.add_chain(chain, t_after.policies[chain])
                added.rules[chain] = specs
        if added.policies:
            out[name] = added
    return out
