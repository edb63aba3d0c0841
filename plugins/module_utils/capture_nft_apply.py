# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""Apply engine of the nftables backend: converge the capture's own inet tables.

The capture owns whole tables (istio-proxy-raw / -mangle / -nat, family
inet), so converging is table-wise:

1. Read once: one command listing the chain names of every table and the
   owned tables in JSON.  It shows which owned tables exist and what they
   hold, and whether an iptables-nft capture (ISTIO_* chains in the ip/ip6
   nat, mangle or raw tables) is present.
2. The wanted tables in nft's canonical form: the payload is loaded into a
   scratch network namespace (`unshare --net`) and listed back, JSON and
   text; cached in state_dir/canonical by payload and the stamps of the nft
   binary, /etc/passwd and /etc/group (owner names resolve to ids).
3. Compare per table, ignoring handles and counter values and the order of
   set elements.
4. One `nft -f FILE` transaction (the payload in a private temporary file): a changed table is replaced (`table inet X`,
   `delete table inet X`, its definition), a missing one created, an
   unwanted one deleted.  nft -f commits all of it or nothing.  Nothing is
   executed when every table is equal.

Pure Python, no Ansible imports: commands go through an injected runner.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import json
import os
import re
from collections import Counter, OrderedDict

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import (
    ApplyError,
    CaptureError,
    run_checked,
)
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_nft import NFT_FAMILY, render_nft_delete
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_store import keep_cache, mtime
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_payload import PayloadFile as _PayloadFile

# The iptables tables a capture of the iptables backends puts ISTIO_* chains in.
IPTABLES_CAPTURE_TABLES = ("nat", "mangle", "raw")
_COUNTER_TEXT = re.compile(r"counter packets \d+ bytes \d+")
_TABLE_LINE = re.compile(r"^table (\S+) (\S+) \{$")


def _sorted_json(items):
    return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))


def _normalise(value):
    """A JSON listing value without counter values, set elements sorted."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "counter" and (item is None or isinstance(item, dict) and "packets" in item):
                out[key] = None
            elif key in ("elem", "set") and isinstance(item, list):
                out[key] = _sorted_json(_normalise(e) for e in item)
            else:
                out[key] = _normalise(item)
        return out
    if isinstance(value, list):
        return [_normalise(item) for item in value]
    return value


def parse_listing(text, owned):
    """(tables, capture_chains) of a `nft -j list ...` output.

    tables: {owned table name: comparable view} for the owned inet tables
    present; capture_chains: ['ip nat ISTIO_INBOUND', ...], the ISTIO_*
    chains of iptables-nft tables (an iptables-backend capture).
    """
    try:
        objects = json.loads(text)["nftables"]
    except (ValueError, KeyError, TypeError):
        raise CaptureError("cannot parse the output of nft -j list: %r" % text[:200])
    tables, chains = OrderedDict(), []
    for obj in objects:
        (kind, body), = obj.items()
        if kind == "metainfo" or not isinstance(body, dict):
            continue
        family = body.get("family")
        table = body.get("name") if kind == "table" else body.get("table")
        if kind == "chain" and family in ("ip", "ip6") and table in IPTABLES_CAPTURE_TABLES \
                and str(body.get("name", "")).startswith("ISTIO_"):
            chains.append("%s %s %s" % (family, table, body["name"]))
        if family != NFT_FAMILY or table not in owned:
            continue
        view = tables.setdefault(table, {"table": None, "objects": {}, "rules": {}})
        attrs = _normalise(dict((k, v) for k, v in body.items() if k != "handle"))
        if kind == "table":
            view["table"] = attrs
        elif kind == "rule":
            view["rules"].setdefault(body.get("chain"), []).append(attrs)
        else:  # set, map, chain, flowtable, named objects
            view["objects"]["%s %s" % (kind, body.get("name"))] = attrs
    return tables, chains


# $0: nft; arguments: the owned table names.  A table that cannot be listed
# is one that does not exist (read() checks that against the chain list).
READ_SCRIPT = ('"$0" -j list chains || exit 1; '
               'for t; do echo "@@ $t"; "$0" -j list table %s "$t" 2>/dev/null; done; exit 0' % NFT_FAMILY)


def parse_read(out, owned):
    """(tables, capture_chains) of READ_SCRIPT's output."""
    lines = out.splitlines()
    # Of a chain listing, the owned tables parse_listing returns are those with chains.
    with_chains, chains = parse_listing(lines[0] if lines else "", owned)
    tables = OrderedDict()
    for k, line in enumerate(lines[1:], 1):
        if line.startswith("@@ ") and k + 1 < len(lines) and not lines[k + 1].startswith("@@ "):
            name = line[3:]
            tables.update((t, v) for t, v in parse_listing(lines[k + 1], owned)[0].items() if t == name)
    unlisted = sorted(set(with_chains) - set(tables))
    if unlisted:
        raise CaptureError("nft -j list table inet %s failed although the table has chains" % unlisted[0])
    return tables, chains


def split_tables(text):
    """{name: text} of the top-level `table FAMILY NAME { ... }` blocks of an nft listing."""
    out, name, lines = OrderedDict(), None, []
    for line in text.splitlines():
        match = _TABLE_LINE.match(line)
        if match:
            name, lines = match.group(2), [line]
        elif name is not None:
            lines.append(line)
            if line == "}":
                out[name] = _COUNTER_TEXT.sub("counter", "\n".join(lines) + "\n")
                name = None
    return out


def entries(table, text):
    """['inet T chain C: RULE' | 'inet T set S: ELEMENT'] of one table listing
    (what added/removed report)."""
    out, kind, name, in_elements = [], None, None, False
    for raw in text.splitlines():
        line = raw.strip()
        words = line.split()
        if raw.startswith("\t") and not raw.startswith("\t\t") and len(words) >= 2 and words[-1] == "{":
            kind, name, in_elements = words[0], words[1], False
            continue
        if kind is None or line in ("", "}") or not raw.startswith("\t\t"):
            continue
        if kind == "chain" and not line.startswith("type "):
            out.append("%s %s chain %s: %s" % (NFT_FAMILY, table, name, line))
        elif kind == "set":
            if line.startswith("elements = {"):
                in_elements, line = True, line[len("elements = {"):]
            if in_elements:
                if line.endswith("}"):
                    in_elements, line = False, line[:-1]
                out.extend("%s %s set %s: %s" % (NFT_FAMILY, table, name, e.strip())
                           for e in line.split(",") if e.strip())
    return out


class NftPlan(object):
    """What converging the owned tables needs."""

    def __init__(self):
        self.existing = []   # owned tables present before
        self.wanted = OrderedDict()  # name -> definition text (payload form)
        self.replace = []    # wanted tables missing or different
        self.delete = []     # present owned tables not wanted
        self.after_text = OrderedDict()  # name -> canonical listing of the wanted tables
        self.capture_chains = []  # ISTIO_* chains of iptables-nft tables (an iptables capture)

    @property
    def changed(self):
        return bool(self.replace or self.delete)

    def transaction(self):
        """The one `nft -f` text converging the tables (empty: nothing to do)."""
        parts = []
        for name in self.replace:
            if name in self.existing:
                parts.append("table %s %s\ndelete table %s %s\n" % (NFT_FAMILY, name, NFT_FAMILY, name))
            parts.append(self.wanted[name])
        parts.append(render_nft_delete(self.delete))
        return "".join(parts)


class NftEngine(object):
    """Reads, plans and applies the capture's nftables tables.

    runner(argv, data=None) -> (rc, stdout, stderr); paths: {'nft': ...,
    'unshare': ...}; owned: the capture's table names; state_dir holds the
    canonical-form cache (never written in check mode).
    """

    def __init__(self, runner, paths, state_dir, owned, check_mode=False):
        self.run = runner
        self.paths = paths
        self.state_dir = state_dir
        self.owned = tuple(owned)
        self.check_mode = check_mode
        self.warnings = []

    # -- read ----------------------------------------------------------------
    def read(self):
        """(owned tables {name: view}, ISTIO_* chains of iptables-nft tables).

        One command: `nft -j list chains` (names only: cheap however many
        rules other software has) and `nft -j list table inet X` of each
        owned table (nothing printed for a missing one).  `nft -j list
        ruleset` would tell the same but costs seconds next to a large
        iptables-nft ruleset (kube-proxy, Docker).
        """
        argv = ["/bin/sh", "-c", READ_SCRIPT, self.paths["nft"]] + list(self.owned)
        return parse_read(run_checked(self.run, argv, "nft -j list"), self.owned)

    def listing(self, name):
        """`nft list table inet NAME` text (counter values dropped)."""
        out = run_checked(self.run, [self.paths["nft"], "list", "table", NFT_FAMILY, name], "nft list table")
        return split_tables(out).get(name, "")

    # -- canonical form ------------------------------------------------------
    def _cache_path(self, payload):
        stamps = [mtime(p) for p in (self.paths["nft"], "/etc/passwd", "/etc/group")]
        key = hashlib.sha256(json.dumps(["nftables", payload, stamps]).encode("utf-8")).hexdigest()
        return os.path.join(self.state_dir, "canonical", key + ".nft.json")

    def canonical(self, payload):
        """{'json': listing JSON text, 'text': listing text} of the payload
        loaded into an empty namespace (cached)."""
        cache = self._cache_path(payload)
        try:
            with open(cache) as f:
                data = json.load(f)
            if isinstance(data, dict) and "json" in data and "text" in data:
                return data
        except (IOError, OSError, ValueError):
            pass
        nft = self.paths["nft"]
        script = '"$0" -f "$1" && "$0" -j list ruleset && "$0" list ruleset'
        with _PayloadFile(payload) as path:
            argv = [self.paths["unshare"], "--net", "--", "/bin/sh", "-c", script, nft, path]
            rc, out, err = self.run(argv)
        if rc != 0:
            raise ApplyError("nftables: the kernel rejects the capture ruleset: %s" % (err or out).strip(),
                             cmd=argv, rc=rc, stderr=err)
        listing, dummy, text = out.partition("\n")
        data = {"json": listing, "text": text}
        if not self.check_mode:
            warning = keep_cache(cache, json.dumps(data))
            if warning:
                self.warnings.append(warning)
        return data

    # -- plan / apply --------------------------------------------------------
    def plan(self, wanted, live=None):
        """Plan convergence to wanted ({table name: definition text}, empty for absent).

        live: the result of read() when the caller has it already.
        """
        tables, chains = live if live is not None else self.read()
        plan = NftPlan()
        plan.existing = [name for name in self.owned if name in tables]
        plan.capture_chains = chains
        plan.wanted = OrderedDict((name, text) for name, text in wanted.items())
        unknown = [name for name in plan.wanted if name not in self.owned]
        if unknown:
            raise CaptureError("not a capture table: %s" % ", ".join(unknown))
        if plan.wanted:
            canonical = self.canonical("".join(plan.wanted.values()))
            want, dummy = parse_listing(canonical["json"], self.owned)
            plan.after_text = split_tables(canonical["text"])
            missing = [name for name in plan.wanted if name not in want]
            if missing:
                raise CaptureError("nftables: the payload does not create %s" % ", ".join(missing))
            plan.replace = [name for name in plan.wanted if tables.get(name) != want[name]]
        plan.delete = [name for name in plan.existing if name not in plan.wanted]
        return plan

    def apply(self, plan):
        """Run the plan's transaction (one `nft -f -`); nothing when unchanged."""
        if not plan.changed:
            return
        with _PayloadFile(plan.transaction()) as path:
            argv = [self.paths["nft"], "-f", path]
            rc, out, err = self.run(argv)
        if rc != 0:
            raise ApplyError("nftables: nft -f failed (rc %s), nothing was changed: %s" % (rc, (err or out).strip()),
                             cmd=argv, rc=rc, stderr=err)

    def report(self, plan):
        """(before text, after text, added, removed) over the tables the plan
        changes; reads `nft list table` of the changed tables that exist."""
        names = [n for n in self.owned if n in plan.replace or n in plan.delete]
        before = OrderedDict((n, self.listing(n)) for n in names if n in plan.existing)
        after = OrderedDict((n, plan.after_text.get(n, "")) for n in names if n in plan.wanted)
        old = [e for n, t in before.items() for e in entries(n, t)]
        new = [e for n, t in after.items() for e in entries(n, t)]
        return "".join(before.values()), "".join(after.values()), _minus(new, old), _minus(old, new)


def _minus(items, others):
    """items without (as many of) others, order kept."""
    left = Counter(others)
    out = []
    for item in items:
        if left[item] > 0:
            left[item] -= 1
        else:
            out.append(item)
    return out


# ------------------------------------------------------------ coexistence
def legacy_capture_present(read_text, run, saves):
    """(present, warnings): whether legacy xtables tables hold ISTIO_* chains.

    read_text(path) reads /proc; saves: {proc file: (iptables-legacy-save
    name, its path or None)}.  A save only runs when its family has legacy
    tables (so none are created where there were none).
    """
    warnings = []
    for proc, (name, save) in sorted(saves.items()):
        if not (read_text(proc) or "").strip():
            continue
        if not save:
            warnings.append("legacy iptables tables exist but %s is missing: an iptables-legacy capture "
                            "cannot be detected" % name)
            continue
        rc, out, dummy = run([save])
        if rc == 0 and any(line.startswith(":ISTIO_") for line in out.splitlines()):
            return True, warnings
    return False, warnings


def nft_capture_tables(run, nft, owned):
    """The owned inet tables that hold chains (`nft -j list chains inet`: cheap,
    unlike `nft list tables`, which reads every rule); [] without nft, or
    where nft cannot list (no nf_tables in the kernel: no such tables either)."""
    if not nft:
        return []
    rc, out, dummy = run([nft, "-j", "list", "chains", NFT_FAMILY])
    if rc != 0:
        return []
    try:
        objects = json.loads(out)["nftables"]
    except (ValueError, KeyError, TypeError):
        raise CaptureError("cannot parse the output of nft -j list chains: %r" % out[:200])
    present = set(o["chain"].get("table") for o in objects if isinstance(o, dict) and "chain" in o)
    return [name for name in owned if name in present]
