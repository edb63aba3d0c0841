"""The capture role installs its dependencies only when they are missing
(roles/capture/tasks/dependencies.yml), on a throwaway namespace host.

* Already there: the target interpreter (the venv's) imports pyroute2 and
  the commands exist, so the role gathers no facts and runs no package
  manager.
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


@pytest.mark.netns
def test_nothing_is_installed_when_everything_is_there(netns_factory, tmp_path):
    ns = netns_factory("deps")
    proc = run_role(ns, tmp_path, cli=["-v"], capture_install_dependencies=True, capture_inbound_ports_include="8080")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The venv interpreter is named: no interpreter discovery, one look.
    assert task_lines(proc.stdout, "Find the target's Python interpreter")[0].startswith("skipping:")
    look = task_lines(proc.stdout, "Look for the commands and the Python module the capture needs")
    assert look and look[0].startswith("ok:"), proc.stdout
    for name in ("Gather the OS family", "Install the packages that provide what is missing"):
        lines = task_lines(proc.stdout, name)
        assert lines and all(line.startswith("skipping:") for line in lines), (name, proc.stdout)
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
