# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""Converge a host to a capture with the chosen backend (what `rules` runs).

iptables backends (iptables-nft, iptables-legacy): capture_apply.Engine.
nftables: capture_nft_apply.NftEngine on the capture's own inet tables.

Only one backend's capture may be in place.  When the other backend's
capture is found, state=present fails before changing anything, unless
migrate is on: then the new capture is applied first (one transaction) and
the old one removed right after (the iptables Engine with an empty
Ruleset, or one `nft -f` deleting the tables).

Runs against one host are serialised: converge() holds the namespace's
lock (capture_lock) from the first read to the last write.  The writes run
in a detached process (capture_detach), so killing the module does not
cut an apply short; an apply that was cut short anyway (that process
killed, the machine down) is reported by the next run, which converges
from what the tables hold (ownership is marked in the tables themselves).

Pure Python, no Ansible imports: the host (commands, binaries, files) is
an injected object.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import time

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_apply import (
    Engine,
    binary_names,
    choose_backend,
    legacy_tables_loaded,
)
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import ApplyError, CaptureError
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_detach import (
    journal_path,
    read_journal,
    remove_journal,
    run_detached,
)
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_lock import LOCK_DIR, LOCK_TIMEOUT, HostLock
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_nft import NFT_FAMILY, NFT_TABLES
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_nft_apply import (
    NftEngine,
    legacy_capture_present,
    nft_capture_tables,
)
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_rules import FAMILIES, IPV4, IPV6, Ruleset
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_save import count_rules, format_owned
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_store import current_netns_id

NFTABLES = "nftables"
INSTALL_HINTS = {
    "unshare": "install util-linux",
    "nft": "install the nftables package (Debian/Ubuntu: apt-get install nftables; RHEL/Fedora: dnf install nftables)",
    "*": "install the iptables package (Debian/Ubuntu: apt-get install iptables; "
         "RHEL/Fedora: dnf install iptables-nft, or iptables-legacy for the legacy backend)",
}
LEGACY_SAVES = {"/proc/net/ip_tables_names": "iptables-legacy-save", "/proc/net/ip6_tables_names": "ip6tables-legacy-save"}


class MissingTool(CaptureError):
    """A binary the backend needs is not on the target."""

    def __init__(self, name):
        super(MissingTool, self).__init__("%s not found on the target: %s"
                                          % (name, INSTALL_HINTS.get(name, INSTALL_HINTS["*"])))


class Host(object):
    """What converging needs from the target: run(argv, data=None) ->
    (rc, out, err), which(name) -> path or None, read_text(path) -> str."""

    def __init__(self, run, which, read_text):
        self.run = run
        self.which = which
        self.read_text = read_text

    def require(self, names, paths=None):
        paths = {} if paths is None else paths
        for name in names:
            paths[name] = self.which(name)
            if not paths[name]:
                raise MissingTool(name)
        return paths


def detect_backend(host, requested):
    """The iptables backend of `auto` (istio's choice) or the requested one."""
    if requested != "auto":
        return requested

    def legacy_rule_count():
        total = 0
        for family in FAMILIES:
            save = host.which(binary_names("iptables-legacy")[family][0])
            if save:
                rc, out, dummy = host.run([save])
                total += count_rules(out) if rc == 0 else 0
        return total

    return choose_backend(requested, legacy_tables_loaded(host.read_text), legacy_rule_count)


def _iptables_engine(host, backend, rendered, job):
    """The Engine of an iptables backend, for the families to converge; warnings go to job['warnings']."""
    families = [IPV4]
    v6_tools = [host.which(name) for name in binary_names(backend)[IPV6]]
    if not os.path.exists("/proc/net/if_inet6"):
        if rendered and rendered["restore"][IPV6]:
            job["warnings"].append("IPv6 is disabled in this kernel: the IPv6 capture rules are skipped")
    elif (rendered and rendered["restore"][IPV6]) or all(v6_tools):
        # Without IPv6 rules wanted, IPv6 is still converged (old rules removed) where ip6tables exists.
        families.append(IPV6)
    paths = {"nft": host.which("nft")}
    host.require([name for family in families for name in binary_names(backend)[family]] + ["unshare"], paths)
    return Engine(host.run, backend, paths, job["state_dir"], families=families, check_mode=job["check_mode"])


def _iptables_diff(plans, backend):
    return [dict(before_header="%s (%s)" % (family, backend), after_header="%s (%s)" % (family, backend),
                 before=format_owned(plan.before), after=format_owned(plan.after))
            for family, plan in plans.items()]


class _Steps(object):
    """The transactions of a run, in order, with what they report."""

    def __init__(self):
        self.steps = []  # (apply callable, changed, report callable)
        self.engines = []
        self.boot = {}  # family -> payload for the boot-time restore

    def add(self, engine, apply, changed, report):
        self.engines.append(engine)
        self.steps.append((apply, changed, report))

    @property
    def changed(self):
        return any(changed for dummy, changed, dummy2 in self.steps)

    def run(self):
        """Run the changed steps (in the detached apply process); returns
        the engines' warnings (an error carries them as err.warnings)."""
        done = 0
        for apply, changed, dummy in self.steps:
            if not changed:
                continue
            try:
                apply()
            except CaptureError as err:
                if done and isinstance(err, ApplyError):
                    err.msg += " (migration: the new capture is in place, the old one was not removed)"
                err.warnings = [engine.warnings for engine in self.engines]
                raise
            done += 1
        return [engine.warnings for engine in self.engines]

    def report(self):
        added, removed, diffs = [], [], []
        for dummy, dummy2, report in self.steps:
            a, r, d = report()
            added += a
            removed += r
            diffs += d
        return added, removed, diffs


def _iptables_step(host, backend, wanted, payloads, rendered, job, steps):
    engine = _iptables_engine(host, backend, rendered, job)
    plans, lives = engine.plan(wanted, payloads)
    changed = any(plan.changed for plan in plans.values())

    def report():
        return ([line for plan in plans.values() for line in plan.added],
                [line for plan in plans.values() for line in plan.removed],
                _iptables_diff(plans, backend))

    steps.add(engine, lambda: engine.apply(plans, lives), changed, report)
    return engine.boot_payloads(plans, payloads)


def _nft_step(host, engine, wanted, live, steps):
    plan = engine.plan(wanted, live)
    # The report reads the tables the plan changes: before the transaction.
    # Unchanged, before and after are the tables as they are (and as wanted).
    same = "".join(plan.after_text.values())
    text = engine.report(plan) if plan.changed else (same, same, [], [])

    def report():
        header = "%s %s (%s)" % (NFT_FAMILY, ", ".join(NFT_TABLES.values()), NFTABLES)
        return text[2], text[3], [dict(before_header=header, after_header=header, before=text[0], after=text[1])]

    steps.add(engine, lambda: engine.apply(plan), plan.changed, report)


def converge(host, requested, state, rendered, ruleset, job):
    """Converge to the capture (state present) or remove it (absent).

    rendered: the module's rendering (restore payloads; 'nft_tables' with
    the nftables backend); ruleset: the Ruleset (may be lazy); job: dict with
    state_dir, check_mode, migrate, warnings (a list warnings are appended
    to) and backend (set here first, so errors can report it); optionally
    lock_dir and lock_timeout (capture_lock's defaults otherwise).
    The whole run holds the namespace's lock (in check mode only when the
    lock directory exists: check mode creates nothing).
    Returns dict(changed, added, removed, diff, migrated_from, boot_payload):
    boot_payload, with state=present, is what the boot-time restore should
    apply ({'ipv4': ..., 'ipv6': ...}: the restore payloads with the tables'
    ownership markers; with the nftables backend the restore payloads as
    they are).
    """
    lock = HostLock(current_netns_id(), directory=job.get("lock_dir", LOCK_DIR),
                    timeout=job.get("lock_timeout", LOCK_TIMEOUT), create=not job["check_mode"])
    lock.acquire()
    try:
        return _converge_locked(host, requested, state, rendered, ruleset, job)
    finally:
        lock.release()


def _converge_locked(host, requested, state, rendered, ruleset, job):
    journal = journal_path(job["state_dir"], current_netns_id())
    interrupted = read_journal(journal)
    if interrupted is not None:
        job["warnings"].append("the previous apply in this network namespace (backend %s, started %s) did not "
                               "finish (its process was killed or the machine went down): this run converges from "
                               "what the tables hold" % (interrupted.get("backend"), interrupted.get("when")))
    steps = _Steps()
    if requested == NFTABLES:
        job["backend"] = NFTABLES
        old = _converge_nftables(host, state, rendered, job, steps)
    else:
        backend = job["backend"] = detect_backend(host, requested)
        old = _converge_iptables(host, backend, state, rendered, ruleset, job, steps)
    changed = steps.changed
    try:
        if changed and not job["check_mode"]:
            intent = dict(backend=job["backend"], state=state, when=_now())
            warnings = []
            try:
                warnings = run_detached(steps.run, journal=journal, intent=intent)
            except CaptureError as err:
                warnings = getattr(err, "warnings", None) or []
                raise
            finally:
                for engine, engine_warnings in zip(steps.engines, warnings):
                    engine.warnings[:] = engine_warnings
    finally:
        for engine in steps.engines:
            job["warnings"].extend(engine.warnings)
    if interrupted is not None and not job["check_mode"]:
        remove_journal(journal)
    added, removed, diffs = steps.report()
    boot = steps.boot if state == "present" else {}
    return dict(changed=changed, added=added, removed=removed, diff=diffs, migrated_from=old, boot_payload=boot)


def _now():
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def _conflict(asked, present, detail):
    return CaptureError("backend %s: a capture of backend %s is present (%s); remove it first (state=absent with "
                        "backend=%s) or set migrate=true" % (asked, present, detail, present))


def _converge_nftables(host, state, rendered, job, steps):
    paths = host.require(["nft"] + (["unshare"] if state == "present" else []))
    engine = NftEngine(host.run, paths, job["state_dir"], NFT_TABLES.values(), check_mode=job["check_mode"])
    live = engine.read()
    old = ["iptables-nft"] if live[1] else []
    saves = dict((proc, (name, host.which(name))) for proc, name in LEGACY_SAVES.items())
    legacy, warnings = legacy_capture_present(host.read_text, host.run, saves)
    job["warnings"].extend(warnings)
    old += ["iptables-legacy"] if legacy else []
    if old and state == "present" and not job["migrate"]:
        where = sorted(set(" ".join(chain.split()[:2]) for chain in live[1])) or ["legacy tables"]
        raise _conflict(NFTABLES, old[0], "ISTIO_* chains in %s" % ", ".join(where))
    wanted = rendered["nft_tables"] if state == "present" else {}
    _nft_step(host, engine, wanted, live, steps)
    # The nftables capture owns whole tables: nothing to add for the boot-time restore.
    steps.boot = dict(rendered["restore"]) if state == "present" else {}
    if not job["migrate"]:
        return []
    for backend in old:  # after the new capture: removed by the iptables Engine
        _iptables_step(host, backend, Ruleset(), dict((f, "") for f in FAMILIES), None, job, steps)
    return old


def _converge_iptables(host, backend, state, rendered, ruleset, job, steps):
    nft = host.which("nft")
    present = nft_capture_tables(host.run, nft, NFT_TABLES.values())
    if present and state == "present" and not job["migrate"]:
        raise _conflict(backend, NFTABLES, ", ".join("%s %s" % (NFT_FAMILY, t) for t in present))
    if state == "absent":
        wanted, payloads = Ruleset(), dict((family, "") for family in FAMILIES)
    else:
        wanted, payloads = ruleset, rendered["restore"]
    steps.boot = _iptables_step(host, backend, wanted, payloads, rendered, job, steps)
    if not (present and job["migrate"]):
        return []
    paths = host.require(["nft"])
    nft_engine = NftEngine(host.run, paths, job["state_dir"], NFT_TABLES.values(), check_mode=job["check_mode"])
    _nft_step(host, nft_engine, {}, nft_engine.read(), steps)
    return [NFTABLES]
