# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""The capture role's work on one host in one task (see plugins/modules/capture.py for the documentation).

Every task costs a worker process per host on the controller, and every
module run a Python process on the host. This action reads what it needs
with one shell command (cluster.env, routes.env, the state of the persisted
files, a digest of the routing state), computes what to do (the capture_plan
filter), and runs only the modules that have something to do: rules; routes
when policy routing is wanted or must be removed and the routing record does
not show it in place; persist unless the persisted files are already what it
would write. Check mode and diff pass through to the modules; the result is
the rules module's, with the plan and the other modules' results beside it.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import json
import os
import posixpath

from ansible.errors import AnsibleActionFail, AnsibleError
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.module_utils.six import string_types
from ansible.module_utils.six.moves import shlex_quote
from ansible.plugins.action import ActionBase
from ansible_collections.meshcapture.sidecar.plugins.filter.capture_plan import (
    capture_plan,
    read_script,
    read_sections,
)

RULES = "meshcapture.sidecar.rules"
ROUTES = "meshcapture.sidecar.routes"
PERSIST = "meshcapture.sidecar.persist"

ROUTES_ENV = "routes.env"
# What meshcapture.sidecar.persist looks at to tell whether systemd runs.
SYSTEMD_BOOTED_PATH = "/run/systemd/system"
FINGERPRINT_SECTION = "persisted"
# stat's %F for a regular file (GNU coreutils says "regular empty file" when it is empty).
REGULAR = ("regular file", "regular empty file")
ROUTING_SECTION = "routing"
# The rules module's default state_dir (tmpfs: gone after a reboot), where the
# routing record is kept.
DEFAULT_STATE_DIR = "/run/meshcapture"
# What the routes module reads to plan (policy rules, the routes, link state
# and addresses of lo, whether IPv6 is usable on lo), hashed on the host; '-'
# when the IPv4 part cannot be read (no ip command, say), which never matches
# a record. The IPv6 part may fail (no IPv6): its messages are hashed too.
ROUTING_DIGEST = (
    "if out=$(ip -d -4 rule show && ip -d -4 route show table all dev lo && ip link show dev lo); then"
    " out6=$(ip -d -6 rule show 2>&1; ip -d -6 route show table all dev lo 2>&1; ip -6 addr show dev lo 2>&1;"
    " cat /proc/sys/net/ipv6/conf/lo/disable_ipv6 2>&1);"
    " printf '%s\\n%s\\n' \"$out\" \"$out6\" | sha256sum | cut -c1-64; else echo -; fi")
# The module_utils the routes module plans with (part of the record's key).
ROUTES_UTILS = ("capture_routes.py", "capture_config.py")
NETNS_ID = "ns=$(readlink /proc/self/ns/net | tr -cd 0-9)"
# Where the restore payloads go in the persist directory.
RESTORE_FILES = (("ipv4", "rules.v4"), ("ipv6", "rules.v6"))
# With backend=nftables also the nft payload (what the restore script runs
# with nft -f).
NFT_RESTORE_FILE = ("nft", "rules.nft")

# Linux tracks the connections of a network namespace only once a rule there
# uses conntrack. On a host where nothing did, the capture's rules would
# switch tracking on in the middle of the SSH session Ansible holds: the
# kernel would pick the session up from sshd's next packet as a NEW outbound
# connection and ISTIO_OUTPUT would redirect it to the proxy port, resetting
# the session. So before the rules change anything, the read also loads a
# table whose only rule reads the conntrack state (it filters nothing): the
# packets that carry the read's output back are then tracked as the session
# they belong to. Once the rules module ran, the capture's own tables keep
# conntrack on and the primer table goes.
# The primer is loaded only when there is a session to protect and it is not
# tracked yet: not for connections without a network session into the host
# (local, the netns plugin), and not when conntrack already has an entry
# for the SSH session (found by SSH_CONNECTION, of the read's shell or of
# the nearest ancestor that has it, as under sudo, in /proc/net/nf_conntrack).
# So a re-run over SSH, whose session the capture's rules track, writes
# nothing to the kernel. The read reports 'primed' when it loaded it.
PRIMER_TABLE = "meshcapture-conntrack-primer"
PRIMER_SECTION = "primer"
NO_SESSION_TRANSPORTS = ("local", "meshcapture.sidecar.netns")
PRIMER_SCRIPT = """printf '#meshcapture-file %s\\n'
mcs_tracked() {
  c=${SSH_CONNECTION:-} p=$$
  while [ -z "$c" ] && [ "$p" -gt 1 ] 2>/dev/null; do
    p=$(sed -n 's/^PPid:[[:space:]]*//p' /proc/"$p"/status 2>/dev/null) && [ -n "$p" ] || return 1
    c=$(tr '\\0' '\\n' < /proc/"$p"/environ 2>/dev/null | sed -n 's/^SSH_CONNECTION=//p')
  done
  set -- $c
  [ $# -eq 4 ] && grep -qs -e "sport=$2 dport=$4 " -e "sport=$4 dport=$2 " /proc/net/nf_conntrack
}
if command -v nft >/dev/null 2>&1 && ! mcs_tracked && nft -f - <<'EOF' >/dev/null 2>&1
table inet %s {
\tchain output {
\t\ttype filter hook output priority 0; policy accept;
\t\tct state established
\t}
}
EOF
then echo primed; else echo -; fi""" % (PRIMER_SECTION, PRIMER_TABLE)
PRIMER_REMOVE = "nft delete table inet %s >/dev/null 2>&1; true" % PRIMER_TABLE

# Only the big lists are passed joined (the module's list type splits them
# again); an item with a comma in it is passed as a list, so that the
# module rejects it by its own value. The rules module returns its options
# joined too (compact_result): the controller then handles two strings
# instead of every item of two more copies of the lists.
JOINABLE_OPTIONS = ("outbound_ip_ranges_exclude", "outbound_ip_ranges_include", "outbound_ports_exclude",
                    "outbound_ports_include", "inbound_ports_exclude", "inbound_ports_include")
FILE_SPEC = dict(content=dict(type="str"), mode=dict(type="raw", default="0644"))
ARGUMENT_SPEC = dict(
    state=dict(type="str", default="present", choices=["present", "absent"]),
    options=dict(type="dict", default={}),
    cluster_env=dict(type="str"),
    connection_guard=dict(type="bool", default=True),
    port=dict(type="int", default=22),
    persist_dir=dict(type="str", required=True),
    persist=dict(type="bool", default=True),
    persist_files=dict(type="list", elements="dict", default=[],
                       options=dict(name=dict(type="str", required=True), **FILE_SPEC)),
    persist_extra_files=dict(type="list", elements="dict", default=[],
                             options=dict(path=dict(type="str", required=True), **FILE_SPEC)),
    persist_owner=dict(type="str", default="root"),
    persist_group=dict(type="str", default="root"),
    plan_only=dict(type="bool", default=False),
)

GUARD_REFUSED = (
    "{source} includes port {port} in the inbound capture, and Ansible is connected to this host on that port "
    "(ansible_port): capturing it would cut off this connection and every later one. Remove port {port} from "
    "{source}, or set capture_connection_guard to false if the connection does not go through that port.")


def restore_files(options):
    """[(key of the rules result's restore, file name)] the action persists for these rules options."""
    files = list(RESTORE_FILES)
    if options.get("backend") == "nftables":
        files.append(NFT_RESTORE_FILE)
    return files


def routes_env(backend, routes):
    """The routes.env the restore script reads at boot, and the next run reads as the routing set up earlier."""
    return "".join((
        "# Managed by Ansible (meshcapture.sidecar.capture): the settings that\n",
        "# meshcapture-restore.sh restores at boot.\n",
        "MESHCAPTURE_IPTABLES_BACKEND=%s\n" % backend,
        "MESHCAPTURE_TPROXY_ROUTES=%s\n" % ("true" if routes["tproxy"] else "false"),
        "MESHCAPTURE_TPROXY_MARK=%d\n" % routes["mark"],
        "MESHCAPTURE_TPROXY_ROUTE_TABLE=%d\n" % routes["table"],
        "MESHCAPTURE_INBOUND_IPV6=%s\n" % ("true" if routes["ipv6"] else "false"),
    ))


def routes_args(state, routes, ipv6=None):
    """meshcapture.sidecar.routes arguments for a routes dict of the plan."""
    return dict(state=state, inbound_tproxy_mark=routes["mark"], inbound_tproxy_route_table=routes["table"],
                manage_tproxy_routes=routes["tproxy"], enable_inbound_ipv6=routes["ipv6"],
                ipv6=routes["ipv6"] if ipv6 is None else ipv6)


def compact_lists(args):
    """The rules arguments with the long port and CIDR lists joined by commas (cheaper to pass and check)."""
    out = dict(args)
    for name in JOINABLE_OPTIONS:
        value = out.get(name)
        if isinstance(value, (list, tuple)) and len(value) > 1 and all(
                isinstance(item, string_types) and "," not in item for item in value):
            out[name] = ",".join(value)
    return out


def fingerprint_script(paths):
    """One line per path (type|mode|owner|group|sha256, or '-'), then systemd=0/1."""
    lines = ["printf '#meshcapture-file %s\\n'" % FINGERPRINT_SECTION,
             "for f in %s; do" % " ".join(shlex_quote(path) for path in paths),
             "  if s=$(LC_ALL=C stat -c '%F|%a|%U|%G' -- \"$f\" 2>/dev/null) && h=$(sha256sum < \"$f\" 2>/dev/null);"
             " then printf '%s|%s\\n' \"$s\" \"${h%% *}\"; else echo -; fi",
             "done",
             "if [ -d %s ]; then echo systemd=1; else echo systemd=0; fi" % SYSTEMD_BOOTED_PATH]
    return "\n".join(lines)


def routing_script(state_dir):
    """The digest of the routing state now, then the record of the last routes run here ('-': none)."""
    record = shlex_quote(state_dir.rstrip("/") + "/routes-") + '"$ns".digest'
    return "\n".join(["printf '#meshcapture-file %s\\n'" % ROUTING_SECTION, NETNS_ID, ROUTING_DIGEST,
                      "cat -- %s 2>/dev/null || echo -" % record])


def record_script(state_dir, key):
    """Keep '<key> <digest of the routing state now>' as the record of a routes run that left nothing to do."""
    record = shlex_quote(state_dir.rstrip("/") + "/routes-") + '"$ns".digest'
    return "\n".join([
        "umask 077", NETNS_ID, "d=$(%s) && [ \"$d\" != - ] && mkdir -p -- %s &&" % (ROUTING_DIGEST, shlex_quote(state_dir)),
        "printf '%%s %%s\\n' %s \"$d\" > %s.tmp && mv -f -- %s.tmp %s" % (shlex_quote(key), record, record, record)])


def public_plan(plan):
    """The plan as the action returns it: without the options (the rules result has them as config), which at
    10,000 CIDRs would add two more copies of the lists to every result the controller handles."""
    return dict((key, value) for key, value in plan.items() if key not in ("options", "rules_args"))


def parse_mode(value):
    """An octal mode as persist accepts it, or None (then persist runs and judges it)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = to_text(value).strip()
    if not text or len(text) > 5 or any(char not in "01234567" for char in text):
        return None
    return int(text, 8)


def unchanged(files, owner, group, fingerprint):
    """Whether every file is a regular file with this content, mode, owner and group (as persist would leave it)."""
    if fingerprint is None or len(fingerprint) != len(files):
        return False
    for (path, content, mode), line in zip(files, fingerprint):
        fields = line.split("|")
        wanted_mode = parse_mode(mode)
        if len(fields) != 5 or wanted_mode is None:
            return False
        kind, have_mode, have_owner, have_group, digest = fields
        try:
            same_mode = int(have_mode, 8) == wanted_mode
        except ValueError:
            return False
        if (kind not in REGULAR or not same_mode or have_owner != owner or have_group != group
                or digest != hashlib.sha256(to_bytes(content, errors="surrogate_or_strict")).hexdigest()):
            return False
    return True


class ActionModule(ActionBase):
    """Read, plan, guard, then rules, routes and persist as needed."""

    TRANSFERS_FILES = False
    _supports_check_mode = True
    _supports_async = False

    def run(self, tmp=None, task_vars=None):
        super(ActionModule, self).run(tmp, task_vars)
        del tmp
        task_vars = task_vars or {}
        dummy, args = self.validate_argument_spec(ARGUMENT_SPEC)
        try:
            return self._run(args, task_vars)
        finally:
            self._remove_tmp_path(self._connection._shell.tmpdir)

    # -- steps -------------------------------------------------------------
    def _read(self, args, files, state_dir, prime=False):
        """cluster.env, routes.env, the fingerprint of files and, with state_dir, the routing state and
        record, with one shell command; with prime, the conntrack primer is loaded too (PRIMER_SCRIPT)."""
        script = read_script(args["cluster_env"], args["persist_dir"].rstrip("/") + "/" + ROUTES_ENV)
        if files:
            script += "\n" + fingerprint_script([path for path, dummy, dummy in files])
        if state_dir:
            script += "\n" + routing_script(state_dir)
        if prime:
            script += "\n" + PRIMER_SCRIPT
        res = self._low_level_execute_command(script, executable="/bin/sh")
        if res.get("rc") != 0:
            raise AnsibleActionFail("could not read %s and %s/%s on the host (rc=%s): %s" % (
                args["cluster_env"] or "(no capture_cluster_env)", args["persist_dir"], ROUTES_ENV, res.get("rc"),
                to_text(res.get("stderr") or res.get("stdout")).strip()))
        return res

    def _module(self, name, module_args, task_vars):
        return self._execute_module(module_name=name, module_args=module_args, task_vars=task_vars)

    def _run(self, args, task_vars):
        state = args["state"]
        options = dict((key, value) for key, value in (args["options"] or {}).items() if value is not None)
        applying = state == "present" and not args["plan_only"]
        files = self._files(args, options) if applying and args["persist"] else []
        state_dir = options.get("state_dir") or DEFAULT_STATE_DIR
        prime = applying and not self._task.check_mode and \
            getattr(self._connection, "transport", None) not in NO_SESSION_TRANSPORTS
        res = self._read(args, files, state_dir if applying else None, prime=prime)
        sections = read_sections(res)
        primed = prime and sections.get(PRIMER_SECTION) == "primed\n"
        try:
            return self._plan_and_apply(args, task_vars, options, files, state_dir, res, sections)
        finally:
            if primed:
                self._low_level_execute_command(PRIMER_REMOVE, executable="/bin/sh")

    def _plan_and_apply(self, args, task_vars, options, files, state_dir, res, sections):
        state = args["state"]
        try:
            plan = capture_plan(list(options), list(options.values()), read=res, cluster_env_path=args["cluster_env"],
                                state=state, connection_guard=args["connection_guard"], port=args["port"])
        except AnsibleError as err:
            raise AnsibleActionFail(to_text(getattr(err, "message", None) or err))
        if plan["guard"]["refuse"]:
            explicit = (args["options"] or {}).get("inbound_ports_include") is not None
            source = "capture_inbound_ports_include" if explicit else "ISTIO_INBOUND_PORTS in %s" % args["cluster_env"]
            return dict(failed=True, changed=False, plan=public_plan(plan),
                        msg=GUARD_REFUSED.format(source=source, port=plan["guard"]["port"]))
        if args["plan_only"]:
            return dict(changed=False, plan=public_plan(plan))
        if state == "present":
            return self._present(args, task_vars, plan, files, sections.get(FINGERPRINT_SECTION),
                                 state_dir, sections.get(ROUTING_SECTION))
        return self._absent(args, task_vars, plan)

    def _present(self, args, task_vars, plan, files, fingerprint, state_dir, routing):
        report = Report(plan)
        rules = self._module(RULES, dict(compact_lists(plan["rules_args"]), state="present", compact_result=True),
                             task_vars)
        if not report.add_main(rules):
            return report.result
        wanted, previous = plan["routes_wanted"], plan["routes_previous"]
        recorded = False
        if previous is not None and previous != wanted and (previous["tproxy"] or previous["ipv6"]):
            removed = self._module(ROUTES, routes_args("absent", previous), task_vars)
            if not report.add("routes_removed", removed, "routes (removing the routing of an earlier run)"):
                return report.result
        elif previous is None or previous == wanted:
            # No other routing to remove, the routes module left nothing to do
            # the last time, and the routing state has not changed since: it
            # would find nothing to do.
            key = self._routing_key(wanted)
            lines = (routing or "").splitlines()
            recorded = len(lines) == 2 and lines[0] != "-" and lines[1] == "%s %s" % (key, lines[0])
        if (wanted["tproxy"] or wanted["ipv6"]) and recorded:
            report.result["routes"] = dict(changed=False, skipped_module=True, added=[], removed=[])
        elif wanted["tproxy"] or wanted["ipv6"]:
            module_args = routes_args("present", wanted)
            routes = self._module(ROUTES, module_args, task_vars)
            warned = bool(routes.get("warnings"))
            if not report.add("routes", routes, "routes"):
                return report.result
            if not self._task.check_mode and not warned:
                self._low_level_execute_command(record_script(state_dir, self._routing_key(wanted)),
                                                executable="/bin/sh")
        if args["persist"]:
            self._persist(args, task_vars, report, files, fingerprint, rules)
        return report.result

    def _routing_key(self, wanted):
        """What the record is valid for: the routes arguments and the routes module's code."""
        digest = hashlib.sha256(json.dumps(routes_args("present", wanted), sort_keys=True).encode("utf-8"))
        digest.update(self._routes_source())
        return digest.hexdigest()

    def _routes_source(self):
        """The sources of the routes module and of the module_utils it plans with."""
        context = self._shared_loader_obj.module_loader.find_plugin_with_context(ROUTES)
        path = context.plugin_resolved_path if context.resolved else None
        if not path:
            raise AnsibleActionFail("cannot find the module %s" % ROUTES)
        utils = os.path.join(os.path.dirname(os.path.dirname(path)), "module_utils")
        data = b""
        for name in [path] + [os.path.join(utils, name) for name in ROUTES_UTILS]:
            with open(name, "rb") as source:
                data += source.read()
        return data

    def _absent(self, args, task_vars, plan):
        report = Report(plan)
        rules_args = dict((key, plan["rules_args"][key]) for key in ("backend", "state_dir") if key in plan["rules_args"])
        rules = self._module(RULES, dict(rules_args, state="absent", compact_result=True), task_vars)
        if not report.add_main(rules):
            return report.result
        items = [dict(plan["routes_wanted"], tproxy=True)]
        if plan["routes_previous"] is not None and plan["routes_previous"] not in items:
            items.append(plan["routes_previous"])
        report.result["routes_removed"] = []
        for item in items:
            removed = self._module(ROUTES, routes_args("absent", item, ipv6=True), task_vars)
            report.result["routes_removed"].append(removed)
            if not report.add(None, removed, "routes"):
                return report.result
        return report.result

    @staticmethod
    def _files(args, options):
        """[(path, content, mode)] of the persisted files: the restore payloads and routes.env (content None
        until the rules ran), then persist_files, then persist_extra_files."""
        base = args["persist_dir"].rstrip("/") or "/"
        names = [name for dummy, name in restore_files(options)] + [ROUTES_ENV]
        files = [(base + "/" + name, None, "0644") for name in names]
        files += [(base + "/" + item["name"], item["content"], item["mode"]) for item in args["persist_files"]]
        files += [(item["path"], item["content"], item["mode"]) for item in args["persist_extra_files"]]
        return files

    def _persist(self, args, task_vars, report, files, fingerprint, rules):
        """Run persist, unless the fingerprint taken by the read shows every file as it would write it."""
        restore = rules.get("restore") or {}
        generated = [restore.get(key, "") for key, dummy in restore_files(report.plan["rules_args"])]
        generated.append(routes_env(rules.get("backend"), report.plan["routes_wanted"]))
        files = [(path, content, mode) for (path, dummy, mode), content in zip(files, generated)] \
            + files[len(generated):]
        owner, group = args["persist_owner"], args["persist_group"]
        lines = (fingerprint or "").splitlines()
        base = args["persist_dir"].rstrip("/") or "/"
        if lines and unchanged(files, owner, group, lines[:-1]):
            report.result["persisted"] = dict(
                changed=False, path=posixpath.normpath(base), written=[], removed=[],
                existing=[posixpath.normpath(path) for path, dummy, dummy in files],
                systemd_running=lines[-1] == "systemd=1")
            return
        n_extra = len(args["persist_extra_files"])
        persisted = self._module(PERSIST, dict(
            state="present", path=base, owner=owner, group=group,
            files=[dict(name=path[len(base):].lstrip("/"), content=content, mode=mode)
                   for path, content, mode in files[:len(files) - n_extra]],
            extra_files=[dict(path=path, content=content, mode=mode)
                         for path, content, mode in files[len(files) - n_extra:]]), task_vars)
        report.add("persisted", persisted, "persist")


class Report(object):
    """The combined result: the rules result at the top, the others beside it."""

    def __init__(self, plan):
        self.plan = plan
        self.result = dict(changed=False, plan=public_plan(plan))
        self.diffs = []

    def _collect(self, sub):
        for key in ("warnings", "deprecations"):
            if sub.get(key):
                self.result.setdefault(key, []).extend(sub.pop(key))
        if sub.get("diff"):
            diff = sub.pop("diff")
            self.diffs.extend(diff if isinstance(diff, list) else [diff])
            self.result["diff"] = self.diffs
        if sub.get("changed"):
            self.result["changed"] = True

    def add_main(self, sub):
        """The rules result goes to the top level."""
        sub.pop("invocation", None)
        self._collect(sub)
        for key, value in sub.items():
            if key != "changed":
                self.result[key] = value
        if sub.get("failed"):
            self.result["failed"] = True
            return False
        return True

    def add(self, key, sub, label):
        sub.pop("invocation", None)
        self._collect(sub)
        if key:
            self.result[key] = sub
        if sub.get("failed"):
            self.result.update(failed=True, msg="%s: %s" % (label, sub.get("msg", "failed")))
            return False
        return True
