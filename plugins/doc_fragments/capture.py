# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    """Options shared by the capture modules (TPROXY mark, table, IPv6)."""

    DOCUMENTATION = r"""
options:
  inbound_tproxy_mark:
    description:
      - Packet mark of inbound connections in TPROXY mode (C(-t) / E(ISTIO_INBOUND_TPROXY_MARK)).
      - A 32-bit value from 1 to 4294967295.
    type: int
    default: 1337
  inbound_tproxy_route_table:
    description:
      - Policy routing table that delivers TPROXY-marked packets locally (C(-r) / E(ISTIO_INBOUND_TPROXY_ROUTE_TABLE)).
      - 1 to 4294967295, except the kernel's reserved tables 253, 254 and 255.
    type: int
    default: 133
  enable_inbound_ipv6:
    description:
      - Capture IPv6 as well (istio does when the pod IP is IPv6). Adds the ip6tables rules, and the C(::6/128)
        inbound source address on C(lo).
    type: bool
    default: false
"""
