"""The capture role on real Debian VMs over SSH: boot, reboot, networkd.

Opt-in (it takes minutes): ``MESHCAPTURE_VM_TESTS=1``, as root, with qemu
(``bash scripts/vm/setup-host.sh`` installs it). ``MESHCAPTURE_VM_RELEASES``
names the Debian releases, ``bookworm`` (the default), ``trixie`` or
``bookworm,trixie``. Each release is a cached image (scripts/vm/build-image.sh:
minbase, kernel, systemd, openssh-server, python3, no iptables, nftables or
pyroute2: the role installs those from the image's local apt repository).

One VM per release and backend (iptables-nft, nftables); the VM's only
network is a tap in a namespace this test creates (192.0.2.1 there,
192.0.2.10 in the VM), ansible-playbook runs inside that namespace with the
collection `ansible-galaxy collection build` makes. The steps run in order
on the same VM (a failed step does not stop the next ones):

1. ``--check --diff`` on the fresh VM succeeds and changes nothing;
2. the role applies (inbound TPROXY, DNS capture, IPv6, all ports; the SSH
   port kept by the guard), and the restore unit is active;
3. real traffic is captured (scripts/vm/vmcheck.py): outbound to 15001 with
   the original destination, inbound to 15006 by TPROXY, DNS to 15053, SSH
   still works; the re-run reports changed=0;
4. ``systemctl reboot``: the unit ran at boot, the rules, policy routing and
   ::6 are identical to before, traffic is captured, the re-run reports
   changed=0;
5. systemd-networkd takes over the VM's network; the role run again adapts
   (its networkd drop-in), reboot: the rules and routes are as before, and
   after ``systemctl restart systemd-networkd`` too; the re-run reports
   changed=0;
6. ``capture_state: absent``: iptables-save, ip6tables-save and nft list
   ruleset exactly as before the role came, traffic not captured; reboot:
   nothing comes back.
"""

from __future__ import annotations

import difflib
import time

import pytest

import vm_helpers

SKIP = vm_helpers.skip_reason()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(bool(SKIP), reason=SKIP or "")]

CASES = [(release, backend) for release in vm_helpers.RELEASES for backend in vm_helpers.BACKENDS]
UNIT = "meshcapture-capture.service"


@pytest.fixture(scope="module")
def collections(tmp_path_factory):
    return vm_helpers.build_collection(tmp_path_factory.mktemp("collection"))


@pytest.fixture(scope="class", params=CASES, ids=["%s-%s" % case for case in CASES])
def vm(request, collections):
    release, backend = request.param
    scenario = vm_helpers.Scenario(release, backend, collections).start()
    print("\nVM %s (%s): %s, boot %.1fs" % (release, backend, scenario.vm.accel, scenario.vm.boot_seconds))
    yield scenario
    print("\nVM %s (%s) timings (%s): %s" % (release, backend, scenario.vm.accel, scenario.timings))
    scenario.close()


def diff(before: str, after: str) -> str:
    return "\n".join(difflib.unified_diff(before.splitlines(), after.splitlines(), "before", "after", lineterm=""))


def assert_same(before, after, what):
    assert before == after, "%s differ:\n%s" % (what, diff(before, after))


def assert_ran(vm, proc, changed=None):
    assert proc.returncode == 0 and proc.recap.get("failed", 1) == 0 and proc.recap.get("unreachable", 1) == 0, \
        vm.explain(proc)
    if changed is not None:
        assert (proc.recap.get("changed") == 0) == (changed == 0), vm.explain(proc)
    assert "[WARNING]" not in proc.stdout + proc.stderr, vm.explain(proc)


def assert_traffic(vm, expect="captured"):
    report = vm.traffic(expect)
    assert report["ok"], "traffic (%s):\n%s" % (expect, vm_helpers.vmcheck.describe(report))


def only_netfilter(snapshot: str) -> str:
    """The iptables-save, ip6tables-save and nft list ruleset part."""
    return snapshot.split("== ip -4 rule")[0]


def unit_ran(vm):
    state = vm.unit()
    assert state.get("ActiveState") == "active" and state.get("ExecMainStatus") == "0", state


class TestVm:
    def test_01_check_mode_changes_nothing(self, vm):
        vm.state["baseline"] = vm.snapshot()
        files = "ls -d /etc/meshcapture /etc/systemd/system/%s /etc/systemd/networkd.conf.d 2>/dev/null; " \
                "dpkg-query -W -f '${Package} ${Status}\\n' iptables nftables python3-pyroute2 2>/dev/null; true" % UNIT
        before_files = vm.vm.ssh(files).stdout
        proc = vm.play("--check")
        vm.timings["check"] = proc.seconds
        assert_same(vm.state["baseline"], vm.snapshot(), "listings after --check")
        assert_same(before_files, vm.vm.ssh(files).stdout, "files and packages after --check")
        assert_ran(vm, proc)

    def test_02_apply(self, vm):
        proc = vm.play()
        vm.timings["apply"] = proc.seconds
        assert_ran(vm, proc, changed=1)
        vm.state["applied"] = vm.snapshot()
        assert vm.state["applied"] != vm.state["baseline"]

    def test_03_unit_active_after_apply(self, vm):
        state = vm.unit()
        assert state.get("UnitFileState") == "enabled", state
        assert state.get("ActiveState") == "active", state

    def test_04_traffic_captured(self, vm):
        assert_traffic(vm)

    def test_05_rerun_changes_nothing(self, vm):
        proc = vm.play()
        vm.timings["no-op"] = proc.seconds
        assert_ran(vm, proc, changed=0)

    def test_06_reboot_restores_everything(self, vm):
        before = vm.snapshot()
        vm.reboot()
        unit_ran(vm)
        assert_same(before, vm.snapshot(), "listings before and after the reboot")

    def test_07_traffic_after_reboot(self, vm):
        assert_traffic(vm)

    def test_08_rerun_after_reboot_changes_nothing(self, vm):
        assert_ran(vm, vm.play(), changed=0)

    def test_09_networkd_boot_keeps_the_rules(self, vm):
        before = vm.snapshot()
        vm.vm.ssh("meshcapture-vm-net networkd")
        # The role sees networkd in use now (its drop-in), then the boot.
        assert_ran(vm, vm.play())
        vm.reboot()
        assert vm.vm.ssh("systemctl is-active systemd-networkd networking", check=False).stdout.split() == \
            ["active", "inactive"]
        unit_ran(vm)
        assert_same(before, vm.snapshot(), "listings before and after the boot with systemd-networkd")

    def test_10_networkd_restart_keeps_the_rules(self, vm):
        before = vm.state.get("applied") or vm.snapshot()
        vm.vm.ssh("systemctl restart systemd-networkd")
        time.sleep(5)
        vm.vm.ssh("networkctl status eth0 >/dev/null 2>&1 || true")
        assert_same(before, vm.snapshot(), "listings before and after systemctl restart systemd-networkd")
        assert_traffic(vm)

    def test_11_rerun_with_networkd_changes_nothing(self, vm):
        assert_ran(vm, vm.play(), changed=0)

    def test_12_absent_leaves_nothing(self, vm):
        proc = vm.play(capture_state="absent")
        assert_ran(vm, proc, changed=1)
        assert_same(only_netfilter(vm.state["baseline"]), only_netfilter(vm.snapshot()),
                    "iptables-save, ip6tables-save, nft list ruleset before the role and after absent")
        assert_same(vm.state["baseline"], vm.snapshot(), "listings before the role and after absent")
        assert_traffic(vm, "direct")

    def test_13_absent_then_reboot_nothing_comes_back(self, vm):
        vm.reboot()
        assert vm.vm.ssh("systemctl cat %s" % UNIT, check=False).returncode != 0
        assert_same(vm.state["baseline"], vm.snapshot(), "listings before the role and after absent and a reboot")
        assert_traffic(vm, "direct")
        assert_ran(vm, vm.play(capture_state="absent"), changed=0)
