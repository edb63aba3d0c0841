"""Faults around what the modules keep on the host, on a real kernel and
real file systems: directories another user could change, a full and a
read-only persist directory (a 64 KiB tmpfs in a private mount namespace),
a read-only state_dir on a first apply, a tampered rendering memo, and the
boot-time restore script (the active file set, the host lock, a refused
directory).

Everything runs as root in namespaces the tests create: the tmpfs mounts
and a tmpfs over /run (where the host lock lives) only exist in a private
mount namespace (unshare -m) of the command that needs them, rules only
ever go into a network namespace of the test.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

import module_runner
from rules_helpers import save
from tests.unit.plugins.modules.test_persist import REFUSED, UNSAFE

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "roles" / "capture" / "files" / "meshcapture-restore.sh"
ROUTES_ENV = ("MESHCAPTURE_IPTABLES_BACKEND=iptables-nft\nMESHCAPTURE_TPROXY_ROUTES=false\n"
              "MESHCAPTURE_TPROXY_MARK=1337\nMESHCAPTURE_TPROXY_ROUTE_TABLE=133\nMESHCAPTURE_INBOUND_IPV6=false\n")
RULES_V4 = "*nat\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -p tcp -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -d 203.0.113.1/32 -j RETURN\nCOMMIT\n"
RULES_V6 = "*nat\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -p tcp -j ISTIO_OUTPUT\nCOMMIT\n"
INJECTED = "-A ISTIO_OUTPUT -d 198.51.100.66/32 -j ACCEPT"
# A rules configuration with IPv4 and IPv6 captures.
DUAL = dict(inbound_ports_include=["8080"], outbound_ip_ranges_include=["*"], enable_inbound_ipv6=True)


def unshare_mounts(setup: str, argv: list[str], netns=None, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run argv in a private mount namespace after the shell commands setup
    (mounts), with a tmpfs over /run there; inside netns when given."""
    script = "set -e\nmount -t tmpfs -o mode=0755 tmpfs /run\n%s\nexec \"$@\"" % setup
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *argv]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns.name, *cmd]
    pythonpath = os.pathsep.join(filter(None, [str(module_runner.COLLECTIONS), os.environ.get("PYTHONPATH")]))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                          env=dict(os.environ, PYTHONPATH=pythonpath, LC_ALL="C.UTF-8"))


def module_in_mounts(name: str, args: dict, tmp_path: Path, setup: str = "", netns=None) -> dict:
    """Run module name with args in a private mount namespace (unshare_mounts); its JSON result."""
    args_file = tmp_path / ("%s-args-%d.json" % (name, time.monotonic_ns()))
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    proc = unshare_mounts(setup, [sys.executable, "-m", "%s.%s" % (module_runner.MODULE_PACKAGE, name),
                                  str(args_file)], netns=netns)
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise AssertionError("module %s printed no JSON (rc=%d)\nstdout: %s\nstderr: %s"
                             % (name, proc.returncode, proc.stdout, proc.stderr)) from None


def persist_args(directory: Path, **contents) -> dict:
    files = dict({"rules.v4": RULES_V4, "rules.v6": RULES_V6, "routes.env": ROUTES_ENV}, **contents)
    items = [dict(name=name, content=text) for name, text in files.items()]
    items.append(dict(name="meshcapture-restore.sh", content=SCRIPT.read_text(), mode="0755"))
    return dict(state="present", path=str(directory), files=items)


def active(directory: Path) -> dict:
    """{name: content} of the active set; each file is also <directory>/<name>, the same file."""
    set_dir = directory / os.readlink(str(directory / ".current"))
    out = {}
    for name in sorted(os.listdir(str(set_dir))):
        assert os.path.samefile(str(set_dir / name), str(directory / name)), name
        out[name] = (set_dir / name).read_text()
    return out


# --------------------------------------------------- persist: loose directories
# The shipped module, run as root, on the unit tests' directories another user could change.
@pytest.mark.parametrize("make, why", [case[1:3] for case in UNSAFE], ids=[case[0] for case in UNSAFE])
def test_persist_refuses_a_directory_another_user_could_change(tmp_path, make, why):
    directory = tmp_path / "etc" / "meshcapture"
    make(directory)
    result = module_runner.run_module("persist", persist_args(directory))
    assert result.get("failed")
    assert result["msg"] == REFUSED.format(why=why.format(p=directory.parent, uid=os.geteuid()), d=directory)
    assert os.listdir(str(directory)) == []  # the root boot script and routes.env never went there


# --------------------------------------------------- persist: full and read-only
def _persist_twice(tmp_path, between=""):
    """Persist a set into a 64 KiB tmpfs, run `between` (shell), persist a bigger set; returns
    (first result, second result, listing and contents seen inside the mount namespace)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    directory = mnt / "meshcapture"
    first = persist_args(directory)
    second = persist_args(directory, **{"rules.v4": RULES_V4.replace("203.0.113.1", "203.0.113.2"),
                                        "rules.v6": RULES_V6 + "# " + "x" * 100 * 1024 + "\n"})
    for index, args in enumerate((first, second)):
        (tmp_path / ("args-%d.json" % index)).write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    run = "%s -m %s.persist" % (shlex.quote(sys.executable), module_runner.MODULE_PACKAGE)
    driver = "\n".join([
        "mount -t tmpfs -o size=64k,mode=0755 tmpfs %s" % shlex.quote(str(mnt)),
        "%s %s > %s" % (run, shlex.quote(str(tmp_path / "args-0.json")), shlex.quote(str(tmp_path / "out-0.json"))),
        between,
        "%s %s > %s || true" % (run, shlex.quote(str(tmp_path / "args-1.json")),
                                shlex.quote(str(tmp_path / "out-1.json"))),
        # what the boot script would read, copied out of the mount namespace
        "cp -a %s %s" % (shlex.quote(str(directory)), shlex.quote(str(tmp_path / "seen"))),
    ])
    proc = unshare_mounts(driver, ["true"])
    assert proc.returncode == 0, proc.stderr
    results = [json.loads((tmp_path / ("out-%d.json" % i)).read_text()) for i in (0, 1)]
    return results[0], results[1], tmp_path / "seen", first


@pytest.mark.parametrize("between, reason", [
    ("", "No space left on device"),
    ("mount -o remount,ro %(mnt)s", "Read-only file system"),
], ids=["full", "read-only"])
def test_persist_failure_leaves_the_previous_set_complete_and_active(tmp_path, between, reason):
    first, second, seen, args = _persist_twice(tmp_path, between % {"mnt": shlex.quote(str(tmp_path / "mnt"))})
    assert not first.get("failed"), first.get("msg")
    assert second.get("failed")
    assert second["msg"].startswith("cannot write %s/.set-" % (tmp_path / "mnt" / "meshcapture"))
    assert second["msg"].endswith(": " + reason)
    # rules.v4 and rules.v6 (and the rest) are all the first run's: the set is replaced in one step or not at all
    assert active(seen) == dict((f["name"], f["content"]) for f in args["files"])
    assert sorted(n for n in os.listdir(str(seen)) if n.startswith(".")) == [
        ".current", os.readlink(str(seen / ".current"))]  # nothing half-written left behind


# --------------------------------------------------- rules: state_dir
def _flush(ns):
    ns.run(["nft", "flush", "ruleset"])


def _tamper(memo: Path):
    data = json.loads(memo.read_text())
    payload = data["rendered"]["restore"]["ipv4"]
    head, sep, tail = payload.partition("COMMIT\n")
    data["rendered"]["restore"]["ipv4"] = head + INJECTED + "\n" + sep + tail
    memo.write_text(json.dumps(data))


@pytest.mark.parametrize("spoil", ["state-dir-0777", "memo-0666", "memo-owned-by-nobody"])
def test_tampered_memo_is_never_applied(netns_factory, tmp_path, spoil):
    ns = netns_factory("memo")
    state = tmp_path / "state"
    args = dict(DUAL, state_dir=str(state))
    first = module_runner.run_module("rules", args, netns=ns)
    assert not first.get("failed"), first.get("msg")
    memo, = state.glob("rendered-*.json")
    _tamper(memo)
    if spoil == "state-dir-0777":
        state.chmod(0o777)
    elif spoil == "memo-0666":
        memo.chmod(0o666)
    else:
        os.chown(str(memo), 65534, 65534)
    _flush(ns)  # the re-run has to apply again
    try:
        result = module_runner.run_module("rules", args, netns=ns)
        message = result.get("msg", "")
    except module_runner.ModuleRunError as err:  # a refusal the module does not catch yet
        result, message = dict(failed=True), str(err)
    assert INJECTED not in save(ns, "ipv4")
    if spoil == "state-dir-0777":
        assert result.get("failed")
        assert "%s: is writable by group and others (mode 0777)" % state in message
    else:  # a memo file another user could have written is ignored: rendered again, applied as it should be
        assert not result.get("failed"), message
        assert "-A ISTIO_OUTPUT" in save(ns, "ipv4")
        assert INJECTED not in memo.read_text()  # replaced by a private one


@pytest.mark.parametrize("setup", [
    "mount -t tmpfs -o size=64k,mode=0700 tmpfs {state} && mount -o remount,ro {state}",
    "mount -t tmpfs -o size=4k,mode=0700 tmpfs {state} && (head -c 8192 /dev/zero > {state}/fill || true)",
], ids=["read-only", "full"])
def test_unwritable_state_dir_on_a_first_apply_is_all_or_nothing(netns_factory, tmp_path, setup):
    """The memo, the canonical-form cache and the engine's records cannot be written on a first apply:
    the capture is applied for both families (a cache that cannot be written is a warning at most), or
    the run fails before changing anything with an error naming the path; never IPv4 without IPv6."""
    ns = netns_factory("ro")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    result = module_in_mounts("rules", dict(DUAL, state_dir=str(state)), tmp_path,
                              setup=setup.format(state=shlex.quote(str(state))), netns=ns)
    applied = dict((family, ":ISTIO_OUTPUT" in save(ns, family)) for family in ("ipv4", "ipv6"))
    if result.get("failed"):
        assert result["msg"].startswith(str(state)), result["msg"]
        assert "cannot write" in result["msg"], result["msg"]
        assert "exception" not in result, result["exception"]
        assert applied == {"ipv4": False, "ipv6": False}, result["msg"]
    else:
        assert result["changed"] is True
        assert applied == {"ipv4": True, "ipv6": True}


# --------------------------------------------------- the boot-time restore script
def _persisted(tmp_path, **contents) -> Path:
    directory = tmp_path / "persist"
    result = module_in_mounts("persist", persist_args(directory, **contents), tmp_path)
    assert not result.get("failed"), result.get("msg")
    return directory


def _boot(ns, directory, before="", timeout=120.0):
    """Run the persisted script as systemd would (ExecStart=<dir>/meshcapture-restore.sh) in ns, with a
    fresh /run; `before` runs first in the same namespaces. Returns (rc, output, seconds)."""
    start = time.monotonic()
    proc = unshare_mounts(before, [str(directory / "meshcapture-restore.sh")], netns=ns, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def test_restore_script_reads_the_active_set(netns_factory, tmp_path):
    ns = netns_factory("boot")
    directory = _persisted(tmp_path)
    # A file of the directory that is not the active set's (left by hand, say) is not read.
    (directory / "rules.v4").unlink()
    (directory / "rules.v4").write_text(RULES_V4.replace("203.0.113.1", "192.0.2.99"))
    rc, out, dummy = _boot(ns, directory)
    assert rc == 0, out
    assert "rules.v4 restored" in out and os.readlink(str(directory / ".current")) in out
    assert "-A ISTIO_OUTPUT -d 203.0.113.1/32 -j RETURN" in save(ns, "ipv4")
    assert "192.0.2.99" not in save(ns, "ipv4")


def test_restore_script_waits_for_the_host_lock(netns_factory, tmp_path):
    ns = netns_factory("lock")
    directory = _persisted(tmp_path)
    hold = ("mkdir -m 0700 /run/meshcapture && lock=/run/meshcapture/lock-$(stat -L -c '%d-%i' /proc/self/ns/net) "
            "&& (flock \"$lock\" sleep 3 >/dev/null 2>&1 &) && sleep 0.5")
    rc, out, seconds = _boot(ns, directory, before=hold)
    assert rc == 0, out
    assert seconds >= 2.5, "the script did not wait for the lock (%.1f s)" % seconds
    assert "-A ISTIO_OUTPUT -d 203.0.113.1/32 -j RETURN" in save(ns, "ipv4")


def test_restore_script_creates_the_lock_directory_private(netns_factory, tmp_path):
    ns = netns_factory("lockdir")
    directory = _persisted(tmp_path)
    probe = tmp_path / "lockdir.txt"
    proc = unshare_mounts("", ["sh", "-c", '"$0" >/dev/null && stat -c "%a %U" /run/meshcapture > "$1" && '
                                           'ls /run/meshcapture >> "$1"',
                               str(directory / "meshcapture-restore.sh"), str(probe)], netns=ns)
    assert proc.returncode == 0, proc.stderr
    ns_id = subprocess.run(["ip", "netns", "exec", ns.name, "stat", "-L", "-c", "%d-%i", "/proc/self/ns/net"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert probe.read_text().split("\n")[:2] == ["700 root", "lock-%s" % ns_id]


@pytest.mark.parametrize("spoil, why", [
    (lambda d: d.chmod(0o777), "{d}: not a directory only root can change: refusing it"),
    (lambda d: (d / os.readlink(str(d / ".current"))).chmod(0o775),
     "{s}: not a directory only root can change: refusing it"),
    (lambda d: os.chown(str(d), 65534, 65534), "{d}: not a directory only root can change: refusing it"),
], ids=["directory-0777", "set-0775", "directory-owned-by-nobody"])
def test_restore_script_refuses_a_directory_another_user_could_change(netns_factory, tmp_path, spoil, why):
    ns = netns_factory("refuse")
    directory = _persisted(tmp_path)
    set_dir = directory / os.readlink(str(directory / ".current"))
    spoil(directory)
    rc, out, dummy = _boot(ns, directory)
    assert rc == 1
    assert "meshcapture-restore: ERROR: " + why.format(d=directory, s=set_dir) in out
    assert "ISTIO" not in save(ns, "ipv4")
