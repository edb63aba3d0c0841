# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""Istio's own native nftables capture (istio-iptables --native-nftables, 1.27+).

Placeholder: render_transaction(cfg) returns the `nft -f` transaction that
Istio's tools/istio-nftables capture builds for the release cfg.istio_version.
Pure Python, no Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


def render_transaction(cfg):
    """The nft -f text of Istio's native nftables capture for cfg (a CaptureConfig)."""
    raise NotImplementedError("native nftables capture is not written yet")
