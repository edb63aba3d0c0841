# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""Payloads handed to iptables-restore / nft -f through a private file.

A pipe breaks (EPIPE) when the reader exits before reading a payload larger
than the pipe buffer (a failing line, a lock timeout); a file cannot, so a
failure is always the command's own, with its rc and stderr.
Pure Python, no Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import tempfile

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_store import remove_quietly


class PayloadFile(object):
    """A temporary file (mode 0600) holding text; its path while in use, removed afterwards."""

    def __init__(self, text):
        self.text = text
        self.path = None

    def __enter__(self):
        fd, self.path = tempfile.mkstemp(prefix="meshcapture-", suffix=".payload")
        with os.fdopen(fd, "w") as f:
            f.write(self.text)
        return self.path

    def __exit__(self, *exc):
        remove_quietly(self.path)
        return False
