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
import re

from ansible import constants as C
from ansible.errors import AnsibleActionFail, AnsibleError
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.module_utils.six import string_types
from ansible.module_utils.six.moves import shlex_quote
from ansible.plugins.action import ActionBase
from ansible_collections.meshcapture.sidecar.plugins.filter.cluster_env import cluster_env
from ansible_collections.meshcapture.sidecar.plugins.module_utils import capture_releases
from ansible_collections.meshcapture.sidecar.plugins.plugin_utils.capture_plan import (
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
# The SSH_CONNECTION of the read's shell or of its nearest ancestor that has
# it (sudo drops it from the environment); empty when there is none.
SESSION_FUNCTION = """mcs_conn() {
  c=${SSH_CONNECTION:-} p=$$
  while [ -z "$c" ] && [ "$p" -gt 1 ] 2>/dev/null; do
    p=$(sed -n 's/^PPid:[[:space:]]*//p' /proc/"$p"/status 2>/dev/null) && [ -n "$p" ] || { c=; break; }
    c=$(tr '\\0' '\\n' < /proc/"$p"/environ 2>/dev/null | sed -n 's/^SSH_CONNECTION=//p')
  done
  printf '%s\\n' "$c"
}"""
PRIMER_SCRIPT = SESSION_FUNCTION + """
printf '#meshcapture-file %s\\n'
mcs_tracked() {
  set -- $(mcs_conn)
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

# The SSH session the read runs in, for the connection guard: its
# SSH_CONNECTION ('client port server port': the 4th field is the port sshd
# accepted this session on, whatever ssh_config or ansible_port say), or '-'.
SESSION_SECTION = "session"
SESSION_SCRIPT = SESSION_FUNCTION + """
printf '#meshcapture-file %s\\n'
c=$(mcs_conn); printf '%%s\\n' "${c:--}\"""" % SESSION_SECTION

# What else the first command reads about the host, one 'key=value' a line:
# systemd (and the state of the restore unit and of systemd-networkd), the
# networkd drop-in directory, the OS and the missing dependencies, the
# installed Istio version.
HOST_SECTION = "host"
ENABLED_STATES = ("enabled",)
# systemd-networkd is in use: its unit is enabled (also through an alias or
# a static dependency) or active.
NETWORKD_ENABLED_STATES = ("enabled", "enabled-runtime", "static", "alias", "indirect", "linked")
NETWORKD_UNIT = "systemd-networkd.service"
NETWORKD_DROPIN_NAME = "meshcapture-capture.conf"
NETWORKD_DROPIN = """\
# Managed by Ansible (meshcapture.sidecar.capture).
# systemd-networkd removes the policy routing rules it did not add itself
# (ManageForeignRoutingPolicyRules=yes) when it configures a link: at boot and
# on every restart. The TPROXY capture needs its rules (ip rule fwmark %d
# lookup %d), added by meshcapture-capture.service and the routes module, so
# networkd leaves rules it did not add alone. Read at networkd's next start.
[Network]
ManageForeignRoutingPolicyRules=no
"""
# When nothing says which Istio runs on the host: the rules of Istio 1.17.
ISTIO_FALLBACK = "1.17"
ISTIO_SOURCES = ("dpkg", "rpm", "agent")
ISTIO_SOURCE_TEXT = {"dpkg": "the istio-sidecar package (dpkg)", "rpm": "the istio-sidecar package (rpm)",
                     "agent": "pilot-agent version"}
ISTIO_UNSUPPORTED = (
    "capture_istio_version: auto found Istio %s on the host (%s), whose capture rules this collection does not "
    "have (supported: %s); set capture_istio_version to the release whose rules to apply")
# The commands each backend needs, besides nft, unshare and ip.
BACKEND_COMMANDS = {
    "nftables": (),
    "iptables-legacy": ("iptables-legacy-save", "iptables-legacy-restore", "ip6tables-legacy-save",
                        "ip6tables-legacy-restore"),
}
DEFAULT_COMMANDS = ("iptables-nft-save", "iptables-nft-restore", "ip6tables-nft-save", "ip6tables-nft-restore")
OS_FAMILIES = (("Debian", ("debian", "ubuntu")),
               ("RedHat", ("rhel", "fedora", "centos", "rocky", "almalinux", "ol", "amzn")))


def required_commands(backend):
    """The commands the modules and the boot-time restore need with this backend."""
    return list(BACKEND_COMMANDS.get(backend, DEFAULT_COMMANDS)) + ["nft", "unshare", "ip"]


def host_script(unit=None, networkd_dir=None, python=None, python_candidates=(), commands=None, istio=False):
    """The host section of the read: what the action needs to know besides the files (see HOST_SECTION)."""
    lines = ["printf '#meshcapture-file %s\\n'" % HOST_SECTION,
             "if [ -d %s ]; then" % SYSTEMD_BOOTED_PATH, "  echo systemd=1"]
    for key, name in (("unit", unit), ("networkd", NETWORKD_UNIT if networkd_dir else None)):
        if name:
            quoted = shlex_quote(name)
            lines.append("  echo \"%s=$(systemctl is-enabled %s 2>/dev/null | head -n 1)/"
                         "$(systemctl is-active %s 2>/dev/null | head -n 1)\"" % (key, quoted, quoted))
    lines += ["else echo systemd=0; fi"]
    if networkd_dir:
        lines.append("if [ -d %s ]; then echo networkd_dir=1; else echo networkd_dir=0; fi"
                     % shlex_quote(networkd_dir))
    if commands is not None:
        lines += [
            "(. /etc/os-release 2>/dev/null; echo \"os=${ID:-} ${ID_LIKE:-}\")",
            "py=%s" % shlex_quote(python or ""),
            "[ -n \"$py\" ] || for c in %s; do py=$(command -v \"$c\" 2>/dev/null) && break; done"
            % " ".join(shlex_quote(c) for c in python_candidates),
            "echo \"python=${py:--}\"",
            "m=$(PATH=\"$PATH:/sbin:/usr/sbin:/usr/local/sbin\"; for c in %s; do"
            " command -v \"$c\" >/dev/null 2>&1 || printf ' %%s' \"$c\"; done)" % " ".join(
                shlex_quote(c) for c in commands),
            # unquoted: an interpreter such as '/usr/bin/env python3'
            "if [ -z \"$py\" ] || ! $py -c 'import importlib.util, sys; "
            "sys.exit(importlib.util.find_spec(\"pyroute2\") is None)' 2>/dev/null; then m=\"pyroute2$m\"; fi",
            "echo \"missing=$m\""]
    if istio:
        lines += [
            "if v=$(dpkg-query -W -f '${db:Status-Abbrev}|${Version}' istio-sidecar 2>/dev/null) && [ -n \"$v\" ];"
            " then echo \"istio_dpkg=$v\"",
            "elif v=$(rpm -q --qf '%{VERSION}' istio-sidecar 2>/dev/null) && [ -n \"$v\" ]; then echo \"istio_rpm=$v\"",
            "elif v=$(PATH=\"$PATH:/usr/local/bin\" pilot-agent version 2>/dev/null | head -n 1) && [ -n \"$v\" ];"
            " then echo \"istio_agent=$v\"",
            "fi"]
    lines.append("true")
    return "\n".join(lines)


def parse_host(text):
    """{key: value} of the host section (the last value of a key wins)."""
    out = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def os_family(text):
    """The Ansible OS family of /etc/os-release's 'ID ID_LIKE' (Debian, RedHat), else the ID, or None."""
    ids = (text or "").split()
    for family, members in OS_FAMILIES:
        if any(item in members for item in ids):
            return family
    return ids[0] if ids else None


_VERSION = re.compile(r"(\d+)\.(\d+)")


def istio_version(source, text):
    """'X.Y' from what a source printed, or None: dpkg ('ii |1.26.2' or '1:1.26.2-1' after the status), rpm
    ('1.26.2'), agent (pilot-agent version: 'client version: 1.26.2' with --short, otherwise
    'client version: version.BuildInfo{Version:"1.26.2", ...}')."""
    text = (text or "").strip()
    if source == "dpkg":
        status, sep, text = text.rpartition("|")
        if sep and status[1:2] != "i":  # not installed (removed, configuration files left)
            return None
        text = text.split(":", 1)[1] if re.match(r"^\d+:", text) else text
        match = _VERSION.match(text)
    elif source == "rpm":
        match = _VERSION.match(text)
    elif source == "agent":
        match = re.search(r'Version:"(\d+)\.(\d+)', text) or re.search(r"version:\s*v?(\d+)\.(\d+)", text)
    else:
        match = None
    return "%d.%d" % (int(match.group(1)), int(match.group(2))) if match else None


def detected_istio_version(host):
    """(version, source) from the host section: the first source that names a version; the fallback otherwise."""
    for source in ISTIO_SOURCES:
        version = istio_version(source, host.get("istio_" + source))
        if version:
            return version, source
    return ISTIO_FALLBACK, None


def session_port(text):
    """The server port of an SSH_CONNECTION value ('client port server port'), or None."""
    fields = (text or "").split()
    if len(fields) == 4 and fields[3].isdigit() and 0 < int(fields[3]) < 65536:
        return int(fields[3])
    return None


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
    port=dict(type="int"),
    persist_dir=dict(type="str", required=True),
    persist=dict(type="bool", default=True),
    persist_files=dict(type="list", elements="dict", default=[],
                       options=dict(name=dict(type="str", required=True), **FILE_SPEC)),
    persist_extra_files=dict(type="list", elements="dict", default=[],
                             options=dict(path=dict(type="str", required=True), **FILE_SPEC)),
    persist_owner=dict(type="str", default="root"),
    persist_group=dict(type="str", default="root"),
    systemd_unit=dict(type="str"),
    systemd_enable=dict(type="bool", default=True),
    networkd_conf_dir=dict(type="str"),
    istio_version=dict(type="str"),
    install_dependencies=dict(type="bool", default=False),
    plan_only=dict(type="bool", default=False),
)

GUARD_REFUSED = (
    "{source} includes port {port} in the inbound capture, and Ansible is connected to this host on that port "
    "({where}): capturing it would cut off this connection and every later one. Remove port {port} from "
    "{source}, or set capture_connection_guard to false if the connection does not go through that port.")
# Where a guarded port comes from, as the messages say it.
FROM_SESSION = "the port of its SSH session, SSH_CONNECTION"
FROM_PORT = "ansible_port"


def restore_files(options):
    """[(key of the rules result's restore, file name)] the action persists for these rules options."""
    files = list(RESTORE_FILES)
    if options.get("backend") == "nftables":
        files.append(NFT_RESTORE_FILE)
    return files


def routes_env(backend, routes, networkd=None):
    """The routes.env the restore script reads at boot, and the next run reads as the routing set up earlier;
    networkd: (path of the networkd drop-in the role wrote, whether it created its directory)."""
    text = "".join((
        "# Managed by Ansible (meshcapture.sidecar.capture): the settings that\n",
        "# meshcapture-restore.sh restores at boot.\n",
        "MESHCAPTURE_IPTABLES_BACKEND=%s\n" % backend,
        "MESHCAPTURE_TPROXY_ROUTES=%s\n" % ("true" if routes["tproxy"] else "false"),
        "MESHCAPTURE_TPROXY_MARK=%d\n" % routes["mark"],
        "MESHCAPTURE_TPROXY_ROUTE_TABLE=%d\n" % routes["table"],
        "MESHCAPTURE_INBOUND_IPV6=%s\n" % ("true" if routes["ipv6"] else "false"),
    ))
    if networkd:
        text += "MESHCAPTURE_NETWORKD_DROPIN=%s\nMESHCAPTURE_NETWORKD_DROPIN_DIR_CREATED=%s\n" % (
            shlex_quote(networkd[0]), "true" if networkd[1] else "false")
    return text


def networkd_recorded(routes_env_text):
    """(drop-in path, whether the role created its directory) that routes.env records, or None."""
    if not routes_env_text:
        return None
    try:
        values = cluster_env(routes_env_text, raw=True)
    except AnsibleError:
        return None
    path = values.get("MESHCAPTURE_NETWORKD_DROPIN")
    if not path:
        return None
    return path, values.get("MESHCAPTURE_NETWORKD_DROPIN_DIR_CREATED") == "true"


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
    """One line per path (type|mode|owner|group|sha256, or '-'), then systemd=0/1.

    One stat and one sha256sum for all the paths (not two processes per path), joined by path in awk: the
    paths first (P lines), then stat's (S lines, the name last), then sha256sum's. A path sha256sum
    escapes (a backslash or newline in it) has no hash, so it is '-', which makes persist run."""
    quoted = " ".join(shlex_quote(path) for path in paths)
    awk = ("awk '/^P/ {n++; p[n] = substr($0, 2); next}"
           " /^S/ {i = index($0, \"|\"); i += index(substr($0, i + 1), \"|\");"
           " i += index(substr($0, i + 1), \"|\"); i += index(substr($0, i + 1), \"|\");"
           " s[substr($0, i + 1)] = substr($0, 2, i - 2); next}"
           " /^[0-9a-f]+  / {h[substr($0, 67)] = substr($0, 1, 64)}"
           " END {for (k = 1; k <= n; k++) if ((p[k] in s) && (p[k] in h)) print s[p[k]] \"|\" h[p[k]];"
           " else print \"-\"}'")
    lines = ["printf '#meshcapture-file %s\\n'" % FINGERPRINT_SECTION,
             "fp() { printf 'P%s\\n' \"$@\"; LC_ALL=C stat -c 'S%F|%a|%U|%G|%n' -- \"$@\"; sha256sum -- \"$@\"; }",
             "fp %s 2>/dev/null | %s" % (quoted, awk),
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
    """Read, plan, guard, then rules, routes, persist and the restore unit as needed."""

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
    def _network_session(self):
        """Whether the connection is a network session into the host (not local, not the netns plugin)."""
        return getattr(self._connection, "transport", None) not in NO_SESSION_TRANSPORTS

    def _read(self, args, files, state_dir, prime=False, host=None):
        """cluster.env, routes.env, the fingerprint of files and, with state_dir, the routing state and
        record, with one shell command; with prime, the conntrack primer is loaded too (PRIMER_SCRIPT); with
        host, the host section (host_script's arguments); the SSH session of a network connection."""
        script = read_script(args["cluster_env"], args["persist_dir"].rstrip("/") + "/" + ROUTES_ENV)
        if files:
            script += "\n" + fingerprint_script([path for path, dummy, dummy in files])
        if state_dir:
            script += "\n" + routing_script(state_dir)
        if host is not None:
            script += "\n" + host_script(**host)
        if self._network_session():
            script += "\n" + SESSION_SCRIPT
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

    def _host_args(self, args, options, task_vars):
        """host_script's arguments for this run."""
        host = dict(istio=args["istio_version"] == "auto")
        if args["persist"]:
            host.update(unit=args["systemd_unit"] if args["systemd_enable"] else None,
                        networkd_dir=args["networkd_conf_dir"])
        if args["install_dependencies"]:
            python = self._templar.template(task_vars.get("ansible_python_interpreter") or "")
            if not python or to_text(python).startswith("auto"):
                python = (task_vars.get("ansible_facts") or {}).get("discovered_interpreter_python") or ""
            try:
                candidates = C.config.get_config_value("INTERPRETER_PYTHON_FALLBACK", variables=task_vars)
            except Exception:  # pylint: disable=broad-except
                candidates = ["/usr/bin/python3", "python3"]
            host.update(python=to_text(python), python_candidates=list(candidates),
                        commands=required_commands(options.get("backend")))
        return host

    def _run(self, args, task_vars):
        state = args["state"]
        options = dict((key, value) for key, value in (args["options"] or {}).items() if value is not None)
        applying = state == "present" and not args["plan_only"]
        networkd_dir = args["networkd_conf_dir"]
        if networkd_dir:
            args["networkd_conf_dir"] = networkd_dir.rstrip("/") or "/"
        files = self._files(args, options) if applying and args["persist"] else []
        state_dir = options.get("state_dir") or DEFAULT_STATE_DIR
        prime = applying and not self._task.check_mode and self._network_session()
        host = self._host_args(args, options, task_vars) if state == "present" else None
        res = self._read(args, files, state_dir if applying else None, prime=prime, host=host)
        sections = read_sections(res)
        primed = prime and sections.get(PRIMER_SECTION) == "primed\n"
        try:
            return self._plan_and_apply(args, task_vars, options, files, state_dir, res, sections)
        finally:
            if primed:
                self._low_level_execute_command(PRIMER_REMOVE, executable="/bin/sh")

    def _guard_ports(self, args, sections):
        """[(port, where it comes from)]: the SSH session's server port, then ansible_port (or the port the
        connection plugin is set to use); port 22 when neither is known."""
        ports = []
        port = session_port(sections.get(SESSION_SECTION))
        if port is not None:
            ports.append((port, FROM_SESSION))
        port = args["port"]
        if port is None:
            try:
                port = self._connection.get_option("port")
            except Exception:  # pylint: disable=broad-except
                port = None
        try:
            port = int(port) if port is not None else None
        except (TypeError, ValueError):
            port = None
        if port is not None and port not in [p for p, dummy in ports]:
            ports.append((port, FROM_PORT))
        return ports or [(22, FROM_PORT)]

    def _plan_and_apply(self, args, task_vars, options, files, state_dir, res, sections):
        state = args["state"]
        host = parse_host(sections.get(HOST_SECTION))
        ports = self._guard_ports(args, sections)
        try:
            plan = capture_plan(list(options), list(options.values()), read=res, cluster_env_path=args["cluster_env"],
                                state=state, connection_guard=args["connection_guard"],
                                port=[port for port, dummy in ports])
        except AnsibleError as err:
            raise AnsibleActionFail(to_text(getattr(err, "message", None) or err))
        plan["guard"]["source"] = dict(ports).get(plan["guard"]["port"], FROM_PORT)
        if plan["guard"]["refuse"]:
            explicit = (args["options"] or {}).get("inbound_ports_include") is not None
            source = "capture_inbound_ports_include" if explicit else "ISTIO_INBOUND_PORTS in %s" % args["cluster_env"]
            return dict(failed=True, changed=False, plan=public_plan(plan),
                        msg=GUARD_REFUSED.format(source=source, port=plan["guard"]["port"],
                                                 where=plan["guard"]["source"]))
        if state == "present" and args["istio_version"]:
            self._istio_version(args, plan, host)
        if args["install_dependencies"] and state == "present":
            missing = host.get("missing", "").split()
            plan["dependencies"] = dict(missing=missing, os_family=os_family(host.get("os")),
                                        python=host.get("python") if host.get("python") != "-" else None)
            if missing and not args["plan_only"] and not self._task.check_mode:
                # The role installs them, then runs the action again.
                return dict(changed=False, plan=public_plan(plan), missing_dependencies=missing)
            if missing and not args["plan_only"]:
                # Check mode installs nothing: what would change, as far as it can be told without them.
                return self._present(args, task_vars, plan, files, sections, state_dir, host, missing=missing)
        if args["plan_only"]:
            return dict(changed=False, plan=public_plan(plan))
        if state == "present":
            return self._present(args, task_vars, plan, files, sections, state_dir, host)
        return self._absent(args, task_vars, plan, sections)

    def _istio_version(self, args, plan, host):
        """The Istio release the rules follow: an explicit capture_istio_version, or with 'auto' the one
        installed on the host (the fallback when none is); passed to the rules module as X.Y."""
        wanted = args["istio_version"]
        if wanted == "auto":
            version, source = detected_istio_version(host)
            plan["istio_version"] = dict(version=version, source=source or "fallback")
            if source and capture_releases.parse_version(version) is None:
                raise AnsibleActionFail(ISTIO_UNSUPPORTED % (version, ISTIO_SOURCE_TEXT[source],
                                                             capture_releases.supported_text()))
        else:
            version = wanted
            plan["istio_version"] = dict(version=version, source="capture_istio_version")
        plan["rules_args"]["istio_version"] = version

    def _present(self, args, task_vars, plan, files, sections, state_dir, host, missing=None):
        report = Report(plan)
        if missing:
            return self._present_without_dependencies(args, task_vars, report, files, sections, host, missing)
        rules = self._module(RULES, dict(compact_lists(plan["rules_args"]), state="present", compact_result=True),
                             task_vars)
        if not report.add_main(rules):
            return report.result
        wanted, previous = plan["routes_wanted"], plan["routes_previous"]
        recorded = False
        routing = sections.get(ROUTING_SECTION)
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
        recorded_dropin = networkd_recorded(sections.get(ROUTES_ENV))
        dropin = self._networkd_dropin(args, plan, host, recorded_dropin)
        if args["persist"]:
            if not self._persist(args, task_vars, report, files, sections.get(FINGERPRINT_SECTION), rules, dropin):
                return report.result
        if recorded_dropin and (dropin is None or dropin[0] != recorded_dropin[0]):
            self._remove_dropin(report, recorded_dropin)
        if args["persist"] and args["systemd_unit"]:
            self._unit(args, report, host)
        return report.result

    def _present_without_dependencies(self, args, task_vars, report, files, sections, host, missing):
        """Check mode on a host that lacks what the modules need (the role would install it first): the whole
        ruleset as it would be added (rules with state=rendered, which reads nothing on the host), the files
        persist would write and what the restore unit would get; the routing is not looked at."""
        plan = report.plan
        rules = self._module(RULES, dict(compact_lists(plan["rules_args"]), state="rendered", compact_result=True),
                             task_vars)
        if not report.add_main(rules):
            return report.result
        report.result.update(changed=True, missing_dependencies=missing)
        if self._task.diff:
            report.diffs.insert(0, dict(
                before_header="capture rules (not read: %s missing on the host)" % ", ".join(missing),
                after_header="capture rules", before="",
                after="".join(command + "\n" for command in rules.get("commands") or [])))
            report.result["diff"] = report.diffs
        if plan["routes_wanted"]["tproxy"] or plan["routes_wanted"]["ipv6"]:
            report.result["routes"] = dict(changed=True, skipped_module=True, added=[], removed=[],
                                           msg="not read: %s missing on the host" % ", ".join(missing))
        recorded_dropin = networkd_recorded(sections.get(ROUTES_ENV))
        dropin = self._networkd_dropin(args, plan, host, recorded_dropin)
        if args["persist"]:
            if not self._persist(args, task_vars, report, files, sections.get(FINGERPRINT_SECTION), rules, dropin):
                return report.result
            if args["systemd_unit"]:
                self._unit(args, report, host)
        return report.result

    # -- systemd-networkd --------------------------------------------------
    def _networkd_dropin(self, args, plan, host, recorded):
        """(path, whether the role creates (or created) its directory, content) of the networkd drop-in, when
        TPROXY is wanted, the files are persisted and systemd-networkd is in use on the host; else None."""
        conf_dir = args["networkd_conf_dir"]
        wanted = plan["routes_wanted"]
        if not (conf_dir and args["persist"] and wanted["tproxy"] and host.get("systemd") == "1"):
            return None
        enabled, dummy, active = host.get("networkd", "").partition("/")
        if enabled not in NETWORKD_ENABLED_STATES and active != "active":
            return None
        path = posixpath.join(conf_dir, NETWORKD_DROPIN_NAME)
        created = host.get("networkd_dir") != "1" or bool(recorded and recorded[0] == path and recorded[1])
        return path, created, NETWORKD_DROPIN % (wanted["mark"], wanted["table"])

    def _remove_dropin(self, report, recorded):
        """Remove the networkd drop-in an earlier run wrote (and its directory if that run created it and
        nothing else is in it): TPROXY or networkd is no longer there. One command, none in check mode but
        the look."""
        path, created = recorded
        quoted = shlex_quote(path)
        if self._task.check_mode:
            command = "if [ -e %s ]; then echo present; fi" % quoted
        else:
            command = "if [ -e %s ]; then rm -f -- %s && echo present; fi" % (quoted, quoted)
            if created:
                command += "; rmdir -- %s 2>/dev/null" % shlex_quote(posixpath.dirname(path))
        res = self._low_level_execute_command(command + "; true", executable="/bin/sh")
        changed = "present" in to_text(res.get("stdout"))
        report.result["networkd_removed"] = dict(changed=changed, path=path)
        if changed:
            report.result["changed"] = True
            if self._task.diff:
                report.diffs.append(dict(before_header=path, after_header=path + " (removed)",
                                         before="(the systemd-networkd drop-in)\n", after=""))
                report.result["diff"] = report.diffs

    # -- the restore unit --------------------------------------------------
    def _unit(self, args, report, host):
        """Enable and start the restore unit where systemd runs (daemon-reload first when its file was just
        written), with one command, and only what is not so already; in check mode, say what would be done."""
        name = args["systemd_unit"]
        result = dict(changed=False, name=name, actions=[])
        report.result["unit"] = result
        if host.get("systemd") != "1":
            result["reason"] = "systemd is not running on this host (no %s)" % SYSTEMD_BOOTED_PATH
            return
        if not args["systemd_enable"]:
            result["reason"] = "capture_systemd_enable is false"
            return
        enabled, dummy, active = host.get("unit", "").partition("/")
        written = report.result.get("persisted", {}).get("written", [])
        actions = []
        if any(posixpath.basename(path) == name for path in written):
            actions.append("daemon-reload")
        if enabled not in ENABLED_STATES:
            actions.append("enable")
        if active != "active":
            actions.append("start")
        result.update(actions=actions, enabled=True, active=True)
        if not actions:
            return
        result["changed"] = True
        report.result["changed"] = True
        if self._task.diff:
            report.diffs.append(dict(
                before_header="%s (systemd)" % name, after_header="%s (systemd)" % name,
                before="enabled: %s\nactive: %s\n" % (enabled or "not-found", active or "inactive"),
                after="enabled: enabled\nactive: active\n"))
            report.result["diff"] = report.diffs
        if self._task.check_mode:
            return
        command = " && ".join("systemctl %s" % action if action == "daemon-reload"
                              else "systemctl %s %s" % (action, shlex_quote(name)) for action in actions)
        res = self._low_level_execute_command(command, executable="/bin/sh")
        if res.get("rc") != 0:
            report.result.update(failed=True, msg="%s failed (rc=%s): %s" % (
                command, res.get("rc"), to_text(res.get("stderr") or res.get("stdout")).strip()))

    def _routing_key(self, wanted):
        """What the record is valid for: the routes arguments and the routes module's code."""
        digest = hashlib.sha256(json.dumps(routes_args("present", wanted), sort_keys=True).encode("utf-8"))
        digest.update(self._routes_source())
        return digest.hexdigest()

    def _plugin_path(self, name):
        context = self._shared_loader_obj.module_loader.find_plugin_with_context(name)
        path = context.plugin_resolved_path if context.resolved else None
        if not path:
            raise AnsibleActionFail("cannot find the module %s" % name)
        return path

    def _routes_source(self):
        """The sources of the routes module and of the module_utils it plans with."""
        path = self._plugin_path(ROUTES)
        utils = os.path.join(os.path.dirname(os.path.dirname(path)), "module_utils")
        data = b""
        for name in [path] + [os.path.join(utils, name) for name in ROUTES_UTILS]:
            with open(name, "rb") as source:
                data += source.read()
        return data

    def _absent(self, args, task_vars, plan, sections):
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
        recorded = networkd_recorded(sections.get(ROUTES_ENV))
        if recorded:
            self._remove_dropin(report, recorded)
        return report.result

    @staticmethod
    def _files(args, options):
        """[(path, content, mode)] of the persisted files: the restore payloads and routes.env (content None
        until the rules ran), then persist_files, then persist_extra_files, then the networkd drop-in (content
        None; persisted only when it is wanted, see _networkd_dropin)."""
        base = args["persist_dir"].rstrip("/") or "/"
        names = [name for dummy, name in restore_files(options)] + [ROUTES_ENV]
        files = [(base + "/" + name, None, "0644") for name in names]
        files += [(base + "/" + item["name"], item["content"], item["mode"]) for item in args["persist_files"]]
        files += [(item["path"], item["content"], item["mode"]) for item in args["persist_extra_files"]]
        if args["networkd_conf_dir"]:
            files.append((posixpath.join(args["networkd_conf_dir"], NETWORKD_DROPIN_NAME), None, "0644"))
        return files

    def _persist(self, args, task_vars, report, files, fingerprint, rules, dropin):
        """Run persist, unless the fingerprint taken by the read shows every file as it would write it."""
        # The payloads a boot restores: boot_payload when the rules module returns one, else restore.
        restore = rules.get("boot_payload") or rules.get("restore") or {}
        generated = [restore.get(key, "") for key, dummy in restore_files(report.plan["rules_args"])]
        generated.append(routes_env(rules.get("backend"), report.plan["routes_wanted"],
                                    dropin[:2] if dropin else None))
        lines = (fingerprint or "").splitlines()
        prints = dict(zip([path for path, dummy, dummy in files], lines[:-1])) if lines else {}
        if args["networkd_conf_dir"]:
            files = files[:-1]
        files = [(path, content, mode) for (path, dummy, mode), content in zip(files, generated)] \
            + files[len(generated):]
        n_extra = len(args["persist_extra_files"])
        if dropin:
            files.append((dropin[0], dropin[2], "0644"))
            n_extra += 1
        owner, group = args["persist_owner"], args["persist_group"]
        base = args["persist_dir"].rstrip("/") or "/"
        if lines and all(path in prints for path, dummy, dummy in files) and unchanged(
                files, owner, group, [prints[path] for path, dummy, dummy in files]):
            report.result["persisted"] = dict(
                changed=False, path=posixpath.normpath(base), written=[], removed=[],
                existing=[posixpath.normpath(path) for path, dummy, dummy in files],
                systemd_running=lines[-1] == "systemd=1")
            return True
        extra = files[len(files) - n_extra:]
        if dropin and dropin[1] and prints.get(dropin[0], "-") == "-":
            # The drop-in directory is missing: created first (persist writes into existing directories
            # only); in check mode the drop-in is shown as it would be written.
            extra = extra[:-1]
            if self._task.check_mode:
                report.result["changed"] = True
                if self._task.diff:
                    report.diffs.append(dict(before_header=dropin[0], after_header=dropin[0], before="",
                                             after=dropin[2]))
                    report.result["diff"] = report.diffs
            else:
                res = self._low_level_execute_command("mkdir -p -m 0755 -- %s" % shlex_quote(
                    posixpath.dirname(dropin[0])), executable="/bin/sh")
                if res.get("rc") != 0:
                    report.result.update(failed=True, msg="cannot create %s: %s" % (
                        posixpath.dirname(dropin[0]), to_text(res.get("stderr") or res.get("stdout")).strip()))
                    return False
                extra = files[len(files) - n_extra:]
        persisted = self._module(PERSIST, dict(
            state="present", path=base, owner=owner, group=group,
            files=[dict(name=path[len(base):].lstrip("/"), content=content, mode=mode)
                   for path, content, mode in files[:len(files) - n_extra]],
            extra_files=[dict(path=path, content=content, mode=mode) for path, content, mode in extra]), task_vars)
        return report.add("persisted", persisted, "persist")


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
