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
    when the inbound ports name a port Ansible is connected on or O(cluster_env) cannot be read.
  - O(state=present) runs M(meshcapture.sidecar.rules) with O(state=present); then
    M(meshcapture.sidecar.routes) with O(state=absent) for the policy routing an earlier run recorded in
    C(routes.env) when that differs from the wanted one; then M(meshcapture.sidecar.routes) with
    O(state=present) when TPROXY or the IPv6 inbound address is wanted, unless the routing is the one
    C(routes.env) records and a record shows that the module found nothing to do on the same routing state
    (see below); then, with O(persist), writes
    C(rules.v4), C(rules.v6) (the restore payloads of the rules result; with C(backend=nftables) in O(options)
    also C(rules.nft); the rules result's C(boot_payload) when it has one, else its C(restore)), C(routes.env)
    (the backend and the
    policy routing), O(persist_files) and O(persist_extra_files) with M(meshcapture.sidecar.persist), unless
    every one of them already has the content, mode, owner and group it would write; then enables and starts
    O(systemd_unit).
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
  - The guard protects the port of the SSH session the action runs in (C(SSH_CONNECTION) of its shell or of the
    nearest parent process that has it) and O(port).
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
    description:
      - The port Ansible connects to (C(ansible_port)); unset, the port the connection plugin is set to use, if
        any.
      - The guard protects this port and, over SSH, the port of the session the action runs in (the 4th field
        of C(SSH_CONNECTION), which is the port sshd really accepted the connection on, also when only an
        C(ssh_config) names it); port 22 when neither is known.
    type: int
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
  systemd_unit:
    description:
      - The name of the restore unit among O(persist_extra_files). With O(persist), where systemd runs
        (C(/run/systemd/system)) and with O(systemd_enable), the action enables and starts it (C(systemctl
        daemon-reload) first when its file was written) with one command, and only what is not so already;
        starting it runs the restore script, which leaves the capture in place alone. In check mode it says
        what it would do. The first command reads C(systemctl is-enabled) and C(is-active) of the unit.
    type: str
  systemd_enable:
    description: Enable and start O(systemd_unit).
    type: bool
    default: true
  networkd_conf_dir:
    description:
      - The drop-in directory of C(networkd.conf) (C(/etc/systemd/networkd.conf.d)). With O(persist), TPROXY
        and systemd-networkd in use (its unit enabled or active), the action writes
        C(meshcapture-capture.conf) there with C(ManageForeignRoutingPolicyRules=no), so that networkd keeps
        the TPROXY policy rules at boot and when it restarts; the directory is created when missing, and
        C(routes.env) records both. When TPROXY or networkd is no longer there, and with O(state=absent), the
        drop-in the record names is removed, and its directory if the role created it and it is empty.
      - Null, never.
    type: str
  istio_version:
    description:
      - The Istio release whose rules to apply (the C(istio_version) option of M(meshcapture.sidecar.rules)).
      - V(auto) reads the installed Istio in the first command - C(dpkg-query) for the C(istio-sidecar)
        package, else C(rpm -q), else C(pilot-agent version) - and uses its C(X.Y); V(1.17) when none is found.
      - Null, the module's default.
    type: str
  install_dependencies:
    description:
      - Look, in the first command, for the commands the modules and the restore script need (PATH and the
        sbin directories) and for the Python module pyroute2 of the target interpreter
        (C(ansible_python_interpreter), or the one interpreter discovery would find), and read the OS of
        C(/etc/os-release).
      - When something is missing, only check the guard and O(cluster_env) and return RV(missing_dependencies)
        without running a module; the role installs them and runs the action again.
    type: bool
    default: false
  plan_only:
    description:
      - Only read, compute the plan and check the guard and O(cluster_env); run no module and change nothing.
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
    persist_dir: /etc/meshcapture
    istio_version: auto
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
missing_dependencies:
  description: With O(install_dependencies), what is missing on the host (commands, C(pyroute2)); no module ran.
  returned: when something is missing
  type: list
  elements: str
unit:
  description:
    - The restore unit O(systemd_unit) - C(name); C(actions), the steps done (or, in check mode, that would be)
      among C(daemon-reload), C(enable) and C(start); C(changed); and C(reason) when it is not enabled.
  returned: with O(systemd_unit), O(persist) and O(state=present)
  type: dict
networkd_removed:
  description: The systemd-networkd drop-in an earlier run wrote, removed (C(path), C(changed)).
  returned: when C(routes.env) records a drop-in that is no longer wanted
  type: dict
persisted:
  description:
    - The result of M(meshcapture.sidecar.persist) (C(path), C(written), C(removed), C(existing),
      C(systemd_running)). When every file was already right the module does not run and this says so.
  returned: with O(persist) and O(state=present)
  type: dict
"""
