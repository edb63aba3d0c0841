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

from ansible_collections.meshcapture.sidecar.plugins.plugin_utils.capture_plan import capture_plan


class FilterModule(object):
    """meshcapture.sidecar filters."""

    def filters(self):
        return {"capture_plan": capture_plan}
