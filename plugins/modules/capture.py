#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)

# The documentation of the action plugin plugins/action/capture.py, which
# does all the work on the controller; there is no module code.

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: capture
short_description: The capture role's work on one host, in one task
version_added: 0.1.0
description:
  - Internal to the C(meshcapture.sidecar.capture) role, which runs it once per host. An action plugin, which runs on
    the controller and composes the modules M(meshcapture.sidecar.rules), M(meshcapture.sidecar.routes) and
    M(meshcapture.sidecar.persist), running each only when it has something to do. Its options may change with
    the role.
  - It reads the Istio C(cluster.env) (O(cluster_env)) and the C(routes.env) an earlier run wrote into
    O(persist_dir) with one shell command, and with O(persist) also the type, mode, owner, group and sha256 of
    the files it persists, and whether systemd is running. Nothing is changed before the checks below pass.
  - It computes the M(meshcapture.sidecar.rules) arguments (O(options) over the C(cluster.env) settings) and the
    connection guard as the P(meshcapture.sidecar.capture_plan#filter) filter does, and fails before any change
    when the inbound ports name the port Ansible is connected on (O(port)) or O(cluster_env) cannot be read.
  - O(state=present) runs M(meshcapture.sidecar.rules) with O(state=present); then
    M(meshcapture.sidecar.routes) with O(state=absent) for the policy routing an earlier run recorded in
    C(routes.env) when that differs from the wanted one; then M(meshcapture.sidecar.routes) with
    O(state=present) when TPROXY or the IPv6 inbound address is wanted, unless the routing is the one
    C(routes.env) records and a record shows that the module found nothing to do on the same routing state
    (see below); then, with O(persist), writes
    C(rules.v4), C(rules.v6) (the restore payloads of the rules result; with C(backend=nftables) in O(options)
    also C(rules.nft)), C(routes.env) (the backend and the
    policy routing), O(persist_files) and O(persist_extra_files) with M(meshcapture.sidecar.persist), unless
    every one of them already has the content, mode, owner and group it would write.
  - O(state=absent) runs M(meshcapture.sidecar.rules) with O(state=absent), then
    M(meshcapture.sidecar.routes) with O(state=absent) for the routing wanted now (with TPROXY) and for the
    routing C(routes.env) records. It does not remove the persisted files.
  - The routing record - After M(meshcapture.sidecar.routes) ran with O(state=present) without a warning, outside
    check mode, the action keeps a sha256 of the routing state it reads (C(ip -d rule), the routes and addresses
    of C(lo), whether IPv6 is disabled on C(lo)) with a key of the module arguments and the module's code in
    C(<state_dir>/routes-<network namespace inode>.digest) (C(state_dir) from O(options), default
    C(/run/meshcapture), which a reboot empties). The next run reads the state again in its first command, and
    does not run the module when both match. Any change to the rules, to C(lo), to the arguments or to the
    module makes it run again.
  - The conntrack primer - Outside check mode, O(state=present) also loads, with its first command, an nft table
    C(inet meshcapture-conntrack-primer) whose one rule reads the conntrack state (it filters nothing), and
    deletes it once the modules ran. On a host where no rule used connection tracking before, the capture's
    rules would otherwise switch it on in the middle of the SSH session Ansible holds, and the kernel would take
    sshd's next packet for a new outbound connection that the capture redirects. With the primer, that session
    is tracked before the rules come.
  - The primer is loaded only when the connection is a network one (not C(local) or
    C(meshcapture.sidecar.netns)) and C(/proc/net/nf_conntrack) has no entry for the SSH session yet (its ports
    from C(SSH_CONNECTION), of the command's shell or of the nearest parent process that has it, as under
    C(sudo)). On a re-run the capture's own rules track the session, so nothing is written to the kernel.
  - Check mode and diff mode are passed on to the modules; the diffs of all of them are returned.
author:
  - meshcapture maintainers (@meshcapture)
extends_documentation_fragment:
  - meshcapture.sidecar.attributes
options:
  state:
    description: V(present) applies the capture, V(absent) removes the rules and the routing.
    type: str
    choices: [present, absent]
    default: present
  options:
    description:
      - The M(meshcapture.sidecar.rules) options as the role variables set them, keyed by option name. Null
        values are left out, so the value from O(cluster_env) or the module default applies.
    type: dict
    default: {}
  cluster_env:
    description:
      - Path of the Istio C(cluster.env) on the host, whose C(ISTIO_*) settings fill the options O(options)
        leaves unset. Null for none.
      - With O(state=present) the file must exist and be readable.
    type: str
  connection_guard:
    description:
      - Refuse inbound ports that name O(port), and add O(port) to the inbound exclusions when the inbound ports
        are V(*) (O(state=present) only).
    type: bool
    default: true
  port:
    description: The port Ansible is connected on (C(ansible_port)).
    type: int
    default: 22
  persist_dir:
    description:
      - The directory of the persisted files; its C(routes.env) tells which policy routing an earlier run set up.
    type: str
    required: true
  persist:
    description: With O(state=present), write the persisted files.
    type: bool
    default: true
  persist_files:
    description: More files in O(persist_dir), written after C(rules.v4), C(rules.v6) and C(routes.env).
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: The file name inside O(persist_dir).
        type: str
        required: true
      content:
        description: The content.
        type: str
      mode:
        description: The mode, as M(meshcapture.sidecar.persist) takes it.
        type: raw
        default: '0644'
  persist_extra_files:
    description: Files outside O(persist_dir) (the systemd unit).
    type: list
    elements: dict
    default: []
    suboptions:
      path:
        description: The absolute path.
        type: str
        required: true
      content:
        description: The content.
        type: str
      mode:
        description: The mode, as M(meshcapture.sidecar.persist) takes it.
        type: raw
        default: '0644'
  persist_owner:
    description: Owner of the persisted files.
    type: str
    default: root
  persist_group:
    description: Group of the persisted files.
    type: str
    default: root
  plan_only:
    description:
      - Only read, compute the plan and check the guard and O(cluster_env); run no module. The role does this
        before it installs packages or creates the proxy user.
    type: bool
    default: false
attributes:
  action:
    description: Indicates this has a corresponding action plugin so some parts of the options can be executed on the controller.
    support: full
  async:
    description: Supports being used with the C(async) keyword.
    support: none
notes:
  - The modules it runs must be installed with it (this collection); each runs as a module on the host.
seealso:
  - module: meshcapture.sidecar.rules
  - module: meshcapture.sidecar.routes
  - module: meshcapture.sidecar.persist
"""

EXAMPLES = r"""
- name: Apply the capture as the role does
  meshcapture.sidecar.capture:
    state: present
    options:
      inbound_ports_include: '*'
      outbound_ip_ranges_include: '*'
    cluster_env: /var/lib/istio/envoy/cluster.env
    port: 22
    persist_dir: /etc/meshcapture
  register: capture
"""

RETURN = r"""
changed:
  description: Whether any of the modules changed something (or would, in check mode).
  returned: always
  type: bool
commands:
  description:
    - As returned by M(meshcapture.sidecar.rules); so are its other return values, at the top level.
    - The rules module runs with O(meshcapture.sidecar.rules#module:compact_result), so the lists in C(config)
      are comma-separated strings.
  returned: unless O(plan_only)
  type: list
  elements: str
plan:
  description:
    - What the action computed, as the P(meshcapture.sidecar.capture_plan#filter) filter returns it, without
      C(options) and C(rules_args) (the rules result's C(config) holds the options the module used).
  returned: always
  type: dict
  contains:
    guard:
      description: The connection guard (C(port), C(refuse), C(needed), C(excluded)).
      type: dict
    routes_wanted:
      description: The policy routing wanted now (C(tproxy), C(mark), C(table), C(ipv6)).
      type: dict
    routes_previous:
      description: The policy routing C(routes.env) records, null when there is none.
      type: dict
routes:
  description: The result of M(meshcapture.sidecar.routes) with O(state=present).
  returned: when it ran
  type: dict
routes_removed:
  description:
    - O(state=present), the result of M(meshcapture.sidecar.routes) removing the routing of an earlier run;
      O(state=absent), the list of its results.
  returned: when it ran
  type: raw
persisted:
  description:
    - The result of M(meshcapture.sidecar.persist) (C(path), C(written), C(removed), C(existing),
      C(systemd_running)). When every file was already right the module does not run and this says so.
  returned: with O(persist) and O(state=present)
  type: dict
"""
