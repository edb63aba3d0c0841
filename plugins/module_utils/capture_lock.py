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
import stat
import time

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import CaptureError

LOCK_DIR = "/run/meshcapture"
LOCK_TIMEOUT = 60.0


class LockError(CaptureError):
    """The lock could not be taken (held by another run, or an unsafe directory)."""


def check_dir(path, uid=0):
    """Raise LockError when path is not a directory only root (uid) can write."""
    try:
        st = os.lstat(path)
    except OSError as err:
        raise LockError("lock directory %s: %s" % (path, err.strerror))
    if stat.S_ISLNK(st.st_mode):
        raise LockError("lock directory %s is a symlink: refusing it (remove it; it is created 0700 root)" % path)
    if not stat.S_ISDIR(st.st_mode):
        raise LockError("lock directory %s is not a directory: refusing it" % path)
    if st.st_uid != uid:
        raise LockError("lock directory %s is owned by uid %d, not root: refusing it" % (path, st.st_uid))
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise LockError("lock directory %s is writable by group or others (mode %04o): refusing it"
                        % (path, stat.S_IMODE(st.st_mode)))


def lock_path(netns_id, directory=LOCK_DIR):
    return os.path.join(directory, "lock-%s" % netns_id)


class HostLock(object):
    """An exclusive flock on the namespace's lock file, waited for at most timeout seconds.

    Use as a context manager, or acquire()/release().  The file descriptor
    is inherited by a forked apply process (capture_detach), which keeps
    the lock held until it is done even when the module is killed.
    """

    def __init__(self, netns_id, directory=LOCK_DIR, timeout=LOCK_TIMEOUT, uid=0, create=True):
        self.directory = directory
        self.path = lock_path(netns_id, directory)
        self.timeout = timeout
        self.uid = uid
        self.create = create
        self.fd = None

    def acquire(self):
        """Take the lock; False when the directory is missing and create is off (nothing to lock)."""
        if not os.path.lexists(self.directory):
            if not self.create:
                return False
            try:
                os.makedirs(self.directory, 0o700)
            except OSError as err:
                if err.errno != errno.EEXIST:
                    raise LockError("cannot create the lock directory %s: %s" % (self.directory, err.strerror))
        check_dir(self.directory, self.uid)
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
