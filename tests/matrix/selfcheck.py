# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""The core self-check the compatibility matrix runs with a target's Python.

Runs with any Python the modules support (3.6 and later), standard library
only, with the collection tree (``ansible_collections/...``) on PYTHONPATH:

1. imports every file of plugins/module_utils;
2. reads a JSON list of ``{"id": ..., "options": {...}}`` on stdin and, for
   each, validates the options, generates the ruleset and renders it
   (iptables commands, iptables-restore payloads, nftables payload);
3. prints ``{"modules": [...], "cases": {id: rendering or error}}`` as JSON.

The matrix driver compares the renderings with Istio's goldens and with the
renderings of its own interpreter: the same options must give the same
rules on every target Python.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import importlib
import json
import os
import sys

PACKAGE = "ansible_collections.meshcapture.sidecar.plugins.module_utils"


def module_utils_names():
    package = importlib.import_module(PACKAGE)
    directory = list(package.__path__)[0]  # a namespace package: no __file__
    return sorted(name[:-3] for name in os.listdir(directory)
                  if name.endswith(".py") and name != "__init__.py")


def render(options):
    from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import CaptureConfig
    from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_generator import (
        generate, restore_payloads)
    from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_nft import (
        render_nft, render_nft_payload)
    from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_rules import render_commands

    cfg = CaptureConfig.from_params(options)
    ruleset = generate(cfg)
    out = dict(commands=render_commands(ruleset), restore=restore_payloads(cfg, ruleset))
    try:
        out["nft"] = render_nft_payload(render_nft(ruleset))
    except Exception as exc:  # the renderer refuses some rulesets; the refusal must match too
        out["nft"] = "%s: %s" % (type(exc).__name__, exc)
    return out


def main():
    imported = []
    for name in module_utils_names():
        importlib.import_module("%s.%s" % (PACKAGE, name))
        imported.append(name)
    cases = json.load(sys.stdin)
    results = {}
    for case in cases:
        try:
            results[case["id"]] = render(case["options"])
        except Exception as exc:
            results[case["id"]] = {"error": "%s: %s" % (type(exc).__name__, exc)}
    json.dump(dict(python=list(sys.version_info[:3]), modules=imported, cases=results), sys.stdout, sort_keys=True)


if __name__ == "__main__":
    main()
