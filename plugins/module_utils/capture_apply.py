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

import difflib
import hashlib
import json
import os
import re
from collections import Counter, OrderedDict

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import CaptureError
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_rules import (
    BUILTIN_CHAINS,
    FAMILIES,
    IPV4,
    IPV6,
    TABLES,
    Ruleset,
    render_restore,
    restore_line,
)

BACKENDS = ("iptables-nft", "iptables-legacy")
_NFT_FAMILY = {IPV4: "ip", IPV6: "ip6"}
STATE_VERSION = 1


class ApplyError(CaptureError):
    """A command failed; carries what fail_json wants."""

    def __init__(self, msg, cmd=None, rc=None, stderr=None):
        super(ApplyError, self).__init__(msg)
        self.msg = msg
        self.cmd = cmd
        self.rc = rc
        self.stderr = stderr


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


def count_rules(save_text):
    return sum(1 for line in save_text.splitlines() if line.startswith("-A "))


# ---------------------------------------------------------------- parsing
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


# ------------------------------------------------------------- ownership
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
_DNS_ZONE = re.compile(r"^(?:-d (\S+) )?-p udp -m udp --(dport 53 -j CT --zone 2|sport 53 -j CT --zone 1)$")
_MARK_RULE = re.compile(
    r"^(?:-p tcp -m mark --mark (\S+) -j CONNMARK --save-mark"
    r"|-p tcp -m connmark --mark (\S+) -j CONNMARK --restore-mark"
    r"|-o lo -p tcp -m mark --mark (\S+) -j RETURN$)")
# Shapes other software could share too: ours only by the state record, or
# when istio-iptables left a capture behind (ISTIO_* chains, no record).
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
    when the state record lists it (the latest copies of a spec are taken,
    ours having been added last); or, for shapes other software could
    share, when trust_generic (istio-iptables left a capture, no record).
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
        self.netns_id = netns_id or _netns_id()
        self.check_mode = check_mode
        self.warnings = []

    # -- commands ----------------------------------------------------------
    def _exec(self, argv, data=None, what=None):
        rc, out, err = self.run(argv, data=data)
        if rc != 0:
            raise ApplyError("%s failed: %s" % (what or argv[0], (err or out).strip()), cmd=argv, rc=rc, stderr=err)
        return out

    def _bin(self, family, which):
        return self.paths[self.names[family][0 if which == "save" else 1]]

    def save(self, family, counters=False):
        argv = [self._bin(family, "save")] + (["-c"] if counters else [])
        return self._exec(argv, what="%s: %s" % (family, self.names[family][0]))

    def restore(self, family, payload, noflush=True, counters=False):
        argv = [self._bin(family, "restore"), "-w", "5"]
        argv += ["--noflush"] if noflush else []
        argv += ["--counters"] if counters else []
        return self._exec(argv, data=payload, what="%s: %s" % (family, self.names[family][1]))

    # -- canonical form ----------------------------------------------------
    def _canonical_cache(self, family, payload):
        # The canonical form depends on the iptables binaries and, for owner
        # names, on the user and group databases: all part of the key.
        stamps = [_mtime(p) for p in (self._bin(family, "save"), self._bin(family, "restore"),
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
            _write_atomic(cache, out)
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
        wanted = _added_by_restore(live, parse_save(self.save(plan.family)))
        lines = plan.payload.splitlines()
        if sum(1 for line in lines if line.startswith(("-A ", "-I "))) == \
                sum(len(specs) for t in wanted.values() for specs in t.rules.values()) \
                and sum(1 for line in lines if line.startswith(":")) == \
                sum(len(t.user_chains()) for t in wanted.values()):
            _write_atomic(cache, format_owned(dict((name, t.rules) for name, t in wanted.items())))
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
            _write_atomic(self._record_path(), json.dumps(record, indent=1, sort_keys=True))
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
            payload = _select_tables(snapshot, [t for t in tables if t in present])
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
            self._exec([nft, "delete", "table", _NFT_FAMILY[family], table],
                       what="%s: nft delete table" % family)

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


def _added_by_restore(before, after):
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


class RenderMemo(object):
    """The rendering of the configuration last applied in this network
    namespace (commands, restore payloads, effective configuration),
    kept in state_dir under a digest of everything it was computed from.

    A re-run with the same options, generator code and host files (see
    memo_key) loads it instead of validating and generating again, so a
    no-op costs little more than one iptables-save per family.  One file
    per namespace: a new configuration replaces it.
    """

    def __init__(self, state_dir, netns_id=None):
        self.path = os.path.join(state_dir, "rendered-%s.json" % (netns_id or _netns_id()))

    def load(self, key):
        """The stored rendering when it was stored under key, else None."""
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (IOError, OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("key") != key:
            return None
        return data.get("rendered")

    def store(self, key, rendered):
        _write_atomic(self.path, json.dumps({"key": key, "rendered": rendered}, separators=(",", ":")))

    def remove(self):
        try:
            os.unlink(self.path)
        except OSError:
            pass


def memo_key(params, code, files):
    """Digest of a rendering's inputs: the module options, the code that
    validates and generates (sources), and the host files it reads
    ({path: content or stat stamp})."""
    blob = json.dumps([STATE_VERSION, params, code, files], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _select_tables(save_text, tables):
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


def _mtime(path):
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _netns_id():
    st = os.stat("/proc/self/ns/net")
    return "%d-%d" % (st.st_dev, st.st_ino)


def _write_atomic(path, text):
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory, 0o700)
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)
