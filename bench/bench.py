"""Benchmark of meshcapture.sidecar against its performance goals (bench/README.md).

    bash scripts/setup.sh && . scripts/env.sh
    python bench/bench.py            # 5 runs per variant (fleet 3 on 1, 5, 20, 50 hosts)
    python bench/bench.py --quick    # 3 runs per variant (fleet 1 on 1 and 20 hosts), about 10 minutes (CI-like)

Every variant runs on fresh network namespaces (tests/netns.py: created
and deleted by name, also on failure and Ctrl-C) through the
meshcapture.sidecar.netns connection, and all variants are measured in the
same invocation, round-robin (round 1 measures every variant once, then
round 2, ...), so that load from other processes hits them alike. The table
shows medians with the spread (min-max); the goals are checked on ratios
of those medians.

Variants (bench/README.md describes them in full):

* floor: bench/playbooks/floor.yml, one ansible.builtin.ping task;
* rules, VM-style options, first apply on a fresh namespace and no-op
  re-run (bench/playbooks/rules.yml), and the module alone (no Ansible);
* per-rule: one ansible.builtin.iptables task per iptables command of the
  same ruleset (ansible.builtin.command where the iptables module cannot
  express the rule), first apply and no-op re-run;
* istio-style check: one `iptables -C` process per rule;
* scale: N excluded CIDRs + 1,000 excluded ports for N = 10 ... 10,000:
  render (in-process), bare iptables-restore of the same payload, first
  apply and no-op through Ansible and the module alone, istio-style check
  (estimated from an evenly spaced sample of rules); at 10,000 also with
  the lists as comma-separated strings, with compact_result, with a
  private copy of the module that leaves `commands` out of its result,
  and through the capture action (bench/playbooks/capture.yml, one task);
* fleet: the capture role on 1, 5, 20 and 50 hosts, forks 10, converge and
  no-op re-run, and the floor playbook on the same hosts, with the CPU
  time per host of the controller and of the targets (the module
  processes, timed by a wrapper around the module interpreter); the goals
  compare the controller's CPU-seconds per host beyond the first with the
  floor playbook's;
* memory: max RSS of the module process (the module file run directly).

The rules and scale variants run for each backend of --backends
(iptables-nft, through the module's default `auto`, and nftables), side by
side in the same rounds; the nftables counterpart of the bare restore is a
bare `nft -f` of the same payload (bench/scale.py).

Exit status: 0 when every goal holds, 1 when a goal is missed, 2 when the
benchmark itself failed. Everything (state dirs, persist dirs, playbooks,
Ansible temp dirs) lives in one temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COLLECTIONS = REPO / ".cache" / "collections"
PLAYBOOKS = Path(__file__).resolve().parent / "playbooks"
MODULE = REPO / "plugins" / "modules" / "rules.py"
ROLE_MAIN = REPO / "roles" / "capture" / "tasks" / "main.yml"

sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(COLLECTIONS))

import netns  # noqa: E402  (tests/netns.py: the namespace harness)
import yaml  # noqa: E402

import scale  # noqa: E402  (bench/scale.py: the scale series and the nftables backend)
from scale import (  # noqa: E402
    BACKENDS, EXTRA_BACKENDS, NFT_VARIANTS, RENDER_REPEAT, SCALE_POINTS, SCALE_PORTS, fmt_s, render)

# The VM-style configuration: what `istioctl x workload entry configure`
# puts in a VM's cluster.env (inbound '*', outbound '*', the usual
# excludes), dual-stack, DNS capture with explicit servers.
VM_CAPTURE = {
    "inbound_ports_include": ["*"],
    "inbound_ports_exclude": ["22", "15090", "15021", "15020"],
    "outbound_ip_ranges_include": ["*"],
    "outbound_ip_ranges_exclude": ["169.254.169.254/32"],
    "outbound_ports_exclude": [],
    "redirect_dns": True,
    "dns_servers_v4": ["192.0.2.53"],
    "dns_servers_v6": ["2001:db8::53"],
    "enable_inbound_ipv6": True,
}
FLEET_SIZES = (1, 5, 20, 50)  # --fleet-sizes; the goals use the slope from the smallest to the largest
QUICK_FLEET_SIZES = (1, 20)  # --quick
FLEET_FORKS = 10
GROUPS = ("floor", "vm", "perrule", "scale", "fleet")  # --only
ISTIO_CHECK_SAMPLE = 40  # iptables -C processes per scale point (the total is extrapolated)

# The change measured for `compact_result` leaving `commands` out of the
# result: after state=rendered has returned (which always returns them),
# before the apply. bench.py runs a private copy of the module with it.
NOCOMMANDS_ANCHOR = """        module.exit_json(**result)

    job = dict("""
NOCOMMANDS_PATCH = """        module.exit_json(**result)
    if p["compact_result"]:
        del result["commands"]

    job = dict("""
NOCOMMANDS_NAME = "meshcapture_rules_nocommands"
MARKER_CHAIN = "MESHCAPTURE_OWNED"  # the module's ownership marker (docs/design.md), left out of rule comparisons

ANSIBLE_TIMEOUT = 900.0
COMMAND_TIMEOUT = 300.0
RECAP_RE = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


class BenchError(RuntimeError):
    """The benchmark could not measure something (not a missed goal)."""


class TimeLimit(BenchError):
    """--time-limit was reached."""


# --------------------------------------------------------------- helpers
def scale_capture(n_cidrs: int) -> dict:
    """The VM configuration with n_cidrs /32 CIDRs and SCALE_PORTS ports excluded (none adjacent)."""
    return scale.scale_capture(VM_CAPTURE, n_cidrs)


def median(values):
    return statistics.median(values) if values else float("nan")


def spread(values) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt_s(values[0])
    return "%s-%s" % (fmt_s(min(values)), fmt_s(max(values)))


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_timed(argv, *, timeout=COMMAND_TIMEOUT, env=None, cwd=None, input_text=None):
    """Run argv in its own process group; return (rc, stdout, stderr, seconds, cpu_seconds).

    cpu_seconds: user + system time of the command and every descendant
    it waited for (Ansible workers, modules, iptables). On timeout or
    interruption the whole group is killed.
    """
    cpu = children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        out, err = proc.communicate(input_text, timeout=timeout)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    return proc.returncode, out, err, time.perf_counter() - start, children_cpu() - cpu


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ------------------------------------------------------- per-rule baseline
# ansible.builtin.iptables parameters for the words of an istio command.
_VALUE_OPTIONS = {
    "-p": "protocol", "--protocol": "protocol",
    "-s": "source", "--source": "source",
    "-d": "destination", "--destination": "destination",
    "-i": "in_interface", "--in-interface": "in_interface",
    "-o": "out_interface", "--out-interface": "out_interface",
    "--dport": "destination_port", "--destination-port": "destination_port",
    "--sport": "source_port", "--source-port": "source_port",
    "--uid-owner": "uid_owner", "--gid-owner": "gid_owner",
}
_TARGET_OPTIONS = {"--to-ports": "to_ports", "--to-port": "to_ports"}
_IMPLIED_MATCHES = {"owner", "tcp", "udp"}  # the iptables module adds -m owner itself; tcp/udp follow -p


def iptables_module_params(command: str):
    """ansible.builtin.iptables parameters for one istio command, or None
    when the module cannot express it (the rule then gets a command task)."""
    words = shlex.split(command)
    params = {"ip_version": "ipv6" if words[0] == "ip6tables" else "ipv4"}
    i, negate, matches = 1, False, []
    while i < len(words):
        word = words[i]
        nxt = words[i + 1] if i + 1 < len(words) else None
        if word == "!":
            negate = True
            i += 1
            continue
        if word == "-t":
            params["table"] = nxt
        elif word == "-N":
            params.update(chain=nxt, chain_management=True)
        elif word == "-A":
            params.update(chain=nxt, action="append")
        elif word == "-I":
            params.update(chain=nxt, action="insert", rule_num=words[i + 2])
            i += 1
        elif word in _VALUE_OPTIONS and nxt is not None:
            key = _VALUE_OPTIONS[word]
            if key in params:
                return None  # e.g. two owner matches in one rule
            params[key] = ("!" if negate else "") + nxt
        elif word == "-m" and nxt in _IMPLIED_MATCHES:
            if nxt in ("tcp", "udp"):
                matches.append(nxt)
        elif word == "-m" and nxt == "conntrack" and words[i + 2:i + 3] == ["--ctstate"] and not negate:
            params["ctstate"] = words[i + 3].split(",")
            i += 2
        elif word == "-j" and "jump" not in params:
            params["jump"] = nxt
        elif word in _TARGET_OPTIONS and "jump" in params:
            params[_TARGET_OPTIONS[word]] = nxt
        else:
            return None  # TPROXY, CT, MARK, CONNMARK, NFLOG, mark matches, ...
        if negate and word not in _VALUE_OPTIONS:
            return None
        negate = False
        i += 2
    if matches:
        params["match"] = matches
    return params


def per_rule_playbook(commands):
    """(playbook, n_iptables_tasks, n_command_tasks): one task per command."""
    tasks, n_module, n_command = [], 0, 0
    for number, command in enumerate(commands, 1):
        params = iptables_module_params(command)
        if params is not None:
            n_module += 1
            tasks.append({"name": "Rule %d: %s" % (number, command), "ansible.builtin.iptables": params})
            continue
        n_command += 1
        words = shlex.split(command)
        verb = next(w for w in words if w in ("-A", "-I", "-N"))
        if verb == "-N":
            check = words[:words.index("-N")] + ["-S", words[words.index("-N") + 1]]
        else:
            at = words.index(verb)
            skip = 3 if verb == "-I" else 2
            check = words[:at] + ["-C", words[at + 1]] + words[at + skip:]
        script = "%s >/dev/null 2>&1 || { %s && echo ADDED; }" % (shlex.join(check), shlex.join(words))
        tasks.append({"name": "Rule %d: %s" % (number, command),
                      "ansible.builtin.command": {"argv": ["/bin/sh", "-c", script]},
                      "register": "bench_rule",
                      "changed_when": "'ADDED' in bench_rule.stdout"})
    play = [{"name": "Apply the capture one rule per task", "hosts": "all", "gather_facts": False, "tasks": tasks}]
    return play, n_module, n_command


def check_commands(commands):
    """The `iptables -C` argv of every rule (istio-style verification)."""
    out = []
    for command in commands:
        words = shlex.split(command)
        if "-N" in words:
            continue
        verb = "-A" if "-A" in words else "-I"
        at = words.index(verb)
        skip = 3 if verb == "-I" else 2
        out.append(words[:at] + ["-C", words[at + 1]] + words[at + skip:])
    return out


# ------------------------------------------------------------------ bench
class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="meshcapture-bench-"))
        self.results: dict[str, list] = {}
        self.info: dict[str, object] = {}
        self.notes: list[str] = []
        self.deadline = time.monotonic() + args.time_limit
        self.seq = 0
        self.python = os.environ.get("MESHCAPTURE_PYTHON") or sys.executable
        bindir = Path(sys.executable).parent
        self.ansible_playbook = str(bindir / "ansible-playbook") if (bindir / "ansible-playbook").exists() \
            else shutil.which("ansible-playbook")
        if not self.ansible_playbook:
            raise BenchError("ansible-playbook not found: run scripts/setup.sh and source scripts/env.sh")
        if not (COLLECTIONS / "ansible_collections" / "meshcapture" / "sidecar").exists():
            raise BenchError("%s is missing: run scripts/setup.sh" % COLLECTIONS)
        cfg = self.tmp / "ansible.cfg"
        cfg.write_text("[defaults]\nretry_files_enabled = False\n")
        for sub in ("ansible-home", "local", "remote", "async"):
            (self.tmp / sub).mkdir()
        self.env = dict(os.environ)
        self.env.update({
            "ANSIBLE_CONFIG": str(cfg),
            "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
            "ANSIBLE_HOME": str(self.tmp / "ansible-home"),
            "ANSIBLE_LOCAL_TEMP": str(self.tmp / "local"),
            "ANSIBLE_REMOTE_TEMP": str(self.tmp / "remote"),
            "ANSIBLE_ASYNC_DIR": str(self.tmp / "async"),
            "ANSIBLE_NOCOLOR": "1",
            "LC_ALL": "C.UTF-8",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(COLLECTIONS), os.environ.get("PYTHONPATH")])),
        })
        self.env.pop("ANSIBLE_FORCE_COLOR", None)

    # -- bookkeeping -------------------------------------------------------
    def record(self, key, value):
        self.results.setdefault(key, []).append(value)

    def med(self, key):
        return median(self.results.get(key, []))

    def check_time(self):
        if time.monotonic() > self.deadline:
            raise TimeLimit("--time-limit of %ds reached" % self.args.time_limit)

    def path(self, stem, suffix):
        self.seq += 1
        return self.tmp / ("%03d-%s%s" % (self.seq, stem, suffix))

    def cleanup(self):
        if self.args.keep_tmp:
            print("kept %s" % self.tmp, file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- runners -----------------------------------------------------------
    def timed_interpreter(self):
        """(wrapper, log): a module interpreter that runs the real one and
        appends the CPU time of its process tree (the module and what it
        runs: iptables, nft, ...) to log, i.e. what a real target would pay."""
        log = self.path("target-cpu", ".log")
        wrapper = self.path("python", ".sh")
        wrapper.write_text("#!/bin/sh\n%s \"$@\"\nrc=$?\ntimes >>%s\nexit $rc\n"
                           % (shlex.quote(self.python), shlex.quote(str(log))))
        wrapper.chmod(0o755)
        return wrapper, log

    @staticmethod
    def target_seconds(log):
        """The children's CPU seconds of every `times` report in log."""
        total = 0.0
        if not log.exists():
            return total
        lines = log.read_text().splitlines()
        for line in lines[1::2]:  # `times`: the shell's own line, then its children's
            for value in line.split():
                minutes, seconds = value.rstrip("s").split("m")
                total += int(minutes) * 60 + float(seconds)
        return total

    def playbook(self, playbook, hosts, extra_vars=None, forks=None, expect=None, label=""):
        """Run a playbook on [(inventory_name, Netns, hostvars)]; return
        (seconds, changed tasks, CPU seconds, target CPU seconds).

        expect: 'changed' (every host changed something), 'unchanged'
        (no host changed anything) or None. Target CPU: the module
        processes' (the rest of the CPU time is the controller's).
        """
        self.check_time()
        interpreter, log = self.timed_interpreter()
        inventory = {"all": {"hosts": {}}}
        for name, ns, hostvars in hosts:
            inventory["all"]["hosts"][name] = dict(
                hostvars or {}, ansible_host=ns.name, ansible_connection="meshcapture.sidecar.netns",
                ansible_python_interpreter=str(interpreter))
        inv = self.path("inventory", ".json")
        inv.write_text(json.dumps(inventory))
        argv = [self.ansible_playbook, "-i", inv, playbook]
        if extra_vars is not None:
            ev = self.path("vars", ".json")
            ev.write_text(json.dumps(extra_vars))
            argv += ["-e", "@%s" % ev]
        if forks:
            argv += ["--forks", str(forks)]
        rc, out, err, seconds, cpu = run_timed(argv, timeout=ANSIBLE_TIMEOUT, env=self.env, cwd=self.tmp)
        recap = {m.group(1): tuple(int(g) for g in m.group(2, 3, 4, 5)) for m in RECAP_RE.finditer(out)}
        if rc != 0 or len(recap) != len(hosts) or any(r[2] or r[3] for r in recap.values()):
            raise BenchError("%s: ansible-playbook %s failed (rc=%s)\n%s\n%s"
                             % (label, Path(playbook).name, rc, tail(out), tail(err, 10)))
        changed = [r[1] for r in recap.values()]
        if expect == "changed" and not all(changed):
            raise BenchError("%s: expected every host to change, recap %s" % (label, recap))
        if expect == "unchanged" and any(changed):
            raise BenchError("%s: the re-run changed something, recap %s\n%s" % (label, recap, tail(out, 40)))
        return seconds, sum(changed), cpu, self.target_seconds(log)

    def timed_playbook(self, key, *args, **kwargs):
        """playbook(), recording seconds under key, CPU seconds under key.cpu
        and the module processes' share of them under key.tcpu."""
        seconds, changed, cpu, target = self.playbook(*args, **kwargs)
        self.record(key, seconds)
        self.record(key + ".cpu", cpu)
        self.record(key + ".tcpu", target)
        return changed

    def module_alone(self, ns, capture, state_dir, label, module=MODULE):
        """Run plugins/modules/rules.py (or module) directly inside ns;
        (seconds, result, peak RSS in KiB, size of the result's JSON in bytes)."""
        self.check_time()
        args = self.path("module-args", ".json")
        args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": dict(capture, state="present", state_dir=str(state_dir))}))
        # The module file runs as __main__ (like `python rules.py args.json`,
        # with a source loader, so that the module can hash its own source
        # for its rendering memo: runpy.run_path leaves __loader__ unset and
        # the module then never memoises) and reports its peak RSS at exit:
        # VmHWM, the high-water mark of this process's own memory since it
        # was exec'd. (getrusage's ru_maxrss would also count the memory of
        # the process that forked it, here this benchmark, carried over
        # across exec.)
        wrapper = (
            "import atexit, importlib.machinery, importlib.util, os, sys\n"
            "def report():\n"
            "    with open('/proc/self/status') as f:\n"
            "        hwm = [line.split()[1] for line in f if line.startswith('VmHWM:')][0]\n"
            "    os.write(2, ('\\nBENCH-VMHWM %s\\n' % hwm).encode())\n"
            "atexit.register(report)\n"
            "sys.argv = sys.argv[1:]\n"
            "loader = importlib.machinery.SourceFileLoader('__main__', sys.argv[0])\n"
            "module = importlib.util.module_from_spec(importlib.util.spec_from_loader('__main__', loader))\n"
            "sys.modules['__main__'] = module\n"
            "loader.exec_module(module)\n")
        argv = ns.argv([self.python, "-c", wrapper, module, args])
        rc, out, err, seconds, dummy = run_timed(argv, env=self.env, cwd=self.tmp)
        match = re.search(r"BENCH-VMHWM (\d+)", err)
        try:
            result = json.loads(out)
        except ValueError:
            raise BenchError("%s: the module printed no JSON (rc=%s)\n%s\n%s" % (label, rc, tail(out), tail(err)))
        if result.get("failed") or not match:
            raise BenchError("%s: the module failed: %s" % (label, result.get("msg")))
        return seconds, result, int(match.group(1)), len(out.strip())

    def bare_restore(self, ns, payloads):
        """(seconds, CPU seconds) of iptables-restore + ip6tables-restore --noflush of the payloads in ns."""
        self.check_time()
        files = {}
        for family, payload in payloads.items():
            files[family] = self.path("payload-" + family, ".txt")
            files[family].write_text(payload)
        script = "iptables-restore -w 5 --noflush < %s && ip6tables-restore -w 5 --noflush < %s" % (
            shlex.quote(str(files["ipv4"])), shlex.quote(str(files["ipv6"])))
        rc, dummy, err, seconds, cpu = run_timed(ns.argv(["/bin/sh", "-c", script]))
        if rc != 0:
            raise BenchError("bare restore failed: %s" % tail(err))
        return seconds, cpu

    def bare_nft(self, ns, payload):
        """Seconds for `nft -f` of the payload in ns (the nftables counterpart of the bare restore)."""
        self.check_time()
        path = self.path("payload-nft", ".nft")
        path.write_text(payload)
        rc, dummy, err, seconds, dummy = run_timed(ns.argv(["nft", "-f", str(path)]))
        if rc != 0:
            raise BenchError("bare nft -f failed: %s" % tail(err))
        return seconds

    def istio_check(self, ns, commands, sample=None):
        """One `iptables -C` process per rule inside ns (or an evenly spaced
        sample of them); returns (seconds, checks run, failures, total rules)."""
        self.check_time()
        checks = check_commands(commands)
        total = len(checks)
        if sample and sample < total:
            step = total / sample
            checks = [checks[int(k * step)] for k in range(sample)]
        script = "f=0\n" + "".join("%s >/dev/null 2>&1 || f=$((f+1))\n" % shlex.join(c) for c in checks) + "echo $f\n"
        path = self.path("istio-check", ".sh")
        path.write_text(script)
        rc, out, err, seconds, dummy = run_timed(ns.argv(["/bin/sh", str(path)]))
        if rc != 0:
            raise BenchError("istio-style check failed to run: %s" % tail(err))
        return seconds, len(checks), int(out.strip().splitlines()[-1]), total

    def save_rules(self, ns):
        """Sorted '-A' lines of both families (for equivalence checks), but
        those of the module's ownership marker chain (MARKER_CHAIN: comments
        that no packet goes through, which the per-rule baseline has no
        counterpart of)."""
        lines = []
        for save in ("iptables-save", "ip6tables-save"):
            out = ns.run([save]).stdout
            table = None
            for line in out.splitlines():
                if line.startswith("*"):
                    table = line[1:]
                elif line.startswith("-A ") and not line.startswith("-A %s " % MARKER_CHAIN):
                    lines.append("%s %s %s" % (save, table, line))
        return sorted(lines)

    def nocommands_module(self):
        """(module file, playbook) of a private copy of the rules module that
        leaves `commands` out of its result with compact_result (not for
        state=rendered), and of bench/playbooks/rules.yml running it; None
        when the module's code does not have the place the change goes
        (then the module has changed: see the note in the report)."""
        if "nocommands" in self.info:
            return self.info["nocommands"]
        source = MODULE.read_text()
        self.info["nocommands"] = None
        if NOCOMMANDS_ANCHOR not in source:
            self.notes.append("the private copy of the rules module without commands was not measured: %s no longer "
                              "has the place of the change (NOCOMMANDS_ANCHOR in bench.py)" % MODULE.name)
            return None
        base = self.tmp / "nocommands"
        (base / "library").mkdir(parents=True)
        module = base / "library" / (NOCOMMANDS_NAME + ".py")
        module.write_text(source.replace(NOCOMMANDS_ANCHOR, NOCOMMANDS_PATCH, 1))
        play = yaml.safe_load((PLAYBOOKS / "rules.yml").read_text())
        task = play[0]["tasks"][0]
        task[NOCOMMANDS_NAME] = task.pop("meshcapture.sidecar.rules")
        playbook = base / "rules.yml"
        playbook.write_text(yaml.safe_dump(play, sort_keys=False, width=1000))
        self.info["nocommands"] = (str(module), str(playbook))
        return self.info["nocommands"]

    # -- variants ----------------------------------------------------------
    def measure_floor(self):
        with netns.Netns("bfloor") as ns:
            self.timed_playbook("floor", PLAYBOOKS / "floor.yml", [("host", ns, None)], label="floor")

    def measure_rules(self, key, capture, commands, round_no, istio_sample=None, playbook="rules.yml"):
        """First apply + no-op through Ansible, then (with commands) the istio-style check there."""
        ev = {"bench_capture": capture, "bench_state_dir": str(self.path("state-" + key, ""))}
        with netns.Netns("brules") as ns:
            self.timed_playbook(key + ".first", PLAYBOOKS / playbook, [("host", ns, None)], ev, expect="changed",
                                label=key + " first apply")
            self.timed_playbook(key + ".noop", PLAYBOOKS / playbook, [("host", ns, None)], ev,
                                expect="unchanged", label=key + " no-op")
            if commands is None:
                return
            seconds, ran, failures, total = self.istio_check(ns, commands, istio_sample)
            if failures:
                raise BenchError("%s: %d of %d iptables -C checks failed after the apply" % (key, failures, ran))
            self.record(key + ".istio", seconds * total / ran)
            self.info[key + ".istio_checks"] = (ran, total)
            if round_no == 0 and key == "vm":
                self.info["vm.saved"] = self.save_rules(ns)

    def measure_module(self, key, capture, module=MODULE):
        state_dir = self.path("state-mod-" + key, "")
        with netns.Netns("bmod") as ns:
            first, res1, rss1, size1 = self.module_alone(ns, capture, state_dir, key + " module first apply", module)
            noop, res2, rss2, size2 = self.module_alone(ns, capture, state_dir, key + " module no-op", module)
        if not res1.get("changed") or res2.get("changed"):
            raise BenchError("%s: module alone: first apply changed=%s, re-run changed=%s"
                             % (key, res1.get("changed"), res2.get("changed")))
        if res1.get("backend") != capture.get("backend", res1.get("backend")):
            raise BenchError("%s: module alone ran backend %r" % (key, res1.get("backend")))
        self.record(key + ".mod_first", first)
        self.record(key + ".mod_noop", noop)
        self.record(key + ".rss_first", rss1)
        self.record(key + ".rss_noop", rss2)
        self.info[key + ".result_bytes"] = (size1, size2)
        self.info[key + ".has_commands"] = "commands" in res2

    def measure_per_rule(self, commands, round_no):
        play, n_module, n_command = per_rule_playbook(commands)
        self.info["perrule.tasks"] = (len(commands), n_module, n_command)
        path = self.path("per-rule", ".yml")
        path.write_text(yaml.safe_dump(play, sort_keys=False, width=1000))
        with netns.Netns("bprule") as ns:
            self.timed_playbook("perrule.first", path, [("host", ns, None)], expect="changed",
                                label="per-rule first apply")
            self.timed_playbook("perrule.noop", path, [("host", ns, None)], expect="unchanged",
                                label="per-rule no-op")
            if round_no == 0:
                same = self.save_rules(ns) == self.info.get("vm.saved")
                self.info["perrule.equivalent"] = same
                if not same:
                    self.notes.append("per-rule baseline: the resulting rules differ from the module's "
                                      "(iptables-save comparison)")

    def measure_scale(self, n, round_no, backend):
        key = "scale%d" % n
        capture = scale_capture(n)
        if backend in NFT_VARIANTS:
            scale.measure_scale_nft(self, n, netns, capture, PLAYBOOKS, backend)
            return
        for dummy in range(RENDER_REPEAT):
            start = time.perf_counter()
            ruleset, commands, payloads = render(capture)
            self.record(key + ".render", time.perf_counter() - start)
        self.info[key + ".rules"] = len(ruleset)
        with netns.Netns("bbare") as ns:
            seconds, cpu = self.bare_restore(ns, payloads)
            self.record(key + ".bare", seconds)
            self.record(key + ".bare.cpu", cpu)
        self.measure_rules(key, capture, commands, round_no, istio_sample=ISTIO_CHECK_SAMPLE)
        self.measure_module(key, capture)
        if n == SCALE_POINTS[-1]:
            # The same lists as comma-separated strings (the module accepts
            # them wherever it accepts a list, as in an Istio cluster.env).
            joined = dict(capture, outbound_ip_ranges_exclude=",".join(capture["outbound_ip_ranges_exclude"]),
                          outbound_ports_exclude=",".join(capture["outbound_ports_exclude"]))
            self.measure_rules(key + "str", joined, None, round_no)
            # The same, with the module returning its options joined too.
            compact = dict(joined, compact_result=True)
            self.measure_rules(key + "strc", compact, None, round_no)
            self.measure_module(key + "strc", compact)
            # ... and leaving `commands` out of the result (a private copy of
            # the module with that change, until the module has it).
            # (Once the module has that change, the copy would measure the same: left out.)
            nocommands = self.nocommands_module() if self.info[key + "strc.has_commands"] else None
            if nocommands:
                self.measure_rules(key + "strn", compact, None, round_no, playbook=nocommands[1])
                self.measure_module(key + "strn", compact, module=nocommands[0])
            # What loading the lists as variables costs ansible-core alone:
            # the floor playbook with the same -e @vars.json (not used).
            with netns.Netns("bfloor") as ns:
                self.timed_playbook(key + ".floorvars", PLAYBOOKS / "floor.yml", [("host", ns, None)],
                                    {"bench_capture": capture}, label="floor with the list variables")
            # The same lists through the capture action (one task, as the
            # role runs it): it passes them to the rules module joined.
            self.measure_rules(key + "cap", capture, None, round_no, playbook="capture.yml")

    def measure_fleet(self, size):
        key = "fleet%d" % size
        capture_vars = {"capture_" + k: v for k, v in VM_CAPTURE.items()}
        capture_vars.update(capture_state="present", capture_install_dependencies=False,
                            capture_systemd_enable=False, capture_proxy_user_create=False)
        with netns.Topology() as topo:
            hosts = []
            for index in range(size):
                ns = topo.netns("bfleet")
                base = self.path("fleet-host%d" % index, "")
                hostvars = {"capture_state_dir": str(base / "state"),
                            "capture_persist_dir": str(base / "persist"),
                            "capture_systemd_unit_dir": str(base / "systemd")}
                (base / "systemd").mkdir(parents=True)
                hosts.append(("host%02d" % index, ns, hostvars))
            self.timed_playbook(key + ".first", PLAYBOOKS / "role.yml", hosts, capture_vars, forks=FLEET_FORKS,
                                expect="changed", label="role on %d hosts" % size)
            changed = self.timed_playbook(key + ".noop", PLAYBOOKS / "role.yml", hosts, capture_vars,
                                          forks=FLEET_FORKS, label="role re-run on %d hosts" % size)
            if changed:
                self.notes.append("the role's re-run on %d hosts reported %d changed tasks" % (size, changed))
            # The reference: the floor playbook (one trivial module run per
            # host) on the same hosts, what any role pays at the least.
            self.timed_playbook(key + ".floor", PLAYBOOKS / "floor.yml", hosts, forks=FLEET_FORKS,
                                expect="unchanged", label="floor playbook on %d hosts" % size)
        # The capture action alone (bench/playbooks/capture.yml: the one task
        # of the role that does a host's work, nothing persisted) on fresh
        # hosts: what the role's other tasks cost is the difference.
        with netns.Topology() as topo:
            hosts = [("host%02d" % index, topo.netns("bfleet"),
                      {"bench_state_dir": str(self.path("fleet-action%d" % index, ""))}) for index in range(size)]
            for what, expect in (("action_first", "changed"), ("action_noop", "unchanged")):
                self.timed_playbook(key + "." + what, PLAYBOOKS / "capture.yml", hosts, {"bench_capture": VM_CAPTURE},
                                    forks=FLEET_FORKS, expect=expect, label="capture action on %d hosts" % size)

    # -- main loop ---------------------------------------------------------
    def run(self):
        vm_ruleset, vm_commands, dummy = render(VM_CAPTURE)
        self.info["vm.rules"] = len(vm_ruleset)
        fleet = not self.args.skip_fleet and "fleet" in self.args.only
        if fleet and not ROLE_MAIN.exists():
            raise BenchError("the capture role is missing (%s); use --skip-fleet to measure without it" % ROLE_MAIN)
        started = time.monotonic()
        only = self.args.only
        for round_no in range(self.args.runs):
            print("bench: round %d/%d (%.0f s so far)" % (round_no + 1, self.args.runs, time.monotonic() - started),
                  file=sys.stderr, flush=True)
            if "floor" in only:
                self.measure_floor()
            # The backends alternate their order from round to round.
            backends = self.args.backends[::-1 if round_no % 2 else 1]
            if "vm" in only:
                for backend in backends:
                    if backend in NFT_VARIANTS:
                        prefix, options = NFT_VARIANTS[backend]
                        nft_capture = dict(VM_CAPTURE, **options)
                        self.measure_rules(prefix + "vm", nft_capture, None, round_no,
                                           playbook=scale.nft_playbook(self, PLAYBOOKS, backend))
                        self.measure_module(prefix + "vm", nft_capture)
                    else:
                        self.measure_rules("vm", VM_CAPTURE, vm_commands, round_no)
                        self.measure_module("vm", VM_CAPTURE)
            if "perrule" in only and round_no < self.args.per_rule_runs and "iptables-nft" in backends:
                self.measure_per_rule(vm_commands, round_no)
            if "scale" in only:
                for n in SCALE_POINTS:
                    for backend in backends:
                        self.measure_scale(n, round_no, backend)
            if fleet and round_no < self.args.fleet_runs:
                for size in self.args.fleet_sizes:
                    self.measure_fleet(size)
        self.info["elapsed"] = time.monotonic() - started


# ------------------------------------------------------------------ report
def machine_info():
    def first_line(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "n/a"

    mem = "n/a"
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        mem = "%.1f GiB" % (kb / 1048576)
    except (OSError, StopIteration, ValueError):
        pass
    cpu = "n/a"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from ansible.release import __version__ as ansible_version
    return [
        ("CPUs (nproc)", "%d (%s)" % (os.cpu_count() or 0, cpu)),
        ("memory", mem),
        ("kernel", platform.release()),
        ("os", first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"])),
        ("iptables", first_line(["iptables", "--version"])),
        ("python", "%s (%s)" % (platform.python_version(), sys.executable)),
        ("ansible-core", ansible_version),
    ]


def goals(b: Bench):
    """[(goal, measured, verdict)] from the medians of this run."""
    out = []
    floor = b.med("floor")

    def verdict(ok, *values):
        if ok is None or any(math.isnan(v) for v in values):
            return "NOT MEASURED"
        return "PASS" if ok else "FAIL"

    for key, text, limit in (("vm.noop", "no-op re-run <= 1.3x the floor", 1.3),
                             ("vm.first", "first apply <= 1.5x the floor", 1.5)):
        value = b.med(key)
        out.append((text, "%.2f / %.2f s = %.2fx" % (value, floor, value / floor),
                    verdict(value / floor <= limit, value, floor)))
    for what, text in (("first", "first apply"), ("noop", "no-op re-run")):
        per_rule, ours = b.med("perrule." + what), b.med("vm." + what)
        out.append(("%s >= 10x faster than per-rule" % text, "%.2f / %.2f s = %.1fx" % (per_rule, ours, per_rule / ours),
                    verdict(per_rule / ours >= 10, per_rule, ours)))
    top = "scale%d" % SCALE_POINTS[-1]
    label = "%s CIDRs + %s ports" % (format(SCALE_POINTS[-1], ","), format(SCALE_PORTS, ","))
    # The long lists as comma-separated strings (as an Istio cluster.env
    # has them), with the module's defaults and with compact_result (as
    # the role runs it); on wall time and, less sensitive to other load,
    # on CPU time (of the whole process tree: Ansible, module, iptables).
    for key, path in ((top + "str", "comma-separated"), (top + "strc", "comma-separated + compact_result")):
        for clock, suffix, unit in (("wall", "", "s"), ("CPU", ".cpu", "CPU-s")):
            floor_t, bare = b.med("floor" + suffix), b.med(top + ".bare" + suffix)
            first, noop = b.med(key + ".first" + suffix), b.med(key + ".noop" + suffix)
            limit = floor_t + bare + BIG_FIRST_MARGIN
            title = "%s (%s), %s: first apply <= floor + bare restore + %g s" % (label, path, clock, BIG_FIRST_MARGIN)
            figures = "%.2f %s, limit %.2f + %.2f + %g = %.2f" % (first, unit, floor_t, bare, BIG_FIRST_MARGIN, limit)
            out.append((title, figures,
                        verdict(first <= limit, first, floor_t, bare)))
            limit = floor_t + BIG_NOOP_MARGIN
            out.append(("%s (%s), %s: no-op <= floor + %g s" % (label, path, clock, BIG_NOOP_MARGIN),
                        "%.2f %s, limit %.2f + %g = %.2f" % (noop, unit, floor_t, BIG_NOOP_MARGIN, limit),
                        verdict(noop <= limit, noop, floor_t)))
    details, ok = [], None if "scale%d.first" % SCALE_POINTS[-1] not in b.results else True
    for name, growth in linear_growth(b):
        if growth is None:
            details.append("%s n/a" % name)
            continue
        ok = ok and growth <= LINEAR_TOLERANCE * CIDR_RATIO if ok is not None else None
        details.append("%s %.1fx" % (name, growth))
    out.append(("cost grows linearly: %s->%s CIDRs (x%d) costs <= x%.1f" % (
        format(SCALE_POINTS[-2], ","), format(SCALE_POINTS[-1], ","), CIDR_RATIO, LINEAR_TOLERANCE * CIDR_RATIO),
        ", ".join(details), verdict(ok)))
    out += scale.nft_goals(b, verdict, BIG_FIRST_MARGIN, BIG_NOOP_MARGIN)
    # The fleet: what each host beyond the first costs the controller, over
    # what it costs the floor playbook (one ping per host) on the same hosts.
    slopes = fleet_slopes(b)
    for what, text, limit in (("noop", "no-op re-run", FLEET_NOOP_LIMIT), ("first", "converge", FLEET_CONVERGE_LIMIT)):
        goal = "fleet, the role's %s: controller CPU-s per host beyond the first <= %gx the floor's" % (text, limit)
        if slopes is None:
            out.append((goal, "not measured (needs two --fleet-sizes)", verdict(None)))
            continue
        lo, hi, per_host = slopes
        (role, target), (ping, ping_target) = per_host[what], per_host["floor"]
        out.append((goal, "%.2f / %.2f = %.1fx (%d->%d hosts; target CPU-s per host %.2f, floor's %.2f)"
                    % (role, ping, role / ping, lo, hi, target, ping_target),
                    verdict(role <= limit * ping, role, ping)))
    return out


CIDR_RATIO = SCALE_POINTS[-1] // SCALE_POINTS[-2]
LINEAR_TOLERANCE = 1.25
BIG_FIRST_MARGIN = 1.0  # s above floor + bare restore, first apply at the largest scale point
BIG_NOOP_MARGIN = 0.5  # s above the floor, no-op at the largest scale point
# The role's controller CPU-seconds per host beyond the first, over the
# floor playbook's (one ansible.builtin.ping per host) on the same hosts.
FLEET_CONVERGE_LIMIT = 5.0
FLEET_NOOP_LIMIT = 3.0


def fleet_sizes(b: Bench):
    """The fleet sizes measured, smallest first."""
    return sorted(int(k[len("fleet"):-len(".first")]) for k in b.results if re.match(r"^fleet\d+\.first$", k))


def fleet_slopes(b: Bench):
    """(smallest, largest, {what: (controller, target)}): the CPU-seconds
    each host beyond the first costs, the slope of the medians from the
    smallest to the largest fleet measured, for the role's converge
    ("first"), its no-op re-run ("noop") and the floor playbook ("floor");
    None with fewer than two sizes."""
    sizes = fleet_sizes(b)
    if len(sizes) < 2:
        return None
    lo, hi = sizes[0], sizes[-1]
    per_host = {}
    for what in ("first", "noop", "floor", "action_first", "action_noop"):
        cpu = [b.med("fleet%d.%s.cpu" % (n, what)) for n in (lo, hi)]
        target = [b.med("fleet%d.%s.tcpu" % (n, what)) for n in (lo, hi)]
        slope, slope_target = (cpu[1] - cpu[0]) / (hi - lo), (target[1] - target[0]) / (hi - lo)
        per_host[what] = (slope - slope_target, slope_target)
    return lo, hi, per_host


def linear_growth(b: Bench):
    """[(series, growth)]: how much the size-dependent cost grows from the
    1,000-CIDR point to the 10,000-CIDR point (both with the 1,000 ports).

    The size-dependent cost is the time above what the same path costs
    without the exclusion lists: the floor for Ansible runs, the module on
    the VM configuration for the module alone, nothing for the in-process
    render. Linear (or better) growth gives at most the CIDR ratio (the
    ports and the fixed part do not grow); the goal allows 25% on top.
    None when the 1,000-CIDR cost is within noise (not above the base).
    """
    top, mid = "scale%d" % SCALE_POINTS[-1], "scale%d" % SCALE_POINTS[-2]
    out = []
    for name, what, base in (("render", "render", 0.0),
                             ("module first", "mod_first", b.med("vm.mod_first")),
                             ("module no-op", "mod_noop", b.med("vm.mod_noop")),
                             ("first", "first", b.med("floor")),
                             ("no-op", "noop", b.med("floor"))):
        cost_mid = b.med("%s.%s" % (mid, what)) - base
        cost_top = b.med("%s.%s" % (top, what)) - base
        out.append((name, cost_top / cost_mid if cost_mid > 0.01 else None))
    return out


def report(b: Bench, machine, load_before, load_after):
    r, lines = b.results, []
    add = lines.append
    add("meshcapture.sidecar benchmark: medians of n runs (min-max), wall-clock seconds; CPU: user+system seconds")
    add("of the whole process tree (Ansible, modules, iptables), median")
    add("")
    for key, value in machine:
        add("  %-13s %s" % (key, value))
    add("  %-13s %s at start, %s at the end" % ("load average", load_before, load_after))
    busy = max(float(x) for x in (load_before.split()[:1] + load_after.split()[:1]) if x != "n/a") \
        if "n/a" not in (load_before, load_after) else 0.0
    if busy > (os.cpu_count() or 1) / 2:
        add("  note: other processes were using the CPUs (load average above nproc/2): timings are inflated")
    add("")

    def row(text, key, cpu=True):
        values = r.get(key, [])
        add("%-62s %2d %8s  %-11s %6s" % (text, len(values), fmt_s(median(values)), spread(values),
                                          fmt_s(b.med(key + ".cpu")) if cpu and key + ".cpu" in r else ""))

    add("%-62s %2s %8s  %-11s %6s" % ("variant", "n", "median", "min-max", "CPU"))
    if "floor" in r:
        row("floor: playbook with one ansible.builtin.ping task", "floor")
    if "vm.first" in r:
        row("rules, VM-style (%d rules): first apply" % b.info["vm.rules"], "vm.first")
        row("rules, VM-style: no-op re-run", "vm.noop")
        row("  the module alone (no Ansible): first apply", "vm.mod_first")
        row("  the module alone (no Ansible): no-op", "vm.mod_noop")
    for backend, text in (("nftables", "backend nftables"), ("nftables-istio", "nftables, nft_layout istio")):
        prefix = NFT_VARIANTS[backend][0]
        if prefix + "vm.first" in r:
            row("rules, VM-style, %s: first apply" % text, prefix + "vm.first")
            row("rules, VM-style, %s: no-op re-run" % text, prefix + "vm.noop")
            row("  the module alone (no Ansible): first apply", prefix + "vm.mod_first")
            row("  the module alone (no Ansible): no-op", prefix + "vm.mod_noop")
    if "perrule.tasks" in b.info:
        total, n_module, n_command = b.info["perrule.tasks"]
        row("per-rule, %d tasks (%d iptables + %d command): first apply" % (total, n_module, n_command),
            "perrule.first")
        row("per-rule: no-op re-run", "perrule.noop")
    if "vm.istio_checks" in b.info:
        row("istio-style check: %d processes (iptables -C per rule)" % b.info["vm.istio_checks"][1], "vm.istio")
    add("")
    if "scale%d.first" % SCALE_POINTS[-1] in r:
        scale_report(b, add)
    for backend in NFT_VARIANTS:
        scale.nft_scale_report(b, add, backend)
    fleet_report(b, add)
    if "scale%d.rss_first" % SCALE_POINTS[-1] in r:
        memory_report(b, add)
    add("goals (ratios of the medians above)")
    results = goals(b)
    for goal, measured, verdict in results:
        if verdict == "NOT MEASURED":
            add("  %-5s %s: not measured" % ("-", goal))
        else:
            add("  %-5s %s: %s" % (verdict, goal, measured))
    if b.info.get("perrule.equivalent"):
        add("note: the per-rule baseline produced exactly the module's rules (iptables-save compared)")
    for note in b.notes:
        add("note: " + note)
    add("benchmark wall time: %.0f s" % b.info["elapsed"])
    return "\n".join(lines), results


def scale_report(b: Bench, add):
    r = b.results
    add("scale: N excluded CIDRs + %s excluded ports, VM-style otherwise (n=%d)"
        % (format(SCALE_PORTS, ","), len(r.get("scale%d.first" % SCALE_POINTS[0], []))))
    head = ("CIDRs", "rules", "render", "bare rst", "first", "no-op", "mod 1st", "mod no-op", "istio -C", "max RSS")
    fmt = "%7s %7s %7s %8s %6s %6s %8s %9s %9s %8s"
    add(fmt % head)
    for n in SCALE_POINTS:
        k = "scale%d" % n
        add(fmt % (
            format(n, ","), format(b.info[k + ".rules"], ","), "%.3f" % b.med(k + ".render"),
            "%.3f" % b.med(k + ".bare"), fmt_s(b.med(k + ".first")), fmt_s(b.med(k + ".noop")),
            fmt_s(b.med(k + ".mod_first")), fmt_s(b.med(k + ".mod_noop")), "~%.1f" % b.med(k + ".istio"),
            "%.0f MiB" % (max(r[k + ".rss_first"]) / 1024)))
    add("  render: in-process, %d samples per run (validate, generate, commands, restore payloads)" % RENDER_REPEAT)
    add("  bare rst: iptables-restore + ip6tables-restore --noflush of the same payloads, fresh namespace")
    add("  first, no-op: ansible-playbook bench/playbooks/rules.yml; mod: the module file alone (ip netns exec)")
    add("  istio -C: one iptables -C process per rule, extrapolated from %d evenly spaced rules" % ISTIO_CHECK_SAMPLE)
    add("  max RSS: peak RSS of the module process, first apply (largest of the runs)")
    top = "scale%d" % SCALE_POINTS[-1]
    add("  at %s CIDRs + %s ports, first apply wall / CPU-s, no-op wall / CPU-s (Ansible, module, iptables); alone:"
        % (format(SCALE_POINTS[-1], ","), format(SCALE_PORTS, ",")))
    add("  the module file's no-op without Ansible and the size of its JSON result:")
    for suffix, text in (("", "the lists as lists (-e @vars.json)"),
                         ("str", "comma-separated strings"),
                         ("strc", "comma-separated + compact_result (as the role runs it)"),
                         ("strn", "  and commands left out (private copy of the module)")):
        k = top + suffix
        if k + ".first" not in r:
            continue
        size, alone = b.info.get(k + ".result_bytes"), ""
        if size:
            alone = "; alone %s s, result %s kB" % (fmt_s(b.med(k + ".mod_noop")), format(round(size[1] / 1000), ","))
        add("    %-56s %s / %s, %s / %s%s" % (
            text, fmt_s(b.med(k + ".first")), fmt_s(b.med(k + ".first.cpu")), fmt_s(b.med(k + ".noop")),
            fmt_s(b.med(k + ".noop.cpu")), alone))
    add("    floor %s / %s, bare restore %s / %s" % (
        fmt_s(b.med("floor")), fmt_s(b.med("floor.cpu")), fmt_s(b.med(top + ".bare")), fmt_s(b.med(top + ".bare.cpu"))))
    k = "scale%d" % SCALE_POINTS[-1]
    add("  the floor playbook with the lists loaded as variables (-e @vars.json, not used): %s s, %s s more than"
        % (fmt_s(b.med(k + ".floorvars")), fmt_s(b.med(k + ".floorvars") - b.med("floor"))))
    add("    the floor: what ansible-core spends on the %s list items before any module runs"
        % format(SCALE_POINTS[-1] + SCALE_PORTS, ","))
    add("  growth %s->%s CIDRs of the size-dependent cost: %s" % (
        format(SCALE_POINTS[-2], ","), format(SCALE_POINTS[-1], ","),
        ", ".join("%s %s" % (name, "n/a" if g is None else "x%.1f" % g) for name, g in linear_growth(b))))
    k = "scale%dcap" % SCALE_POINTS[-1]
    add("  the same %s CIDRs + ports through the capture action (bench/playbooks/capture.yml, one task, which passes"
        % format(SCALE_POINTS[-1], ","))
    add("    them to the rules module joined): first %s, no-op %s" % (fmt_s(b.med(k + ".first")),
                                                                      fmt_s(b.med(k + ".noop"))))
    add("")


def fleet_report(b: Bench, add):
    r = b.results
    sizes = fleet_sizes(b)
    if sizes:
        add("fleet: the capture role and the floor playbook (one ansible.builtin.ping per host) on the same N hosts,")
        add("forks %d: wall seconds, ratio to the floor, and CPU-seconds per host, controller + target (the module"
            % FLEET_FORKS)
        add("processes and what they run; the rest of the process tree is the controller's)")
        fmt = "%5s %2s %8s %8s %7s %7s %7s   %-11s %-11s %-11s"
        add(fmt % ("hosts", "n", "converge", "no-op", "floor", "conv/fl", "noop/fl", "CPU/h conv", "CPU/h no-op",
                   "CPU/h floor"))

        def per_host(size, what):
            cpu, target = b.med("fleet%d.%s.cpu" % (size, what)), b.med("fleet%d.%s.tcpu" % (size, what))
            return "%.2f+%.2f" % ((cpu - target) / size, target / size)

        for size in sizes:
            k = "fleet%d." % size
            conv, noop, ping = b.med(k + "first"), b.med(k + "noop"), b.med(k + "floor")
            add(fmt % (size, len(r[k + "first"]), fmt_s(conv), fmt_s(noop), fmt_s(ping), "%.2fx" % (conv / ping),
                       "%.2fx" % (noop / ping), per_host(size, "first"), per_host(size, "noop"),
                       per_host(size, "floor")))
        slopes = fleet_slopes(b)
        if slopes:
            lo, hi, per_host = slopes
            add("  each host beyond the first (%d -> %d hosts), CPU-seconds controller + target, and the controller's"
                % (lo, hi))
            add("  over the floor playbook's:")
            for what, text in (("first", "converge"), ("noop", "no-op"), ("floor", "floor"),
                               ("action_first", "action, converge"), ("action_noop", "action, no-op")):
                controller, target = per_host[what]
                if math.isnan(controller):
                    continue
                add("    %-16s %.2f + %.2f = %.2f   %.1fx" % (
                    text, controller, target, controller + target, controller / per_host["floor"][0]))
            add("  action: bench/playbooks/capture.yml on fresh hosts, the role's one task that does a host's work")
            add("  (the capture action, nothing persisted); the role's other tasks cost the controller the difference")
        ncpu = os.cpu_count() or 1
        add("  the fleet's 'hosts' are namespaces on this machine: targets and controller share its %d CPUs" % ncpu)
        add("")


def memory_report(b: Bench, add):
    r = b.results
    top = "scale%d" % SCALE_POINTS[-1]
    add("memory: peak RSS (VmHWM) of the module process at %s CIDRs + %s ports (%s rules): %.1f MiB first apply,"
        % (format(SCALE_POINTS[-1], ","), format(SCALE_PORTS, ","), format(b.info[top + ".rules"], ","),
           max(r[top + ".rss_first"]) / 1024))
    vm_rss = "" if "vm.rss_first" not in r else "; VM-style, %d rules: %.1f MiB" % (
        b.info["vm.rules"], max(r["vm.rss_first"]) / 1024)
    add("  %.1f MiB no-op%s; the largest of %d runs" % (
        max(r[top + ".rss_noop"]) / 1024, vm_rss, len(r[top + ".rss_first"])))
    add("")


def load_average():
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "n/a"


def write_json(path, bench, machine, goals):
    Path(path).write_text(json.dumps({"results": bench.results, "info": {
        k: v for k, v in bench.info.items() if k != "vm.saved"}, "machine": machine, "goals": goals}, indent=1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 runs per variant instead of 5 (CI-like)")
    parser.add_argument("--runs", type=int, help="runs per variant (default 5, or 3 with --quick)")
    parser.add_argument("--per-rule-runs", type=int,
                        help="runs of the per-rule baseline (default 2, or 1 with --quick: 60-100 s each)")
    parser.add_argument("--fleet-runs", type=int,
                        help="runs of the fleet (default 3, or 1 with --quick: 1 to 3 minutes each on 2 cores)")
    parser.add_argument("--skip-fleet", action="store_true", help="do not measure the role (its goal is then "
                                                                  "reported as not measured)")
    parser.add_argument("--fleet-sizes",
                        help="host counts of the fleet's scaling table (default %s, or %s with --quick; the goals "
                             "use the CPU per host from the smallest to the largest)"
                        % (",".join(map(str, FLEET_SIZES)), ",".join(map(str, QUICK_FLEET_SIZES))))
    parser.add_argument("--only", default=",".join(GROUPS),
                        help="measure only these variant groups (comma-separated, of %(default)s); goals of the "
                             "others are reported as not measured")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="the rules and scale variants for these backends, side by side (comma-separated, of "
                             "%%(default)s, and %s: nft_layout istio, Istio 1.27, no goals); the goals of a "
                             "backend left out are reported as not measured" % ", ".join(EXTRA_BACKENDS))
    parser.add_argument("--time-limit", type=int, default=1800, help="abort after this many seconds (default 1800)")
    parser.add_argument("--json", metavar="PATH", help="also write every measurement to PATH as JSON")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    args.runs = args.runs or (3 if args.quick else 5)
    args.per_rule_runs = min(args.runs, args.per_rule_runs or (1 if args.quick else 2))
    args.fleet_runs = min(args.runs, args.fleet_runs or (1 if args.quick else 3))
    if min(args.runs, args.per_rule_runs, args.fleet_runs) < 1:
        parser.error("run counts must be at least 1")
    if args.fleet_sizes is None:
        args.fleet_sizes = ",".join(map(str, QUICK_FLEET_SIZES if args.quick else FLEET_SIZES))
    try:
        args.fleet_sizes = sorted(set(int(n) for n in args.fleet_sizes.split(",")))
    except ValueError:
        parser.error("--fleet-sizes: comma-separated host counts, got %r" % args.fleet_sizes)
    if not args.fleet_sizes or args.fleet_sizes[0] < 1:
        parser.error("--fleet-sizes: host counts must be at least 1")
    args.only = set(word.strip() for word in args.only.split(",") if word.strip())
    if not args.only or args.only - set(GROUPS):
        parser.error("--only: comma-separated names of %s" % ", ".join(GROUPS))
    args.backends = [word.strip() for word in args.backends.split(",") if word.strip()]
    known = BACKENDS + EXTRA_BACKENDS
    if not args.backends or set(args.backends) - set(known) or len(set(args.backends)) < len(args.backends):
        parser.error("--backends: comma-separated names of %s" % ", ".join(known))
    reason = netns.unavailable_reason()
    if reason:
        print("bench: %s" % reason, file=sys.stderr)
        return 2
    bench = None
    try:
        machine = machine_info()
        load_before = load_average()
        bench = Bench(args)
        try:
            bench.run()
        except TimeLimit as exc:
            # Report what was measured; the exit status still says that the run is incomplete.
            bench.notes.append("%s: the run is incomplete, goals without figures are not measured" % exc)
            bench.info.setdefault("elapsed", args.time_limit)
            incomplete = True
        else:
            incomplete = False
        if args.json:  # every sample, before the report (goals added below)
            write_json(args.json, bench, machine, None)
        text, results = report(bench, machine, load_before, load_average())
    except (BenchError, subprocess.SubprocessError, OSError) as exc:
        print("bench: %s" % exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if bench is not None:
            bench.cleanup()
    print(text)
    if args.json:
        write_json(args.json, bench, machine, results)
    if incomplete:
        return 2
    return 0 if all(goal[2] == "PASS" for goal in results) else 1


if __name__ == "__main__":
    sys.exit(main())
