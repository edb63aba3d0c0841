# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: cluster_env
short_description: Capture options from an Istio cluster.env
version_added: 0.1.0
author:
  - meshcapture maintainers (@meshcapture)
description:
  - Parses the text of an Istio C(cluster.env) (as written by C(istioctl x workload entry configure)) and
    returns the traffic capture settings it holds, keyed by the option names of M(meshcapture.sidecar.rules).
  - The file is a list of C(KEY=VALUE) lines. Blank lines and comment lines are skipped, a leading C(export)
    is allowed, values may be in single or double quotes, and an unquoted value ends where a comment starts
    (a C(#) after a blank). When a key appears twice, the last one wins, as when a shell sources the file.
  - Lines end where a shell ends them, at a line feed; Windows line ends (carriage return and line feed) work
    too. A line with any other control character (a tab aside) or Unicode line break (vertical tab, form feed,
    lone carriage return, U+0085, U+2028, U+2029, ...) fails naming the line, as other readers would split
    such a line where a shell does not.
  - Keys that are not capture settings (C(ISTIO_META_CLUSTER_ID), C(CANONICAL_SERVICE), ...) and keys with an
    empty value are left out, so the module defaults apply for them.
  - Values stay strings; M(meshcapture.sidecar.rules) validates them (it accepts comma-separated lists).
  - "The mapping: E(ISTIO_SERVICE_CIDR) -> C(outbound_ip_ranges_include),
    E(ISTIO_SERVICE_EXCLUDE_CIDR) -> C(outbound_ip_ranges_exclude),
    E(ISTIO_INBOUND_PORTS) -> C(inbound_ports_include), E(ISTIO_LOCAL_EXCLUDE_PORTS) -> C(inbound_ports_exclude),
    E(ISTIO_OUTBOUND_PORTS) -> C(outbound_ports_include),
    E(ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE) -> C(outbound_ports_exclude),
    E(ISTIO_INBOUND_INTERCEPTION_MODE) -> C(inbound_interception_mode),
    E(ISTIO_INBOUND_TPROXY_MARK) -> C(inbound_tproxy_mark),
    E(ISTIO_INBOUND_TPROXY_ROUTE_TABLE) -> C(inbound_tproxy_route_table),
    E(ISTIO_META_DNS_CAPTURE) -> C(redirect_dns), E(ISTIO_EXCLUDE_INTERFACES) -> C(exclude_interfaces),
    E(ENVOY_PORT) -> C(proxy_port), E(INBOUND_CAPTURE_PORT) -> C(inbound_capture_port),
    E(INBOUND_TUNNEL_PORT) -> C(inbound_tunnel_port),
    E(ISTIO_OUTBOUND_OWNER_GROUPS) -> C(owner_groups_include),
    E(ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE) -> C(owner_groups_exclude), E(INVALID_DROP) -> C(drop_invalid),
    E(ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR) -> C(host_ipv4_loopback_cidr)."
options:
  _input:
    description: The text of the C(cluster.env) file.
    type: str
    required: true
  raw:
    description:
      - Return every C(KEY=VALUE) pair as found, without mapping keys to option names or dropping any.
    type: bool
    default: false
seealso:
  - module: meshcapture.sidecar.rules
  - name: istioctl x workload entry configure
    description: Generates the cluster.env of a VM joining the mesh.
    link: https://istio.io/latest/docs/setup/install/virtual-machine/
"""

EXAMPLES = r"""
- name: Read the cluster.env of the VM
  ansible.builtin.slurp:
    src: /var/lib/istio/envoy/cluster.env
  register: cluster_env_file

- name: Capture with the values istioctl generated
  meshcapture.sidecar.rules:
    inbound_ports_include: "{{ settings.inbound_ports_include | default(omit) }}"
    outbound_ip_ranges_include: "{{ settings.outbound_ip_ranges_include | default(omit) }}"
  vars:
    settings: "{{ cluster_env_file.content | b64decode | meshcapture.sidecar.cluster_env }}"

# "ISTIO_SERVICE_CIDR='*'\nISTIO_LOCAL_EXCLUDE_PORTS='15090,15021,15020'\nISTIO_META_DNS_CAPTURE='true'\n"
# | meshcapture.sidecar.cluster_env
# => {"outbound_ip_ranges_include": "*", "inbound_ports_exclude": "15090,15021,15020", "redirect_dns": "true"}
"""

RETURN = r"""
_value:
  description:
    - The capture settings found, keyed by M(meshcapture.sidecar.rules) option name, values as strings.
    - With O(raw=true), every pair of the file keyed by its variable name.
  type: dict
  sample: {outbound_ip_ranges_include: '*', inbound_ports_include: '*', inbound_ports_exclude: '15090,15021,15020'}
"""

import re

from ansible.errors import AnsibleFilterError
from ansible.module_utils.common.text.converters import to_text
from ansible.module_utils.six import string_types

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_options import cluster_env_keys

# cluster.env variable -> meshcapture.sidecar.rules option (from the option table).
CLUSTER_ENV_OPTIONS = cluster_env_keys()

# Characters that end a line for Python's splitlines() or other readers but
# not for a shell, which reads the file as one line there (a value could then
# hide an assignment from one reader and not from the other); refused.
# Tab is the only control character a line may hold.
_CHARACTER_NAMES = {
    "\r": "carriage return (not followed by a line feed)",
    "\x0b": "vertical tab",
    "\x0c": "form feed",
    "\x1c": "file separator",
    "\x1d": "group separator",
    "\x1e": "record separator",
    "\x85": "next line (NEL)",
    "\u2028": "line separator",
    "\u2029": "paragraph separator",
}
_FORBIDDEN_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")

_BLANKS = " \t"
_LINE_RE = re.compile(r"^(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*(.*)$")
_DOUBLE_ESCAPE_RE = re.compile(r'\\([\\"$`])')


def _closing_quote(text, quote):
    """Index of the quote that closes text[0], or -1 (backslash escapes inside double quotes)."""
    pos = 1
    while pos < len(text):
        char = text[pos]
        if quote == '"' and char == "\\":
            pos += 2
            continue
        if char == quote:
            return pos
        pos += 1
    return -1


def _value(text, lineno):
    """The value of one assignment, shell-style quotes removed."""
    if text[:1] in ("'", '"'):
        quote = text[0]
        end = _closing_quote(text, quote)
        if end < 0:
            raise AnsibleFilterError("cluster_env: line %d: unterminated %s quote" % (lineno, quote))
        rest = text[end + 1:].strip(_BLANKS)
        if rest and not rest.startswith("#"):
            raise AnsibleFilterError("cluster_env: line %d: unexpected text after the closing quote: %r"
                                     % (lineno, rest))
        value = text[1:end]
        return _DOUBLE_ESCAPE_RE.sub(r"\1", value) if quote == '"' else value
    # Unquoted: ends at whitespace followed by a comment.
    return re.split(r"[ \t]+#", text, maxsplit=1)[0].strip(_BLANKS)


def _lines(text):
    """The lines of a cluster.env as a shell reads them: only a line feed ends a
    line; a carriage return right before it (or at the end of the text) is
    dropped, so files with Windows line ends (CRLF) read the same. Any other
    control or line-breaking character is an error naming the line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for lineno, line in enumerate(lines, 1):
        if line.endswith("\r"):
            line = line[:-1]
        bad = _FORBIDDEN_RE.search(line)
        if bad:
            char = bad.group(0)
            name = _CHARACTER_NAMES.get(char, "control character")
            raise AnsibleFilterError(
                "cluster_env: line %d contains a %s (U+%04X), which a shell and other readers split differently: "
                "remove it (line %r)" % (lineno, name, ord(char), line))
        yield lineno, line


def parse_cluster_env(text):
    """All KEY=VALUE pairs of a cluster.env text, last assignment wins."""
    pairs = {}
    for lineno, line in _lines(text):
        line = line.strip(_BLANKS)
        if not line or line.startswith("#"):
            continue
        match = _LINE_RE.match(line)
        if not match:
            raise AnsibleFilterError("cluster_env: line %d is not KEY=VALUE: %r" % (lineno, line))
        pairs[match.group(1)] = _value(match.group(2).strip(_BLANKS), lineno)
    return pairs


def cluster_env(text, raw=False):
    """Capture options (rules module names, string values) from a cluster.env text."""
    if not isinstance(text, string_types):
        raise AnsibleFilterError("cluster_env: expected the file's text, got %s" % type(text).__name__)
    pairs = parse_cluster_env(to_text(text))
    if raw:
        return pairs
    options = {}
    for key, option in CLUSTER_ENV_OPTIONS.items():
        value = pairs.get(key, "").strip(_BLANKS)
        if value:
            options[option] = value
    return options


class FilterModule(object):
    """meshcapture.sidecar filters."""

    def filters(self):
        return {"cluster_env": cluster_env}
