# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""Apply engine: converge the live iptables state to a capture Ruleset.

One iptables-save per family reads the live state; the wanted ruleset is
brought into iptables-save's canonical form once (restored into a scratch
network namespace and saved back, cached by payload); capture-owned rules
are compared exactly; a difference is applied with one atomic
`iptables-restore --noflush` per family.  Other software's rules are never
named in a payload, so they stay as they are.

Pure Python, no Ansible imports: commands go through an injected runner.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import json
import os
from collections import OrderedDict

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_compare import FamilyPlan, plan_family
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import (
    ApplyError,
    CaptureError,
    run_checked,
)
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_rules import (
    BUILTIN_CHAINS,
    FAMILIES,
    IPV4,
    IPV6,
    Ruleset,
    render_restore,
)
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_save import (
    added_by_restore,
    format_owned,
    parse_save,
    select_tables,
)
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_store import (
    STATE_VERSION,
    mtime,
    current_netns_id,
    write_atomic,
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


# ------------------------------------------------------------------ engine
class Engine(object):
    """Reads, plans and applies capture rulesets on one host.

    runner(argv, data=None) -> (rc, stdout, stderr) runs a command (data
    goes to stdin).  paths maps executable names to absolute paths: the
    backend's save/restore binaries, 'unshare', and optionally 'nft'.
    state_dir holds the per-namespace state record and the canonical-form
    cache; in check_mode nothing is written there.
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
        argv = [self._bin(family, "restore"), "-w", "5"]
        argv += ["--noflush"] if noflush else []
        argv += ["--counters"] if counters else []
        return run_checked(self.run, argv, "%s: %s" % (family, self.names[family][1]), data=payload)

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
        script = '"$0" --noflush && "$1"'
        argv = [self.paths["unshare"], "--net", "--", "/bin/sh", "-c", script,
                self._bin(family, "restore"), self._bin(family, "save")]
        rc, out, err = self.run(argv, data=payload)
        if rc != 0:
            raise ApplyError("%s: the kernel rejects the capture ruleset: %s" % (family, (err or out).strip()),
                             cmd=argv, rc=rc, stderr=err)
        if not self.check_mode:
            write_atomic(cache, out)
        return parse_save(out)

    # -- state record ------------------------------------------------------
    def _record_path(self):
        return os.path.join(self.state_dir, "netns-%s.json" % self.netns_id)

    def load_record(self):
        try:
            with open(self._record_path()) as f:
                record = json.load(f)
        except (IOError, OSError, ValueError):
            return {}
        return record if record.get("version") == STATE_VERSION else {}

    # -- plan / apply ------------------------------------------------------
    def plan(self, ruleset, payloads=None, defer=False):
        """Plan convergence to ruleset (Ruleset() for absent).

        payloads: {family: render_restore(ruleset, family)} when the caller
        has them already (then ruleset is only read for the families that
        need a change, so it may be computed lazily).
        defer: for a family with nothing of a capture in its tables and no
        cached canonical form, plan the plain payload and learn the
        canonical form from what the restore adds (apply() does), instead of
        a restore + save in a scratch namespace first.  Only for runs that
        apply: the plan then has no before/after views until apply().
        Returns (plans {family: FamilyPlan}, lives {family: save text}).
        """
        record = self.load_record()
        plans, lives = OrderedDict(), {}
        for family in self.families:
            lives[family] = self.save(family)
            live = parse_save(lives[family])
            payload = payloads[family] if payloads is not None else render_restore(ruleset, family)
            family_record = record.get("families", {}).get(family)
            recorded = None if family_record is None else family_record.get("builtin", {})
            cache = self._canonical_cache(family, payload) if payload else None
            wanted = self._cached(cache) if cache else {}
            if wanted is None and defer and not plan_family(family, live, {}, Ruleset(), recorded).before:
                plan = plans[family] = FamilyPlan(family)
                plan.payload = payload
                plan.tables = [line[1:] for line in payload.splitlines() if line.startswith("*")]
                plan.pending = (live, ruleset, recorded, cache)
                continue
            if wanted is None:
                wanted = self._scratch(family, payload, cache)
            plans[family] = plan_family(family, live, wanted, ruleset, recorded)
        return plans, lives

    def _finish(self, plan):
        """Fill in a deferred plan once its payload is restored: the rules
        the restore added are the canonical form, kept in the cache when
        they are exactly as many rules and chains as the payload has (else,
        say when something else changed the tables meanwhile, the canonical
        form is computed in a scratch namespace as usual)."""
        live, ruleset, recorded, cache = plan.pending
        wanted = added_by_restore(live, parse_save(self.save(plan.family)))
        lines = plan.payload.splitlines()
        if sum(1 for line in lines if line.startswith(("-A ", "-I "))) == \
                sum(len(specs) for t in wanted.values() for specs in t.rules.values()) \
                and sum(1 for line in lines if line.startswith(":")) == \
                sum(len(t.user_chains()) for t in wanted.values()):
            write_atomic(cache, format_owned(dict((name, t.rules) for name, t in wanted.items())))
        else:
            wanted = self._scratch(plan.family, plan.payload, cache)
        done = plan_family(plan.family, live, wanted, ruleset, recorded)
        for name in ("before", "after", "added", "removed", "builtin_after"):
            setattr(plan, name, getattr(done, name))
        plan.pending = None

    def apply(self, plans, lives):
        """Apply the planned payloads, IPv4 first.

        iptables-restore commits table by table, so when a restore fails,
        every table changed so far (of this family and of those applied
        before it) is put back from a snapshot taken just before, counters
        included.  Afterwards, tables the capture created and no longer
        uses are removed (nft backend), and the state record is updated (or
        removed when nothing is left).  Returns the changed families.
        """
        record = self.load_record() or {"version": STATE_VERSION, "backend": self.backend, "families": {}}
        done = []  # (family, snapshot, tables)
        for family, plan in plans.items():
            rec = record["families"].setdefault(family, {"builtin": {}, "created_tables": []})
            existing = parse_save(lives[family])
            if plan.changed:
                step = (family, self.save(family, counters=True), plan.tables)
                # iptables-nft creates a base chain the first time a rule goes
                # into it: note the ones this restore creates in tables that
                # existed before (a table it creates is removed as a whole).
                touched = [t for t in plan.tables if t in existing]
                chains_before = self._base_chains(family) if touched else None
                try:
                    self.restore(family, plan.payload)
                    if plan.pending is not None:
                        self._finish(plan)
                except ApplyError as err:
                    self._rollback(done + [step])
                    err.msg += "; rolled back: %s" % ", ".join(f for f, dummy, dummy2 in done + [step])
                    raise
                done.append(step)
                if chains_before is not None:
                    chains_after = self._base_chains(family)
                    created = rec.setdefault("created_chains", {})
                    for table in touched:
                        new = chains_after.get(table, set()) - chains_before.get(table, set())
                        if new:
                            created[table] = sorted(set(created.get(table, [])) | new)
            rec["created_tables"] += [t for t in plan.after if t not in existing and t not in rec["created_tables"]]
            rec["builtin"] = dict((t, c) for t, c in plan.builtin_after.items() if c)
        for family, plan in plans.items():
            rec = record["families"][family]
            unused = [t for t in rec["created_tables"] if t not in plan.after]
            self._drop_created_tables(family, unused)
            rec["created_tables"] = [t for t in rec["created_tables"] if t in plan.after]
            self._drop_created_chains(family, plan, rec)
        if any(rec["builtin"] or rec["created_tables"] or rec.get("created_chains")
               for rec in record["families"].values()):
            write_atomic(self._record_path(), json.dumps(record, indent=1, sort_keys=True))
        else:
            self._remove_record()
        return [family for family, dummy, dummy2 in done]

    def _rollback(self, steps):
        """Put the given tables back as their snapshots show them.

        A flushing restore of a table from its iptables-save restores it
        byte for byte (with --counters, counters too); a table that did not
        exist before is emptied and, when the capture created it, deleted.
        """
        for family, snapshot, tables in reversed(steps):
            present = parse_save(snapshot)
            payload = select_tables(snapshot, [t for t in tables if t in present])
            payload += "".join("*%s\nCOMMIT\n" % t for t in tables if t not in present)
            self.restore(family, payload, noflush=False, counters=True)
            self._drop_created_tables(family, [t for t in tables if t not in present])

    def _drop_created_tables(self, family, tables):
        """Remove now-empty tables that the capture created (nft backend only)."""
        if self.backend != "iptables-nft" or not tables:
            return
        nft = self.paths.get("nft")
        if not nft:
            self.warnings.append("nft not found: empty %s tables %s are left in place" % (family, ", ".join(tables)))
            return
        live = parse_save(self.save(family))
        for table in tables:
            t = live.get(table)
            if t is None or any(t.rules.values()) or t.user_chains():
                continue
            if any(p not in ("ACCEPT", "-") for p in t.policies.values()):
                continue
            run_checked(self.run, [nft, "delete", "table", _NFT_FAMILY[family], table],
                        "%s: nft delete table" % family)

    def _base_chains(self, family):
        """{table: set of built-in chain names} that exist in nftables for the
        family (`nft list chains`, no rules listed); None when that cannot be
        told (legacy backend, or no nft)."""
        nft = self.paths.get("nft")
        if self.backend != "iptables-nft" or not nft:
            return None
        rc, out, dummy = self.run([nft, "list", "chains", _NFT_FAMILY[family]])
        if rc != 0:
            return None
        chains, table = {}, None
        for line in out.splitlines():
            words = line.split()
            if words[:1] == ["table"] and len(words) >= 3:
                table = words[2]
                chains.setdefault(table, set())
            elif words[:1] == ["chain"] and len(words) >= 2 and table is not None and words[1] in BUILTIN_CHAINS:
                chains[table].add(words[1])
        return chains

    def _drop_created_chains(self, family, plan, rec):
        """Delete the empty base chains the capture created in tables that
        existed before, once it has no rules in them any more (nft backend).
        A chain that other software has put rules in, or given another policy,
        is left alone."""
        created = dict((t, c) for t, c in (rec.get("created_chains") or {}).items() if c)
        rec["created_chains"] = created
        unused = [(t, c) for t, chains in sorted(created.items()) for c in chains if not plan.after.get(t, {}).get(c)]
        nft = self.paths.get("nft")
        if not unused or not nft:
            return
        live = parse_save(self.save(family))
        for table, chain in unused:
            t = live.get(table)
            if t is not None and (t.rules.get(chain) or t.policies.get(chain, "ACCEPT") != "ACCEPT"):
                continue  # in use by someone else: keep it, and keep it recorded
            if t is not None:
                argv = [nft, "delete", "chain", _NFT_FAMILY[family], table, chain]
                rc, out, err = self.run(argv)
                if rc != 0:
                    self.warnings.append("%s: could not delete the empty %s chain %s the capture created: %s"
                                         % (family, table, chain, (err or out).strip()))
                    continue
            created[table] = [c for c in created[table] if c != chain]
        rec["created_chains"] = dict((t, c) for t, c in created.items() if c)

    def _remove_record(self):
        try:
            os.unlink(self._record_path())
        except OSError:
            pass
