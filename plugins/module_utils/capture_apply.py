# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""Apply engine: converge the live iptables state to a capture Ruleset.

One iptables-save per family reads the live state; the wanted ruleset is
brought into iptables-save's canonical form once (restored into a scratch
network namespace and saved back, cached by payload); capture-owned rules
are compared exactly; a difference is applied with one
`iptables-restore --noflush` per family, each table of it one commit that
carries the table's ownership marker (capture_marker).  Other software's
rules are never named in a payload, so they stay as they are.  A failed
restore is undone with the --noflush inverse of what had changed.

Pure Python, no Ansible imports: commands go through an injected runner.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import json
import os
import re
from collections import OrderedDict

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_compare import plan_family
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import (
    ApplyError,
    CaptureError,
    run_checked,
)
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_marker import (
    MARKER_CHAIN,
    Marker,
    read_marker,
    recorded_rules,
    with_markers,
)
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_payload import PayloadFile as _PayloadFile
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_owner import (
    Signature,
    is_capture_chain,
    owned_builtin,
)
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_rules import (
    BUILTIN_CHAINS,
    FAMILIES,
    IPV4,
    IPV6,
    render_restore,
)
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_save import parse_save
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_store import (
    current_netns_id,
    keep_cache,
    mtime,
    remove_quietly,
)

BACKENDS = ("iptables-nft", "iptables-legacy")
_NFT_FAMILY = {IPV4: "ip", IPV6: "ip6"}


def binary_names(backend):
    """{family: (save, restore)} executable names of a backend."""
    suffix = "nft" if backend == "iptables-nft" else "legacy"
    return {
        IPV4: ("iptables-%s-save" % suffix, "iptables-%s-restore" % suffix),
        IPV6: ("ip6tables-%s-save" % suffix, "ip6tables-%s-restore" % suffix),
    }


def legacy_tables_loaded(read_text):
    """True when legacy xtables tables exist in this network namespace.

    Reads /proc/net/ip{,6}_tables_names, which list the legacy tables of
    the current namespace, without creating any (running
    iptables-legacy-save would).
    """
    for path in ("/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"):
        text = read_text(path)
        if text and text.strip():
            return True
    return False


def choose_backend(requested, legacy_loaded, legacy_rule_count):
    """istio's choice: legacy only where legacy already holds rules.

    legacy_rule_count is a callable, only called when legacy tables exist.
    """
    if requested != "auto":
        return requested
    if legacy_loaded and legacy_rule_count() > 0:
        return "iptables-legacy"
    return "iptables-nft"


# "# Table `nat' is incompatible, use 'nft' tool." / "... contains incompatible base-chains ..."
_INCOMPATIBLE = re.compile(r"^# Table `(\S+)' (?:is incompatible|contains incompatible)")
_COUNTED = re.compile(r"^(\[\d+:\d+\]) -A (\S+) ?(.*)$")
# $0: nft; arguments: families.  Per family, a line "@@ FAMILY", then its
# chains (base chain hooks and policies: names only, no rules), sets and maps.
_NFT_VIEW = ('for f; do echo "@@ $f"; "$0" -j list chains "$f" || exit 1; echo; "$0" -j list sets "$f" 2>/dev/null; '
             'echo; "$0" -j list maps "$f" 2>/dev/null; echo; done; exit 0')


def incompatible_tables(save_text):
    """Tables iptables-nft-save says it cannot show in full."""
    return set(m.group(1) for m in map(_INCOMPATIBLE.match, save_text.splitlines()) if m)


def parse_nft_view(out, family):
    """({table: set of base chains}, {table: [what iptables cannot show]}) of _NFT_VIEW's output."""
    chains, unfamiliar = {}, {}
    for part in out.split("\n"):
        part = part.strip()
        if not part:
            continue
        try:
            objects = json.loads(part)["nftables"]
        except (ValueError, KeyError, TypeError):
            raise CaptureError("cannot parse the output of nft -j list chains/sets %s: %r" % (family, part[:200]))
        for obj in objects:
            (kind, body), = obj.items()
            if kind == "metainfo" or not isinstance(body, dict):
                continue
            table = body.get("table")
            if kind == "chain":
                chains.setdefault(table, set())
                if "hook" not in body:
                    continue
                name = body.get("name")
                if name in BUILTIN_CHAINS and str(body.get("hook")) == name.lower():
                    chains[table].add(name)
                else:
                    unfamiliar.setdefault(table, []).append("base chain %s" % name)
            elif kind in ("set", "map"):
                unfamiliar.setdefault(table, []).append("%s %s" % (kind, body.get("name")))
    return chains, unfamiliar


def _counted(snapshot):
    """{(table, chain): [(counters, spec)]} of an iptables-save -c dump."""
    out, table = {}, None
    for line in snapshot.splitlines():
        if line.startswith("*"):
            table = line[1:]
            continue
        m = _COUNTED.match(line)
        if m:
            out.setdefault((table, m.group(2)), []).append((m.group(1), m.group(3)))
    return out


def _owned_view(tables):
    """{table: ({chain: [(index, spec)]} of owned built-in rules, {chain: [spec]} of capture and marker chains)}."""
    signature = Signature(tables)
    marked = any(read_marker(t) is not None for t in tables.values())
    trust = signature.present and not marked
    out = {}
    for name, table in tables.items():
        marker = read_marker(table)
        recorded = recorded_rules(table, marker[0]) if marker else {}
        builtin = {}
        for chain in table.policies:
            if chain in BUILTIN_CHAINS:
                owned = owned_builtin(name, chain, table.rules.get(chain, []), signature, recorded.get(chain, []), trust)
                if owned:
                    builtin[chain] = owned
        chains = OrderedDict((c, list(table.rules.get(c, []))) for c in table.user_chains()
                             if is_capture_chain(c) or c == MARKER_CHAIN)
        out[name] = (builtin, chains)
    return out


def inverse_payload(snapshot, live_text, tables):
    """The --noflush --counters payload that puts the capture's part of the
    given tables back as the snapshot (iptables-save -c) shows it.

    Only the capture's rules and chains are named: its rules in built-in
    chains are deleted and inserted again at their old positions, its
    chains (and the marker chain) declared and refilled, chains it did not
    have dropped.  Other software's rules and chains are not touched.
    """
    before, live = parse_save(snapshot), parse_save(live_text)
    old_view, new_view = _owned_view(before), _owned_view(live)
    counters = _counted(snapshot)
    blocks = []
    for table in tables:
        old_builtin, old_chains = old_view.get(table, ({}, OrderedDict()))
        new_builtin, new_chains = new_view.get(table, ({}, OrderedDict()))
        if old_builtin == new_builtin and old_chains == new_chains:
            continue
        lines = ["*%s" % table]
        lines.extend(":%s - [0:0]" % c for c in list(old_chains) + [c for c in new_chains if c not in old_chains])
        for chain, owned in sorted(new_builtin.items()):
            lines.extend("-D %s %d" % (chain, index) for index, dummy in reversed(owned))
        lines.extend("-X %s" % c for c in new_chains if c not in old_chains)
        for chain, owned in sorted(old_builtin.items()):
            counted = counters.get((table, chain), [])
            for index, spec in owned:
                count = counted[index - 1][0] if index <= len(counted) and counted[index - 1][1] == spec else "[0:0]"
                lines.append("%s -I %s %d %s" % (count, chain, index, spec))
        for chain, specs in old_chains.items():
            counted = counters.get((table, chain), [])
            for k, spec in enumerate(specs):
                count = counted[k][0] if k < len(counted) and counted[k][1] == spec else "[0:0]"
                lines.append("%s -A %s %s" % (count, chain, spec))
        lines.append("COMMIT")
        blocks.append("\n".join(lines))
    return "\n".join(blocks) + "\n" if blocks else ""


# ------------------------------------------------------------------ engine
class Engine(object):
    """Reads, plans and applies capture rulesets on one host.

    runner(argv, data=None) -> (rc, stdout, stderr) runs a command.  paths
    maps executable names to absolute paths: the backend's save/restore
    binaries, 'unshare', and optionally 'nft'.  state_dir holds the
    canonical-form cache; in check_mode nothing is written there.
    Ownership lives in the tables themselves (capture_marker), not in
    state_dir.
    """

    def __init__(self, runner, backend, paths, state_dir, families=FAMILIES, netns_id=None, check_mode=False):
        if backend not in BACKENDS:
            raise CaptureError("unknown backend %r" % backend)
        self.run = runner
        self.backend = backend
        self.paths = paths
        self.names = binary_names(backend)
        self.state_dir = state_dir
        self.families = tuple(families)
        self.netns_id = netns_id or current_netns_id()
        self.check_mode = check_mode
        self.warnings = []

    # -- commands ----------------------------------------------------------
    def _bin(self, family, which):
        return self.paths[self.names[family][0 if which == "save" else 1]]

    def save(self, family, counters=False):
        argv = [self._bin(family, "save")] + (["-c"] if counters else [])
        return run_checked(self.run, argv, "%s: %s" % (family, self.names[family][0]))

    def restore(self, family, payload, noflush=True, counters=False):
        """Restore payload (read from a file: a restore that stops reading early cannot break a pipe)."""
        options = ["-w", "5"] + (["--noflush"] if noflush else []) + (["--counters"] if counters else [])
        with _PayloadFile(payload) as path:
            argv = [self._bin(family, "restore")] + options + [path]
            rc, out, err = self.run(argv)
        if rc != 0:
            raise ApplyError("%s: %s failed (rc %s): %s" % (family, " ".join([self.names[family][1]] + options), rc,
                                                            (err or out).strip()), cmd=argv, rc=rc, stderr=err)
        return out

    def _nft(self, family, commands, what):
        with _PayloadFile(commands) as path:
            argv = [self.paths["nft"], "-f", path]
            rc, out, err = self.run(argv)
        if rc != 0:
            raise ApplyError("%s: nft -f (%s) failed (rc %s): %s" % (family, what, rc, (err or out).strip()),
                             cmd=argv, rc=rc, stderr=err)

    def nft_view(self, family):
        """({table: base chains}, {table: [unfamiliar objects]}) of the
        family's nf_tables tables; (None, {}) for the legacy backend or without nft."""
        return self.nft_views([family]).get(family, (None, {}))

    def nft_views(self, families):
        """{family: nft_view(family)}, read with one command."""
        nft = self.paths.get("nft")
        if self.backend != "iptables-nft" or not nft or not families:
            return {}
        argv = ["/bin/sh", "-c", _NFT_VIEW, nft] + [_NFT_FAMILY[f] for f in families]
        rc, out, dummy = self.run(argv)
        if rc != 0:
            return {}
        parts, current = {}, None
        for line in out.splitlines():
            if line.startswith("@@ "):
                current = line[3:]
                parts[current] = []
            elif current is not None:
                parts[current].append(line)
        return dict((f, parse_nft_view("\n".join(parts.get(_NFT_FAMILY[f], [])), f)) for f in families)

    # -- the state record of earlier releases --------------------------------
    def _legacy_path(self):
        return os.path.join(self.state_dir, "netns-%s.json" % self.netns_id)

    def legacy_record(self):
        """{family: record} of the state record an earlier release of the
        module kept (until the tables carry markers), or None."""
        try:
            with open(self._legacy_path()) as f:
                record = json.load(f)
        except (IOError, OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("version") != 1 or record.get("backend") != self.backend:
            return None
        families = record.get("families")
        return families if isinstance(families, dict) else None

    def _remove_legacy_record(self):
        remove_quietly(self._legacy_path())

    # -- canonical form ----------------------------------------------------
    def _canonical_cache(self, family, payload):
        # The canonical form depends on the iptables binaries and, for owner
        # names, on the user and group databases: all part of the key.
        stamps = [mtime(p) for p in (self._bin(family, "save"), self._bin(family, "restore"),
                                     "/etc/passwd", "/etc/group")]
        key = hashlib.sha256(json.dumps([self.backend, family, payload, stamps]).encode("utf-8")).hexdigest()
        return os.path.join(self.state_dir, "canonical", key + ".save")

    @staticmethod
    def _cached(cache):
        try:
            with open(cache) as f:
                return parse_save(f.read())
        except (IOError, OSError):
            return None

    def canonical(self, family, payload):
        """{table: Table}: a restore payload as iptables-save prints it."""
        if not payload:
            return {}
        cache = self._canonical_cache(family, payload)
        cached = self._cached(cache)
        return cached if cached is not None else self._scratch(family, payload, cache)

    def _scratch(self, family, payload, cache):
        """Canonicalise in a scratch network namespace; kept in cache (not in check mode)."""
        script = '"$0" --noflush "$2" && "$1"'
        with _PayloadFile(payload) as path:
            argv = [self.paths["unshare"], "--net", "--", "/bin/sh", "-c", script,
                    self._bin(family, "restore"), self._bin(family, "save"), path]
            rc, out, err = self.run(argv)
        if rc != 0:
            raise ApplyError("%s: the kernel rejects the capture ruleset: %s" % (family, (err or out).strip()),
                             cmd=argv, rc=rc, stderr=err)
        if not self.check_mode:
            warning = keep_cache(cache, out)
            if warning:
                self.warnings.append(warning)
        return parse_save(out)

    # -- plan / apply ------------------------------------------------------
    def plan(self, ruleset, payloads=None):
        """Plan convergence to ruleset (Ruleset() for absent).

        payloads: {family: render_restore(ruleset, family)} when the caller
        has them already (then ruleset is only read for the families that
        need a change, so it may be computed lazily).  A table iptables
        cannot show in full (iptables-nft-save calls it incompatible, or it
        holds nft-only base chains, sets or maps) is never written to: a
        plan that would change it raises CaptureError.
        Returns (plans {family: FamilyPlan}, lives {family: save text}).
        """
        plans, lives = OrderedDict(), {}
        legacy = self.legacy_record()
        views = self.nft_views(self.families)
        for family in self.families:
            lives[family] = self.save(family)
            live = parse_save(lives[family])
            nft_chains, unfamiliar = views.get(family, (None, {}))
            for table in incompatible_tables(lives[family]):
                unfamiliar.setdefault(table, []).insert(0, "what iptables-nft-save calls incompatible")
            payload = payloads[family] if payloads is not None else render_restore(ruleset, family)
            plan = plan_family(family, live, self.canonical(family, payload), ruleset, nft_chains,
                               legacy=legacy.get(family) if legacy is not None else None)
            plan.nft_chains = nft_chains
            for table in list(plan.tables) + plan.cleanup:
                if table in unfamiliar:
                    raise CaptureError(
                        "%s: the %s table holds %s (nft list table %s %s): the capture does not write into a table "
                        "iptables cannot show in full; nothing was changed. Move that software's rules to a table of "
                        "its own name, or use backend=nftables"
                        % (family, table, ", ".join(unfamiliar[table]), _NFT_FAMILY[family], table))
            plans[family] = plan
        return plans, lives

    def apply(self, plans, lives):  # pylint: disable=unused-argument
        """Apply the planned payloads, IPv4 first.

        A restore commits table by table; when one fails, every table
        changed so far (of this family and of those applied before it) is
        put back with the --noflush inverse of what changed (capture rules
        only, counters included), and base chains or tables the failed run
        created are removed.  Afterwards the tables and base chains the
        capture created and no longer uses are removed (iptables-nft).
        Returns the changed families.
        """
        done = []  # (family, snapshot, plan)
        for family, plan in plans.items():
            if not plan.payload:
                continue
            step = (family, self.save(family, counters=True), plan)
            try:
                self.restore(family, plan.payload)
            except ApplyError as err:
                try:
                    back = self._rollback(done + [step])
                except CaptureError as failed:
                    err.msg += ("; the rollback failed too, the tables may hold part of the new capture (the next "
                                "run converges them): %s" % failed)
                    raise err
                err.msg += "; rolled back: %s" % ", ".join(back)
                raise
            done.append(step)
        for family, plan in plans.items():
            self._cleanup(family, plan)
        self._remove_legacy_record()
        return [family for family, dummy, dummy2 in done]

    def _rollback(self, steps):
        """Put the given families' tables back as their snapshots show them; returns the families."""
        back = []
        for family, snapshot, plan in reversed(steps):
            payload = inverse_payload(snapshot, self.save(family, counters=True), plan.tables)
            if payload:
                self.restore(family, payload, counters=True)
            self._drop_new_nft(family, plan)
            back.append(family)
        return back

    def _drop_new_nft(self, family, plan):
        """Delete the empty tables and base chains (of the plan's tables) that
        a failed restore created (iptables-nft)."""
        if plan.nft_chains is None:
            return
        now, unfamiliar = self.nft_view(family)
        if not now:
            return
        live = parse_save(self.save(family))
        fam, commands = _NFT_FAMILY[family], []
        for table in plan.tables:
            t = live.get(table)
            if table not in now or t is None or table in unfamiliar:
                continue
            if table not in plan.nft_chains:
                if _empty_table(t):
                    commands.append("delete table %s %s" % (fam, table))
                continue
            for chain in sorted(now[table] - plan.nft_chains[table]):
                if not t.rules.get(chain) and t.policies.get(chain, "ACCEPT") == "ACCEPT":
                    commands.append("delete chain %s %s %s" % (fam, table, chain))
        if commands:
            self._nft(family, "\n".join(commands) + "\n", "removing what the failed restore created")

    def _cleanup(self, family, plan):
        """Remove what the capture created and no longer uses, one nft
        transaction per table (iptables-nft).  A table the capture left: the
        whole table when only its marker and empty ACCEPT base chains are
        left, else the empty created base chains and the marker chain.  A
        table still in use: the unused created base chains (when empty) and
        the marker rules naming them."""
        nft = self.paths.get("nft")
        if self.backend != "iptables-nft" or not plan.cleanup:
            return
        if not nft:
            self.warnings.append("nft not found: empty %s tables or chains the capture created are left in place "
                                 "(%s)" % (family, ", ".join(plan.cleanup)))
            return
        live = parse_save(self.save(family))
        chains_now, unfamiliar = self.nft_view(family)
        chains_now = chains_now or {}
        fam = _NFT_FAMILY[family]
        for table in plan.cleanup:
            t = live.get(table)
            marker = read_marker(t)
            if marker is None:
                continue
            dummy, created_table, created_chains = marker

            def empty_base(chain):
                return (chain in chains_now.get(table, ()) and not t.rules.get(chain)
                        and t.policies.get(chain, "ACCEPT") == "ACCEPT")

            used = plan.after.get(table)
            if not used:
                if created_table and _empty_table(t, but=MARKER_CHAIN) and table not in unfamiliar:
                    commands = ["delete table %s %s" % (fam, table)]
                else:
                    commands = ["delete chain %s %s %s" % (fam, table, c) for c in sorted(created_chains)
                                if empty_base(c)]
                    commands += ["flush chain %s %s %s" % (fam, table, MARKER_CHAIN),
                                 "delete chain %s %s %s" % (fam, table, MARKER_CHAIN)]
            else:
                unused = sorted(c for c in created_chains if c not in used)
                handles = self._rule_handles(family, table, MARKER_CHAIN)
                specs = t.rules.get(MARKER_CHAIN, [])
                if len(handles) != len(specs):
                    continue  # changed meanwhile: the next run cleans up
                commands = []
                for chain in unused:
                    if empty_base(chain):
                        commands.append("delete chain %s %s %s" % (fam, table, chain))
                    entry = '-m comment --comment "meshcapture created-chain %s"' % chain
                    commands.extend("delete rule %s %s %s handle %d" % (fam, table, MARKER_CHAIN, handles[k])
                                    for k, spec in enumerate(specs) if spec == entry)
            if commands:
                self._nft(family, "\n".join(commands) + "\n", "removing what the capture created in %s" % table)

    def _rule_handles(self, family, table, chain):
        """The handles of a chain's rules, in order (`nft -j -a list chain`)."""
        argv = [self.paths["nft"], "-j", "-a", "list", "chain", _NFT_FAMILY[family], table, chain]
        out = run_checked(self.run, argv, "%s: nft list chain %s %s" % (family, table, chain))
        try:
            objects = json.loads(out)["nftables"]
        except (ValueError, KeyError, TypeError):
            raise CaptureError("cannot parse the output of nft -j -a list chain: %r" % out[:200])
        return [o["rule"]["handle"] for o in objects if isinstance(o, dict) and "rule" in o]

    def boot_payloads(self, plans, payloads):
        """{family: the restore payload with the tables' ownership markers}:
        what the boot-time restore should apply."""
        out = {}
        for family in FAMILIES:
            plan = plans.get(family)
            payload = payloads.get(family) or ""
            markers = {}
            for table, marker in (plan.markers.items() if plan else ()):
                used = set(plan.after.get(table, {}))
                if used:  # the base chains it created and still uses
                    markers[table] = Marker(marker.rules, marker.created_table, marker.created_chains & used).specs()
            out[family] = with_markers(payload, markers)
        return out


def _empty_table(table, but=None):
    """True when an iptables table holds no rule and no chain (but `but`), every policy ACCEPT."""
    for chain, policy in table.policies.items():
        if chain == but:
            continue
        if chain not in BUILTIN_CHAINS or table.rules.get(chain) or policy not in ("ACCEPT", "-"):
            return False
    return True
