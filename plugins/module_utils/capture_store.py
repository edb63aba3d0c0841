# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""What the modules keep on the host: the rendering memo, atomic file
writes, the identity of the current network namespace.

Pure Python, no Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import json
import os

STATE_VERSION = 1


class RenderMemo(object):
    """The rendering of the configuration last applied in this network
    namespace (commands, restore payloads, effective configuration),
    kept in state_dir under a digest of everything it was computed from.

    A re-run with the same options, generator code and host files (see
    memo_key) loads it instead of validating and generating again, so a
    no-op costs little more than one iptables-save per family.  One file
    per namespace: a new configuration replaces it.
    """

    def __init__(self, state_dir, netns_id=None):
        self.path = os.path.join(state_dir, "rendered-%s.json" % (netns_id or current_netns_id()))

    def load(self, key):
        """The stored rendering when it was stored under key, else None."""
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (IOError, OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("key") != key:
            return None
        return data.get("rendered")

    def store(self, key, rendered):
        write_atomic(self.path, json.dumps({"key": key, "rendered": rendered}, separators=(",", ":")))

    def remove(self):
        try:
            os.unlink(self.path)
        except OSError:
            pass


def memo_key(params, code, files):
    """Digest of a rendering's inputs: the module options, the code that
    validates and generates (sources), and the host files it reads
    ({path: content or stat stamp})."""
    blob = json.dumps([STATE_VERSION, params, code, files], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def mtime(path):
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def current_netns_id():
    st = os.stat("/proc/self/ns/net")
    return "%d-%d" % (st.st_dev, st.st_ino)


def write_atomic(path, text):
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory, 0o700)
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)
