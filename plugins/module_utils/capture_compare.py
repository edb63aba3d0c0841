# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""Compare a live iptables state with the wanted capture, per family.

plan_family() returns a FamilyPlan: before/after views of the capture-owned
rules, the added/removed lines, and the one `iptables-restore --noflush`
payload that converges the family (only changed chains named).
Pure Python, no Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import difflib
from collections import Counter, OrderedDict

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_owner import Signature, is_capture_chain, owned_builtin
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_rules import BUILTIN_CHAINS, TABLES, restore_line
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_save import Table


class FamilyPlan(object):
    """What converging one family needs: before/after views and the payload."""

    def __init__(self, family):
        self.family = family
        self.before = OrderedDict()  # table -> OrderedDict(chain -> [spec])
        self.after = OrderedDict()
        self.payload = ""
        self.tables = []  # tables the payload changes
        self.added = []
        self.removed = []
        self.builtin_after = {}  # table -> {chain: [spec]} owned built-in rules after
        # A first apply planned without the canonical form (Engine.plan with
        # defer=True): (live tables, ruleset, recorded, cache path); the views
        # are filled in after the restore, from what it added.
        self.pending = None

    @property
    def changed(self):
        return bool(self.payload)


def _edit_builtin(chain, live_specs, owned, wanted, rules):
    """Payload lines turning our rules of a built-in chain into `wanted`.

    Returns (deletes, inserts).  Rules that stay keep their place; new ones
    go next to the kept rule before (or after) them, so other software's
    rules keep their positions relative to ours.  With nothing kept, the
    generator's own appends/inserts are replayed, as on a fresh host.
    """
    have = [spec for dummy, spec in owned]
    matcher = difflib.SequenceMatcher(None, have, wanted, autojunk=False)
    kept = {}  # wanted index -> live index
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            kept[block.b + k] = owned[block.a + k][0]
    dropped = sorted((i for i, dummy in owned if i not in kept.values()), reverse=True)
    deletes = ["-D %s %d" % (chain, i) for i in dropped]
    if not kept:
        return deletes, [restore_line(r) for r in rules]
    # Simulate the chain: live rules minus the dropped ones, then insert.
    model = [i for i in range(1, len(live_specs) + 1) if i not in set(dropped)]
    inserts, cursor = [], None
    first_kept = model.index(min(kept.values()))
    for j, spec in enumerate(wanted):
        if j in kept:
            cursor = model.index(kept[j])
            continue
        position = first_kept if cursor is None else cursor + 1
        model.insert(position, None)
        if cursor is None:
            first_kept += 1
        cursor = position
        if position == len(model) - 1:
            inserts.append("-A %s %s" % (chain, spec))
        else:
            inserts.append("-I %s %d %s" % (chain, position + 1, spec))
    return deletes, inserts


def plan_family(family, live, wanted, ruleset, recorded):
    """Compare live and wanted (parsed saves) for one family.

    live/wanted: {table: Table}; wanted comes from the canonicalised
    ruleset (empty for state=absent).  ruleset supplies the append/insert
    operations to replay.  recorded: {table: {chain: [spec]}} from the
    state record, or None when there is none.  Returns a FamilyPlan.
    """
    plan = FamilyPlan(family)
    signature = Signature(live)
    trust_generic = signature.present and recorded is None
    recorded = recorded or {}
    blocks = []
    for table in TABLES:
        live_t = live.get(table) or Table(table)
        want_t = wanted.get(table) or Table(table)
        rec_t = recorded.get(table, {})
        before, after = OrderedDict(), OrderedDict()
        deletes, inserts = [], []

        builtins = [c for c in live_t.policies if c in BUILTIN_CHAINS]
        builtins += [c for c in want_t.policies if c in BUILTIN_CHAINS and c not in builtins]
        owned_after = {}
        for chain in builtins:
            live_specs = live_t.rules.get(chain, [])
            want_specs = want_t.rules.get(chain, [])
            owned = owned_builtin(table, chain, live_specs, signature, rec_t.get(chain, []), trust_generic)
            if owned:
                before[chain] = [spec for dummy, spec in owned]
            if want_specs:
                after[chain] = list(want_specs)
                owned_after[chain] = list(want_specs)
            if [spec for dummy, spec in owned] != want_specs:
                rules = [r for r in ruleset[family] if r.table == table and r.chain == chain]
                chain_deletes, chain_inserts = _edit_builtin(chain, live_specs, owned, want_specs, rules)
                deletes += chain_deletes
                inserts += chain_inserts

        live_user = [c for c in live_t.user_chains() if is_capture_chain(c)]
        want_user = want_t.user_chains()
        for chain in live_user:
            before[chain] = list(live_t.rules.get(chain, []))
        for chain in want_user:
            after[chain] = list(want_t.rules.get(chain, []))
        declare = [c for c in want_user if c not in live_user or live_t.rules.get(c) != want_t.rules.get(c)]
        drop = [c for c in live_user if c not in want_user]

        for chain in set(before) | set(after):
            old, new = Counter(before.get(chain, [])), Counter(after.get(chain, []))
            plan.removed.extend("%s -t %s -A %s %s" % (family, table, chain, s) for s in sorted((old - new).elements()))
            plan.added.extend("%s -t %s -A %s %s" % (family, table, chain, s) for s in sorted((new - old).elements()))
        if before:
            plan.before[table] = before
        if after:
            plan.after[table] = after
        plan.builtin_after[table] = owned_after

        if not (deletes or inserts or declare or drop):
            continue
        lines = ["*%s" % table]
        lines.extend(":%s - [0:0]" % c for c in declare + drop)
        lines.extend(deletes)
        lines.extend("-X %s" % c for c in drop)
        lines.extend(inserts)
        lines.extend(restore_line(r) for r in ruleset[family] if r.table == table and r.chain in declare)
        lines.append("COMMIT")
        blocks.append("\n".join(lines))
        plan.tables.append(table)
    plan.payload = "\n".join(blocks) + "\n" if blocks else ""
    return plan
