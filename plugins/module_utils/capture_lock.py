# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""The per-network-namespace lock that serialises runs against one host.

A run of `rules` (and the boot-time restore, with flock(1) on the same
file) holds an exclusive flock on LOCK_DIR/lock-<netns id> from before it
reads the tables until it has written them.  The directory is created 0700
root when missing and refused when it could let another user interfere:
a symlink, not owned by root, or writable by group or others.

Pure Python, no Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import fcntl
import os
import time

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import CaptureError
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_store import StoreError, ensure_private_dir

LOCK_DIR = "/run/meshcapture"
LOCK_TIMEOUT = 60.0


class LockError(CaptureError):
    """The lock could not be taken (held by another run, or an unsafe directory)."""


def lock_path(netns_id, directory=LOCK_DIR):
    return os.path.join(directory, "lock-%s" % netns_id)


class HostLock(object):
    """An exclusive flock on the namespace's lock file, waited for at most timeout seconds.

    Use as a context manager, or acquire()/release().  The file descriptor
    is inherited by a forked apply process (capture_detach), which keeps
    the lock held until it is done even when the module is killed.
    """

    def __init__(self, netns_id, directory=LOCK_DIR, timeout=LOCK_TIMEOUT, create=True):
        self.directory = directory
        self.path = lock_path(netns_id, directory)
        self.timeout = timeout
        self.create = create
        self.fd = None

    def acquire(self):
        """Take the lock; False when the directory is missing and create is off (nothing to lock)."""
        if not self.create and not os.path.lexists(self.directory):
            return False
        try:
            # Created 0700 when missing; refused when another user could change it.
            ensure_private_dir(self.directory)
        except StoreError as err:
            raise LockError("lock directory %s" % err)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as err:
            raise LockError("cannot open the lock file %s: %s" % (self.path, err.strerror))
        deadline = time.time() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except (IOError, OSError) as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise LockError("cannot lock %s: %s" % (self.path, err.strerror))
            if time.time() >= deadline:
                os.close(fd)
                raise LockError("lock %s is held by another run against this host (another rules run or the "
                                "boot-time restore); gave up after %d s" % (self.path, int(self.timeout)))
            time.sleep(0.1)
        self.fd = fd
        return True

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False
