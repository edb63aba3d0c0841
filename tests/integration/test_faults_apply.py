"""Faults during an apply of the iptables backends: the module killed while
a restore runs, the apply process itself killed, a restore of the second
family failing with payloads below and above the pipe buffer, and the
rollback leaving nothing it did not have.

The module runs in the background (rules_helpers.start_module) with
wrappers of the restore binaries first on PATH (rules_helpers.write_wrapper)
that log each apply call and can wait, fail, or kill their caller.
"""

import os
import signal
import time

import pytest

import netns

from module_runner import warning_messages
from rules_helpers import (CONFIGS, FAMILIES, RESTORE, add_foreign, apply, assert_marked, assert_same, calls,
                           finish_module, ok, restore, saves, start_module, state_dir, wait_unlocked, without_marker,
                           write_wrapper)

pytestmark = pytest.mark.netns

BACKENDS = ["iptables-nft", "iptables-legacy"]
# From a capture without IPv6 and without excluded interfaces to one with
# both: a mix of the two leaves `-i/-o eth9 -j RETURN` in IPv4 (shapes other
# software could have too) and no IPv6 capture.
FIRST = dict(CONFIGS["vm-redirect"])
SECOND = dict(CONFIGS["kubevirt"])


def _real(name):
    for directory in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise AssertionError("%s not found" % name)


def wrappers(tmp_path, backend, actions):
    """A directory of wrappers of the backend's restore binaries; actions:
    {family: shell snippet run on each apply call of that family's restore}."""
    directory = tmp_path / "bin"
    directory.mkdir(exist_ok=True)
    for family in FAMILIES:
        name = RESTORE[backend][family]
        write_wrapper(directory, name, _real(name), actions.get(family, ""))
    return directory


def wait_for_call(directory, name, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(line.split()[0] == name for line in calls(directory)):
            return
        time.sleep(0.02)
    raise AssertionError("no apply call of %s; calls: %s" % (name, calls(directory)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """reference(backend, *configs) -> saves of a namespace with the foreign
    rules where the configs were applied in turn, without faults."""
    import netns
    cache = {}

    def get(backend, *configs):
        key = (backend, repr([sorted(c.items()) for c in configs]))
        if key not in cache:
            with netns.Netns("fref") as ns:
                add_foreign(ns, backend=backend)
                tmp = tmp_path_factory.mktemp("fref")
                for config in configs:
                    ok(apply(ns, tmp, backend=backend, **config))
                cache[key] = saves(ns, backend=backend)
        return cache[key]
    return get


def _converged(ns, tmp_path, backend, config, reference, foreign):
    """The host holds exactly the capture of FIRST then config applied; a
    re-run changes nothing; absent leaves the foreign rules only."""
    assert_same(saves(ns, backend=backend), reference(backend, FIRST, config))
    again = ok(apply(ns, tmp_path, backend=backend, **config))
    assert again["changed"] is False, again
    assert ok(apply(ns, tmp_path, backend=backend, state="absent"))["changed"] is True
    assert_same(saves(ns, backend=backend), foreign)
    assert ok(apply(ns, tmp_path, backend=backend, state="absent"))["changed"] is False


KILLS = [(backend, family, how) for backend in BACKENDS for family in FAMILIES for how in ("module", "group")]


def _interrupted_apply_converges(ns, tmp_path, reference, backend, family, interrupt):
    """Apply FIRST, then SECOND with slow restores; interrupt(proc) while the
    family's restore runs must end the module without a result, and the
    host must hold exactly SECOND (the detached apply went on to the end)."""
    add_foreign(ns, backend=backend)
    foreign = saves(ns, backend=backend)
    ok(apply(ns, tmp_path, backend=backend, **FIRST))
    directory = wrappers(tmp_path, backend, {f: "sleep 1" for f in FAMILIES})
    proc = start_module(ns, tmp_path, path_dirs=[directory], backend=backend, **SECOND)
    try:
        wait_for_call(directory, RESTORE[backend][family])
        interrupt(proc)
        assert finish_module(proc) is None
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_unlocked(ns)
    _converged(ns, tmp_path, backend, SECOND, reference, foreign)


@pytest.mark.parametrize("backend, family, how", KILLS, ids=["%s-%s-kill-%s" % k for k in KILLS])
def test_killing_the_module_during_a_restore_leaves_the_new_capture(netns_factory, tmp_path, reference,
                                                                    backend, family, how):
    """SIGKILL of the module (or of its whole process group, as a task
    timeout does) while the IPv4 or the IPv6 restore runs: the apply goes
    on to the end in its detached process; the host holds exactly the new
    capture, and the next run has nothing to do."""
    def kill(proc):
        if how == "module":
            os.kill(proc.pid, signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
    _interrupted_apply_converges(netns_factory("kill"), tmp_path, reference, backend, family, kill)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_to_every_process_of_the_run_leaves_the_new_capture(netns_factory, tmp_path, reference, backend):
    """A service or container stop sends SIGTERM to every process (SIGKILL only after a grace period): sent
    to the module, its apply process and the running IPv4 restore, it ends the module; the apply and its
    restores go on to the end, and the host holds exactly the new capture."""
    ns = netns_factory("term")

    def terminate_all(dummy):
        for pid in netns.run(["ip", "netns", "pids", ns.name]).stdout.split():
            try:
                os.kill(int(pid), signal.SIGTERM)
            except OSError:
                pass
    _interrupted_apply_converges(ns, tmp_path, reference, backend, "ipv4", terminate_all)


@pytest.mark.parametrize("backend", BACKENDS)
def test_killed_apply_process_is_reported_and_converged(netns_factory, tmp_path, reference, backend):
    """The apply process itself killed (SIGKILL) between the IPv4 and the
    IPv6 restore: IPv4 holds the new capture, IPv6 the old one.  The
    module fails saying so; the next run reports the interrupted apply and
    converges exactly (no second copy of a rule, nothing orphaned), and
    absent then removes everything."""
    ns = netns_factory("killap")
    add_foreign(ns, backend=backend)
    foreign = saves(ns, backend=backend)
    ok(apply(ns, tmp_path, backend=backend, **FIRST))
    directory = wrappers(tmp_path, backend, {"ipv6": "kill -9 $PPID; exit 1"})
    proc = start_module(ns, tmp_path, path_dirs=[directory], backend=backend, **SECOND)
    result = finish_module(proc)
    assert result is not None and result.get("failed") is True, result
    assert "ended without a result" in result["msg"], result["msg"]
    wait_unlocked(ns)
    mixed = saves(ns, backend=backend)
    assert "eth9" in mixed["ipv4"] and "ISTIO" not in mixed["ipv6"], "expected the IPv4-only mix"
    assert_marked(mixed["ipv4"], foreign["ipv4"])

    again = ok(apply(ns, tmp_path, backend=backend, **SECOND))
    assert again["changed"] is True
    assert any("did not finish" in w for w in warning_messages(again)), warning_messages(again)
    assert not [f for f in os.listdir(state_dir(tmp_path)) if f.startswith("apply-")], "journal left behind"
    _converged(ns, tmp_path, backend, SECOND, reference, foreign)


def _many_ranges(count):
    return ["2001:db8:%x::/48" % i for i in range(count)]


SIZES = {"small": 10, "large": 3000}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", list(SIZES))
def test_second_family_failing_is_rolled_back(netns_factory, tmp_path, backend, size):
    """ip6tables-restore fails without reading its payload (below and above
    the 64 KiB pipe buffer): IPv4 is put back exactly, and the error names
    the family, the command, its rc and its stderr."""
    ns = netns_factory("fail6")
    add_foreign(ns, backend=backend)
    ok(apply(ns, tmp_path, backend=backend, **FIRST))
    before = saves(ns, backend=backend, counters=True)
    ruleset = ns.run(["nft", "list", "ruleset"]).stdout
    second = dict(SECOND)
    second["outbound_ip_ranges_include"] = ["10.0.0.0/8"] + _many_ranges(SIZES[size])
    rendered = ok(apply(ns, tmp_path, state="rendered", backend=backend, **second))
    assert (len(rendered["restore"]["ipv6"]) > 65536) == (size == "large")
    fail = 'case "$*" in *--counters*) ;; *) echo "injected failure: cannot commit" >&2; exit 3;; esac'
    directory = wrappers(tmp_path, backend, {"ipv6": fail})
    result = finish_module(start_module(ns, tmp_path, path_dirs=[directory], backend=backend, **second))
    assert result is not None and result.get("failed") is True, result
    msg = result["msg"]
    assert msg.startswith("ipv6: %s -w 5 --noflush failed (rc 3): injected failure: cannot commit" %
                          RESTORE[backend]["ipv6"]), msg
    assert "rolled back: ipv6, ipv4" in msg, msg
    assert result["rc"] == 3 and result["stderr"].strip() == "injected failure: cannot commit"
    assert_same(saves(ns, backend=backend, counters=True), before, "IPv4 was not put back exactly")
    assert ns.run(["nft", "list", "ruleset"]).stdout == ruleset


def test_rollback_creates_no_base_chains(netns_factory, tmp_path):
    """A host whose nat table has only an OUTPUT chain: the rollback after a
    failed IPv6 restore leaves the nftables ruleset exactly as it was (no
    INPUT/POSTROUTING base chains appear), and another program's rules in
    chains of the same table stay."""
    ns = netns_factory("rbchain")
    restore(ns, "ipv4", "*nat\n-A OUTPUT -d 203.0.113.9/32 -j RETURN\nCOMMIT\n")
    ok(apply(ns, tmp_path, **dict(FIRST, enable_inbound_ipv6=True)))
    ruleset = ns.run(["nft", "list", "ruleset"]).stdout
    before = saves(ns, counters=True)
    fail = 'case "$*" in *--counters*) ;; *) echo "injected failure" >&2; exit 3;; esac'
    directory = wrappers(tmp_path, "iptables-nft", {"ipv6": fail})
    result = finish_module(start_module(ns, tmp_path, path_dirs=[directory], **SECOND))
    assert result is not None and result.get("failed") is True, result
    assert ns.run(["nft", "list", "ruleset"]).stdout == ruleset
    assert_same(saves(ns, counters=True), before)


def test_rollback_of_a_first_apply_removes_the_tables_it_created(netns_factory, tmp_path):
    """On a host without tables, a first apply whose IPv6 restore fails leaves no table behind."""
    ns = netns_factory("rbfirst")
    fail = 'case "$*" in *--counters*) ;; *) echo "injected failure" >&2; exit 3;; esac'
    directory = wrappers(tmp_path, "iptables-nft", {"ipv6": fail})
    result = finish_module(start_module(ns, tmp_path, path_dirs=[directory], **SECOND))
    assert result is not None and result.get("failed") is True, result
    assert ns.run(["nft", "list", "ruleset"]).stdout == ""
    assert without_marker(saves(ns)) == {"ipv4": "", "ipv6": ""}


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_process_killed_during_the_rollback(netns_factory, tmp_path, reference, backend):
    """The IPv6 restore fails and the apply process is killed while it puts
    IPv4 back: the next run reports the interrupted apply and converges
    exactly, from whatever mix the tables hold."""
    ns = netns_factory("killrb")
    add_foreign(ns, backend=backend)
    foreign = saves(ns, backend=backend)
    ok(apply(ns, tmp_path, backend=backend, **FIRST))
    directory = wrappers(tmp_path, backend, {
        "ipv4": 'case "$*" in *--counters*) kill -9 $PPID; exit 1;; esac',
        "ipv6": 'case "$*" in *--counters*) ;; *) echo "injected failure" >&2; exit 3;; esac'})
    result = finish_module(start_module(ns, tmp_path, path_dirs=[directory], backend=backend, **SECOND))
    assert result is not None and result.get("failed") is True, result
    assert "ended without a result" in result["msg"], result["msg"]
    wait_unlocked(ns)
    again = ok(apply(ns, tmp_path, backend=backend, **SECOND))
    assert again["changed"] is True
    assert any("did not finish" in w for w in warning_messages(again)), warning_messages(again)
    _converged(ns, tmp_path, backend, SECOND, reference, foreign)


def test_absent_killed_before_its_clean_up_is_finished_by_the_next(netns_factory, tmp_path):
    """absent removes the rules (one restore per family) and then, with nft,
    the tables the capture created; the apply process killed in between
    leaves empty tables that still carry the marker, and the next absent
    deletes them: the ruleset ends empty, as it began."""
    ns = netns_factory("killcl")
    ok(apply(ns, tmp_path, **CONFIGS["dual-dns"]))
    directory = tmp_path / "bin"
    directory.mkdir()
    (directory / "nft").write_text('#!/bin/sh\n[ "$1" = "-f" ] && { kill -9 $PPID; exit 1; }\n'
                                   'exec %s "$@"\n' % _real("nft"))
    (directory / "nft").chmod(0o755)
    result = finish_module(start_module(ns, tmp_path, path_dirs=[directory], state="absent"))
    assert result is not None and result.get("failed") is True, result
    wait_unlocked(ns)
    assert "ISTIO" not in ns.run(["nft", "list", "ruleset"]).stdout
    assert "MESHCAPTURE_OWNED" in ns.run(["nft", "list", "ruleset"]).stdout
    again = ok(apply(ns, tmp_path, state="absent"))
    assert again["changed"] is True
    assert any("did not finish" in w for w in warning_messages(again)), warning_messages(again)
    assert ns.run(["nft", "list", "ruleset"]).stdout == ""
    assert ok(apply(ns, tmp_path, state="absent"))["changed"] is False
