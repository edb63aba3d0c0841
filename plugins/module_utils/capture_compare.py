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

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_marker import (
    MARKER_CHAIN,
    Marker,
    read_marker,
    recorded_rules,
)
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
        self.markers = OrderedDict()  # table -> capture_marker.Marker the table holds after
        # Tables whose marker names a table or base chain the capture created
        # and no longer uses: removed after the restore (Engine._cleanup).
        self.cleanup = []
        self.nft_chains = None  # {table: base chains} before the plan (iptables-nft), else None

    @property
    def changed(self):
        return bool(self.payload or self.cleanup)


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


def plan_family(family, live, wanted, ruleset, nft_chains=None, legacy=None):
    """Compare live and wanted (parsed saves) for one family.

    live/wanted: {table: Table}; wanted comes from the canonicalised
    ruleset (empty for state=absent).  ruleset supplies the append/insert
    operations to replay.  nft_chains: {table: set of base chains} that
    exist in nftables (iptables-nft), None when that cannot be told: what
    the capture creates is noted in the table's marker.

    Which built-in chain rules are the capture's: see capture_owner; the
    rules the tables' markers name (capture_marker) count as the capture's
    too.  With no marker in any table of the family, shapes other software
    could share are taken only for a capture istio-iptables left (ISTIO_*
    chains present).  legacy: the family's part of the state record an
    earlier release of the module kept in state_dir ({'builtin': {table:
    {chain: [spec]}}, 'created_tables': [...], 'created_chains': {table:
    [...]}}), used like markers when no table of the family has one.
    Returns a FamilyPlan.
    """
    plan = FamilyPlan(family)
    signature = Signature(live)
    markers = dict((name, read_marker(t)) for name, t in live.items())
    marked = any(m is not None for m in markers.values())
    legacy = None if marked else legacy
    trust_generic = signature.present and not marked and legacy is None
    blocks = []
    for table in TABLES:
        live_t = live.get(table) or Table(table)
        want_t = wanted.get(table) or Table(table)
        live_marker = markers.get(table)
        rec_t = recorded_rules(live_t, live_marker[0]) if live_marker else {}
        prior = live_marker
        if legacy is not None:
            rec_t = (legacy.get("builtin") or {}).get(table) or {}
            prior = (None, table in (legacy.get("created_tables") or []),
                     set((legacy.get("created_chains") or {}).get(table) or []))
        before, after = OrderedDict(), OrderedDict()
        deletes, inserts = [], []

        builtins = [c for c in live_t.policies if c in BUILTIN_CHAINS]
        builtins += [c for c in want_t.policies if c in BUILTIN_CHAINS and c not in builtins]
        owned_after = OrderedDict()
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

        marker = _wanted_marker(table, prior, after, owned_after, nft_chains)
        plan.markers[table] = marker
        if (not after and not marker.empty) or (after and marker.created_chains - set(after)):
            plan.cleanup.append(table)
        live_specs = live_t.rules.get(MARKER_CHAIN) if live_marker is not None else None
        marker_lines = []
        if marker.empty:
            if live_specs is not None:
                marker_lines = [":%s - [0:0]" % MARKER_CHAIN, "-X %s" % MARKER_CHAIN]
        elif live_specs != marker.specs():
            marker_lines = [":%s - [0:0]" % MARKER_CHAIN]
            marker_lines += ["-A %s %s" % (MARKER_CHAIN, spec) for spec in marker.specs()]

        if not (deletes or inserts or declare or drop or marker_lines):
            continue
        lines = ["*%s" % table]
        lines.extend(":%s - [0:0]" % c for c in declare + drop)
        lines.extend(deletes)
        lines.extend("-X %s" % c for c in drop)
        lines.extend(inserts)
        lines.extend(restore_line(r) for r in ruleset[family] if r.table == table and r.chain in declare)
        lines.extend(marker_lines)
        lines.append("COMMIT")
        blocks.append("\n".join(lines))
        plan.tables.append(table)
    plan.payload = "\n".join(blocks) + "\n" if blocks else ""
    return plan


def _wanted_marker(table, live_marker, after, owned_after, nft_chains):
    """The Marker the table should hold after the plan: the built-in chain
    rules wanted, and what the capture created (kept from the live marker
    until the clean-up after the restore removes it)."""
    created_table = bool(live_marker and live_marker[1])
    created_chains = set(live_marker[2]) if live_marker else set()
    if after and nft_chains is not None:
        if table not in nft_chains:
            created_table = True
        elif not created_table:
            created_chains |= set(c for c in owned_after if c not in nft_chains[table])
    if created_table:
        created_chains = set()
    return Marker(owned_after, created_table, created_chains)
