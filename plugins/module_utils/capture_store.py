# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""What the modules keep on the host: the rendering memo, atomic file
writes, the identity of the current network namespace, and the checks that a directory can be trusted with what root reads back.

Errors (all capture_config.CaptureError, so a module's main() catches them
with the core's other errors; message "<path>: <why>"):

* UnsafePathError: a directory (or one of its parents) that someone other
  than the running user (root) could change: refused, nothing is read from
  or written to it.
* StoreWriteError: a file or directory could not be written (ENOSPC, EROFS,
  EACCES...). Also an OSError (errno, strerror, filename), so older callers
  that catch OSError keep working. A cache that cannot be written is a
  warning at most: keep_cache() returns the warning instead of raising.

Pure Python, no Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import hashlib
import json
import os
import stat

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import CaptureError

STATE_VERSION = 1
# Symbolic links are followed at most this deep when checking a path.
_MAX_LINKS = 40


class StoreError(CaptureError):
    """A path of the store: '<path>: <why>'."""

    def __init__(self, path, why):
        super(StoreError, self).__init__("%s: %s" % (path, why))
        self.path = path
        self.why = why


class UnsafePathError(StoreError):
    """A directory that a user other than the running one could change
    (owned by someone else, writable by group or others, a symbolic link,
    or under such a directory)."""


class StoreWriteError(StoreError, OSError):
    """A file or directory of the store could not be written."""

    def __init__(self, path, err):
        reason = err.strerror or str(err)
        StoreError.__init__(self, path, "cannot write: %s" % reason)
        self.errno = err.errno
        self.strerror = reason
        self.filename = path

    def __str__(self):
        return "%s: %s" % (self.path, self.why)


# ------------------------------------------------------------ trusted paths
def _owner_ok(uid):
    return uid in (0, os.geteuid())


def _check_chain(path, given, depth=0):
    """Every existing component of the absolute path: a directory owned by
    root or the running user, not writable by group or others unless sticky
    (as /tmp), or a symbolic link owned by root or the running user whose
    target passes the same checks. Stops at the first missing component."""
    if depth > _MAX_LINKS:
        raise UnsafePathError(given, "too many levels of symbolic links")
    current = "/"
    parts = [part for part in path.split("/") if part]
    for index in range(len(parts) + 1):
        if index:
            current = os.path.join(current, parts[index - 1])
        try:
            st = os.lstat(current)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                return
            raise UnsafePathError(given, "cannot check %s: %s" % (current, err.strerror))
        if stat.S_ISLNK(st.st_mode):
            if not _owner_ok(st.st_uid):
                raise UnsafePathError(given, "%s is a symbolic link owned by uid %d" % (current, st.st_uid))
            target = os.path.normpath(os.path.join(os.path.dirname(current), os.readlink(current)))
            return _check_chain(os.path.join(target, *parts[index:]), given, depth + 1)
        if not stat.S_ISDIR(st.st_mode):
            if index == len(parts):
                return
            raise UnsafePathError(given, "%s is not a directory" % current)
        if not _owner_ok(st.st_uid):
            raise UnsafePathError(given, "%s is owned by uid %d, not by root or uid %d"
                                  % (current, st.st_uid, os.geteuid()))
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise UnsafePathError(given, "%s is writable by %s (mode %04o) without the sticky bit"
                                  % (current, _who(st.st_mode), stat.S_IMODE(st.st_mode)))


def _who(mode):
    return " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if mode & bit)


def check_private_dir(path):
    """Raise UnsafePathError unless path is safe to keep what root reads back:
    a directory (not a symbolic link) owned by the running user, not
    writable by group or others, whose parents only root or the running
    user can change (see _check_chain). Returns False when path does not
    exist (its existing parents are checked), else True."""
    path = os.path.abspath(path)
    _check_chain(os.path.dirname(path), path)
    try:
        st = os.lstat(path)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise UnsafePathError(path, "cannot check: %s" % err.strerror)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(path, "is a symbolic link")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(path, "is not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafePathError(path, "is owned by uid %d, not by uid %d (the user running this)"
                              % (st.st_uid, os.geteuid()))
    if st.st_mode & 0o022:
        raise UnsafePathError(path, "is writable by %s (mode %04o)" % (_who(st.st_mode), stat.S_IMODE(st.st_mode)))
    return True


def ensure_private_dir(path, create_mode=0o700):
    """Create path (and its missing parents) with create_mode if missing,
    then check it (check_private_dir). Returns the absolute path.

    Raises UnsafePathError (refused: not owned by the running user, writable
    by group or others, a symbolic link, or under a directory another user
    could change) or StoreWriteError (cannot be created)."""
    path = os.path.abspath(path)
    if create_mode & 0o022:
        raise UnsafePathError(path, "create_mode %04o is writable by group or others" % create_mode)
    if not check_private_dir(path):
        missing = []
        current = path
        while not os.path.lexists(current):
            missing.insert(0, current)
            current = os.path.dirname(current)
        for directory in missing:
            try:
                os.mkdir(directory, create_mode)
                os.chmod(directory, create_mode)  # mkdir's mode is masked by the umask
            except OSError as err:
                if err.errno != errno.EEXIST:
                    raise StoreWriteError(directory, err)
        check_private_dir(path)
    return path


# ------------------------------------------------------------------ writes
def write_atomic(path, text):
    """Write text to path atomically (a temporary file in the same
    directory, renamed over path). The directory is created private when
    missing (ensure_private_dir). Raises StoreWriteError naming the path on
    any failure (nothing is left behind), UnsafePathError when the
    directory is not safe."""
    directory = ensure_private_dir(os.path.dirname(os.path.abspath(path)))
    tmp = os.path.join(directory, ".%s.%d.tmp" % (os.path.basename(path), os.getpid()))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except (IOError, OSError) as err:
        remove_quietly(tmp)
        raise StoreWriteError(path, err)


def remove_quietly(path):
    """Remove the file path if it is there; a failure (already gone, say) is ignored."""
    try:
        os.unlink(path)
    except OSError:
        pass


def keep_cache(path, text):
    """write_atomic for a cache, which may fail without harm: None when
    written, else a warning "could not keep <path>: <why>" (never raises
    StoreError)."""
    try:
        write_atomic(path, text)
    except StoreError as err:
        return "could not keep %s: %s" % (path, err.why)
    return None


def read_private(path):
    """The text of a file that only the running user can have written (a
    regular file, not a symbolic link, owned by the running user, not
    writable by group or others, one link), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022 or st.st_nlink != 1:
            return None
        try:
            return f.read()
        except (IOError, OSError, ValueError):
            return None


# ------------------------------------------------------------------ memo
def _strings(value):
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _string_map(value):
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def valid_rendering(rendered):
    """Whether rendered has the shape the rules module stores: commands and
    warnings (lists of strings), restore ({family: payload}), config (a
    dict), and nft_tables ({name: text}) when present."""
    return (isinstance(rendered, dict) and _strings(rendered.get("commands"))
            and _strings(rendered.get("warnings")) and _string_map(rendered.get("restore"))
            and isinstance(rendered.get("config"), dict)
            and ("nft_tables" not in rendered or _string_map(rendered["nft_tables"])))


class RenderMemo(object):
    """The rendering of the configuration last applied in this network
    namespace (commands, restore payloads, effective configuration),
    kept in state_dir under a digest of everything it was computed from.

    A re-run with the same options, generator code and host files (see
    memo_key) loads it instead of validating and generating again, so a
    no-op costs little more than one iptables-save per family.  One file
    per namespace: a new configuration replaces it.

    Trust: the memo holds the payloads that are restored, so it is only
    read from and written to a private state_dir (check_private_dir: owned
    by the running user, not writable by group or others, no symbolic link,
    parents only root can change); load() and store() raise
    UnsafePathError otherwise, before anything is applied. The file itself
    must be a regular file of the running user, not writable by group or
    others, with one link, and must have the stored shape; anything else is
    a miss (rendered again, then replaced). It is not signed: a secret to
    sign it with would live in the same directory, and re-rendering to
    verify it would cost what the memo saves.
    """

    def __init__(self, state_dir, netns_id=None):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, "rendered-%s.json" % (netns_id or current_netns_id()))

    def load(self, key):
        """The stored rendering when it was stored under key, else None.
        Raises UnsafePathError when state_dir is not private."""
        if not check_private_dir(self.state_dir):
            return None
        text = read_private(self.path)
        if text is None:
            return None
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("key") != key or not valid_rendering(data.get("rendered")):
            return None
        return data["rendered"]

    def store(self, key, rendered):
        """Raises StoreWriteError (cannot write) or UnsafePathError."""
        write_atomic(self.path, json.dumps({"key": key, "rendered": rendered}, separators=(",", ":")))

    def remove(self):
        remove_quietly(self.path)


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
    """'<st_dev>-<st_ino>' of /proc/self/ns/net, as the restore script's
    stat -L -c '%d-%i' /proc/self/ns/net prints it."""
    st = os.stat("/proc/self/ns/net")
    return "%d-%d" % (st.st_dev, st.st_ino)
