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
  - O(state=present) creates O(path) if it is missing, then writes each file whose content, mode, owner or
    group differ from the wanted ones, atomically (a temporary file in the same directory, renamed over the
    old one). Files that are already right are not touched, so a second run reports no change and writes
    nothing.
  - O(state=absent) removes the listed files and then O(path) itself, but only if nothing else is left in it.
    Other files in O(path) are kept.
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
      - With O(state=present) it is created, with its missing parents, with O(directory_mode), O(owner) and
        O(group). An existing directory is left as it is.
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
            C(..)).
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
      - Files outside O(path) (a systemd unit, say), written and removed with the same rules as O(files).
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
      - User that owns the written files and the directories the module creates. A name, or a numeric ID.
    type: str
    default: root
  group:
    description:
      - Group that owns the written files and the directories the module creates. A name, or a numeric ID.
    type: str
    default: root
  directory_mode:
    description:
      - Permissions of the directories the module creates, an octal number such as V('0755').
    type: raw
    default: '0755'
notes:
  - A file is compared byte for byte. An entry that is not a regular file (a symbolic link, say) is replaced
    by a regular file; an entry that is a directory makes the module fail before anything changes.
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
import os
import pwd
import stat
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.text.converters import to_bytes, to_native, to_text

# What sd_booted(3) checks: systemd is running when this is a directory.
SYSTEMD_BOOTED_PATH = "/run/systemd/system"

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


class Entry(object):
    """One managed file: where it goes and what it should be."""

    def __init__(self, option, path, content, mode):
        self.option = option  # e.g. files[0], for messages
        self.path = path
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
        entries.append((option, os.path.join(directory, item["name"]), item))
    for index, item in enumerate(params["extra_files"]):
        option = "extra_files[%d]" % index
        if not os.path.isabs(item["path"]) or item["path"].endswith("/"):
            raise PersistError(option + ".path", "must be the absolute path of a file", item["path"])
        entries.append((option, os.path.normpath(item["path"]), item))
    result = []
    seen = {}
    for option, path, item in entries:
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
        result.append(Entry(option, path, content, parse_mode(option + ".mode", item["mode"])))
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


def write_atomically(entry, uid, gid):
    """Write entry.content to a temporary file next to entry.path, then rename it over entry.path."""
    dirname, basename = os.path.split(entry.path)
    fd, tmp = tempfile.mkstemp(prefix=".%s." % basename, suffix=".tmp", dir=dirname)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(entry.content)
            f.flush()
            os.fchown(f.fileno(), uid, gid)
            os.fchmod(f.fileno(), entry.mode)
        os.rename(tmp, entry.path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def plan_present(entries, directory, uid, gid, dir_mode):
    """(directories to create, entries to write, diff) without changing anything."""
    if lstat(directory) is not None and not os.path.isdir(directory):
        raise PersistError("path", "exists and is not a directory", directory)
    create = missing_dirs(directory)
    diff = []
    new_attrs = dict(mode=None, owner=owner_name(uid), group=group_name(gid))
    for path in create:
        diff.append(dict(before_header=path, after_header=path, before=dict(path=path, state="absent"),
                         after=dict(path=path, state="directory", mode=mode_text(dir_mode),
                                    owner=new_attrs["owner"], group=new_attrs["group"])))
    writes = []
    for entry in entries:
        parent = os.path.dirname(entry.path)
        if parent != directory and not os.path.isdir(parent):
            raise PersistError(entry.option + ".path", "directory %s does not exist" % parent, entry.path)
        st = lstat(entry.path)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise PersistError(entry.option, "is a directory, not a file", entry.path)
        wanted = dict(new_attrs, mode=mode_text(entry.mode))
        if st is not None and stat.S_ISREG(st.st_mode):
            before = read_bytes(entry.path)
            now = attributes(st)
        else:
            before, now = None, None
        if before == entry.content and now == wanted:
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
    return create, writes, diff


def plan_absent(entries, directory, want_diff):
    """(entries to remove, whether to remove directory, diff) without changing anything."""
    removes = []
    diff = []
    for entry in entries:
        st = lstat(entry.path)
        if st is None:
            continue
        if stat.S_ISDIR(st.st_mode):
            raise PersistError(entry.option, "is a directory, not a file", entry.path)
        removes.append(entry)
        if not want_diff:
            continue
        before = read_bytes(entry.path) if stat.S_ISREG(st.st_mode) else b""
        diff.append(dict(before_header=entry.path, after_header=entry.path,
                         before=to_text(before, errors="replace"), after=""))
    remove_dir = False
    if os.path.isdir(directory) and not os.path.islink(directory):
        gone = set(entry.path for entry in removes)
        left = [name for name in os.listdir(directory) if os.path.join(directory, name) not in gone]
        remove_dir = not left
        if remove_dir:
            diff.append(dict(before_header=directory, after_header=directory,
                             before=dict(path=directory, state="directory"),
                             after=dict(path=directory, state="absent")))
    return removes, remove_dir, diff


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    state = p["state"]
    uid = gid = None
    try:
        entries, directory = entries_from_params(p)
        dir_mode = parse_mode("directory_mode", p["directory_mode"])
        if state == "present":
            uid = resolve_owner("owner", p["owner"], pwd.getpwnam, "pw_uid")
            gid = resolve_owner("group", p["group"], grp.getgrnam, "gr_gid")
    except PersistError as err:
        module.fail_json(msg=str(err))

    result = dict(changed=False, path=directory, written=[], removed=[],
                  existing=[entry.path for entry in entries if lstat(entry.path) is not None],
                  systemd_running=os.path.isdir(SYSTEMD_BOOTED_PATH))
    create, writes, removes, remove_dir, diff = [], [], [], False, []
    try:
        if state == "present":
            create, writes, diff = plan_present(entries, directory, uid, gid, dir_mode)
            result["written"] = [entry.path for entry in writes]
            result["changed"] = bool(create or writes)
        else:
            removes, remove_dir, diff = plan_absent(entries, directory, module._diff)
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
        done = []
        try:
            if state == "present":
                for path in create:
                    os.mkdir(path, dir_mode)
                    os.chown(path, uid, gid)
                    os.chmod(path, dir_mode)  # mkdir's mode is masked by the umask
                for entry in writes:
                    write_atomically(entry, uid, gid)
                    done.append(entry.path)
            else:
                for entry in removes:
                    os.unlink(entry.path)
                    done.append(entry.path)
                if remove_dir:
                    os.rmdir(directory)
        except (IOError, OSError) as err:
            verb, key = ("write", "written") if state == "present" else ("remove", "removed")
            result[key] = done
            module.fail_json(msg="cannot %s %s: %s" % (verb, err.filename or directory, to_native(err.strerror or err)),
                             **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
