"""The capture role installs its dependencies only when they are missing
(roles/capture/tasks/dependencies.yml), on a throwaway namespace host.

* Already there: the target interpreter (the venv's) imports pyroute2 and
  the commands exist, which the action finds out with its first command: the
  role gathers no facts, runs no package manager and no other task; a
  re-run runs the action alone.
* Missing and not installable: the system Python has no pyroute2 and the
  package to install does not exist (capture_install_packages names a bogus
  one, so the package manager fails at once and changes nothing); the error
  says what is missing and how to skip the step, before any rule changes.
"""

import os
import subprocess

import pytest

from role_helpers import run_role

SYSTEM_PYTHON = "/usr/bin/python3"


def task_lines(stdout, name):
    """The result lines (ok/changed/skipping/fatal) of the task called name."""
    block = stdout.split("TASK [meshcapture.sidecar.capture : %s]" % name)
    return [] if len(block) < 2 else [line for line in block[1].split("TASK [")[0].splitlines()
                                      if line.startswith(("ok:", "changed:", "skipping:", "fatal:"))]


def tasks_run(stdout):
    """The names of the tasks that ran (not skipped), in order."""
    out = []
    for block in stdout.split("TASK [")[1:]:
        name, dummy, rest = block.partition("]")
        if any(line.startswith(("ok:", "changed:", "fatal:")) for line in rest.splitlines()):
            out.append(name)
    return out


APPLY = "meshcapture.sidecar.capture : Apply the capture rules, set up the policy routing, persist them and " \
        "start the restore unit"


@pytest.mark.netns
def test_nothing_is_installed_when_everything_is_there(netns_factory, tmp_path):
    ns = netns_factory("deps")
    for run in ("converge", "re-run"):
        proc = run_role(ns, tmp_path, cli=["-v"], capture_install_dependencies=True,
                        capture_inbound_ports_include="8080")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # The action is the one task that does something (no facts, no interpreter discovery task, no
        # package manager); besides it only the role's argument check (capture_systemd_enable is false in
        # these tests: no note that the restore unit is not enabled).
        assert [name for name in tasks_run(proc.stdout) if "Validating arguments" not in name] == [
            APPLY], (run, proc.stdout)
        assert "Gathering Facts" not in proc.stdout
        lines = task_lines(proc.stdout, "Install the missing dependencies, then apply the capture")
        assert all(line.startswith("skipping:") for line in lines), (run, proc.stdout)
    assert "changed=0" in proc.stdout, proc.stdout
    assert "ISTIO_INBOUND" in ns.run(["iptables-nft-save"]).stdout


@pytest.mark.netns
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="no %s" % SYSTEM_PYTHON)
def test_a_failed_install_names_what_is_missing_and_how_to_skip(netns_factory, tmp_path):
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import pyroute2"], capture_output=True, check=False)
    if probe.returncode == 0:
        pytest.skip("%s imports pyroute2: nothing would be missing" % SYSTEM_PYTHON)
    ns = netns_factory("deps")
    proc = run_role(ns, tmp_path, cli=["-v"], ansible_python_interpreter=SYSTEM_PYTHON,
                    capture_install_dependencies=True, capture_inbound_ports_include="8080",
                    capture_install_packages=["meshcapture-no-such-package"])
    assert proc.returncode != 0
    assert ("capture_install_dependencies: missing on the host: the Python module pyroute2 for /usr/bin/python3;"
            " installing meshcapture-no-such-package failed (") in proc.stdout, proc.stdout
    assert ("Install them yourself (or give the host a package mirror) and run again, or set"
            " capture_install_dependencies to false to skip this step.") in proc.stdout
    assert "ISTIO" not in ns.run(["iptables-nft-save"]).stdout


@pytest.mark.netns
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="no %s" % SYSTEM_PYTHON)
@pytest.mark.parametrize("check", [False, True], ids=["apply", "check-mode"])
def test_after_the_install_the_action_runs_again_and_applies(netns_factory, tmp_path, check):
    """The action finds pyroute2 missing for the system Python and changes nothing; the role installs the
    packages (here iproute2, which this machine has: the package manager has nothing to do) and runs the
    action again, which applies the capture (REDIRECT needs no pyroute2). In check mode nothing is installed
    and the action is not run again: its first run showed the ruleset it would add (rendered) and the files,
    the role says what a run would install (no package module: it needs python3-apt even to check), and
    nothing fails."""
    def ok(*argv):
        return subprocess.run(argv, capture_output=True, text=True, check=False)

    installed = ok("dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "iproute2").stdout.startswith("ii")
    if ok(SYSTEM_PYTHON, "-c", "import pyroute2").returncode == 0 or not installed \
            or (not check and ok(SYSTEM_PYTHON, "-c", "import apt").returncode != 0):
        pytest.skip("needs %s without pyroute2 and with python3-apt, and iproute2 installed" % SYSTEM_PYTHON)
    ns = netns_factory("deps")
    proc = run_role(ns, tmp_path, cli=["--check", "--diff"] if check else [], ansible_python_interpreter=SYSTEM_PYTHON,
                    capture_install_dependencies=True, capture_inbound_ports_include="8080",
                    capture_install_packages=["iproute2"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ran = tasks_run(proc.stdout)
    if check:
        assert "capture rules (not read: pyroute2 missing on the host)" in proc.stdout, proc.stdout
        assert "+iptables -t nat -N ISTIO_INBOUND" in proc.stdout
        assert APPLY + " (dependencies installed)" not in ran
        assert "meshcapture.sidecar.capture : Install the packages that provide what is missing" not in ran
        assert "check mode: missing on the host: pyroute2; a run installs iproute2." in proc.stdout, proc.stdout
        assert "changed=2" in proc.stdout
        assert "ISTIO" not in ns.run(["iptables-nft-save"]).stdout
        assert not (tmp_path / "host" / "persist").exists()
        return
    assert "meshcapture.sidecar.capture : Install the packages that provide what is missing" in ran, proc.stdout
    assert ran.index(APPLY) < ran.index(APPLY + " (dependencies installed)"), ran
    assert "ISTIO_INBOUND" in ns.run(["iptables-nft-save"]).stdout
