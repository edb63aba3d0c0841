"""Runs against one host at the same time, and the lock that serialises them.

Two runs of the rules module started together in one namespace (the
restores slowed down by wrappers, so they overlap): the second waits for
the first's lock, so the host ends holding exactly the configuration of
the run that finished last, never a mix of the two.
"""

import os
import stat
import subprocess
import time

import pytest

from module_runner import warning_messages
from rules_helpers import (CONFIGS, FAMILIES, LOCK_DIR, RESTORE, add_foreign, apply, assert_same, calls,
                           finish_module, lock_id, ok, saves, start_module, write_wrapper)
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_lock import HostLock, LockError

pytestmark = pytest.mark.netns

PAIRS = {
    "same": ("vm-redirect", "vm-redirect"),
    "different": ("vm-redirect", "kubevirt"),
}
BACKENDS = ["iptables-nft", "iptables-legacy", "nftables"]
CASES = [(backend, pair) for backend in BACKENDS for pair in PAIRS]


def _slow_restores(tmp_path, backend):
    directory = tmp_path / "bin"
    directory.mkdir(exist_ok=True)
    names = [RESTORE[backend][family] for family in FAMILIES] if backend != "nftables" else []
    for name in names:
        write_wrapper(directory, name, "/usr/sbin/" + name, "sleep 0.5")
    if backend == "nftables":  # nft -f FILE of the apply (not the reads, not the scratch namespace)
        path = directory / "nft"
        path.write_text('#!/bin/sh\n[ "$1" = "-f" ] && sleep 0.5\nexec /usr/sbin/nft "$@"\n')
        path.chmod(0o755)
    return directory


def _serial(netns_factory, tmp_path, backend, names):
    """The state of a namespace where the configurations were applied one after the other."""
    ns = netns_factory("cref")
    if backend != "nftables":
        add_foreign(ns, backend=backend)
    for name in names:
        ok(apply(ns, tmp_path / "ref", backend=backend, **CONFIGS[name]))
    return _state(ns, backend)


def _state(ns, backend):
    if backend == "nftables":
        return ns.run(["nft", "list", "ruleset"]).stdout
    return saves(ns, backend=backend)


@pytest.mark.parametrize("backend, pair", CASES, ids=["%s-%s" % case for case in CASES])
def test_concurrent_runs_end_in_one_configuration(netns_factory, tmp_path, backend, pair):
    first, second = PAIRS[pair]
    ns = netns_factory("conc")
    if backend != "nftables":
        add_foreign(ns, backend=backend)
    directory = _slow_restores(tmp_path, backend)
    procs = {}
    for k, name in enumerate((first, second)):
        procs[k] = (name, start_module(ns, tmp_path, path_dirs=[directory], backend=backend, **CONFIGS[name]))
    finished = []
    results = {}
    deadline = time.time() + 180
    while len(finished) < 2 and time.time() < deadline:
        for k, (name, proc) in procs.items():
            if k not in finished and proc.poll() is not None:
                finished.append(k)
                results[k] = finish_module(proc)
        time.sleep(0.02)
    assert len(finished) == 2, "the runs did not end"
    for k in finished:
        ok(results[k])
        assert warning_messages(results[k]) == []
    # Exactly as if the runs had been made one after the other, in the order
    # they took the lock (which the order they exit in need not show: the one
    # that waited may finish first).
    state = _state(ns, backend)
    orders = [[first, second], [second, first]] if first != second else [[first, second]]
    matches = []
    for order in orders:
        try:
            assert_same(state, _serial(netns_factory, tmp_path / "-".join(order), backend, order))
            matches.append(order)
        except AssertionError:
            pass
    assert matches, "the host is in neither serial order's state"
    # Both runs changed the host when they differ; of two equal runs, one.
    assert sorted(results[k]["changed"] for k in finished) == ([True, True] if first != second else [False, True])
    assert ok(apply(ns, tmp_path, backend=backend, **CONFIGS[matches[0][-1]]))["changed"] is False


def test_a_run_waits_for_the_lock(netns_factory, tmp_path):
    """While another process holds the namespace's lock (as the boot-time
    restore does with flock), a run waits and then applies."""
    ns = netns_factory("lockw")
    path = os.path.join(LOCK_DIR, "lock-%s" % lock_id(ns))
    holder = subprocess.Popen(["flock", path, "sleep", "2"])
    try:
        time.sleep(0.3)
        started = time.time()
        result = ok(apply(ns, tmp_path, **CONFIGS["vm-redirect"]))
        assert time.time() - started >= 1.5, "the run did not wait for the lock"
        assert result["changed"] is True
    finally:
        holder.wait(timeout=30)


# ------------------------------------------------------------ the lock itself
def test_lock_times_out_naming_the_lock(tmp_path):
    directory = tmp_path / "locks"
    holder = HostLock("4-1", directory=str(directory))
    holder.acquire()
    try:
        with pytest.raises(LockError) as err:
            HostLock("4-1", directory=str(directory), timeout=0.3).acquire()
        assert str(err.value) == ("lock %s/lock-4-1 is held by another run against this host (another rules run or "
                                  "the boot-time restore); gave up after 0 s" % directory)
    finally:
        holder.release()
    with HostLock("4-1", directory=str(directory), timeout=0.3):
        pass


def test_lock_directory_is_created_private(tmp_path):
    directory = tmp_path / "new"
    with HostLock("4-2", directory=str(directory)):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert (directory / "lock-4-2").exists()


def test_lock_in_check_mode_creates_nothing(tmp_path):
    assert HostLock("4-3", directory=str(tmp_path / "none"), create=False).acquire() is False
    assert not (tmp_path / "none").exists()


UNSAFE = ["symlink", "group-writable", "other-writable", "not-owned", "not-a-directory"]


@pytest.mark.parametrize("case", UNSAFE)
def test_unsafe_lock_directory_is_refused(tmp_path, case):
    target = tmp_path / "real"
    target.mkdir(mode=0o700)
    directory = tmp_path / "locks"
    if case == "symlink":
        directory.symlink_to(target)
        reason = "is a symbolic link"
    elif case == "not-a-directory":
        directory.write_text("")
        reason = "is not a directory"
    else:
        directory.mkdir(mode=0o700)
        if case == "not-owned":
            os.chown(str(directory), 65534, 65534)
            reason = "is owned by uid 65534, not by uid %d (the user running this)" % os.geteuid()
        else:
            mode = 0o720 if case == "group-writable" else 0o702
            directory.chmod(mode)
            reason = "is writable by %s (mode %04o)" % ("group" if case == "group-writable" else "others", mode)
    with pytest.raises(LockError) as err:
        HostLock("4-4", directory=str(directory)).acquire()
    assert str(err.value) == "lock directory %s: %s" % (directory, reason)
    assert not (target / "lock-4-4").exists()


def test_flock_command_sees_the_module_lock(netns_factory, tmp_path):
    """The boot-time restore takes the same lock with flock(1): while a run
    holds it, `flock -n` on the file fails."""
    ns = netns_factory("lockf")
    directory = tmp_path / "bin"
    directory.mkdir()
    for family in FAMILIES:
        write_wrapper(directory, RESTORE["iptables-nft"][family], "/usr/sbin/" + RESTORE["iptables-nft"][family],
                      "sleep 1")
    proc = start_module(ns, tmp_path, path_dirs=[directory], **CONFIGS["vm-redirect"])
    path = os.path.join(LOCK_DIR, "lock-%s" % lock_id(ns))
    try:
        deadline = time.time() + 30
        while not calls(directory) and time.time() < deadline:  # the apply's restore runs: the lock is held
            time.sleep(0.02)
        assert calls(directory)
        assert subprocess.run(["flock", "-n", path, "true"], check=False).returncode != 0
    finally:
        ok(finish_module(proc))
    assert subprocess.run(["flock", "-n", path, "true"], check=False).returncode == 0
