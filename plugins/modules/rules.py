#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: rules
short_description: Istio sidecar traffic capture rules (istio-iptables 1.17), applied idempotently
version_added: 0.1.0
description:
  - Generates the iptables ruleset that C(istio-iptables) 1.17 installs for a sidecar, rule for rule and in
    the same order, from the same options, and converges a host to it.
  - O(state=present) reads the live rules once per family (C(iptables-save)), compares the capture-owned
    rules exactly, and applies only the changed chains with one atomic C(iptables-restore --noflush) per
    family. A second run with the same options reports no change and writes nothing.
  - The capture owns the C(ISTIO_*) chains of the C(nat), C(mangle) and C(raw) tables and its own rules in
    their built-in chains. Rules of other software are never touched.
  - O(state=absent) removes every capture-owned rule and chain, also those istio-clean-iptables leaves
    behind, without needing the options the capture was applied with.
  - O(state=rendered) only computes the ruleset; it needs no privileges and touches nothing.
  - If a restore fails, every table changed so far (of either family) is put back as it was, counters included.
  - With O(backend=nftables) the capture is native nftables instead, the tables C(istio-proxy-raw),
    C(istio-proxy-mangle) and C(istio-proxy-nat) of family C(inet), which it owns whole, with named sets for
    port and CIDR lists. They are read with one command (C(nft -j list chains) and C(nft -j list table) of the
    capture's tables) and changed with one atomic C(nft -f) transaction; O(state=absent) deletes them.
author:
  - meshcapture maintainers (@meshcapture)
extends_documentation_fragment:
  - meshcapture.sidecar.attributes
  - meshcapture.sidecar.capture
options:
  state:
    description:
      - V(present) converges to the ruleset, V(absent) removes the capture, V(rendered) computes only.
    type: str
    choices: [present, absent, rendered]
    default: present
  backend:
    description:
      - Which iptables binaries to use. V(auto) uses C(iptables-legacy) only where legacy tables already hold
        rules (as istio does), C(iptables-nft) otherwise.
      - V(nftables) writes native nftables tables (family C(inet)) with C(nft) instead of iptables rules.
      - Only one backend's capture can be in place. When a capture of another backend is found, O(state=present)
        fails before changing anything, unless O(migrate) is set.
    type: str
    choices: [auto, iptables-nft, iptables-legacy, nftables]
    default: auto
  migrate:
    description:
      - With O(state=present), replace a capture of another backend (iptables backends and V(nftables)) in this
        run. The new capture is applied first, in one transaction, then the old one removed, in another.
      - With O(state=absent), remove the captures of both kinds.
    type: bool
    default: false
  compact_result:
    description:
      - Return the list options in RV(config), and in the C(invocation) Ansible keeps of the task, as
        comma-separated strings (the form the options also accept) instead of lists. A list with no items stays
        an empty list.
      - Ansible handles every item of a result's lists one by one (masking C(no_log) values, serialising,
        passing it to the controller); with 10,000 CIDRs the two copies of the options are most of the
        result a re-run returns. RV(commands), RV(restore), RV(added), RV(removed) and the diff stay as they are.
      - The role meshcapture.sidecar.capture sets it.
    type: bool
    default: false
  proxy_port:
    description: Port the proxy's outbound listener captures on (C(-p) / E(ENVOY_PORT)).
    type: int
    default: 15001
  inbound_capture_port:
    description: Port inbound traffic is redirected to (C(-z) / E(INBOUND_CAPTURE_PORT)).
    type: int
    default: 15006
  inbound_tunnel_port:
    description: Tunnel port that bypasses inbound capture (C(-e) / E(INBOUND_TUNNEL_PORT)).
    type: int
    default: 15008
  proxy_uid:
    description: User IDs or names whose traffic is never captured, the proxy's (C(-u)).
    type: list
    elements: str
    default: ['1337']
  proxy_gid:
    description: Group IDs or names whose traffic is never captured (C(-g)). Defaults to O(proxy_uid).
    type: list
    elements: str
  inbound_interception_mode:
    description: How inbound traffic is captured (C(-m) / E(ISTIO_INBOUND_INTERCEPTION_MODE)).
    type: str
    choices: [REDIRECT, TPROXY]
    default: REDIRECT
  inbound_ports_include:
    description:
      - Inbound ports to capture, or V(*) for all (C(-b) / E(ISTIO_INBOUND_PORTS)). Empty captures no inbound
        traffic.
    type: list
    elements: str
    default: []
  inbound_ports_exclude:
    description: Inbound ports not captured when O(inbound_ports_include=*) (C(-d) / E(ISTIO_LOCAL_EXCLUDE_PORTS)).
    type: list
    elements: str
    default: []
  outbound_ports_include:
    description: Outbound ports always captured (C(-q) / E(ISTIO_OUTBOUND_PORTS)).
    type: list
    elements: str
    default: []
  outbound_ports_exclude:
    description: Outbound ports never captured (C(-o) / E(ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE)).
    type: list
    elements: str
    default: []
  outbound_ip_ranges_include:
    description:
      - Destination CIDRs whose traffic is captured, or V(*) for all (C(-i) / E(ISTIO_SERVICE_CIDR)).
      - Addresses are normalised to their network, like istio does (V(10.1.2.3/8) becomes V(10.0.0.0/8)).
    type: list
    elements: str
    default: []
  outbound_ip_ranges_exclude:
    description: Destination CIDRs never captured (C(-x) / E(ISTIO_SERVICE_EXCLUDE_CIDR)).
    type: list
    elements: str
    default: []
  kube_virt_interfaces:
    description: Interfaces whose inbound traffic is treated as outbound (C(-k)), as for KubeVirt VMs.
    type: list
    elements: str
    default: []
  exclude_interfaces:
    description: Interfaces whose traffic is never captured (C(-c) / E(ISTIO_EXCLUDE_INTERFACES)).
    type: list
    elements: str
    default: []
  owner_groups_include:
    description: Groups whose outbound traffic is captured, or V(*) for all (E(ISTIO_OUTBOUND_OWNER_GROUPS)). At most 64.
    type: list
    elements: str
    default: ['*']
  owner_groups_exclude:
    description: Groups whose outbound traffic is not captured (E(ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE)).
    type: list
    elements: str
    default: []
  redirect_dns:
    description: Capture DNS (TCP and UDP port 53) to the agent on port 15053 (E(ISTIO_META_DNS_CAPTURE)).
    type: bool
    default: false
  capture_all_dns:
    description: With O(redirect_dns), capture DNS to every server, not only those of O(dns_servers_v4)/O(dns_servers_v6).
    type: bool
    default: false
  dns_servers_v4:
    description:
      - IPv4 DNS servers whose traffic is captured. Unset, the target's C(/etc/resolv.conf) is read when
        O(redirect_dns) is on; V([]) means none.
    type: list
    elements: str
  dns_servers_v6:
    description: IPv6 DNS servers whose traffic is captured, like O(dns_servers_v4).
    type: list
    elements: str
  drop_invalid:
    description: Drop packets conntrack finds INVALID instead of resetting connections (E(INVALID_DROP)).
    type: bool
    default: false
  trace_logging:
    description: Add NFLOG rules (group 1337) that trace which capture rules match (C(--iptables-trace-logging)).
    type: bool
    default: false
  state_dir:
    description:
      - Where the module keeps its state record (per network namespace), its cache of canonical rule forms and
        the rendering of the last applied configuration (so that a re-run with the same options skips validation
        and generation). Lost on reboot together with the rules when on a tmpfs, which is intended.
    type: path
    default: /run/meshcapture
notes:
  - Comma-separated strings are accepted wherever a list is, so values copied from an Istio C(cluster.env) work.
  - The canonical form of the wanted rules is computed once by restoring them in a scratch network namespace
    (C(unshare --net)), or on a first apply learnt from what the restore added, and cached in O(state_dir);
    the scratch namespace never touches the host's tables.
requirements:
  - iptables (C(iptables-nft-save) and friends, or the legacy ones), C(unshare) (util-linux)
  - C(nft) to remove tables the capture created, on the nft backend
  - For O(backend=nftables), C(nft) (nftables package) and C(unshare) only
seealso:
  - module: meshcapture.sidecar.routes
  - name: istio-iptables
    description: The istio tool whose ruleset this module reproduces.
    link: https://istio.io/latest/docs/ops/deployment/application-requirements/
"""

EXAMPLES = r"""
- name: Preview the capture of a VM (no privileges needed)
  meshcapture.sidecar.rules:
    state: rendered
    inbound_ports_include: ['*']
    outbound_ip_ranges_include: ['*']
  register: capture

- name: Capture like a VM onboarded with istioctl (values from cluster.env)
  meshcapture.sidecar.rules:
    inbound_ports_include: '*'
    inbound_ports_exclude: '22,15090,15021,15020'
    outbound_ip_ranges_include: '*'
    outbound_ip_ranges_exclude: '169.254.169.254/32'
    redirect_dns: true
    enable_inbound_ipv6: true

- name: TPROXY inbound capture (also needs meshcapture.sidecar.routes)
  meshcapture.sidecar.rules:
    inbound_interception_mode: TPROXY
    inbound_ports_include: ['*']

- name: Remove the capture, whatever it was applied with
  meshcapture.sidecar.rules:
    state: absent

- name: Native nftables capture, replacing an iptables capture applied before
  meshcapture.sidecar.rules:
    backend: nftables
    migrate: true
    inbound_ports_include: ['*']
    outbound_ip_ranges_include: ['*']
    outbound_ip_ranges_exclude: '169.254.169.254/32,10.96.0.0/12'
"""

RETURN = r"""
commands:
  description: The iptables and ip6tables commands, in istio-iptables 1.17 order and format.
  returned: always
  type: list
  elements: str
  sample: ['iptables -t nat -N ISTIO_INBOUND', 'iptables -t nat -A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN']
restore:
  description: The iptables-restore (C(--noflush)) payloads that create the ruleset on a host without it.
  returned: always
  type: dict
  contains:
    ipv4:
      description: Payload for iptables-restore; empty when there are no IPv4 rules.
      type: str
    ipv6:
      description: Payload for ip6tables-restore; empty unless O(enable_inbound_ipv6).
      type: str
    nft:
      description:
        - The C(nft -f) payload that creates the capture's C(inet) tables (no delete or flush lines).
        - Only with O(backend=nftables).
      type: str
      returned: when backend is nftables
backend:
  description: The backend used (iptables binaries, or V(nftables)), or that would be used.
  returned: always
  type: str
  sample: iptables-nft
migrated_from:
  description: Backends whose capture was removed by O(migrate) (or would be, in check mode).
  returned: when state is present or absent
  type: list
  elements: str
  sample: [iptables-nft]
config:
  description:
    - The effective options after validation and defaults (DNS servers as read from resolv.conf).
    - With O(compact_result), the non-empty lists as comma-separated strings.
  returned: always
  type: dict
added:
  description:
    - Rules added, as C(<family> -t <table> -A <chain> <spec>) in iptables-save form.
    - 'With O(backend=nftables), as C(inet <table> chain <chain>: <rule>) and C(inet <table> set <set>: <element>)
      in C(nft list) form.'
  returned: when state is present or absent
  type: list
  elements: str
removed:
  description: Rules removed, in the same form as RV(added).
  returned: when state is present or absent
  type: list
  elements: str
summary:
  description: Counts of added and removed rules.
  returned: when state is present or absent
  type: dict
  sample: {added: 16, removed: 0}
"""

import grp
import hashlib
import os
import pwd
import sys

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.meshcapture.sidecar.plugins.module_utils import (
    capture_config,
    capture_generator,
    capture_nft,
    capture_nft_rules,
    capture_rules,
)
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import (
    DEFAULTS,
    ApplyError,
    CaptureError,
    CaptureConfig,
)
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_converge import NFTABLES, Host, converge
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_generator import generate
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_nft import render_nft, render_nft_payload
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_rules import (
    FAMILIES,
    render_commands,
    render_restore,
)
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_store import RenderMemo, memo_key

C_LOCALE = {"LANG": "C", "LC_ALL": "C", "LC_MESSAGES": "C"}


def _list(default=None):
    spec = dict(type="list", elements="str")
    if default is not None:
        spec["default"] = default
    return spec


ARGUMENT_SPEC = dict(
    state=dict(type="str", default="present", choices=["present", "absent", "rendered"]),
    backend=dict(type="str", default="auto", choices=["auto", "iptables-nft", "iptables-legacy", NFTABLES]),
    migrate=dict(type="bool", default=False),
    compact_result=dict(type="bool", default=False),
    state_dir=dict(type="path", default="/run/meshcapture"),
    proxy_port=dict(type="int", default=15001),
    inbound_capture_port=dict(type="int", default=15006),
    inbound_tunnel_port=dict(type="int", default=15008),
    proxy_uid=_list(["1337"]),
    proxy_gid=_list(),
    inbound_interception_mode=dict(type="str", default="REDIRECT", choices=["REDIRECT", "TPROXY"]),
    inbound_tproxy_mark=dict(type="int", default=1337),
    inbound_tproxy_route_table=dict(type="int", default=133),
    inbound_ports_include=_list([]),
    inbound_ports_exclude=_list([]),
    outbound_ports_include=_list([]),
    outbound_ports_exclude=_list([]),
    outbound_ip_ranges_include=_list([]),
    outbound_ip_ranges_exclude=_list([]),
    kube_virt_interfaces=_list([]),
    exclude_interfaces=_list([]),
    owner_groups_include=_list(["*"]),
    owner_groups_exclude=_list([]),
    redirect_dns=dict(type="bool", default=False),
    capture_all_dns=dict(type="bool", default=False),
    dns_servers_v4=_list(),
    dns_servers_v6=_list(),
    drop_invalid=dict(type="bool", default=False),
    enable_inbound_ipv6=dict(type="bool", default=False),
    trace_logging=dict(type="bool", default=False),
)


def _exists(lookup):
    def exists(name):
        try:
            lookup(name)
        except KeyError:
            return False
        return True
    return exists


def _read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except (IOError, OSError):
        return ""


class _Runner(object):
    """Runs commands through AnsibleModule.run_command in the C locale."""

    def __init__(self, module):
        self.module = module

    def __call__(self, argv, data=None):
        return self.module.run_command(argv, data=data, binary_data=True, environ_update=C_LOCALE)


def _stamp(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def _code_digest(*modules):
    """sha256 of the modules' sources (None when a loader cannot tell)."""
    digest = hashlib.sha256()
    for mod in modules:
        spec = getattr(mod, "__spec__", None)
        try:
            source = mod.__loader__.get_source(spec.name if spec else mod.__name__)
        except Exception:  # pylint: disable=broad-except  # any loader without sources: no memo
            source = None
        if not source:
            return None
        digest.update(source.encode("utf-8"))
    return digest.hexdigest()


def _memo_key(params):
    """The key of this run's rendering (None: do not memoise)."""
    code = _code_digest(sys.modules[__name__], capture_config, capture_generator, capture_rules, capture_nft,
                        capture_nft_rules)
    if code is None:
        return None
    # What validation and generation read from the host: resolv.conf for the
    # DNS servers, the user and group databases for the owner names.
    files = {"/etc/resolv.conf": _read_text("/etc/resolv.conf"),
             "/etc/passwd": _stamp("/etc/passwd"), "/etc/group": _stamp("/etc/group")}
    # compact_result only shapes the result: the same rendering either way.
    return memo_key(dict((k, v) for k, v in params.items() if k != "compact_result"), code, files)


def _render(module, params, state):
    """Validate and generate: (rendering dict, Ruleset), or fail_json."""
    try:
        cfg = CaptureConfig.from_params(dict((k, params[k]) for k in DEFAULTS),
                                        read_resolv_conf=lambda: _read_text("/etc/resolv.conf"))
    except CaptureError as err:
        module.fail_json(msg=str(err))
    ruleset = generate(cfg)
    rendered = dict(
        commands=render_commands(ruleset),
        restore=dict((family, render_restore(ruleset, family)) for family in FAMILIES),
        config=cfg.to_dict(),
        warnings=list(cfg.warnings),
    )
    if params["backend"] == NFTABLES and state != "absent":
        try:
            nft = render_nft(ruleset)
        except CaptureError as err:
            module.fail_json(msg=str(err), **_public(rendered))
        rendered["restore"]["nft"] = render_nft_payload(nft)
        rendered["nft_tables"] = dict((name, nft.table_text(name)) for name in nft.tables)
    if state == "present":
        try:
            cfg.check_owner_names(_exists(pwd.getpwnam), _exists(grp.getgrnam))
        except CaptureError as err:
            module.fail_json(msg=str(err), changed=False, **_public(rendered))
    return rendered, ruleset


def _public(rendered):
    return dict((k, rendered[k]) for k in ("commands", "restore", "config"))


def _joined(options):
    """The options with every non-empty list of strings joined by commas (compact_result)."""
    return dict((name, ",".join(value) if isinstance(value, list) and value and all(
        isinstance(item, str) for item in value) else value) for name, value in options.items())


class _LazyRuleset(object):
    """A Ruleset generated on first use (a memoised no-op never needs it)."""

    def __init__(self, build):
        self._build = build
        self._ruleset = None

    def __getitem__(self, family):
        if self._ruleset is None:
            self._ruleset = self._build()
        return self._ruleset[family]


def _warn(module, job):
    for warning in job["warnings"]:
        module.warn(warning)
    del job["warnings"][:]


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    state = p["state"]
    runner = _Runner(module)
    # state=present re-runs with the same options load the rendering of the
    # last run from state_dir instead of validating and generating again.
    memo = RenderMemo(p["state_dir"]) if state == "present" else None
    key = _memo_key(p) if memo else None
    rendered = memo.load(key) if key else None
    fresh = rendered is None
    if fresh:
        rendered, ruleset = _render(module, p, state)
    else:
        ruleset = _LazyRuleset(lambda: _render(module, p, state)[1])
    for warning in rendered["warnings"]:
        module.warn(warning)
    result = dict(changed=False, **_public(rendered))
    if p["compact_result"]:
        result.update(config=_joined(result["config"]), invocation=dict(module_args=_joined(p)))
    if state == "rendered":
        result["backend"] = p["backend"] if p["backend"] != "auto" else "iptables-nft"
        module.exit_json(**result)

    job = dict(state_dir=p["state_dir"], check_mode=module.check_mode, migrate=p["migrate"], warnings=[],
               backend=p["backend"])
    host = Host(runner, module.get_bin_path, _read_text)
    try:
        done = converge(host, p["backend"], state, rendered, ruleset, job)
    except ApplyError as err:
        _warn(module, job)
        module.fail_json(msg=err.msg, cmd=" ".join(err.cmd or []), rc=err.rc, stderr=err.stderr or "",
                         backend=job["backend"], **result)
    except CaptureError as err:
        _warn(module, job)
        module.fail_json(msg=str(err), backend=job["backend"], **result)
    _warn(module, job)
    if key and fresh and not module.check_mode:
        try:
            memo.store(key, rendered)
        except (IOError, OSError) as err:
            module.warn("could not keep the rendering in %s: %s" % (memo.path, err))
    elif state == "absent" and not module.check_mode:
        RenderMemo(p["state_dir"]).remove()

    result.update(backend=job["backend"], changed=done["changed"], added=done["added"], removed=done["removed"],
                  migrated_from=done["migrated_from"])
    result["summary"] = dict(added=len(result["added"]), removed=len(result["removed"]))
    if module._diff:
        result["diff"] = done["diff"]
    module.exit_json(**result)


if __name__ == "__main__":
    main()
