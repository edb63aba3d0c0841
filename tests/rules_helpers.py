"""Helpers for the real-kernel tests of meshcapture.sidecar.rules.

Standard library only; import it like tests/netns.py (tests/ is on
sys.path).  Everything here runs inside namespaces the tests created: the
module always gets a ``state_dir`` under the test's tmp_path, never the
default /run/meshcapture.
"""

from __future__ import annotations

import difflib
import re
import shlex

from module_runner import run_module
from netns import MarkedMonitor

FAMILIES = ("ipv4", "ipv6")
SAVE = {
    "iptables-nft": {"ipv4": "iptables-nft-save", "ipv6": "ip6tables-nft-save"},
    "iptables-legacy": {"ipv4": "iptables-legacy-save", "ipv6": "ip6tables-legacy-save"},
}
RESTORE = {
    "iptables-nft": {"ipv4": "iptables-nft-restore", "ipv6": "ip6tables-nft-restore"},
    "iptables-legacy": {"ipv4": "iptables-legacy-restore", "ipv6": "ip6tables-legacy-restore"},
}
COMMAND = {
    "iptables-nft": {"iptables": "iptables-nft", "ip6tables": "ip6tables-nft"},
    "iptables-legacy": {"iptables": "iptables-legacy", "ip6tables": "ip6tables-legacy"},
}

_CHAIN_COUNTERS = re.compile(r"^(:\S+ \S+) \[\d+:\d+\]$")

# Configurations shared by the test files (options of the rules module).
CONFIGS = {
    # A VM onboarded with istioctl: everything captured, a few excludes.
    "vm-redirect": dict(
        inbound_ports_include=["*"], inbound_ports_exclude=["22", "15090", "15021", "15020"],
        outbound_ip_ranges_include=["*"], outbound_ip_ranges_exclude=["169.254.169.254/32"],
        outbound_ports_exclude=["25"]),
    "tproxy": dict(
        inbound_interception_mode="TPROXY", inbound_ports_include=["*"], inbound_ports_exclude=["22"],
        outbound_ip_ranges_include=["10.0.0.0/8", "fd00::/8"], outbound_ip_ranges_exclude=["10.96.0.0/12"],
        enable_inbound_ipv6=True),
    "dual-dns": dict(
        inbound_ports_include=["8080", "9090"], outbound_ip_ranges_include=["*"],
        outbound_ip_ranges_exclude=["2001:db8:fffe::/48"], redirect_dns=True,
        dns_servers_v4=["192.0.2.53"], dns_servers_v6=["2001:db8::53"], enable_inbound_ipv6=True),
    "trace": dict(
        inbound_ports_include=["8080"], outbound_ports_include=["32000"],
        outbound_ip_ranges_include=["10.0.0.0/8"], trace_logging=True, redirect_dns=True,
        capture_all_dns=True),
    "kubevirt": dict(
        kube_virt_interfaces=["eth1", "eth2"], exclude_interfaces=["eth9"], drop_invalid=True,
        outbound_ip_ranges_include=["10.0.0.0/8", "2001:db8:ffff::/48"], inbound_ports_include=["8080"],
        enable_inbound_ipv6=True),
    "groups": dict(
        owner_groups_include=["1000", "202"], proxy_uid=["1337", "1338"], proxy_gid=["1337"],
        outbound_ports_include=["32000", "31000"], inbound_ports_include=["*"],
        inbound_interception_mode="TPROXY", exclude_interfaces=["eth9"], proxy_port=15011),
}


def state_dir(tmp_path) -> str:
    return str(tmp_path / "meshcapture-state")


def apply(ns, tmp_path, *, check=False, diff=False, **opts) -> dict:
    """Run the rules module inside ``ns`` (state_dir under tmp_path); returns its result."""
    args = dict(opts)
    args.setdefault("state_dir", state_dir(tmp_path))
    return run_module("rules", args, netns=ns, check=check, diff=diff)


def ok(result) -> dict:
    """The result, asserted not failed (the message shown otherwise)."""
    assert not result.get("failed"), "module failed: %s\nstderr: %s" % (result.get("msg"), result.get("stderr"))
    return result


def save(ns, family, *, backend="iptables-nft", counters=False) -> str:
    """iptables-save of a family inside ``ns``: comment lines removed; without
    ``counters`` chain counters are zeroed and rule counters not asked for."""
    argv = [SAVE[backend][family]] + (["-c"] if counters else [])
    out = ns.run(argv).stdout
    lines = []
    for line in out.splitlines():
        if line.startswith("#"):
            continue
        if not counters:
            line = _CHAIN_COUNTERS.sub(r"\1 [0:0]", line)
        lines.append(line)
    return "\n".join(lines) + "\n" if lines else ""


def saves(ns, *, backend="iptables-nft", counters=False) -> dict:
    return {family: save(ns, family, backend=backend, counters=counters) for family in FAMILIES}


def assert_same(actual, expected, what="iptables-save"):
    """assert actual == expected (a save, or {family: save}), showing a
    unified diff (- expected, + actual) when they differ."""
    if actual == expected:
        return
    if isinstance(expected, dict):
        parts = ["%s:\n%s" % (key, _udiff(expected.get(key, ""), actual.get(key, "")))
                 for key in sorted(set(expected) | set(actual)) if expected.get(key) != actual.get(key)]
    else:
        parts = [_udiff(expected, actual)]
    raise AssertionError("%s differs (- expected, + actual):\n%s" % (what, "\n".join(parts)))


def _udiff(expected, actual):
    return "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True), "expected", "actual"))


def restore(ns, family, payload, *, backend="iptables-nft", noflush=True):
    argv = [RESTORE[backend][family], "-w", "5"] + (["--noflush"] if noflush else [])
    return ns.run(argv, input=payload)


def run_commands(ns, commands, *, backend="iptables-nft"):
    """Run istio-iptables style commands ('iptables -t nat -A ...') one by one."""
    for command in commands:
        argv = shlex.split(command)
        argv[0] = COMMAND[backend][argv[0]]
        ns.run(argv)


# Rules of other software, in every table and several chains of both
# families, placed before the capture.  Some have shapes close to the
# capture's own rules (RETURN on an interface, REDIRECT of port 53 by
# someone else) but differ in a selector.
FOREIGN_V4 = """\
*raw
-A PREROUTING -s 203.0.113.1/32 -j NOTRACK
-A OUTPUT -d 203.0.113.2/32 -p udp -m udp --dport 123 -j NOTRACK
COMMIT
*mangle
-A PREROUTING -i eth0 -p tcp -m tcp --dport 2222 -j MARK --set-xmark 0x7/0xffffffff
-A OUTPUT -p tcp -m tcp --dport 2222 -j MARK --set-xmark 0x7/0xffffffff
COMMIT
*nat
:FOREIGN - [0:0]
-A PREROUTING -d 203.0.113.10/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.0.2.99:8080
-A PREROUTING -i eth7 -j RETURN
-A OUTPUT -d 203.0.113.11/32 -j FOREIGN
-A OUTPUT -d 203.0.113.53/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 5353
-A POSTROUTING -s 10.244.0.0/16 -o eth0 -j MASQUERADE
-A FOREIGN -p tcp -j REDIRECT --to-ports 3128
COMMIT
*filter
:FOREIGN_FW - [0:0]
-A INPUT -s 203.0.113.9/32 -j ACCEPT
-A INPUT -j FOREIGN_FW
-A OUTPUT -d 203.0.113.9/32 -j DROP
-A FOREIGN_FW -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
"""

FOREIGN_V6 = """\
*raw
-A PREROUTING -s 2001:db8:9::1/128 -j NOTRACK
-A OUTPUT -d 2001:db8:9::2/128 -p udp -m udp --dport 123 -j NOTRACK
COMMIT
*mangle
-A PREROUTING -i eth0 -p tcp -m tcp --dport 2222 -j MARK --set-xmark 0x7/0xffffffff
-A OUTPUT -p tcp -m tcp --dport 2222 -j MARK --set-xmark 0x7/0xffffffff
COMMIT
*nat
:FOREIGN6 - [0:0]
-A PREROUTING -d 2001:db8:9::10/128 -p tcp -m tcp --dport 80 -j DNAT --to-destination [2001:db8::99]:8080
-A OUTPUT -d 2001:db8:9::11/128 -j FOREIGN6
-A POSTROUTING -s fd00:244::/64 -o eth0 -j MASQUERADE
-A FOREIGN6 -p tcp -j REDIRECT --to-ports 3128
COMMIT
*filter
-A INPUT -s 2001:db8:9::9/128 -j ACCEPT
-A OUTPUT -d 2001:db8:9::9/128 -j DROP
COMMIT
"""

FOREIGN = {"ipv4": FOREIGN_V4, "ipv6": FOREIGN_V6}


def add_foreign(ns, *, backend="iptables-nft"):
    for family in FAMILIES:
        restore(ns, family, FOREIGN[family], backend=backend)


def owned_lines(save_text):
    """{(table, '-A CHAIN spec')} of the capture's rules in a save: rules of
    ISTIO_* chains and rules that jump to them, plus their chain lines."""
    out, table = set(), None
    for line in save_text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":ISTIO_"):
            out.add((table, line.split()[0]))
        elif line.startswith("-A "):
            out.add((table, line))
    return out


# The generation line of each marker transaction (the module's own nft
# commands come with events of their own, which are kept).
_OWN_GENERATION = re.compile(r"^# new generation \d+ by process \d+ \(nft\)$")


def nft_monitor(ns):
    """``nft monitor`` inside a namespace, marked by adding and deleting a
    table (see netns.MarkedMonitor); the marker's own events are left out."""
    def marker(serial):
        name = "mcs_marker_%d" % serial
        return ([["nft", "add table inet %s" % name], ["nft", "delete table inet %s" % name]],
                lambda line: line.startswith("delete table inet %s" % name))

    return MarkedMonitor(ns, ["nft", "monitor"], marker,
                         keep=lambda line: "mcs_marker_" not in line and not _OWN_GENERATION.match(line))


# ------------------------------------------------------- fault injection
# Helpers of tests/integration/test_faults_*.py: the rules module started in
# the background with a PATH whose first directory holds wrappers of the
# restore binaries, so a test can kill the module (or the apply process, or
# fail a restore) at a chosen moment.

LOCK_DIR = "/run/meshcapture"


def start_module(ns, tmp_path, *, path_dirs=(), **opts):
    """Start the rules module in ``ns`` in its own session (like a play's task:
    killable as a process group); returns a handle for finish_module()."""
    import json as _json
    import os as _os
    import subprocess as _subprocess
    import sys as _sys
    import tempfile as _tempfile
    from module_runner import COLLECTIONS, MODULE_PACKAGE

    args = dict(opts)
    args.setdefault("state_dir", state_dir(tmp_path))
    fd, args_path = _tempfile.mkstemp(prefix="rules-args-", suffix=".json", dir=str(tmp_path))
    with _os.fdopen(fd, "w") as f:
        _json.dump({"ANSIBLE_MODULE_ARGS": args}, f)
    env = dict(_os.environ, LC_ALL="C.UTF-8",
               PYTHONPATH=_os.pathsep.join(filter(None, [str(COLLECTIONS), _os.environ.get("PYTHONPATH")])),
               PATH=_os.pathsep.join([str(d) for d in path_dirs] + [_os.environ.get("PATH", "")]))
    argv = ["ip", "netns", "exec", ns.name, _sys.executable, "-m", MODULE_PACKAGE + ".rules", args_path]
    return _subprocess.Popen(argv, stdout=_subprocess.PIPE, stderr=_subprocess.PIPE, text=True, env=env,
                             start_new_session=True, cwd=str(tmp_path))


def finish_module(proc, timeout=120):
    """The JSON result of a module started by start_module (None when it printed none)."""
    import json as _json
    out, err = proc.communicate(timeout=timeout)
    try:
        return _json.loads(out)
    except ValueError:
        return None


def write_wrapper(directory, name, real, action=""):
    """An executable ``directory/name`` that logs each call of ``real`` made by
    an apply (argv starting with -w: not the scratch-namespace restores) to
    ``directory/calls`` as 'NAME N ARGS...', runs the shell snippet
    ``action`` (it sees $n, the call's number, and $PPID, the caller), then
    runs ``real``."""
    import os as _os
    path = _os.path.join(str(directory), name)
    with open(path, "w") as f:
        f.write("""#!/bin/sh
if [ "$1" = "-w" ]; then
    D=%(dir)s
    n=$(cat "$D/count.%(name)s" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > "$D/count.%(name)s"
    echo "%(name)s $n $*" >> "$D/calls"
    %(action)s
fi
exec %(real)s "$@"
""" % dict(dir=str(directory), name=name, real=real, action=action))
    _os.chmod(path, 0o755)
    return path


def calls(directory):
    """The lines of the wrappers' call log."""
    import os as _os
    path = _os.path.join(str(directory), "calls")
    if not _os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().splitlines()


def lock_id(ns):
    """capture_store.current_netns_id() as seen inside ns (names the lock file)."""
    return ns.python("import os; st = os.stat('/proc/self/ns/net'); print('%d-%d' % (st.st_dev, st.st_ino))"
                     ).stdout.strip()


def wait_unlocked(ns, timeout=60.0):
    """Wait until no apply holds ns's lock (a detached apply may outlive a killed module)."""
    import fcntl as _fcntl
    import os as _os
    import time as _time
    path = _os.path.join(LOCK_DIR, "lock-%s" % lock_id(ns))
    if not _os.path.exists(path):
        return
    fd = _os.open(path, _os.O_RDONLY)
    try:
        deadline = _time.time() + timeout
        while True:
            try:
                _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
                return
            except OSError:
                if _time.time() > deadline:
                    raise AssertionError("%s still locked after %s s" % (path, timeout))
                _time.sleep(0.05)
    finally:
        _os.close(fd)


def boot_payload(ns, result, *, backend="iptables-nft"):
    """What the role persists for the boot-time restore: the module's
    ``boot_payload`` when it returns one, else the same built from its
    ``restore`` payloads and the ownership markers the tables hold."""
    if result.get("boot_payload"):
        return result["boot_payload"]
    from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_marker import (
        MARKER_CHAIN, with_markers)
    from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_save import parse_save
    out = {}
    for family in FAMILIES:
        live = parse_save(save(ns, family, backend=backend))
        markers = {name: t.rules[MARKER_CHAIN] for name, t in live.items() if MARKER_CHAIN in t.policies}
        out[family] = with_markers(result["restore"][family], markers)
    return out


# ------------------------------------------------------ ownership marker
def _marker():
    from ansible_collections.meshcapture.sidecar.plugins.module_utils import capture_marker
    return capture_marker


def without_marker(text):
    """A save (or {family: save}) without the lines of the ownership marker chain."""
    MARKER_CHAIN = _marker().MARKER_CHAIN
    if isinstance(text, dict):
        return {family: without_marker(t) for family, t in text.items()}
    marker = re.compile(r"^(\[\d+:\d+\] )?(:%s |-A %s )" % (MARKER_CHAIN, MARKER_CHAIN))
    lines = [line for line in text.splitlines() if not marker.match(line)]
    return "\n".join(lines) + "\n" if lines else ""


def assert_marked(save_text, foreign=""):
    """Every table holding capture rules holds the marker chain, naming
    exactly the capture's rules in built-in chains (those not in foreign)."""
    from collections import Counter
    from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_save import parse_save
    MARKER_CHAIN, rule_hash = _marker().MARKER_CHAIN, _marker().rule_hash
    live, others = parse_save(save_text), parse_save(foreign)
    for name, table in live.items():
        theirs = Counter((c, spec) for c, specs in (others[name].rules.items() if name in others else [])
                         for spec in specs)
        ours = Counter((c, spec) for c, specs in table.rules.items() if c in BUILTINS for spec in specs) - theirs
        if not (ours or any(c.startswith("ISTIO_") for c in table.policies)):
            assert MARKER_CHAIN not in table.policies, "marker in %s without a capture" % name
            continue
        assert MARKER_CHAIN in table.policies, "no marker in %s" % name
        named = Counter(re.findall(r"meshcapture rule (\S+) ([0-9a-f]{16})", " ".join(table.rules[MARKER_CHAIN])))
        assert named == Counter({(c, rule_hash(c, spec)): n for (c, spec), n in ours.items()}), name


BUILTINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
