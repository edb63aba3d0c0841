#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: persist
short_description: Write or remove a set of files in one idempotent step
version_added: 0.1.0
description:
  - Converges the files of a directory, and a few files outside it, to the given contents in one module run.
    The C(meshcapture.sidecar.capture) role persists the capture for the next boot with it (the restore payloads,
    the routing settings and the restore script in one directory, the systemd unit in another).
  - The files of O(files) are kept as one set, replaced in one step. The set is a directory
    C(<path>/.set-<digest>/) that holds every file of it, and the symbolic link C(<path>/.current) points to
    the active one; each file is also C(<path>/<name>), a hard link to the active set's file (the same file,
    with the same content, mode and owner). A change writes a complete new set directory (files that stay the same
    are hard-linked into it), then renames a new C(.current) over the old one, then links the names in
    O(path) and removes the old set. A failure before that rename (a full or read-only file system, say)
    leaves the previous set complete and active, and the error names the path that could not be written.
    Whoever reads the set through C(.current) (the role's boot-time restore script does) sees the old set or
    the new one, never a mix.
  - Running as root, the module holds the host lock of M(meshcapture.sidecar.rules) (C(/run/meshcapture/lock-<network
    namespace>), waited for up to 60 seconds) while it changes anything, so the boot-time restore script,
    which takes the same lock, never reads a set while it is replaced.
  - O(state=present) creates O(path) if it is missing, then writes a new set when a file's content, mode,
    owner or group differ from the wanted ones. Files that are already right are not touched, so a second run
    reports no change and writes nothing. The names in O(files) are added to the set or replace their
    namesakes; other files of the set are kept.
  - O(state=absent) removes the listed files from the set (in one step, as above) and from O(path), and then
    O(path) itself, but only if nothing else is left in it. Other files in O(path) are kept.
  - O(path) must be a directory that only the user running the module can change, since root runs what is
    in it at boot. A O(path) that is a symbolic link, is not owned by that user, or is writable by group or
    others, or that is under a directory another user could change (one not owned by root or that user,
    writable by group or others without the sticky bit, or a symbolic link owned by another user) is refused
    before anything changes, with the path and the reason.
  - Every option is checked before anything changes.
  - Also reports whether systemd is running on the target (RV(systemd_running)), so that a playbook can decide
    whether to enable a unit it wrote without another task.
author:
  - meshcapture maintainers (@meshcapture)
extends_documentation_fragment:
  - meshcapture.sidecar.attributes
options:
  state:
    description:
      - V(present) writes the files, V(absent) removes them.
    type: str
    choices: [present, absent]
    default: present
  path:
    description:
      - The directory that holds O(files). An absolute path.
      - With O(state=present) it is created, with its missing parents, with O(directory_mode) and O(group),
        owned by the user running the module. An existing directory is left as it is (and refused when
        another user could change it, see above).
      - With O(state=absent) it is removed when the listed files were the only entries in it; a O(path) that
        is not a directory is left alone.
    type: path
    required: true
  files:
    description:
      - The files in O(path).
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description:
          - The file name, a plain name inside O(path) (not empty, no C(/), no control characters, not C(.) or
            C(..), not C(.current) and not starting with C(.set-) or C(.current.)).
        type: str
        required: true
      content:
        description:
          - The whole content of the file. Required with O(state=present), ignored with O(state=absent).
        type: str
      mode:
        description:
          - The file's permissions, an octal number such as V('0644') (quote it in YAML).
        type: raw
        default: '0644'
  extra_files:
    description:
      - Files outside O(path) (a systemd unit, say), written and removed with the same rules as O(files), but
        each on its own (a temporary file in the same directory, renamed over the old one), not as part of
        the set.
      - Their directory must exist; it is never created or removed.
    type: list
    elements: dict
    default: []
    suboptions:
      path:
        description:
          - The file's absolute path.
        type: path
        required: true
      content:
        description:
          - The whole content of the file. Required with O(state=present), ignored with O(state=absent).
        type: str
      mode:
        description:
          - The file's permissions, an octal number such as V('0644') (quote it in YAML).
        type: raw
        default: '0644'
  owner:
    description:
      - User that owns the written files. A name, or a numeric ID. The directories the module creates are
        owned by the user running it.
    type: str
    default: root
  group:
    description:
      - Group that owns the written files and the directories the module creates. A name, or a numeric ID.
    type: str
    default: root
  directory_mode:
    description:
      - Permissions of the directories the module creates (O(path), its missing parents and the set
        directories), an octal number such as V('0755'), not writable by group or others.
    type: raw
    default: '0755'
notes:
  - A file is compared byte for byte. An entry in O(path) that is not the active set's file (a symbolic link,
    or a copy, say) is replaced by a hard link to it; an entry that is a directory makes the module fail
    before anything changes. Files written by earlier releases (plain files in O(path)) become the first set.
  - With C(--diff), the diff holds the old and new content of every file written or removed (whole, however
    large) and the attributes that change.
  - SELinux contexts and other file attributes are not managed.
seealso:
  - module: ansible.builtin.copy
  - module: meshcapture.sidecar.rules
"""

EXAMPLES = r"""
- name: Persist the capture and its systemd unit
  meshcapture.sidecar.persist:
    path: /etc/meshcapture
    files:
      - name: rules.v4
        content: "{{ rules.restore.ipv4 }}"
      - name: meshcapture-restore.sh
        content: "{{ lookup('ansible.builtin.template', 'meshcapture-restore.sh.j2') }}"
        mode: '0755'
    extra_files:
      - path: /etc/systemd/system/meshcapture-capture.service
        content: "{{ lookup('ansible.builtin.template', 'meshcapture-capture.service.j2') }}"
  register: persisted

- name: Enable the unit where systemd runs, reloading systemd when the unit changed
  ansible.builtin.systemd_service:
    name: meshcapture-capture.service
    enabled: true
    daemon_reload: "{{ '/etc/systemd/system/meshcapture-capture.service' in persisted.written }}"
  when: persisted.systemd_running

- name: Remove them again (the directory too, if nothing else is in it)
  meshcapture.sidecar.persist:
    state: absent
    path: /etc/meshcapture
    files:
      - name: rules.v4
      - name: meshcapture-restore.sh
    extra_files:
      - path: /etc/systemd/system/meshcapture-capture.service
"""

RETURN = r"""
path:
  description: The directory O(path), normalised.
  returned: always
  type: str
  sample: /etc/meshcapture
written:
  description: The files written (or that would be, in check mode), O(files) first, in the given order.
  returned: always
  type: list
  elements: str
  sample: ['/etc/meshcapture/rules.v4', '/etc/systemd/system/meshcapture-capture.service']
removed:
  description:
    - The files removed (or that would be, in check mode), then O(path) when it is removed.
    - Always empty with O(state=present).
  returned: always
  type: list
  elements: str
  sample: ['/etc/meshcapture/rules.v4', '/etc/systemd/system/meshcapture-capture.service', '/etc/meshcapture']
existing:
  description: The listed files (O(files), then O(extra_files)) that existed before the run.
  returned: always
  type: list
  elements: str
  sample: ['/etc/systemd/system/meshcapture-capture.service']
systemd_running:
  description: Whether systemd is running on the target, that is, whether C(/run/systemd/system) is a directory.
  returned: always
  type: bool
  sample: true
"""

import grp
import hashlib
import os
import pwd
import shutil
import stat
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.text.converters import to_bytes, to_native, to_text
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import CaptureError
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_lock import LOCK_DIR, LOCK_TIMEOUT, HostLock
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_store import (
    StoreError,
    check_private_dir,
    current_netns_id,
    remove_quietly,
)

# What sd_booted(3) checks: systemd is running when this is a directory.
SYSTEMD_BOOTED_PATH = "/run/systemd/system"
# The active file set of a directory: CURRENT is a symbolic link to one
# SET_PREFIX<digest> directory that holds every file of the set; each file
# is also a hard link <path>/<name> to the active one.
CURRENT = ".current"
SET_PREFIX = ".set-"

FILE_SPEC = dict(
    content=dict(type="str"),
    mode=dict(type="raw", default="0644"),
)

ARGUMENT_SPEC = dict(
    state=dict(type="str", default="present", choices=["present", "absent"]),
    path=dict(type="path", required=True),
    files=dict(type="list", elements="dict", default=[],
               options=dict(name=dict(type="str", required=True), **FILE_SPEC)),
    extra_files=dict(type="list", elements="dict", default=[],
                     options=dict(path=dict(type="path", required=True), **FILE_SPEC)),
    owner=dict(type="str", default="root"),
    group=dict(type="str", default="root"),
    directory_mode=dict(type="raw", default="0755"),
)


class PersistError(Exception):
    """A bad option value: '<option>: <reason> (got <value>)'."""

    def __init__(self, option, reason, value):
        super(PersistError, self).__init__("%s: %s (got %r)" % (option, reason, value))


class WriteError(Exception):
    """A write that failed: 'cannot write <path>: <reason>'."""

    def __init__(self, path, err):
        reason = to_native(getattr(err, "strerror", None) or err)
        super(WriteError, self).__init__("cannot write %s: %s" % (path, reason))


class Entry(object):
    """One managed file: where it goes and what it should be."""

    def __init__(self, option, path, content, mode, name=None):
        self.option = option  # e.g. files[0], for messages
        self.path = path
        self.name = name  # the name in the file set (files), None for extra_files
        self.content = content  # bytes, or None with state=absent
        self.mode = mode


def parse_mode(option, value):
    """An octal mode given as a string ('0644', '644') or as the integer YAML makes of 0644."""
    if isinstance(value, bool):
        raise PersistError(option, "must be an octal mode such as '0644'", value)
    if isinstance(value, int):
        mode = value
    else:
        text = to_text(value).strip()
        if not text or len(text) > 5 or any(char not in "01234567" for char in text):
            raise PersistError(option, "must be an octal mode such as '0644'", value)
        mode = int(text, 8)
    if not 0 <= mode <= 0o7777:
        raise PersistError(option, "must be an octal mode between '0000' and '07777'", value)
    return mode


def check_name(option, name):
    if name == "":
        raise PersistError(option, "must not be empty", name)
    if name in (".", ".."):
        raise PersistError(option, "must be a file name, not '.' or '..'", name)
    if "/" in name:
        raise PersistError(option, "must be a plain file name inside path, without '/'", name)
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        raise PersistError(option, "must not contain control characters", name)
    if name == CURRENT or name.startswith((SET_PREFIX, CURRENT + ".")):
        raise PersistError(option, "is a name the module keeps the file set under", name)


def resolve_owner(option, value, lookup, id_field):
    try:
        return getattr(lookup(value), id_field)
    except KeyError:
        if value.isdigit():
            return int(value)
    kind = "user" if option == "owner" else "group"
    raise PersistError(option, "no such %s on the target" % kind, value)


def entries_from_params(params):
    """The managed files, checked: (Entry list, directory)."""
    state = params["state"]
    directory = params["path"]
    if not os.path.isabs(directory):
        raise PersistError("path", "must be an absolute path", directory)
    directory = os.path.normpath(directory)
    entries = []
    for index, item in enumerate(params["files"]):
        option = "files[%d]" % index
        check_name(option + ".name", item["name"])
        entries.append((option, os.path.join(directory, item["name"]), item, item["name"]))
    for index, item in enumerate(params["extra_files"]):
        option = "extra_files[%d]" % index
        if not os.path.isabs(item["path"]) or item["path"].endswith("/"):
            raise PersistError(option + ".path", "must be the absolute path of a file", item["path"])
        entries.append((option, os.path.normpath(item["path"]), item, None))
    result = []
    seen = {}
    for option, path, item, name in entries:
        if path in seen:
            raise PersistError(option, "names the same file as %s" % seen[path], path)
        if path == directory:
            raise PersistError(option, "names the directory path itself", path)
        seen[path] = option
        content = None
        if state == "present":
            if item["content"] is None:
                raise PersistError(option + ".content", "is required with state=present", None)
            content = to_bytes(item["content"], errors="surrogate_or_strict")
        result.append(Entry(option, path, content, parse_mode(option + ".mode", item["mode"]), name))
    return result, directory


def lstat(path):
    try:
        return os.lstat(path)
    except OSError:
        return None


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def mode_text(mode):
    return "%04o" % mode


def owner_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid):
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def attributes(st):
    return dict(mode=mode_text(stat.S_IMODE(st.st_mode)), owner=owner_name(st.st_uid), group=group_name(st.st_gid))


def missing_dirs(directory):
    """The directories to create for directory, outermost first."""
    missing = []
    while lstat(directory) is None:
        missing.insert(0, directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    return missing


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path, content, mode, uid, gid, exclusive=False):
    """Write content to a new file path (fsync'ed, owner and mode set)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
        f.flush()
        os.fchown(f.fileno(), uid, gid)
        os.fchmod(f.fileno(), mode)
        os.fsync(f.fileno())


def write_atomically(entry, uid, gid):
    """Write entry.content to a temporary file next to entry.path, then rename it over entry.path."""
    dirname, basename = os.path.split(entry.path)
    fd, tmp = tempfile.mkstemp(prefix=".%s." % basename, suffix=".tmp", dir=dirname)
    os.close(fd)
    try:
        write_file(tmp, entry.content, entry.mode, uid, gid)
        os.rename(tmp, entry.path)
    except BaseException:
        remove_quietly(tmp)
        raise


# ---------------------------------------------------------------- file sets
class FileSet(object):
    """The active file set of a directory: {name: os.stat_result} of the
    files in the directory CURRENT points to (name None: no set yet)."""

    def __init__(self, directory):
        self.directory = directory
        self.name = None
        self.files = {}
        link = os.path.join(directory, CURRENT)
        st = lstat(link)
        if st is None:
            return
        target = os.readlink(link) if stat.S_ISLNK(st.st_mode) else None
        if target is None or "/" in target or not target.startswith(SET_PREFIX) or target.endswith(".tmp"):
            raise PersistError("path", "%s is not a symbolic link to a %s* directory of this module"
                               % (link, SET_PREFIX), directory)
        set_dir = os.path.join(directory, target)
        try:
            check_private_dir(set_dir)
        except StoreError as err:
            raise PersistError("path", str(err), directory)
        if lstat(set_dir) is None:
            raise PersistError("path", "%s points to %s, which does not exist" % (link, set_dir), directory)
        self.name = target
        for name in os.listdir(set_dir):
            fst = os.lstat(os.path.join(set_dir, name))
            if not stat.S_ISREG(fst.st_mode):
                raise PersistError("path", "%s is not a regular file" % os.path.join(set_dir, name), directory)
            self.files[name] = fst

    def path(self, name, set_name=None):
        return os.path.join(self.directory, set_name or self.name, name)


def set_digest(files):
    """{name: (content, mode, uid, gid)} -> the name of its set directory."""
    digest = hashlib.sha256()
    for name in sorted(files):
        content, mode, uid, gid = files[name]
        digest.update(to_bytes("%s\0%o\0%d\0%d\0%d\0" % (name, mode, uid, gid, len(content))))
        digest.update(content)
    return digest.hexdigest()[:16]


def same_file(a, b):
    return a is not None and b is not None and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def plan_present(entries, directory, uid, gid, dir_mode):
    """(directories to create, entries to write, new set or None, diff) without changing anything.

    The new set: {name: Entry, or the stat of an unchanged file of the active set}."""
    if lstat(directory) is not None and not os.path.isdir(directory):
        raise PersistError("path", "exists and is not a directory", directory)
    create = missing_dirs(directory)
    active = FileSet(directory) if not create else None
    diff = []
    new_attrs = dict(mode=None, owner=owner_name(uid), group=group_name(gid))
    for path in create:
        diff.append(dict(before_header=path, after_header=path, before=dict(path=path, state="absent"),
                         after=dict(path=path, state="directory", mode=mode_text(dir_mode),
                                    owner=owner_name(os.geteuid()), group=new_attrs["group"])))
    writes = []
    new_set = dict(active.files) if active else {}
    set_changed = False
    for entry in entries:
        parent = os.path.dirname(entry.path)
        if parent != directory and not os.path.isdir(parent):
            raise PersistError(entry.option + ".path", "directory %s does not exist" % parent, entry.path)
        st = lstat(entry.path)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise PersistError(entry.option, "is a directory, not a file", entry.path)
        wanted = dict(new_attrs, mode=mode_text(entry.mode))
        in_set = active.files.get(entry.name) if active and entry.name else None
        if entry.name is not None:
            new_set[entry.name] = entry
            if in_set is not None and attributes(in_set) == wanted \
                    and read_bytes(active.path(entry.name)) == entry.content:
                new_set[entry.name] = in_set
                if same_file(st, in_set):
                    continue
            else:
                set_changed = True
        # What is there now, as the file at entry.path shows it (or the set's copy).
        shown = entry.path if st is not None and stat.S_ISREG(st.st_mode) else None
        if shown is None and in_set is not None:
            shown, st = active.path(entry.name), in_set
        if shown is not None:
            before = read_bytes(shown)
            now = attributes(st)
        else:
            before, now = None, None
        if entry.name is None and before == entry.content and now == wanted:
            continue
        writes.append(entry)
        if now is None:
            # A new file: its content, with its attributes in the header.
            diff.append(dict(before_header=entry.path,
                             after_header="%s (mode %s, owner %s, group %s)" % (
                                 entry.path, wanted["mode"], wanted["owner"], wanted["group"]),
                             before="", after=to_text(entry.content, errors="replace")))
            continue
        if before != entry.content:
            diff.append(dict(before_header=entry.path, after_header=entry.path,
                             before=to_text(before, errors="replace"),
                             after=to_text(entry.content, errors="replace")))
        if now != wanted:
            diff.append(dict(before_header=entry.path + " (attributes)", after_header=entry.path + " (attributes)",
                             before=dict(path=entry.path, **now),
                             after=dict(path=entry.path, **wanted)))
    return create, writes, (new_set if set_changed else None), active, diff


def plan_absent(entries, directory, want_diff):
    """(entries to remove, new set or None, active set, whether to remove directory, diff)."""
    if lstat(directory) is None or not os.path.isdir(directory) or os.path.islink(directory):
        active = None
    else:
        active = FileSet(directory)
    removes = []
    diff = []
    new_set = dict(active.files) if active else {}
    for entry in entries:
        st = lstat(entry.path)
        in_set = active.files.get(entry.name) if active and entry.name else None
        if st is None and in_set is None:
            continue
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise PersistError(entry.option, "is a directory, not a file", entry.path)
        new_set.pop(entry.name, None)
        removes.append(entry)
        if not want_diff:
            continue
        if st is not None and stat.S_ISREG(st.st_mode):
            before = read_bytes(entry.path)
        else:
            before = read_bytes(active.path(entry.name)) if in_set is not None else b""
        diff.append(dict(before_header=entry.path, after_header=entry.path,
                         before=to_text(before, errors="replace"), after=""))
    remove_dir = False
    if active is not None:
        gone = set(entry.path for entry in removes)
        left = [name for name in os.listdir(directory) if os.path.join(directory, name) not in gone
                and (new_set or not (name == CURRENT or name.startswith(SET_PREFIX)))]
        remove_dir = not left
        if remove_dir:
            diff.append(dict(before_header=directory, after_header=directory,
                             before=dict(path=directory, state="directory"),
                             after=dict(path=directory, state="absent")))
    set_changed = active is not None and active.name is not None and len(new_set) != len(active.files)
    return removes, (new_set if set_changed else None), active, remove_dir, diff


def build_set(directory, new_set, active, uid, gid, dir_mode):
    """Write the set directory of new_set (unchanged files hard-linked from
    the active set) under a temporary name, then give it its name. Returns
    that name. On failure nothing of it is left, and WriteError names the
    path that failed."""
    files = {}
    for name, item in new_set.items():
        if isinstance(item, Entry):
            files[name] = (item.content, item.mode, uid, gid)
        else:
            files[name] = (read_bytes(active.path(name)), stat.S_IMODE(item.st_mode), item.st_uid, item.st_gid)
    set_name = SET_PREFIX + set_digest(files)
    if active is not None and set_name == active.name:  # the active set was edited in place
        set_name = SET_PREFIX + hashlib.sha256(to_bytes(set_name)).hexdigest()[:16]
    final = os.path.join(directory, set_name)
    tmp = final + ".tmp"
    for leftover in (tmp, final):
        if lstat(leftover) is not None:  # an earlier run that failed
            shutil.rmtree(leftover, ignore_errors=True)
    path = tmp
    try:
        os.mkdir(tmp, dir_mode)
        os.chown(tmp, os.geteuid(), gid)
        os.chmod(tmp, dir_mode)
        for name in sorted(new_set):
            item = new_set[name]
            path = os.path.join(tmp, name)
            if isinstance(item, Entry):
                write_file(path, item.content, item.mode, uid, gid, exclusive=True)
            else:
                os.link(active.path(name), path)
        path = tmp
        fsync_dir(tmp)
        path = final
        os.rename(tmp, final)
    except (IOError, OSError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(path, err)
    return set_name


def activate(directory, set_name):
    """Point CURRENT at set_name: one rename (the commit of the set). When
    that fails, set_name is removed again and the active set stays."""
    try:
        _activate(directory, set_name)
    except WriteError:
        shutil.rmtree(os.path.join(directory, set_name), ignore_errors=True)
        raise


def _activate(directory, set_name):
    link = os.path.join(directory, CURRENT)
    replace_with_link(os.symlink, set_name, link, link + ".tmp", sync_dir=directory)


def link_names(directory, set_name, names):
    """Make each <directory>/<name> a hard link to the file of the set."""
    for name in names:
        target = os.path.join(directory, set_name, name)
        path = os.path.join(directory, name)
        if same_file(lstat(path), lstat(target)):
            continue
        replace_with_link(os.link, target, path, os.path.join(directory, ".%s.tmp" % name))


def replace_with_link(make_link, target, path, tmp, sync_dir=None):
    """make_link(target, tmp) (os.link or os.symlink; a tmp left by an
    earlier run is removed first), then rename tmp over path and, with
    sync_dir, fsync that directory. On failure tmp is removed and
    WriteError names path."""
    try:
        if lstat(tmp) is not None:
            os.unlink(tmp)
        make_link(target, tmp)
        os.rename(tmp, path)
        if sync_dir is not None:
            fsync_dir(sync_dir)
    except (IOError, OSError) as err:
        remove_quietly(tmp)
        raise WriteError(path, err)


def remove_other_sets(directory, keep):
    """Remove the set directories (and leftovers) other than keep."""
    for name in os.listdir(directory):
        if name.startswith(SET_PREFIX) and name != keep:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


class NoLock(object):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def check_directory(directory):
    try:
        check_private_dir(directory)
    except StoreError as err:
        raise PersistError("path", "%s: refusing a directory that another user could change" % err.why, directory)


def apply_present(directory, create, writes, new_set, active, uid, gid, dir_mode):
    """Returns the paths written; raises WriteError."""
    done = []
    for path in create:
        try:
            os.mkdir(path, dir_mode)
            os.chown(path, os.geteuid(), gid)
            os.chmod(path, dir_mode)  # mkdir's mode is masked by the umask
        except (IOError, OSError) as err:
            raise WriteError(path, err)
    if not create:
        check_directory(directory)  # once more: it could have changed since the plan
    names = [entry.name for entry in writes if entry.name is not None]
    set_name = active.name if active is not None else None
    if new_set is not None:
        set_name = build_set(directory, new_set, active, uid, gid, dir_mode)
        activate(directory, set_name)
    if names:
        link_names(directory, set_name, names)
        done += [os.path.join(directory, name) for name in names]
    if set_name is not None:
        remove_other_sets(directory, set_name)
    for entry in writes:
        if entry.name is None:
            try:
                write_atomically(entry, uid, gid)
            except (IOError, OSError) as err:
                raise WriteError(entry.path, err)
            done.append(entry.path)
    return done


def apply_absent(directory, removes, new_set, active, remove_dir, gid, dir_mode):
    """Returns the paths removed; raises WriteError."""
    done = []
    path = directory
    if new_set:
        set_name = build_set(directory, new_set, active, None, gid, dir_mode)
        activate(directory, set_name)
        remove_other_sets(directory, set_name)
    try:
        if new_set is not None and not new_set:
            path = os.path.join(directory, CURRENT)
            os.unlink(path)  # the set is gone in one step
            remove_other_sets(directory, None)
        for entry in removes:
            path = entry.path
            if lstat(path) is not None:
                os.unlink(path)
            done.append(path)
        if remove_dir:
            path = directory
            if lstat(os.path.join(directory, CURRENT)) is not None:
                os.unlink(os.path.join(directory, CURRENT))
            remove_other_sets(directory, None)
            os.rmdir(directory)
    except (IOError, OSError) as err:
        raise WriteError(path, err)
    return done


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    state = p["state"]
    uid = gid = None
    try:
        entries, directory = entries_from_params(p)
        dir_mode = parse_mode("directory_mode", p["directory_mode"])
        if dir_mode & 0o022:
            raise PersistError("directory_mode", "must not be writable by group or others", p["directory_mode"])
        if state == "present":
            uid = resolve_owner("owner", p["owner"], pwd.getpwnam, "pw_uid")
        gid = resolve_owner("group", p["group"], grp.getgrnam, "gr_gid")
    except PersistError as err:
        module.fail_json(msg=str(err))

    result = dict(changed=False, path=directory, written=[], removed=[],
                  existing=[entry.path for entry in entries if lstat(entry.path) is not None],
                  systemd_running=os.path.isdir(SYSTEMD_BOOTED_PATH))
    create, writes, removes, remove_dir, diff, new_set, active = [], [], [], False, [], None, None
    try:
        if state == "present":
            if lstat(directory) is None or os.path.isdir(directory):
                check_directory(directory)
            create, writes, new_set, active, diff = plan_present(entries, directory, uid, gid, dir_mode)
            result["written"] = [entry.path for entry in writes]
            result["changed"] = bool(create or writes)
        else:
            if os.path.isdir(directory):
                check_directory(directory)
            removes, new_set, active, remove_dir, diff = plan_absent(entries, directory, module._diff)
            result["removed"] = [entry.path for entry in removes] + ([directory] if remove_dir else [])
            result["changed"] = bool(result["removed"])
    except PersistError as err:
        module.fail_json(msg=str(err), **result)
    except (IOError, OSError) as err:
        module.fail_json(msg="cannot read %s: %s" % (err.filename or directory, to_native(err.strerror or err)),
                         **result)
    if module._diff:
        result["diff"] = diff

    if result["changed"] and not module.check_mode:
        try:
            # The host lock keeps the boot-time restore script (run as root)
            # from reading a set while it is replaced.
            with (HostLock(current_netns_id(), directory=LOCK_DIR, timeout=LOCK_TIMEOUT) if os.geteuid() == 0
                  else NoLock()):
                if state == "present":
                    result["written"] = apply_present(directory, create, writes, new_set, active, uid, gid,
                                                      dir_mode)
                else:
                    result["removed"] = apply_absent(directory, removes, new_set, active, remove_dir, gid,
                                                     dir_mode) + ([directory] if remove_dir else [])
        except (WriteError, PersistError, CaptureError) as err:
            key = "written" if state == "present" else "removed"
            result[key] = []
            module.fail_json(msg=str(err), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
