#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: routes
short_description: TPROXY policy routing and the IPv6 inbound address of an Istio sidecar capture
version_added: 0.1.0
description:
  - Manages, over netlink (pyroute2, no C(ip) commands), what istio's C(ConfigureRoutes) sets up for
    TPROXY inbound capture, per address family
    (C(ip -4 rule add fwmark <mark> lookup <table>), C(ip -4 route add local default dev lo table <table>),
    and the same with C(-6)), and the C(::6/128) address on C(lo) that IPv6 inbound capture uses as source.
  - Istio adds these and never removes them, and its second run can fail with "file exists". This module
    reads the current state once, changes only what differs, and O(state=absent) removes them.
  - A rule is one of these objects only if it matches on the mark alone (no other selector, full mask);
    a route only if it is a C(local) default route through C(lo) without gateway or other attributes.
    Whatever else is in the table, or in other tables, is never touched.
  - Where IPv6 is unusable (no IPv6 in the kernel, or C(net.ipv6.conf.lo.disable_ipv6=1), where the
    kernel refuses IPv6 routes and addresses on C(lo)), O(state=present) skips the IPv6 objects with a warning.
author:
  - meshcapture maintainers (@meshcapture)
extends_documentation_fragment:
  - meshcapture.sidecar.attributes
options:
  state:
    description:
      - V(present) adds the objects that are missing, V(absent) removes every copy of them.
      - Both act on the objects the other options select, so use the same options for both.
    type: str
    choices: [present, absent]
    default: present
  inbound_tproxy_mark:
    description:
      - Packet mark of inbound connections in TPROXY mode (C(-t) / E(ISTIO_INBOUND_TPROXY_MARK)), matched by
        the policy rule. A 32-bit value from 1 to 4294967295.
    type: int
    default: 1337
  inbound_tproxy_route_table:
    description:
      - Routing table that delivers marked packets locally (C(-r) / E(ISTIO_INBOUND_TPROXY_ROUTE_TABLE)).
      - 1 to 4294967295, except the kernel's reserved tables 253, 254 and 255.
      - If the table already has another default route that the kernel would not let the local one be added
        beside, the module fails without changing anything.
    type: int
    default: 133
  enable_inbound_ipv6:
    description:
      - Manage the C(::6/128) address on C(lo) (istio adds it when the pod IP is IPv6), whatever
        O(manage_tproxy_routes).
      - Ignored when O(ipv6=false).
    type: bool
    default: false
  manage_tproxy_routes:
    description:
      - Manage the TPROXY policy rule and local route. V(false) manages only the address of O(enable_inbound_ipv6).
    type: bool
    default: true
  ipv4:
    description: Manage the IPv4 rule and route.
    type: bool
    default: true
  ipv6:
    description:
      - Manage the IPv6 rule, route and (with O(enable_inbound_ipv6)) address. V(false) leaves all IPv6 state alone.
    type: bool
    default: true
notes:
  - New rules get the preference the kernel chooses, as with C(ip rule add) and istio; existing ones are
    recognised whatever their preference, so state set up by istio is adopted, not duplicated.
  - O(state=present) adds the address and the local routes before the rules; O(state=absent) removes the
    rules first.
  - Istio itself sets up the IPv6 rule and route only when the pod IP is IPv6; use O(ipv6=false) to stay
    IPv4-only.
  - Needs C(CAP_NET_ADMIN) (root) to change anything.
requirements:
  - pyroute2 on the target
seealso:
  - module: meshcapture.sidecar.rules
  - name: Istio TPROXY inbound interception
    description: Istio's sidecar inbound interception modes.
    link: https://istio.io/latest/docs/reference/config/annotations/
"""

EXAMPLES = r"""
- name: TPROXY inbound capture with the istio defaults (mark 1337, table 133)
  meshcapture.sidecar.routes:

- name: The same for a host with an IPv6 pod address, including the ::6 source address
  meshcapture.sidecar.routes:
    enable_inbound_ipv6: true

- name: Only the ::6 address (REDIRECT mode with IPv6)
  meshcapture.sidecar.routes:
    manage_tproxy_routes: false
    enable_inbound_ipv6: true

- name: Remove what the first task added
  meshcapture.sidecar.routes:
    state: absent
"""

RETURN = r"""
added:
  description: Objects added (or that would be, in check mode), in text form.
  returned: always
  type: list
  elements: str
  sample: ['ip -4 route: local default dev lo table 133', 'ip -4 rule: fwmark 0x539 lookup 133']
removed:
  description: Objects removed (or that would be), in the same form as RV(added).
  returned: always
  type: list
  elements: str
  sample: []
rules:
  description: The managed policy rules present after the run (in check mode, that would be).
  returned: always
  type: list
  elements: str
  sample: ['ip -4 rule: fwmark 0x539 lookup 133', 'ip -6 rule: fwmark 0x539 lookup 133']
routes:
  description: The managed routes present after the run (in check mode, that would be).
  returned: always
  type: list
  elements: str
  sample: ['ip -4 route: local default dev lo table 133', 'ip -6 route: local default dev lo table 133']
addresses:
  description: The managed addresses present after the run (in check mode, that would be).
  returned: always
  type: list
  elements: str
  sample: ['ip -6 addr: ::6/128 dev lo']
"""

import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import CaptureError
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_routes import (
    RoutesConfig,
    apply,
    plan,
)

try:
    from pyroute2 import IPRoute
except ImportError:
    HAS_PYROUTE2 = False
    PYROUTE2_IMPORT_ERROR = traceback.format_exc()
else:
    HAS_PYROUTE2 = True
    PYROUTE2_IMPORT_ERROR = None

ARGUMENT_SPEC = dict(
    state=dict(type="str", default="present", choices=["present", "absent"]),
    inbound_tproxy_mark=dict(type="int", default=1337),
    inbound_tproxy_route_table=dict(type="int", default=133),
    enable_inbound_ipv6=dict(type="bool", default=False),
    manage_tproxy_routes=dict(type="bool", default=True),
    ipv4=dict(type="bool", default=True),
    ipv6=dict(type="bool", default=True),
)


def _text(lines):
    return "".join(line + "\n" for line in lines)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    if not HAS_PYROUTE2:
        module.fail_json(msg=missing_required_lib("pyroute2"), exception=PYROUTE2_IMPORT_ERROR)
    try:
        cfg = RoutesConfig.from_params(module.params)
        with IPRoute() as ipr:
            routes_plan = plan(cfg, ipr)
            if routes_plan.changed and not module.check_mode:
                apply(routes_plan, ipr)
    except CaptureError as err:
        module.fail_json(msg=str(err))

    for warning in routes_plan.warnings:
        module.warn(warning)
    result = dict(changed=routes_plan.changed, added=routes_plan.added, removed=routes_plan.removed)
    result.update(routes_plan.state_after())
    if module._diff:
        result["diff"] = dict(before=_text(routes_plan.before_lines), after=_text(routes_plan.after_lines))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
