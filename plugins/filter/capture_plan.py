# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: capture_plan
short_description: What the capture role passes to its modules on one host
version_added: 0.1.0
author:
  - meshcapture maintainers (@meshcapture)
description:
  - Internal to the M(meshcapture.sidecar.capture) role, which calls it once per host. One filter call
    instead of a dozen Jinja expressions, because Ansible compiles every template again on every host.
  - Merges the role's explicit variables over the settings of an Istio C(cluster.env) (see
    P(meshcapture.sidecar.cluster_env#filter)); variables that are null are left out, so the module
    defaults apply.
  - Computes the connection guard (C(capture_connection_guard)) for O(state=present), the TPROXY policy
    routing and IPv6 inbound address wanted now, and the ones a previous run recorded in C(routes.env).
options:
  _input:
    description: The names of the M(meshcapture.sidecar.rules) options the role passes on.
    type: list
    elements: str
    required: true
  values:
    description: The values of the role variables C(capture_<name>), in the order of the names; null when unset.
    type: list
    elements: raw
    required: true
  read:
    description:
      - The registered result of the role's read task (C(ansible.builtin.raw)), whose output has a section per
        file - a line C(#meshcapture-file cluster.env) or C(#meshcapture-file routes.env), then the file's
        content or the single line C(#meshcapture-missing) when the file does not exist or cannot be read.
      - Output before the first section (a shell's greeting) and carriage returns (a TTY) are ignored.
      - Null (nothing read) means neither file exists.
    type: dict
  cluster_env_path:
    description:
      - The role's C(capture_cluster_env), for the error message when it names a file that cannot be read.
      - When set and O(state=present), the C(cluster.env) section must hold the file.
    type: str
  state:
    description: The role's C(capture_state); the guard applies to V(present) only.
    type: str
    default: present
  connection_guard:
    description: The role's C(capture_connection_guard).
    type: bool
    default: true
  port:
    description: The port Ansible is connected on (C(ansible_port)).
    type: int
    default: 22
"""

EXAMPLES = r"""
- name: Compute what the role passes to its modules
  ansible.builtin.set_fact:
    plan: >-
      {{ names | meshcapture.sidecar.capture_plan(
           values=query('ansible.builtin.vars', *(names | map('regex_replace', '^', 'capture_'))),
           read=read_result, cluster_env_path='/var/lib/istio/envoy/cluster.env',
           state='present', connection_guard=true, port=ansible_port | default(22)) }}
  vars:
    names: [inbound_ports_include, inbound_ports_exclude, inbound_interception_mode]
"""

RETURN = r"""
_value:
  description: The plan.
  type: dict
  contains:
    options:
      description: The explicit variables over the C(cluster.env) settings, keyed by option name.
      type: dict
    rules_args:
      description:
        - The M(meshcapture.sidecar.rules) arguments, O(options) with the connection port added to
          C(inbound_ports_exclude) when the guard needs it.
      type: dict
    guard:
      description: The connection guard.
      type: dict
      contains:
        port: {description: The connection port., type: int}
        refuse: {description: The inbound ports name the connection port; the role fails., type: bool}
        needed: {description: "Inbound ports are V(*): the port is added to the exclusions.", type: bool}
        excluded: {description: The inbound exclusions with the connection port added., type: list, elements: str}
    routes_wanted:
      description: The policy routing wanted now (keys C(tproxy), C(mark), C(table), C(ipv6)).
      type: dict
    routes_previous:
      description: The policy routing recorded by a previous run (same keys), null when there is no record.
      type: dict
"""

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

    port = _int(port if port is not None else 22)
    guard_on = state == "present" and _bool(connection_guard)
    inbound = _items(options.get("inbound_ports_include"))
    excluded = _items(options.get("inbound_ports_exclude"))
    refuse = guard_on and port in [_int(p) for p in inbound if p != "*"]
    needed = guard_on and inbound == ["*"] and port not in [_int(p) for p in excluded]
    guard_excluded = excluded + [str(port)]
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
        "guard": {"port": port, "refuse": refuse, "needed": needed, "excluded": guard_excluded},
        "routes_wanted": routes_wanted,
        "routes_previous": routes_previous,
    }


class FilterModule(object):
    """meshcapture.sidecar filters."""

    def filters(self):
        return {"capture_plan": capture_plan}
