# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""What the capture role passes to its modules on one host: the options merge, the connection guard and the
policy routing (wanted now, and the one routes.env records). Shared by the action meshcapture.sidecar.capture
and the capture_plan filter (a thin wrapper), both on the controller."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.errors import AnsibleFilterError
from ansible.module_utils.six.moves import shlex_quote
from ansible.module_utils.common.text.converters import to_text
from ansible.module_utils.parsing.convert_bool import boolean
from ansible.module_utils.six import string_types
from ansible.module_utils.six.moves.collections_abc import Mapping
from ansible_collections.meshcapture.sidecar.plugins.filter.cluster_env import cluster_env


def _int(value, default=0):
    """Jinja's int filter: an int, else int(float), else the default."""
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return int(float(value))
        except (TypeError, ValueError):
            return default


def _bool(value):
    return boolean(value, strict=False)


def _items(value):
    """A port list as the rules module reads it: a list or a comma-separated string; stripped, no blanks."""
    if value is None:
        return []
    if isinstance(value, string_types):
        value = value.split(",")
    elif not isinstance(value, (list, tuple)):
        value = [value]
    return [item for item in (to_text(v).strip() for v in value) if item]


SECTION = "#meshcapture-file "
MISSING = "#meshcapture-missing"

# The shell script that reads cluster.env and routes.env in one command (the
# action plugin meshcapture.sidecar.capture runs it; no module run): one
# section per file, which read_sections() parses. The two paths are quoted
# with shlex.quote and may be empty (unset).
READ_SCRIPT = """r() {
  printf '#meshcapture-file %%s\\n' "$1"
  if [ -n "$2" ] && [ -f "$2" ] && [ -r "$2" ]; then cat -- "$2"; echo; else echo '#meshcapture-missing'; fi
}
r cluster.env %s
r routes.env %s"""


def read_script(cluster_env_path, routes_env_path):
    """The read script for these paths (None or '' for an unset path)."""
    return READ_SCRIPT % (shlex_quote(cluster_env_path or ""), shlex_quote(routes_env_path or ""))


def read_sections(read):
    """{file name: text or None (missing)} from the output of the role's read task."""
    if not read:
        return {}
    if not isinstance(read, Mapping):
        raise AnsibleFilterError("capture_plan: read must be the registered result of the read task, got %s"
                                 % type(read).__name__)
    sections, name, lines = {}, None, []
    for line in to_text(read.get("stdout") or "").splitlines():
        line = line.rstrip("\r")
        if name is None and SECTION in line:
            # A greeting without a final newline runs into the first header.
            line = line[line.index(SECTION):]
        if line.startswith(SECTION):
            if name is not None:
                sections[name] = lines
            name, lines = line[len(SECTION):].strip(), []
        elif name is not None:
            lines.append(line)
    if name is not None:
        sections[name] = lines
    return dict((key, None if value[:1] == [MISSING] else "\n".join(value) + "\n")
                for key, value in sections.items())


def _ports(port):
    """The connection ports the guard protects: one port or a list of them (None: 22), without repeats."""
    if port is None or (isinstance(port, (list, tuple)) and not port):
        return [22]
    items = port if isinstance(port, (list, tuple)) else [port]
    ports = []
    for item in items:
        value = _int(item if item is not None else 22)
        if value not in ports:
            ports.append(value)
    return ports


def capture_plan(names, values, read=None, cluster_env_path=None, state="present", connection_guard=True, port=22):
    """The rules arguments, connection guard and policy routing (wanted, previous) of one host."""
    names, values = list(names), list(values)
    if len(names) != len(values):
        raise AnsibleFilterError("capture_plan: %d option names but %d values" % (len(names), len(values)))
    files = read_sections(read)
    if read and "routes.env" not in files:
        raise AnsibleFilterError("capture_plan: the output of the read task has no routes.env section")
    text = files.get("cluster.env")
    if cluster_env_path and text is None and state == "present":
        # An uninstall does not need the file (it may be gone already).
        raise AnsibleFilterError("capture_cluster_env: %s does not exist on the host or cannot be read"
                                 % cluster_env_path)
    options = cluster_env(text) if text is not None and cluster_env_path else {}
    options.update((name, value) for name, value in zip(names, values) if value is not None)

    ports = _ports(port)
    guard_on = state == "present" and _bool(connection_guard)
    inbound = _items(options.get("inbound_ports_include"))
    excluded = _items(options.get("inbound_ports_exclude"))
    included = [_int(p) for p in inbound if p != "*"]
    refused = [p for p in ports if p in included] if guard_on else []
    have = [_int(p) for p in excluded]
    added = [p for p in ports if p not in have] if guard_on and inbound == ["*"] else []
    refuse, needed = bool(refused), bool(added)
    guard_excluded = excluded + [str(p) for p in (added if needed else ports)]
    rules_args = dict(options, inbound_ports_exclude=guard_excluded) if needed else dict(options)

    routes_wanted = {
        "tproxy": options.get("inbound_interception_mode", "REDIRECT") == "TPROXY",
        "mark": _int(options.get("inbound_tproxy_mark", 1337)),
        "table": _int(options.get("inbound_tproxy_route_table", 133)),
        "ipv6": _bool(options.get("enable_inbound_ipv6", False)),
    }
    routes_previous = None
    text = files.get("routes.env")
    if text is not None:
        previous = cluster_env(text, raw=True)
        routes_previous = {
            "tproxy": _bool(previous.get("MESHCAPTURE_TPROXY_ROUTES", "false")),
            "mark": _int(previous.get("MESHCAPTURE_TPROXY_MARK", 1337)),
            "table": _int(previous.get("MESHCAPTURE_TPROXY_ROUTE_TABLE", 133)),
            "ipv6": _bool(previous.get("MESHCAPTURE_INBOUND_IPV6", "false")),
        }
    return {
        "options": options,
        "rules_args": rules_args,
        "guard": {"port": (refused or added or ports)[0], "ports": ports, "refuse": refuse, "needed": needed,
                  "excluded": guard_excluded},
        "routes_wanted": routes_wanted,
        "routes_previous": routes_previous,
    }
