"""The operator's path: the capture role over real SSH, from the built collection.

The "VM" is a network namespace running a real OpenSSH ``sshd`` on
192.0.2.10:22 (molecule/ssh/sshvm.sh: host key and client key made for the
run, root login with the key only). Ansible uses the ordinary ``ssh``
connection plugin (ControlMaster/ControlPersist, as by default); its TCP
connection starts in a second, controller-side namespace (the ProxyCommand
of the generated ssh_config runs molecule/ssh/relay.py there) and enters the
VM through its veth and PREROUTING chains, as a connection from another
machine does. This machine's own network namespace is never changed.

The collection is the one ``ansible-galaxy collection build`` makes from
this checkout, installed with ``ansible-galaxy collection install`` into an
empty directory; ANSIBLE_COLLECTIONS_PATH names only that directory and
PYTHONPATH is cleared, so the checkout is not used.

* guard on (the default), ``inbound_ports_include: '*'``, TPROXY (so the
  routes module runs too), pipelining off and on: the play finishes on the
  SSH connection it started with, new connections work, the re-run reports
  changed=0, the uninstall leaves iptables-save, nft list ruleset and the
  policy routing exactly as before.
* guard off, port 22 captured into a proxy port nothing listens on: the
  role does what it is told (no refusal, no roll-back) and the play still
  finishes, since the connection Ansible holds is established and the nat
  REDIRECT only sees new connections; every new SSH connection is refused
  and Ansible reports the host unreachable. The console (here the netns
  connection) uninstalls it, and SSH works again. docs/troubleshooting.md
  says so.
* sshd on port 2222, named only in the ssh_config Ansible uses (ansible_port
  unset): the guard protects 2222, the port of the SSH session
  (SSH_CONNECTION), not 22; the persisted rules do too, and new connections
  work.
"""

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import netns
from role_helpers import PLAYBOOK as ROLE
from rules_helpers import nft_monitor

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"
SSHVM = REPO / "molecule" / "ssh" / "sshvm.sh"
VM_ADDR = "192.0.2.10"
PRIMER = "meshcapture-conntrack-primer"

pytestmark = pytest.mark.netns

APPLY = """
- name: Apply the capture over SSH
  hosts: vm
  gather_facts: false
  tasks:
    - name: Note the SSH connection Ansible holds
      ansible.builtin.command: printenv SSH_CONNECTION
      register: mcs_before
      changed_when: false

    - name: Apply the role
      ansible.builtin.import_role:
        name: meshcapture.sidecar.capture

    - name: Note the SSH connection after the apply
      ansible.builtin.command: printenv SSH_CONNECTION
      register: mcs_after
      changed_when: false

    - name: Report both
      ansible.builtin.debug:
        msg: "SSH_CONNECTION before=[{{ mcs_before.stdout }}] after=[{{ mcs_after.stdout }}]"
"""

PING = """
- name: Reach the host
  hosts: vm
  gather_facts: false
  tasks:
    - name: Ping
      ansible.builtin.ping:
"""

# Rules of other software the VM has before the capture: they must survive.
# The first is what a stateful host firewall has; it also makes the kernel
# track connections (conntrack) in the VM from the start, the SSH connection
# included (see test_held_connection_survives_where_nothing_tracked_it).
FOREIGN = (
    ("iptables-nft", "-A", "INPUT", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"),
    ("iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "9999", "-j", "ACCEPT"),
    ("iptables-nft", "-t", "nat", "-A", "OUTPUT", "-d", "198.51.100.99/32", "-p", "tcp", "-j", "RETURN"),
    ("ip6tables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "9999", "-j", "ACCEPT"),
)
# Rules that do not use conntrack: the kernel tracks no connection in the VM
# until the capture's rules come.
FOREIGN_STATELESS = FOREIGN[1:]


def shell_env(tmpdir, collections):
    """scripts/env.sh, then only the installed collection: PYTHONPATH (which
    env.sh points at the checkout) cleared, ANSIBLE_COLLECTIONS_PATH set."""
    return ["bash", "-c", '. "$0/scripts/env.sh" && unset PYTHONPATH && export ANSIBLE_COLLECTIONS_PATH="$1"'
            ' && shift && exec "$@"', str(REPO), str(collections)]


@pytest.fixture(scope="module")
def collection():
    """The built collection, installed into an empty collections path."""
    if not PYTHON.exists() or not shutil.which("ssh"):
        pytest.skip("run scripts/setup.sh first")
    tmp = Path(tempfile.mkdtemp(prefix="mcs-coll-"))
    try:
        build, path = tmp / "build", tmp / "collections"
        prefix = shell_env(tmp, path)
        subprocess.run(prefix + ["ansible-galaxy", "collection", "build", "--output-path", str(build), str(REPO)],
                       check=True, capture_output=True, text=True, timeout=120)
        tarball, = build.glob("meshcapture-sidecar-*.tar.gz")
        subprocess.run(prefix + ["ansible-galaxy", "collection", "install", str(tarball), "-p", str(path)],
                       check=True, capture_output=True, text=True, timeout=120)
        listed = subprocess.run(prefix + ["ansible-galaxy", "collection", "list", "--format", "json"],
                                check=True, capture_output=True, text=True, timeout=60)
        found = {where: names for where, names in json.loads(listed.stdout).items() if "meshcapture.sidecar" in names}
        assert list(found) == [str(path / "ansible_collections")], found
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class SshVm:
    """A VM namespace with sshd, a controller-side namespace, and the files
    of the run (a short directory: ssh's ControlPath must stay short)."""

    def __init__(self, topology, collection, foreign=FOREIGN, port=22):
        if not (shutil.which("sshd") or os.access("/usr/sbin/sshd", os.X_OK)):
            pytest.skip("no sshd: run scripts/setup.sh (it installs openssh-server)")
        self.collection = collection
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="mcs-ssh-"))
        self.host = self.dir / "host"
        try:
            self.vm, self.ctrl = self._start(topology, foreign)
        except BaseException:
            self.close()  # the namespaces (and sshd in them) go with the topology
            raise
        self.runs = 0

    def _start(self, topology, foreign):
        """The namespaces, sshd running in the VM, the rules of other software."""
        vm, ctrl = topology.netns("sshvm"), topology.netns("sshctl")
        netns.veth(vm, ctrl)  # vm 192.0.2.10, ctrl 192.0.2.20
        subprocess.run(["sh", str(SSHVM), "config", vm.name, ctrl.name, str(self.dir)],
                       check=True, capture_output=True, text=True, timeout=60)
        if self.port != 22:
            # sshd on another port, which only the ssh_config names (as an operator's ~/.ssh/config does).
            for name, old, new in (("sshd_config", "ListenAddress %s:22\n" % VM_ADDR,
                                    "ListenAddress %s:%d\n" % (VM_ADDR, self.port)),
                                   ("ssh_config", "    User root\n", "    User root\n    Port %d\n" % self.port)):
                path = self.dir / name
                text = path.read_text()
                assert old in text, (name, text)
                path.write_text(text.replace(old, new, 1))
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        vm.popen([sshd, "-D", "-f", self.dir / "sshd_config", "-E", self.dir / "sshd.log"],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ctrl.python("import socket, time\n"
                    "for _ in range(100):\n"
                    "    try:\n"
                    "        socket.create_connection(('%s', %d), timeout=1).close(); break\n"
                    "    except OSError: time.sleep(0.1)\n"
                    "else: raise SystemExit('sshd does not answer')" % (VM_ADDR, self.port))
        for argv in foreign:
            vm.run(argv)
        (self.host / "systemd").mkdir(parents=True)
        return vm, ctrl

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def inventory(self, **capture_vars):
        common = {
            "ansible_python_interpreter": str(PYTHON),
            "capture_persist_dir": str(self.host / "persist"),
            "capture_systemd_unit_dir": str(self.host / "systemd"),
            "capture_systemd_enable": False,
            "capture_state_dir": str(self.host / "state"),
            "capture_istio_sidecar_env_path": str(self.host / "sidecar.env"),
            **capture_vars,
        }
        return {"all": {"vars": common, "hosts": {
            # What an operator has: the address, a user, ssh options.
            "vm": {"ansible_host": VM_ADDR, "ansible_user": "root",
                   "ansible_ssh_common_args": "-F %s" % (self.dir / "ssh_config")},
        }, "children": {"console": {"hosts": {
            # The "console": the same VM without SSH.
            "vm-console": {"ansible_connection": "meshcapture.sidecar.netns", "ansible_host": self.vm.name},
        }}}}}

    def play(self, playbook, *, limit="vm", pipelining=False, control_path=None, **capture_vars):
        """ansible-playbook with the installed collection; each run opens
        its own SSH connection unless control_path names an earlier run's."""
        self.runs += 1
        run = self.dir / ("run%d" % self.runs)
        run.mkdir()
        (run / "inventory.json").write_text(json.dumps(self.inventory(**capture_vars)))
        (run / "site.yml").write_text(playbook)
        env = dict(os.environ, ANSIBLE_PIPELINING=str(pipelining),
                   ANSIBLE_SSH_CONTROL_PATH_DIR=str(control_path or run / "cp"))
        proc = subprocess.run(shell_env(self.dir, self.collection)
                              + ["ansible-playbook", "-i", str(run / "inventory.json"), "--limit", limit,
                                 str(run / "site.yml")],
                              cwd=run, env=env, capture_output=True, text=True, timeout=300, check=False)
        proc.control_path = run / "cp"
        return proc

    def play_monitored(self, playbook, **kwargs):
        """play(), and the nft events in the VM meanwhile (rules_helpers.nft_monitor)."""
        monitor = nft_monitor(self.vm)
        try:
            proc = self.play(playbook, **kwargs)
            return proc, monitor.mark()
        finally:
            monitor.close()

    def ssh(self, command="printenv SSH_CONNECTION"):
        """A new SSH connection (no ControlMaster) through the same ProxyCommand."""
        return subprocess.run(["ssh", "-F", str(self.dir / "ssh_config"), "-o", "ControlPath=none",
                               "-o", "BatchMode=yes", VM_ADDR, command],
                              capture_output=True, text=True, timeout=60, check=False)

    def snapshot(self):
        """iptables-save (both families), nft list ruleset and the policy
        routing inside the VM, without counters."""
        parts = []
        for argv in (["iptables-nft-save"], ["ip6tables-nft-save"], ["nft", "list", "ruleset"],
                     ["ip", "-4", "rule"], ["ip", "-6", "rule"], ["ip", "-4", "route", "show", "table", "all"],
                     ["ip", "-6", "route", "show", "table", "all"], ["ip", "-br", "addr", "show", "dev", "lo"]):
            out = self.vm.run(argv).stdout
            out = re.sub(r"\[\d+:\d+\]", "[-]", out)
            out = re.sub(r"counter packets \d+ bytes \d+", "counter", out)
            # Link-local and multicast routes come and go with IPv6 autoconfiguration.
            lines = [line for line in out.splitlines()
                     if not line.startswith("#") and not re.search(r"\b(fe80::|ff00::)", line)]
            parts.append("== %s\n%s" % (" ".join(argv), "\n".join(lines)))
        return "\n".join(parts)


@pytest.fixture
def ssh_vm(topology, collection, request):
    vm = SshVm(topology, collection, foreign=getattr(request, "param", FOREIGN))
    yield vm
    vm.close()


def recap(proc):
    """The PLAY RECAP counters of host vm."""
    match = re.search(r"^vm\s+:\s+(.*)$", proc.stdout, re.M)
    assert match, proc.stdout + proc.stderr
    return dict((key, int(value)) for key, value in re.findall(r"(\w+)=(\d+)", match.group(1)))


def connections(proc):
    """SSH_CONNECTION before and after the role, as the VM's sshd saw them."""
    match = re.search(r"SSH_CONNECTION before=\[([^\]]*)\] after=\[([^\]]*)\]", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return match.group(1), match.group(2)


def assert_ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@pytest.mark.parametrize("pipelining", [False, True], ids=["pipelining-off", "pipelining-on"])
def test_guarded_capture_over_ssh(ssh_vm, pipelining):
    before = ssh_vm.snapshot()
    capture = dict(capture_inbound_ports_include="*", capture_outbound_ip_ranges_include="*",
                   capture_inbound_interception_mode="TPROXY")

    # 1. Apply: the play finishes on the connection it started with. The
    # VM's stateful firewall tracks the session already: no conntrack primer.
    proc, events = ssh_vm.play_monitored(APPLY, pipelining=pipelining, **capture)
    assert_ok(proc)
    assert not [e for e in events if PRIMER in e], events
    held_before, held_after = connections(proc)
    assert held_before and held_before == held_after
    assert held_before.endswith(" %s 22" % VM_ADDR)
    # The guarded port is the one of the SSH session (ansible_port is unset here).
    assert ("port 22, which Ansible is connected on (the port of its SSH session, SSH_CONNECTION), is added to "
            "inbound_ports_exclude") in proc.stdout, proc.stdout
    # Dependencies were all there (the venv interpreter imports pyroute2): the action's first command found
    # nothing missing, so the install step was not included.
    assert re.search(r"TASK \[meshcapture\.sidecar\.capture : Install the missing dependencies, then apply the "
                     r"capture\] \*+\nskipping: \[vm\]", proc.stdout), proc.stdout
    applied = ssh_vm.snapshot()
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 22 -j RETURN" in applied
    assert "ISTIO_TPROXY" in applied
    assert "fwmark 0x539 lookup 133" in applied

    # 2. A new SSH connection works, and is another TCP connection.
    new = ssh_vm.ssh()
    assert new.returncode == 0, new.stderr
    assert new.stdout.strip() != held_before

    # 3. The re-run, on a new connection too, changes nothing and writes
    # nothing to the kernel (nft monitor sees no event).
    proc, events = ssh_vm.play_monitored(APPLY, pipelining=pipelining, **capture)
    assert_ok(proc)
    assert events == []
    assert recap(proc)["changed"] == 0, proc.stdout
    assert connections(proc)[0] != held_before
    assert ssh_vm.snapshot() == applied

    # 4. Uninstall over SSH: everything as before, SSH still works.
    proc = ssh_vm.play(ROLE, pipelining=pipelining, capture_state="absent")
    assert_ok(proc)
    assert recap(proc)["changed"] > 0
    assert ssh_vm.snapshot() == before
    assert ssh_vm.ssh().returncode == 0
    assert not (ssh_vm.host / "persist").exists()


def test_guard_off_locks_out_new_connections_until_the_console_uninstalls(ssh_vm):
    before = ssh_vm.snapshot()
    capture = dict(capture_inbound_ports_include="*", capture_connection_guard=False)

    # 1. No refusal and no roll-back: the role applies the capture, and the
    #    play finishes on the connection it holds (established; the nat
    #    REDIRECT only sees new connections).
    proc = ssh_vm.play(APPLY, **capture)
    assert_ok(proc)
    assert recap(proc)["failed"] == 0 and recap(proc)["unreachable"] == 0
    held_before, held_after = connections(proc)
    assert held_before == held_after
    ruleset = ssh_vm.snapshot()
    assert "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT" in ruleset
    assert "--dport 22 " not in ruleset

    # 2. Every new connection to port 22 is redirected to 15006, where
    #    nothing listens: refused.
    new = ssh_vm.ssh()
    assert new.returncode == 255
    assert "Connection refused" in new.stderr, new.stderr
    # A new Ansible run finds the host unreachable ...
    proc = ssh_vm.play(PING)
    assert proc.returncode != 0
    assert recap(proc)["unreachable"] == 1, proc.stdout
    # ... but a run that reuses the first run's ControlPersist master (60 s)
    # still gets through: it hides the lockout.
    first_control_path = ssh_vm.dir / "run1" / "cp"
    assert list(first_control_path.iterdir())
    proc = ssh_vm.play(PING, control_path=first_control_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # 3. From the console: uninstall, and SSH works again.
    proc = ssh_vm.play(ROLE, limit="console", capture_state="absent")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ssh_vm.snapshot() == before
    new = ssh_vm.ssh()
    assert new.returncode == 0, new.stderr
    assert new.stdout.strip() != held_before


@pytest.mark.parametrize("ssh_vm", [FOREIGN_STATELESS], indirect=True, ids=["no-conntrack-before"])
def test_held_connection_survives_where_nothing_tracked_it(ssh_vm):
    """Where no rule used conntrack before the capture (a VM without a
    stateful firewall), the kernel would start tracking the SSH connection
    Ansible holds only when the capture's rules come, pick it up midstream
    from sshd's next packet as a NEW outbound connection, and ISTIO_OUTPUT
    would redirect it to 15001.  The capture action loads its conntrack
    primer with the read, before the rules: the session is tracked as what
    it is, and survives."""
    proc, events = ssh_vm.play_monitored(APPLY, capture_inbound_ports_include="*",
                                         capture_outbound_ip_ranges_include="*")
    assert_ok(proc)
    held_before, held_after = connections(proc)
    assert held_before == held_after
    # The primer was loaded before the rules and deleted in the same task.
    assert events[0] == "add table inet " + PRIMER, events
    assert "delete table inet " + PRIMER in events, events
    # The re-run: the capture's rules track the session, no primer, no write.
    proc, events = ssh_vm.play_monitored(APPLY, capture_inbound_ports_include="*",
                                         capture_outbound_ip_ranges_include="*")
    assert_ok(proc)
    assert recap(proc)["changed"] == 0 and events == [], events


@pytest.fixture
def ssh_vm_2222(topology, collection):
    vm = SshVm(topology, collection, port=2222)
    yield vm
    vm.close()


def test_guard_protects_the_port_only_ssh_config_names(ssh_vm_2222):
    """sshd listens on 2222, which only the ssh_config Ansible uses names
    (ansible_port is unset): the guard protects the port of the SSH session
    the action runs in (SSH_CONNECTION), not 22; the capture persisted for the
    next boot keeps it reachable too, and new SSH connections work."""
    vm = ssh_vm_2222
    before = vm.snapshot()
    capture = dict(capture_inbound_ports_include="*", capture_outbound_ip_ranges_include="*")
    proc = vm.play(APPLY, **capture)
    assert_ok(proc)
    held_before, held_after = connections(proc)
    assert held_before.endswith(" %s 2222" % VM_ADDR) and held_before == held_after
    assert ("port 2222, which Ansible is connected on (the port of its SSH session, SSH_CONNECTION), is added to "
            "inbound_ports_exclude") in proc.stdout, proc.stdout
    applied = vm.snapshot()
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 2222 -j RETURN" in applied
    assert "--dport 22 " not in applied
    assert "--dport 2222 -j RETURN" in (vm.host / "persist" / "rules.v4").read_text()
    new = vm.ssh()
    assert new.returncode == 0, new.stderr
    assert new.stdout.strip().endswith(" %s 2222" % VM_ADDR)
    # The re-run on a new connection: nothing to change.
    proc = vm.play(APPLY, **capture)
    assert_ok(proc)
    assert recap(proc)["changed"] == 0, proc.stdout
    proc = vm.play(ROLE, capture_state="absent")
    assert_ok(proc)
    assert vm.snapshot() == before
