"""The controller x target compatibility matrix (run it with scripts/matrix.sh).

A cell is (ansible-core release on the controller, Python of the target,
pyroute2 on the target). For each cell this driver

1. makes the virtualenvs it needs, once, under the cache directory: one per
   controller (``ctl-2.16`` ...: the latest patch release of that line from
   PyPI) and one per target (``tgt-py3.6-pyroute2-0.7.1`` ...: pyroute2 at
   that version, and pytest when the Python can have it);
2. runs the core on the target's Python (once per Python, shared by its
   cells): tests/matrix/selfcheck.py imports every module_utils file and
   renders every golden case of the conformance corpora, compared with
   Istio's goldens and with the renderings of this driver's own Python;
   then pytest runs the unit tests of the pure core (config, generator,
   nftables rendering) with that Python;
3. runs tests/matrix/playbooks/converge.yml with the controller's
   ansible-playbook against a network namespace it creates (and deletes,
   also on failure) through the netns connection plugin, with
   ``ansible_python_interpreter`` set to the target's Python: rules and
   routes present (changed), present again (not changed), absent (changed),
   absent again (not changed); the iptables/ip6tables rules (nft and legacy)
   and the policy rules and routes after absent must equal those before,
   and the run must print no warning;
4. once per controller (the reduced matrix: with 2.16 only), in the same
   namespace, the capture role (tests/matrix/playbooks/role.yml, TPROXY
   with IPv6): present changes, present again changes nothing, absent
   changes and leaves the namespace as it was.

Cells that cannot work are EXCLUDED with the reason (the ansible-core
release does not support that Python on targets; that pyroute2 does not
install or run on that Python). The table goes to stdout; the details to
<cache>/results.json. Exit status 1 when a cell FAILs.

Usage: python tests/matrix/matrix.py [--full] [--cell CTL:PY:PYROUTE2 ...] [--list]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import netns  # noqa: E402  (tests/netns.py)
from tests.unit.corpus import golden_cases  # noqa: E402

HERE = Path(__file__).resolve().parent
COLLECTIONS = REPO / ".cache" / "collections"
CONTROLLERS = ("2.16", "2.17", "2.18", "2.19")
PYTHONS = ("3.6", "3.7", "3.8", "3.9", "3.10", "3.11", "3.12", "3.13")

# The oldest pyroute2 the routes module works with (older releases fail; see
# docs/compatibility.md), and the newest release that works per target Python:
# 0.9.3 and later require Python 3.9, 0.9.1 and 0.9.2 install on 3.7 and 3.8 but
# do not run there.
PYROUTE2_OLDEST = "0.7.2"
PYROUTE2_NEWEST = {"3.6": "0.8.1", "3.7": "0.8.1", "3.8": "0.8.1"}
PYROUTE2_NEWEST_DEFAULT = "0.9.7"

# The pip bundled with Python 3.6 and 3.7 picks releases that do not support
# them (it ignores the index's Requires-Python): first the last pip for each.
PIP_FOR = {"3.6": "pip==21.3.1", "3.7": "pip==24.0"}

# The reduced matrix (CI): the oldest corner, a Debian 12-like middle cell
# (Python 3.11, the distribution's pyroute2 0.7.x line), the newest corner.
REDUCED = (("2.16", "3.6", "oldest"), ("2.18", "3.11", "oldest"), ("2.19", "3.13", "newest"))

# The reduced matrix runs the role with the oldest controller only (the suite's
# own role tests run it with the newest); the others once per controller.
REDUCED_ROLE = ("2.16",)

# The unit tests of the pure core (no Ansible, no kernel: those marked netns are
# left out) run on each target Python.
CORE_TESTS = ("tests/unit/plugins/module_utils/test_config.py",
              "tests/unit/plugins/module_utils/test_generator.py",
              "tests/unit/plugins/module_utils/test_nft_render.py")


def log(msg):
    print("matrix: %s" % msg, file=sys.stderr, flush=True)


def run(argv, **kwargs):
    """subprocess.run, output captured as text; the caller checks the status."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run([str(a) for a in argv], check=False, **kwargs)


class Toolchain:
    """Finds interpreters and makes the virtualenvs of the matrix (once)."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.pyenv = Path(os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv")))
        cache.mkdir(parents=True, exist_ok=True)

    def interpreter(self, version):
        """The newest installed CPython X.Y: pyenv's, else pythonX.Y on PATH."""
        found = sorted(glob.glob(str(self.pyenv / "versions" / (version + ".*") / "bin" / ("python" + version))),
                       key=lambda p: [int(x) for x in re.findall(r"\d+", Path(p).parents[1].name)])
        if found:
            return found[-1]
        return shutil.which("python" + version)

    def _venv(self, name, base, packages, optional=(), pip_spec="pip"):
        """cache/name with packages (and what of optional installs); None + reason if impossible."""
        path = self.cache / name
        stamp = path / ".matrix-ready"
        want = json.dumps([packages, list(optional)])
        if stamp.exists() and json.loads(stamp.read_text())["want"] == want:
            return path, json.loads(stamp.read_text())["optional"]
        shutil.rmtree(path, ignore_errors=True)
        log("creating %s" % path)
        proc = run([base, "-m", "venv", path])
        if proc.returncode:
            return None, "cannot create a venv with %s: %s" % (base, proc.stderr.strip()[-300:])
        pip = [path / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        run(pip + ["--upgrade", pip_spec])
        proc = run(pip + list(packages))
        if proc.returncode:
            reason = [line for line in proc.stderr.splitlines()
                      if "ERROR" in line or "requires" in line.lower()] or proc.stderr.splitlines()[-3:]
            shutil.rmtree(path, ignore_errors=True)
            return None, "pip install %s failed: %s" % (" ".join(packages), " ".join(reason)[:300])
        installed = [p for p in optional if run(pip + [p]).returncode == 0]
        stamp.write_text(json.dumps(dict(want=want, optional=installed)))
        return path, installed

    def controller(self, release):
        """(venv, reason): ansible-core <release>.x, the newest patch release."""
        for version in ("3.11", "3.12", "3.10", "3.13"):
            base = self.interpreter(version)
            if base and (version != "3.10" or release in ("2.16", "2.17")) \
                    and (version != "3.13" or release not in ("2.16", "2.17")):
                break
        else:
            return None, "no Python 3.10-3.13 for the controller"
        venv, info = self._venv("ctl-%s" % release, base, ["ansible-core~=%s.0" % release])
        return venv, (info if venv is None else None)

    def target(self, python, pyroute2):
        """(venv, has_pytest or the reason it could not be made)."""
        base = self.interpreter(python)
        if not base:
            return None, "Python %s is not installed" % python
        venv, info = self._venv("tgt-py%s-pyroute2-%s" % (python, pyroute2), base,
                                ["pyroute2==%s" % pyroute2], optional=("pytest", "pyyaml"),
                                pip_spec=PIP_FOR.get(python, "pip"))
        if venv is None:
            return None, info
        return venv, ("pytest" in info and "pyyaml" in info)


def supported_target_pythons(ctl_venv):
    """The target Pythons of an ansible-core, from its ansible-test constants."""
    code = ("from ansible_test._util.target.common.constants import "
            "REMOTE_ONLY_PYTHON_VERSIONS as r, CONTROLLER_PYTHON_VERSIONS as c; print(' '.join(r + c))")
    proc = run([ctl_venv / "bin" / "python", "-c", code])
    return proc.stdout.split() if proc.returncode == 0 else []


def ansible_version(ctl_venv):
    proc = run([ctl_venv / "bin" / "python", "-c", "import ansible.release as r; print(r.__version__)"])
    return proc.stdout.strip()


def pyroute2_version(spec, python):
    if spec == "oldest":
        return PYROUTE2_OLDEST
    if spec == "newest":
        return PYROUTE2_NEWEST.get(python, PYROUTE2_NEWEST_DEFAULT)
    return spec


# --- the core on the target's Python --------------------------------------------------------------

def _selfcheck_cases():
    return list(golden_cases(every_release=True))


def _selfcheck(python, cases):
    env = dict(os.environ, PYTHONPATH=str(COLLECTIONS), LC_ALL="C.UTF-8")
    proc = run([python, HERE / "selfcheck.py"], input=json.dumps([{"id": c.id, "options": c.options} for c in cases]),
               env=env, cwd=tempfile.gettempdir(), timeout=600)
    if proc.returncode:
        raise RuntimeError("selfcheck.py failed with %s:\n%s" % (python, proc.stderr.strip()[-2000:]))
    return json.loads(proc.stdout)


class CoreChecks:
    """Selfcheck and core unit tests per target Python (cached per Python)."""

    def __init__(self):
        self.cases = _selfcheck_cases()
        self.reference = None
        self.done = {}
        self.role_done = set()  # controllers whose run of the role passed (it runs once per controller)

    def check(self, python, venv, has_pytest):
        if python in self.done:
            return self.done[python]
        problems, notes = [], []
        interpreter = venv / "bin" / "python"
        try:
            if self.reference is None:
                self.reference = _selfcheck(sys.executable, self.cases)["cases"]
            got = _selfcheck(interpreter, self.cases)
            bad = []
            for case in self.cases:
                out = got["cases"][case.id]
                if "error" in out:
                    bad.append("%s: %s" % (case.id, out["error"]))
                elif case.actual(out) != case.expected():
                    bad.append("%s: differs from the golden" % case.id)
                elif out != self.reference[case.id]:
                    bad.append("%s: differs from the rendering with Python %d.%d"
                               % ((case.id,) + sys.version_info[:2]))
            if bad:
                problems.append("selfcheck: %d of %d cases wrong: %s" % (len(bad), len(self.cases), "; ".join(bad[:3])))
            else:
                notes.append("selfcheck %d modules, %d cases" % (len(got["modules"]), len(self.cases)))
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            problems.append(str(exc))
        if has_pytest:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(COLLECTIONS), str(REPO / "tests")]),
                       LC_ALL="C.UTF-8")
            # -c: not the suite's pytest.ini (its options need a newer pytest);
            # --noconftest: tests/conftest.py is for the controller's Python;
            # not netns: the kernel tests of these files are the controller suite's.
            proc = run([interpreter, "-m", "pytest", "-q", "-c", HERE / "pytest-target.ini", "--rootdir", REPO,
                        "--noconftest", "-p", "no:cacheprovider", "-m", "not netns", *CORE_TESTS],
                       env=env, cwd=REPO, timeout=900)
            summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
            if proc.returncode:
                problems.append("core unit tests: %s\n%s" % (summary, proc.stdout[-3000:]))
            else:
                notes.append("unit: %s" % summary.strip("= "))
        else:
            notes.append("unit: pytest not installable")
        self.done[python] = (problems, notes)
        return self.done[python]


# --- the real-kernel run through ansible-playbook ---------------------------------------------------

def _snapshot(ns):
    """What absent must restore: the rules of every table of both iptables
    flavours and families, the policy rules and the routes."""
    out = {}
    for tool in ("iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"):
        if shutil.which(tool):
            text = ns.run([tool], check=False).stdout
            out[tool] = [re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in text.splitlines()
                         if not line.startswith("#")]
    for family in ("-4", "-6"):
        out["ip %s rule" % family] = ns.run(["ip", family, "rule"], check=False).stdout.splitlines()
        out["ip %s route" % family] = ns.run(["ip", family, "route", "show", "table", "all"],
                                             check=False).stdout.splitlines()
        out["ip %s addr lo" % family] = ns.run(["ip", family, "addr", "show", "dev", "lo"],
                                               check=False).stdout.splitlines()
    return out


WARNING = re.compile(r"\[(DEPRECATION )?WARNING\]")


ROLE_VARS = dict(
    capture_install_dependencies=False,
    capture_systemd_enable=False,
    capture_inbound_interception_mode="TPROXY",
    capture_inbound_ports_include=["*"],
    capture_inbound_ports_exclude=["22"],
    capture_outbound_ip_ranges_include=["*"],
    capture_enable_inbound_ipv6=True,
)
RECAP = re.compile(r"^target\s+:\s+ok=\d+\s+changed=(\d+)", re.M)


def _playbook(ctl_venv, workdir, playbook, label, extra=()):
    """Run a playbook of tests/matrix/playbooks; (changed tasks, problems)."""
    env = dict(os.environ,
               PATH=os.pathsep.join([str(ctl_venv / "bin"), os.environ.get("PATH", "")]),
               ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS),
               ANSIBLE_HOME=str(workdir / "home"),
               ANSIBLE_LOCAL_TEMP=str(workdir / "tmp-local"),
               ANSIBLE_REMOTE_TEMP=str(workdir / "tmp-remote"),
               ANSIBLE_CONFIG=str(workdir / "ansible.cfg"),
               ANSIBLE_NOCOLOR="1",
               ANSIBLE_FORCE_COLOR="0",
               LC_ALL="C.UTF-8")
    env.pop("PYTHONPATH", None)
    proc = run([ctl_venv / "bin" / "ansible-playbook", "-i", workdir / "inventory.json",
                HERE / "playbooks" / playbook, *extra], env=env, cwd=workdir, timeout=900)
    output = proc.stdout + proc.stderr
    with open(workdir / "ansible-playbook.log", "a") as f:
        f.write("=== %s\n%s\n" % (label, output))
    problems = []
    if proc.returncode:
        failed = [line for line in output.splitlines() if "fatal:" in line or "FAILED" in line or "ERROR" in line]
        problems.append("%s: ansible-playbook rc=%d: %s"
                        % (label, proc.returncode, " | ".join(failed)[:1500] or output[-1500:]))
    warnings = [line for line in output.splitlines() if WARNING.search(line)]
    if warnings:
        problems.append("%s: warnings: %s" % (label, " | ".join(warnings)[:1000]))
    recap = RECAP.search(output)
    return (int(recap.group(1)) if recap else None), problems


def converge(ctl_venv, target_venv, workdir: Path, role=False):
    """Run the playbooks on a fresh namespace; [] when the cell passes, else the problems.

    The modules' playbook always; with role, then also the capture role:
    present (changes), present again (no change), absent (changes).
    """
    problems = []
    with netns.Netns("mx") as ns:
        before = _snapshot(ns)
        hostvars = {
            "ansible_connection": "meshcapture.sidecar.netns",
            "ansible_host": ns.name,
            "ansible_python_interpreter": str(target_venv / "bin" / "python"),
            "matrix_state_dir": str(workdir / "state"),
            "capture_state_dir": str(workdir / "role" / "state"),
            "capture_persist_dir": str(workdir / "role" / "persist"),
            "capture_systemd_unit_dir": str(workdir / "role" / "systemd"),
            "capture_istio_sidecar_env_path": str(workdir / "role" / "sidecar.env"),
        }
        hostvars.update(ROLE_VARS)
        (workdir / "role" / "systemd").mkdir(parents=True)
        (workdir / "inventory.json").write_text(json.dumps({"all": {"hosts": {"target": hostvars}}}))
        (workdir / "ansible.cfg").write_text("[defaults]\n")  # no ansible.cfg of the caller's
        dummy, found = _playbook(ctl_venv, workdir, "converge.yml", "modules")
        problems += found
        after = _snapshot(ns)
        problems += ["modules: after absent, %s differs from before" % key for key in before if before[key] != after.get(key)]
        if role and not problems:
            for state, want in (("present", "changed"), ("present", "not changed"), ("absent", "changed")):
                label = "role %s (%s)" % (state, want)
                changed, found = _playbook(ctl_venv, workdir, "role.yml", label, ["-e", "capture_state=" + state])
                problems += found
                if not found and (changed is None or (changed > 0) != (want == "changed")):
                    problems.append("%s: %s tasks changed" % (label, changed))
                if problems:
                    break
            after = _snapshot(ns)
            problems += ["role: after absent, %s differs from before" % key
                         for key in before if before[key] != after.get(key)]
    return problems


# --- the matrix -------------------------------------------------------------------------------------

def cells(args):
    if args.cell:
        out = []
        for spec in args.cell:
            ctl, py, pr = spec.split(":")
            out.append((ctl, py, pr))
        return out
    if not args.full:
        return list(REDUCED)
    out = []
    for ctl in CONTROLLERS:
        for py in PYTHONS:
            seen = set()
            for spec in ("oldest", "newest"):
                version = pyroute2_version(spec, py)
                if version not in seen:
                    seen.add(version)
                    out.append((ctl, py, spec))
    return out


def run_cell(tools, core, ctl, py, pyroute2, role_controllers=CONTROLLERS):
    """The result row of one cell."""
    row = dict(controller=ctl, python=py, pyroute2=pyroute2, result="FAIL", detail="")
    ctl_venv, why = tools.controller(ctl)
    if ctl_venv is None:
        row["detail"] = why
        return row
    row["controller"] = ansible_version(ctl_venv) or ctl
    supported = supported_target_pythons(ctl_venv)
    if not supported:
        row["detail"] = "cannot read the target Pythons of ansible-core %s" % ctl
        return row
    if py not in supported:
        row.update(result="EXCLUDED", detail="ansible-core %s supports target Python %s to %s"
                   % (ctl, supported[0], supported[-1]))
        return row
    target_venv, has_pytest = tools.target(py, pyroute2)
    if target_venv is None:
        row.update(result="EXCLUDED", detail=has_pytest)
        return row
    problems, notes = core.check(py, target_venv, has_pytest)
    workdir = Path(tempfile.mkdtemp(prefix="mcs-matrix-"))
    try:
        role = ctl in role_controllers and ctl not in core.role_done
        problems = problems + converge(ctl_venv, target_venv, workdir, role=role)
        if role and not problems:
            core.role_done.add(ctl)
            notes = notes + ["role present/present/absent"]
    except Exception as exc:  # a broken cell must not stop the others
        problems.append("%s: %s" % (type(exc).__name__, exc))
    if problems:
        row["detail"] = "; ".join(problems)
        row["log"] = str(workdir / "ansible-playbook.log")
    else:
        row.update(result="PASS", detail="; ".join(notes + ["rules+routes apply/no-op/absent"]))
        shutil.rmtree(workdir, ignore_errors=True)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--full", action="store_true", help="every controller x target Python x pyroute2 cell")
    parser.add_argument("--cell", action="append", metavar="CTL:PY:PYROUTE2",
                        help="one cell, e.g. 2.16:3.6:oldest or 2.19:3.12:0.9.7 (repeatable)")
    parser.add_argument("--cache", default=os.environ.get("MESHCAPTURE_MATRIX_CACHE", str(REPO / ".cache" / "matrix")),
                        help="where the virtualenvs are kept (default: .cache/matrix)")
    parser.add_argument("--list", action="store_true", help="print the cells and exit")
    args = parser.parse_args(argv)

    todo = cells(args)
    if args.list:
        for ctl, py, spec in todo:
            print("%s %s %s" % (ctl, py, pyroute2_version(spec, py)))
        return 0
    reason = netns.unavailable_reason()
    if reason:
        log(reason)
        return 2
    if not (COLLECTIONS / "ansible_collections" / "meshcapture" / "sidecar").exists():
        log("run scripts/setup.sh first (the collection tree is missing)")
        return 2

    tools = Toolchain(Path(args.cache))
    core = CoreChecks()
    results = []
    started = time.monotonic()
    for ctl, py, spec in todo:
        pyroute2 = pyroute2_version(spec, py)
        log("cell ansible-core %s x Python %s x pyroute2 %s" % (ctl, py, pyroute2))
        t0 = time.monotonic()
        row = run_cell(tools, core, ctl, py, pyroute2, REDUCED_ROLE if not (args.full or args.cell) else CONTROLLERS)
        row["seconds"] = round(time.monotonic() - t0, 1)
        log("  %s (%ss)" % (row["result"], row["seconds"]))
        results.append(row)

    Path(args.cache, "results.json").write_text(json.dumps(results, indent=1))
    print()
    print("| controller | target Python | pyroute2 | result | detail |")
    print("|---|---|---|---|---|")
    for row in results:
        detail = row["detail"].replace("\n", " ").replace("|", "/")[:400]
        if row.get("log"):
            detail += " (log: %s)" % row["log"]
        print("| %s | %s | %s | %s | %s |" % (row["controller"], row["python"], row["pyroute2"], row["result"], detail))
    counts = dict((r, sum(1 for row in results if row["result"] == r)) for r in ("PASS", "FAIL", "EXCLUDED"))
    print("\n%(PASS)d passed, %(FAIL)d failed, %(EXCLUDED)d excluded" % counts
          + " in %ds" % (time.monotonic() - started))
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
