"""What the VM scenario looks at inside a VM started by vmctl.py (run as root).

Standard library only; used by tests/integration/test_vm.py (``import
vmcheck``) and by molecule/vm's verify (the command line)::

    vmcheck.py snapshot DIR           # the listings below, normalised
    vmcheck.py traffic DIR captured   # or: direct; JSON report, exit 1 on a miss
    vmcheck.py unit DIR               # ActiveState/ExecMainStatus of the unit

snapshot: ``iptables-save``, ``ip6tables-save``, ``nft list ruleset`` (a
command that is not installed yet lists nothing, as a kernel without any
table does; the ruleset's tables, and the chains and sets in each, sorted,
since nft lists them in creation order), ``ip rule`` (both families), ``ip route show table 133`` (both
families) and the IPv6 addresses on lo (``ip -6 addr show lo``, where
TPROXY's ::6 lives), with counters and comments removed.

traffic: molecule/shared/verify_capture.py (copied into the VM, run with the
VM's python3) starts the listeners in the VM: 15001 (outbound, reports
SO_ORIGINAL_DST), 15006 (inbound, transparent: its local address is the
original destination), 15053 (DNS, UDP and TCP, socket of uid 1337) and the
application port 8080; the namespace's side (192.0.2.1 / 2001:db8::1)
listens on 9080. Checks, both address families:
  * from the VM (root) to the namespace's 9080: ``captured`` expects the
    VM's 15001 with original destination 192.0.2.1:9080; ``direct`` the
    namespace's listener;
  * DNS from the VM to 192.0.2.1:53, UDP and TCP: ``captured`` expects the
    VM's 15053; ``direct`` no answer (nothing serves DNS in the namespace);
  * from the namespace to the VM's 8080: ``captured`` expects 15006 (TPROXY)
    with local address 192.0.2.10:8080; ``direct`` the application port;
  * a new SSH connection to the VM works.
"""

import json
import os
import re
import select
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import vmctl  # noqa: E402

REPO = os.path.dirname(os.path.dirname(HERE))
VERIFY = os.path.join(REPO, "molecule", "shared", "verify_capture.py")
VM_VERIFY = "/root/verify_capture.py"
UNIT = "meshcapture-capture.service"

SNAPSHOT = r"""
listing() {
    echo "== $*"
    if command -v "$1" >/dev/null 2>&1; then "$@" 2>&1; fi
}
listing iptables-save
listing ip6tables-save
listing nft list ruleset
listing ip -4 rule
listing ip -6 rule
listing ip -4 route show table 133
listing ip -6 route show table 133
echo "== ip -6 addr show lo"
ip -6 -o addr show dev lo | sed -e 's/\\.*//' -e 's/ *$//'
"""


def _blocks(lines, indent):
    """Split lines into blocks that start at `indent` + a keyword and end
    with `indent` + "}" (nft list ruleset's tables, chains, sets)."""
    blocks, current = [], []
    for line in lines:
        current.append(line)
        if line == indent + "}":
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def canonical_ruleset(text):
    """nft list ruleset with its tables, and the chains and sets in each,
    sorted: nft lists them in the order they were created, which a restore
    at boot need not repeat (iptables-nft creates the chains of a table in
    the order of its restore file); the rules inside a chain keep their
    order."""
    tables = []
    # nft prints "# Warning: table ip nat is managed by iptables-nft, do not
    # touch!" above such a table: a comment, not part of the table's block.
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    for table in _blocks(lines, ""):
        head, body, tail = table[0], table[1:-1], table[-1:]
        chains = sorted(_blocks(body, "\t"))
        tables.append([head] + [line for chain in chains for line in chain] + tail)
    return "\n".join(line for table in sorted(tables) for line in table)


def snapshot(vm):
    out = vm.ssh(SNAPSHOT).stdout
    head, sep, rest = out.partition("== nft list ruleset\n")
    if sep:
        ruleset, sep2, after = rest.partition("== ip -4 rule\n")
        out = head + sep + canonical_ruleset(ruleset) + "\n" + sep2 + after
    out = re.sub(r"\[\d+:\d+\]", "[-]", out)
    out = re.sub(r"counter packets \d+ bytes \d+", "counter", out)
    # A routing table that never had a route does not exist yet; one whose
    # routes were all removed does: both list nothing.
    lines = [line.rstrip() for line in out.splitlines() if not line.startswith("#")
             and not re.match(r"Error: ipv[46]: FIB table does not exist\.$|Dump terminated$", line)]
    return "\n".join(lines) + "\n"


def unit_state(vm, unit=UNIT):
    out = vm.ssh("systemctl show -p ActiveState,ExecMainStatus,UnitFileState %s" % unit).stdout
    return dict(line.split("=", 1) for line in out.split())


def _verify_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("verify_capture", VERIFY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_verify(vm):
    if vm.ssh("test -s %s" % VM_VERIFY, check=False).returncode != 0:
        vm.copy_in(VERIFY, VM_VERIFY)


class _Server:
    """verify_capture.py serve, in the VM (over SSH) or in the namespace."""

    def __init__(self, argv, what, timeout=90):
        self.what = what
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready, _w, _x = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        try:
            status = json.loads(line) if line.strip() else {"ready": False, "error": "no answer in %ss" % timeout}
        except ValueError:
            status = {"ready": False, "error": line[:200]}
        if not status.get("ready"):
            self.close()
            raise vmctl.VMError("listeners %s did not start: %s" % (what, status.get("error")))

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()


def checks_for(expect):
    captured = expect == "captured"
    checks_vm, checks_ns = [], []
    for ns_addr, vm_addr in ((vmctl.NS_V4, vmctl.VM_V4), (vmctl.NS_V6, vmctl.VM_V6)):
        fmt = (lambda a, p: "[%s]:%d" % (a, p)) if ":" in ns_addr else (lambda a, p: "%s:%d" % (a, p))
        checks_vm.append({"name": "outbound %s" % fmt(ns_addr, 9080), "dst": ns_addr, "port": 9080,
                          "expect": "outbound" if captured else "peer:9080",
                          "expect_orig_dst": fmt(ns_addr, 9080) if captured else None})
        for proto in ("udp", "tcp"):
            checks_vm.append({"name": "dns %s %s" % (proto, fmt(ns_addr, 53)), "dst": ns_addr, "port": 53,
                              "proto": proto, "expect": "dns" if captured else "none"})
        checks_ns.append({"name": "inbound %s" % fmt(vm_addr, 8080), "dst": vm_addr, "port": 8080,
                          "expect": "inbound" if captured else "app:8080",
                          "expect_orig_dst": fmt(vm_addr, 8080) if captured else None})
    return checks_vm, checks_ns


def traffic(vm, expect="captured", timeout=3.0):
    """Real connections (see the module docstring); {"ok": bool, "checks": [...]}."""
    verify = _verify_module()
    copy_verify(vm)
    spec = {"inbound_mode": "TPROXY", "app_ports": [8080], "peer_ports": [9080]}
    vm_listeners, ns_listeners = verify.listeners_of(spec)
    checks_vm, checks_ns = checks_for(expect)
    serve = {"listeners": vm_listeners, "lifetime": 60}
    servers = []
    try:
        servers.append(_Server(vm.ssh_argv("python3 %s serve '%s'" % (VM_VERIFY, json.dumps(serve))), "in the VM"))
        servers.append(_Server(vm.ns_argv([sys.executable, VERIFY, "serve",
                                           json.dumps({"listeners": ns_listeners, "lifetime": 60})]),
                               "in the namespace"))
        out = vm.ssh("python3 %s clients '%s'" % (VM_VERIFY, json.dumps({"checks": checks_vm, "timeout": timeout})),
                     timeout=120).stdout
        results_vm = json.loads(out.strip().splitlines()[-1])["results"]
        proc = vmctl.run(vm.ns_argv([sys.executable, VERIFY, "clients",
                                     json.dumps({"checks": checks_ns, "timeout": timeout})]), timeout=120)
        results_ns = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    finally:
        for server in servers:
            server.close()
    judged = [verify.judge(dict(check, **{"from": "host"}), result) for check, result in zip(checks_vm, results_vm)]
    judged += [verify.judge(dict(check, **{"from": "peer"}), result) for check, result in zip(checks_ns, results_ns)]
    ssh = vm.ssh("echo ssh-ok", check=False, timeout=60)
    judged.append({"name": "new SSH connection", "ok": ssh.returncode == 0 and ssh.stdout.strip() == "ssh-ok",
                   "problems": [] if ssh.returncode == 0 else [ssh.stderr.strip()]})
    return {"ok": all(item["ok"] for item in judged), "expect": expect, "checks": judged}


def describe(report):
    """The failed checks, one line each."""
    return "\n".join("%s: %s" % (item["name"], "; ".join(item.get("problems") or []) or item.get("error"))
                     for item in report["checks"] if not item["ok"])


def main(argv):
    if len(argv) < 2 or argv[0] not in ("snapshot", "traffic", "unit"):
        sys.stderr.write(__doc__)
        return 2
    vm = vmctl.VM.load(argv[1])
    if argv[0] == "snapshot":
        sys.stdout.write(snapshot(vm))
    elif argv[0] == "unit":
        print(json.dumps(unit_state(vm)))
    else:
        report = traffic(vm, argv[2] if len(argv) > 2 else "captured")
        print(json.dumps(report, indent=1))
        if not report["ok"]:
            sys.stderr.write(describe(report) + "\n")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
