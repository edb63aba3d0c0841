"""The demo: the capture role on a throwaway network-namespace host.

1. builds a "VM" namespace and a peer namespace joined by a veth pair;
2. shows what the role would change (check mode, --diff) on the fresh VM;
3. applies the role (values from an Istio cluster.env);
4. proves capture with real connections and prints where each landed;
5. re-runs the role: nothing changes;
6. uninstalls and checks the VM's iptables are exactly as before;
7. deletes the namespaces (also when something fails).

Run it through scripts/demo.sh, which sets up the toolchain first.
Everything stays in the two namespaces and a temporary directory; traffic
only uses 192.0.2.0/24, 198.51.100.0/24 and 2001:db8::/32.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

import netns  # noqa: E402  (tests/netns.py: the namespace harness)

SERVICE = "198.51.100.7"  # a "remote service", on the peer
DNS_SERVER = "192.0.2.53"  # the VM's resolver, on the peer
APP_UID = 1000
PROXY_UID = 1337
CLUSTER_ENV = """\
# As written by `istioctl x workload entry configure` (abridged)
CANONICAL_SERVICE=demo-vm
ISTIO_INBOUND_PORTS=*
ISTIO_LOCAL_EXCLUDE_PORTS=15090,15021,15020
ISTIO_SERVICE_CIDR=*
ISTIO_SERVICE_EXCLUDE_CIDR=169.254.169.254/32
ISTIO_META_DNS_CAPTURE=true
"""


def say(text):
    print("\n\033[1m== %s\033[0m" % text if sys.stdout.isatty() else "\n== %s" % text, flush=True)


def iptables_save(ns):
    """Both families' iptables-save, without comment lines."""
    out = []
    for tool in ("iptables-nft-save", "ip6tables-nft-save"):
        text = ns.run([tool]).stdout
        out.extend(line for line in text.splitlines() if not line.startswith("#"))
    return "\n".join(out)


class Playbook(object):
    """Runs scripts/demo/site.yml against the VM with the given role vars."""

    def __init__(self, workdir, vm):
        self.workdir = workdir
        self.inventory = os.path.join(workdir, "inventory.json")
        persist = os.path.join(workdir, "etc-meshcapture")
        os.makedirs(os.path.join(workdir, "systemd"))
        with open(os.path.join(workdir, "cluster.env"), "w") as f:
            f.write(CLUSTER_ENV)
        host_vars = {
            "ansible_connection": "meshcapture.sidecar.netns",
            "ansible_host": vm.name,
            "ansible_python_interpreter": sys.executable,
            "capture_cluster_env": os.path.join(workdir, "cluster.env"),
            "capture_dns_servers_v4": [DNS_SERVER],
            "capture_dns_servers_v6": [],
            "capture_install_dependencies": False,
            # Namespaces share this machine's file system: keep every file
            # the role writes in the demo's temporary directory.
            "capture_persist_dir": persist,
            "capture_systemd_unit_dir": os.path.join(workdir, "systemd"),
            "capture_state_dir": os.path.join(workdir, "run-meshcapture"),
            "capture_istio_sidecar_env_path": os.path.join(workdir, "sidecar.env"),
        }
        with open(self.inventory, "w") as f:
            json.dump({"all": {"children": {"vms": {"hosts": {"demo-vm": host_vars}}}}}, f, indent=1)

    def run(self, *args, **extra_vars):
        argv = ["ansible-playbook", "-i", self.inventory, os.path.join(REPO, "scripts", "demo", "site.yml")]
        argv += list(args)
        if extra_vars:
            argv += ["-e", json.dumps(extra_vars)]
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        return proc.returncode, proc.stdout


def recap(output):
    """{'ok': n, 'changed': n, 'failed': n, ...} of the PLAY RECAP line."""
    line = [l for l in output.splitlines() if l.startswith("demo-vm")][-1]
    return dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", line))


def show_diff(output):
    """The --diff of a check run: every rule of the rules task, and the
    names of the other tasks that would change something (files)."""
    diffs, task = {}, None
    for line in output.splitlines():
        if line.startswith("TASK ["):
            task = line[line.index(":") + 1:].strip(" *]")
        elif task and line.startswith(("+", "-")) and not line.startswith(("+++", "---")):
            diffs.setdefault(task, []).append(line)
    for task, lines in diffs.items():
        if "capture rules" in task:
            print("   %s:" % task)
            for line in lines:
                print("     " + line)
    others = [task for task in diffs if "capture rules" not in task]
    if others:
        print("   also (files for the next boot): %s" % "; ".join(others))


def prove_capture(vm, peer):
    """Real connections; returns [(description, expected, landed, original destination, ok)]."""
    rows = []
    with netns.tcp_listener(vm, 15001, banner="envoy-outbound:15001", uid=PROXY_UID, gid=PROXY_UID), \
            netns.tcp_listener(vm, 15006, banner="envoy-inbound:15006", uid=PROXY_UID, gid=PROXY_UID), \
            netns.tcp_listener(vm, 22, banner="sshd:22"), \
            netns.udp_dns_listener(vm, 15053, banner="istio-agent-dns:15053", uid=PROXY_UID, gid=PROXY_UID), \
            netns.tcp_listener(peer, 80, banner="service:80"), \
            netns.udp_dns_listener(peer, 53, banner="resolver:53"):
        checks = [
            ("app (uid %d) -> %s:80" % (APP_UID, SERVICE), "envoy-outbound:15001",
             netns.tcp_connect(vm, SERVICE, 80, uid=APP_UID, gid=APP_UID)),
            ("proxy (uid %d) -> %s:80" % (PROXY_UID, SERVICE), "service:80",
             netns.tcp_connect(vm, SERVICE, 80, uid=PROXY_UID, gid=PROXY_UID)),
            ("peer -> VM %s:8080" % netns.HOST_V4, "envoy-inbound:15006",
             netns.tcp_connect(peer, netns.HOST_V4, 8080)),
            ("peer -> VM %s:22 (Ansible's port)" % netns.HOST_V4, "sshd:22",
             netns.tcp_connect(peer, netns.HOST_V4, 22)),
            ("app DNS/udp -> %s:53" % DNS_SERVER, "istio-agent-dns:15053",
             netns.udp_query(vm, DNS_SERVER, 53, uid=APP_UID, gid=APP_UID)),
            ("proxy DNS/udp -> %s:53" % DNS_SERVER, "resolver:53",
             netns.udp_query(vm, DNS_SERVER, 53, uid=PROXY_UID, gid=PROXY_UID)),
        ]
        for description, expected, result in checks:
            landed = result.get("banner") or "no answer (%s)" % result.get("error")
            rows.append((description, expected, landed, result.get("orig_dst") or "", landed == expected))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (inventory, files)")
    args = parser.parse_args()
    reason = netns.unavailable_reason()
    if reason:
        sys.exit("demo: %s" % reason)
    started = time.time()
    workdir = tempfile.mkdtemp(prefix="meshcapture-demo-")
    failures = []
    with netns.Topology() as topo:
        say("1. A throwaway VM and a peer (network namespaces)")
        vm, peer = topo.host_and_peer()
        for address in (SERVICE, DNS_SERVER):
            peer.run(["ip", "addr", "add", address + "/32", "dev", "lo"])
        print("   VM   %s  eth0 %s, %s" % (vm.name, netns.HOST_V4, netns.HOST_V6))
        print("   peer %s  eth0 %s, %s; also %s (service) and %s (resolver)"
              % (peer.name, netns.PEER_V4, netns.PEER_V6, SERVICE, DNS_SERVER))
        before = iptables_save(vm)
        play = Playbook(workdir, vm)

        say("2. Check mode with --diff on the fresh VM (nothing is changed)")
        rc, out = play.run("--check", "--diff")
        show_diff(out)
        if rc != 0 or iptables_save(vm) != before:
            failures.append("check mode failed or changed the VM")
            print(out)
        print("   recap: %s; VM iptables unchanged: %s" % (recap(out), iptables_save(vm) == before))

        say("3. Apply the role")
        rc, out = play.run()
        if rc != 0:
            failures.append("apply failed")
            print(out)
        print("   recap: %s" % recap(out))
        for line in out.splitlines():
            if "WARNING" in line or "[WARNING]" in line:
                print("   " + line.strip())

        say("4. Real connections: where did each land?")
        rows = prove_capture(vm, peer)
        width = max(len(r[0]) for r in rows)
        for description, expected, landed, orig, ok in rows:
            origin = ("original dst %s" % orig) if orig else ""
            verdict = "ok" if ok else "EXPECTED %s" % expected
            print("   %-*s  -> %-24s %s %s" % (width, description, landed, origin, verdict))
            if not ok:
                failures.append("%s landed on %s" % (description, landed))

        say("5. Run the role again: nothing to change")
        rc, out = play.run()
        summary = recap(out)
        print("   recap: %s" % summary)
        if rc != 0 or summary.get("changed") != 0:
            failures.append("second run was not a no-op")
            print(out)

        say("6. Uninstall (capture_state: absent)")
        rc, out = play.run(capture_state="absent")
        print("   recap: %s" % recap(out))
        same = iptables_save(vm) == before
        print("   VM iptables exactly as before the capture: %s" % same)
        if rc != 0 or not same:
            failures.append("uninstall did not restore the VM")

        say("7. Clean up")
    print("   namespaces %s and %s deleted" % (vm.name, peer.name))
    if not args.keep:
        subprocess.run(["rm", "-rf", workdir], check=False)
    else:
        print("   kept %s" % workdir)
    outcome = "demo FAILED: " + "; ".join(failures) if failures else "demo passed"
    print("\n%s in %.1f s" % (outcome, time.time() - started))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
