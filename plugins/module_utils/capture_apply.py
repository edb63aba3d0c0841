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
)

BACKENDS = ("iptables-nft", "iptables-legacy")
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


_JUMP_ISTIO = re.compile(r"(?:^| )-j ISTIO_[A-Z0-9_]+(?: |$)")
_NFLOG_ISTIO = re.compile(
    r"-j NFLOG --nflog-prefix \"?(?:JumpInbound|JumpOutbound|ExcludeInboundPort|IncludeInboundPort|"
    r"InboundCapture|KubevirtCommand|ExcludeInterfaceCommand)\"? --nflog-group 1337")
_DNS_CT = re.compile(r"-p udp -m udp --[ds]port (?:53|15053) .*-j CT --zone [12]$")
_DNS_NAT = re.compile(r"-p udp -m udp --dport 53 (?:.*-j REDIRECT --to-ports 15053|.*-m owner .*-j RETURN)$")
_TPROXY_MANGLE = re.compile(
    r"(?:-p tcp -m mark --mark \S+ -j CONNMARK --save-mark"
    r"|-p tcp -m connmark --mark \S+ -j CONNMARK --restore-mark"
    r"|^-o lo -p tcp -m mark --mark \S+ -j RETURN$"
    r"|-o lo -p tcp -m owner --[ug]id-owner \S+ -j MARK --set-xmark 0x53a/0xffffffff$)")


def is_capture_rule(table, chain, spec):
    """Recognise the capture's rules in built-in chains by their shape.

    Shapes that other software could plausibly share (interface RETURN,
    INVALID DROP) are not recognised here; the state record covers them.
    """
    if _JUMP_ISTIO.search(spec) or _NFLOG_ISTIO.search(spec):
        return True
    if table == "raw":
        return bool(_DNS_CT.search(spec))
    if table == "nat" and chain == "OUTPUT":
        return bool(_DNS_NAT.search(spec))
    if table == "mangle":
        return bool(_TPROXY_MANGLE.search(spec))
    return False


class FamilyPlan(object):
    """What converging one family needs: before/after views and the payload."""

    def __init__(self, family):
        self.family = family
        self.before = OrderedDict()  # table -> OrderedDict(chain -> [spec])
        self.after = OrderedDict()
        self.payload = ""
        self.added = []
        self.removed = []
        self.builtin_after = {}  # table -> {chain: [spec]} owned built-in rules after

    @property
    def changed(self):
        return bool(self.payload)


def _owned_builtin(table, chain, specs, recorded, wanted):
    """[(index, spec)] of the capture's rules in a built-in chain.

    A rule is ours when its shape says so, when the state record lists it,
    or when it equals a wanted rule not otherwise accounted for (so a rule
    we want is never added twice).
    """
    spare_recorded = Counter(recorded)
    owned = set()
    for index, spec in enumerate(specs, 1):
        if is_capture_rule(table, chain, spec):
            owned.add(index)
        elif spare_recorded[spec] > 0:
            spare_recorded[spec] -= 1
            owned.add(index)
    spare_wanted = Counter(wanted) - Counter(specs[i - 1] for i in owned)
    for index, spec in enumerate(specs, 1):
        if index not in owned and spare_wanted[spec] > 0:
            spare_wanted[spec] -= 1
            owned.add(index)
    return [(i, specs[i - 1]) for i in sorted(owned)]


def _verb_line(rule):
    if rule.is_insert:
        return " ".join(("-I", rule.chain, str(rule.position)) + rule.params)
    return " ".join(("-A", rule.chain) + rule.params)


def plan_family(family, live, wanted, ruleset, recorded):
    """Compare live and wanted (parsed saves) for one family.

    live/wanted: {table: Table}; wanted comes from the canonicalised
    ruleset (empty for state=absent).  ruleset supplies the append/insert
    operations to replay.  recorded: {table: {chain: [spec]}} from the
    state record.  Returns a FamilyPlan.
    """
    plan = FamilyPlan(family)
    blocks = []
    for table in TABLES:
        live_t = live.get(table) or Table(table)
        want_t = wanted.get(table) or Table(table)
        rec_t = recorded.get(table, {})
        before, after = OrderedDict(), OrderedDict()
        deletes, rewrite = [], set()

        builtins = [c for c in live_t.policies if c in BUILTIN_CHAINS]
        builtins += [c for c in want_t.policies if c in BUILTIN_CHAINS and c not in builtins]
        owned_after = {}
        for chain in builtins:
            want_specs = want_t.rules.get(chain, [])
            owned = _owned_builtin(table, chain, live_t.rules.get(chain, []), rec_t.get(chain, []), want_specs)
            if owned:
                before[chain] = [spec for dummy, spec in owned]
            if want_specs:
                after[chain] = list(want_specs)
                owned_after[chain] = list(want_specs)
            if [spec for dummy, spec in owned] != want_specs:
                rewrite.add(chain)
                deletes.extend("-D %s %d" % (chain, index) for index, dummy in reversed(owned))

        live_user = [c for c in live_t.user_chains() if is_capture_chain(c)]
        want_user = want_t.user_chains()
        for chain in live_user:
            before[chain] = list(live_t.rules.get(chain, []))
        for chain in want_user:
            after[chain] = list(want_t.rules.get(chain, []))
        declare = [c for c in want_user if c not in live_user or live_t.rules.get(c) != want_t.rules.get(c)]
        drop = [c for c in live_user if c not in want_user]
        rewrite.update(declare)

        for chain in set(before) | set(after):
            old, new = Counter(before.get(chain, [])), Counter(after.get(chain, []))
            plan.removed.extend("%s -t %s -A %s %s" % (family, table, chain, s) for s in sorted((old - new).elements()))
            plan.added.extend("%s -t %s -A %s %s" % (family, table, chain, s) for s in sorted((new - old).elements()))
        if before:
            plan.before[table] = before
        if after:
            plan.after[table] = after
        plan.builtin_after[table] = owned_after

        if not (rewrite or drop):
            continue
        lines = ["*%s" % table]
        lines.extend(":%s - [0:0]" % c for c in declare + drop)
        lines.extend(deletes)
        lines.extend("-X %s" % c for c in drop)
        lines.extend(_verb_line(r) for r in ruleset[family] if r.table == table and r.chain in rewrite)
        lines.append("COMMIT")
        blocks.append("\n".join(lines))
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

    def save(self, family):
        return self._exec([self._bin(family, "save")], what="%s: %s" % (family, self.names[family][0]))

    def restore(self, family, payload, noflush=True):
        argv = [self._bin(family, "restore"), "-w", "5"]
        if noflush:
            argv.append("--noflush")
        return self._exec(argv, data=payload, what="%s: %s" % (family, self.names[family][1]))

    # -- canonical form ----------------------------------------------------
    def canonical(self, family, ruleset):
        """{table: Table}: the ruleset as iptables-save prints it."""
        payload = render_restore(ruleset, family)
        if not payload:
            return {}
        # The canonical form depends on the iptables binaries and, for owner
        # names, on the user and group databases: all part of the key.
        stamps = [_mtime(p) for p in (self._bin(family, "save"), self._bin(family, "restore"),
                                      "/etc/passwd", "/etc/group")]
        key = hashlib.sha256(json.dumps([self.backend, family, payload, stamps]).encode("utf-8")).hexdigest()
        cache = os.path.join(self.state_dir, "canonical", key + ".save")
        try:
            with open(cache) as f:
                return parse_save(f.read())
        except (IOError, OSError):
            pass
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
    def plan(self, ruleset):
        """Plan convergence to ruleset (Ruleset() for absent).

        Returns (plans {family: FamilyPlan}, lives {family: save text}).
        """
        record = self.load_record()
        plans, lives = OrderedDict(), {}
        for family in self.families:
            lives[family] = self.save(family)
            live = parse_save(lives[family])
            wanted = self.canonical(family, ruleset)
            recorded = record.get("families", {}).get(family, {}).get("builtin", {})
            plans[family] = plan_family(family, live, wanted, ruleset, recorded)
        return plans, lives

    def apply(self, plans, lives):
        """Apply the planned payloads, IPv4 first; roll IPv4 back if IPv6 fails.

        Afterwards, tables the capture created and no longer uses are
        removed (nft backend), and the state record is updated (or
        removed when nothing is left).  Returns the changed families.
        """
        record = self.load_record() or {"version": STATE_VERSION, "backend": self.backend, "families": {}}
        done = []
        for family, plan in plans.items():
            rec = record["families"].setdefault(family, {"builtin": {}, "created_tables": []})
            existing = parse_save(lives[family])
            rec["created_tables"] += [t for t in plan.after if t not in existing and t not in rec["created_tables"]]
            if plan.changed:
                try:
                    self.restore(family, plan.payload)
                except ApplyError as err:
                    self._rollback(done, lives)
                    if done:
                        err.msg += "; %s changes were rolled back" % ", ".join(done)
                    raise
                done.append(family)
            rec["builtin"] = dict((t, c) for t, c in plan.builtin_after.items() if c)
        for family, plan in plans.items():
            rec = record["families"][family]
            unused = [t for t in rec["created_tables"] if t not in plan.after]
            self._drop_created_tables(family, unused)
            rec["created_tables"] = [t for t in rec["created_tables"] if t in plan.after]
        if any(rec["builtin"] or rec["created_tables"] for rec in record["families"].values()):
            _write_atomic(self._record_path(), json.dumps(record, indent=1, sort_keys=True))
        else:
            self._remove_record()
        return done

    def _rollback(self, done, lives):
        """Put the tables of already changed families back as they were.

        A flushing restore of the saved tables restores them byte for
        byte; tables that did not exist before are emptied.
        """
        for family in done:
            present = parse_save(lives[family])
            payload = _select_tables(lives[family], TABLES)
            payload += "".join("*%s\nCOMMIT\n" % t for t in TABLES if t not in present)
            self.restore(family, payload, noflush=False)

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
            self._exec([nft, "delete", "table", "ip" if family == IPV4 else "ip6", table],
                       what="%s: nft delete table" % family)

    def _remove_record(self):
        try:
            os.unlink(self._record_path())
        except OSError:
            pass


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


def empty_ruleset():
    return Ruleset()
