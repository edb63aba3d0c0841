"""The persist module on a temporary directory: writes, idempotence, check
mode, diff, removal and its argument errors.

Files are owned by the user running the tests (root in CI), so the tests
also run unprivileged.
"""

import errno
import fcntl
import grp
import os
import re
import pwd
import stat

import pytest

from ansible_collections.meshcapture.sidecar.plugins.modules import persist

USER = pwd.getpwuid(os.geteuid()).pw_name
GROUP = grp.getgrgid(os.getegid()).gr_name
SYSTEMD_BOOTED_PATH = persist.SYSTEMD_BOOTED_PATH  # before the fixture below replaces it


@pytest.fixture(autouse=True)
def no_systemd(monkeypatch, tmp_path):
    """systemd 'runs' when tmp_path/systemd-booted exists."""
    monkeypatch.setattr(persist, "SYSTEMD_BOOTED_PATH", str(tmp_path / "systemd-booted"))
    monkeypatch.setattr(persist, "LOCK_DIR", str(tmp_path / "lock"), raising=False)


@pytest.fixture
def layout(tmp_path):
    unit_dir = tmp_path / "systemd"
    unit_dir.mkdir()
    return tmp_path / "etc" / "meshcapture", unit_dir / "meshcapture-capture.service"


def args(directory, unit=None, state="present", **overrides):
    files = [
        dict(name="rules.v4", content="*nat\nCOMMIT\n"),
        dict(name="rules.v6", content=""),
        dict(name="routes.env", content="MESHCAPTURE_TPROXY_ROUTES=false\n", mode="0644"),
        dict(name="meshcapture-restore.sh", content="#!/bin/sh\nexit 0\n", mode="0755"),
    ]
    result = dict(state=state, path=str(directory), owner=USER, group=GROUP, files=files,
                  extra_files=[dict(path=str(unit), content="[Unit]\n")] if unit else [])
    if state == "absent":
        result["files"] = [dict(name=f["name"]) for f in files]
        result["extra_files"] = [dict(path=str(unit))] if unit else []
    result.update(overrides)
    return result


def snapshot(*paths):
    """(inode, mtime_ns, mode, content) of each path."""
    out = {}
    for path in paths:
        st = os.lstat(str(path))
        out[str(path)] = (st.st_ino, st.st_mtime_ns, stat.S_IMODE(st.st_mode), path.read_bytes())
    return out


def active_set(directory):
    """(name of the active set directory, its file names); checks that every
    file of the set is also <directory>/<name>, the same file (a hard link)."""
    set_name = os.readlink(str(directory / ".current"))
    assert set_name.startswith(".set-") and "/" not in set_name
    names = sorted(os.listdir(str(directory / set_name)))
    for name in names:
        assert os.path.samestat(os.lstat(str(directory / name)), os.lstat(str(directory / set_name / name))), name
    return set_name, names


def listing(directory):
    """The directory's entries, the active set directory as '.set-*' (and checked: active_set)."""
    set_name, dummy = active_set(directory)
    return sorted(".set-*" if name == set_name else name for name in os.listdir(str(directory)))


def managed(directory, unit):
    return [directory / name for name in ("rules.v4", "rules.v6", "routes.env", "meshcapture-restore.sh")] + [unit]


def test_present_writes_everything(run_module, layout):
    directory, unit = layout
    result, failed = run_module(persist.main, args(directory, unit))
    assert not failed, result.get("msg")
    assert result["changed"] is True
    assert result["written"] == [str(p) for p in managed(directory, unit)]
    assert result["removed"] == []
    assert result["existing"] == []
    assert result["path"] == str(directory)
    assert result["systemd_running"] is False
    assert (directory / "rules.v4").read_text() == "*nat\nCOMMIT\n"
    assert (directory / "rules.v6").read_text() == ""
    assert unit.read_text() == "[Unit]\n"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o755
    assert stat.S_IMODE(directory.parent.stat().st_mode) == 0o755  # missing parents are created too
    assert stat.S_IMODE((directory / "meshcapture-restore.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((directory / "routes.env").stat().st_mode) == 0o644
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    # The files are one set: .set-<digest>/ with all of them, .current pointing to it, and each
    # file also in the directory itself (a hard link to the set's); no temporary file left.
    assert listing(directory) == [".current", ".set-*", "meshcapture-restore.sh", "routes.env", "rules.v4",
                                  "rules.v6"]
    assert active_set(directory)[1] == ["meshcapture-restore.sh", "routes.env", "rules.v4", "rules.v6"]
    assert stat.S_IMODE((directory / active_set(directory)[0]).stat().st_mode) == 0o755
    assert os.listdir(str(unit.parent)) == [unit.name]


def test_second_run_changes_and_writes_nothing(run_module, layout):
    directory, unit = layout
    run_module(persist.main, args(directory, unit))
    before = snapshot(*managed(directory, unit))
    dir_before = os.stat(str(directory)).st_mtime_ns
    result, failed = run_module(persist.main, args(directory, unit, _ansible_diff=True))
    assert not failed
    assert result["changed"] is False
    assert result["written"] == []
    assert result["existing"] == [str(p) for p in managed(directory, unit)]
    assert result["diff"] == []
    assert snapshot(*managed(directory, unit)) == before
    assert os.stat(str(directory)).st_mtime_ns == dir_before


def test_content_change_rewrites_only_that_file_atomically(run_module, layout):
    directory, unit = layout
    run_module(persist.main, args(directory, unit))
    before = snapshot(*managed(directory, unit))
    new = args(directory, unit)
    new["files"][0]["content"] = "*nat\n:ISTIO_OUTPUT - [0:0]\nCOMMIT\n"
    result, failed = run_module(persist.main, new)
    assert not failed
    assert result["changed"] is True
    assert result["written"] == [str(directory / "rules.v4")]
    after = snapshot(*managed(directory, unit))
    rules_v4 = str(directory / "rules.v4")
    assert after[rules_v4][3] == b"*nat\n:ISTIO_OUTPUT - [0:0]\nCOMMIT\n"
    assert after[rules_v4][0] != before[rules_v4][0]  # a new file renamed over the old one
    del before[rules_v4], after[rules_v4]
    assert after == before  # the other files are the same files (hard links into the new set)
    assert listing(directory) == [".current", ".set-*", "meshcapture-restore.sh", "routes.env", "rules.v4",
                                  "rules.v6"]  # the old set is gone


def test_mode_change_is_written(run_module, layout):
    directory, unit = layout
    run_module(persist.main, args(directory, unit))
    os.chmod(str(directory / "meshcapture-restore.sh"), 0o644)
    os.chmod(str(unit), 0o600)
    result, failed = run_module(persist.main, args(directory, unit, _ansible_diff=True))
    assert not failed
    assert result["written"] == [str(directory / "meshcapture-restore.sh"), str(unit)]
    assert stat.S_IMODE((directory / "meshcapture-restore.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    # Only the attributes differ: the diff says so, and shows no content change.
    assert result["diff"] == [
        dict(before_header=str(directory / "meshcapture-restore.sh") + " (attributes)",
             after_header=str(directory / "meshcapture-restore.sh") + " (attributes)",
             before=dict(path=str(directory / "meshcapture-restore.sh"), mode="0644", owner=USER, group=GROUP),
             after=dict(path=str(directory / "meshcapture-restore.sh"), mode="0755", owner=USER, group=GROUP)),
        dict(before_header=str(unit) + " (attributes)", after_header=str(unit) + " (attributes)",
             before=dict(path=str(unit), mode="0600", owner=USER, group=GROUP),
             after=dict(path=str(unit), mode="0644", owner=USER, group=GROUP)),
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_owner_change_is_written(run_module, layout):
    directory, unit = layout
    run_module(persist.main, args(directory, unit, owner="root", group="root"))
    os.chown(str(directory / "routes.env"), 65534, 0)
    os.chown(str(unit), 0, 65534)
    result, failed = run_module(persist.main, args(directory, unit, owner="root", group="root"))
    assert not failed
    assert result["written"] == [str(directory / "routes.env"), str(unit)]
    for path in (directory / "routes.env", unit):
        assert (path.stat().st_uid, path.stat().st_gid) == (0, 0)


def test_numeric_owner_and_integer_mode(run_module, layout):
    directory, unit = layout
    result, failed = run_module(persist.main, dict(
        path=str(directory), owner=str(os.geteuid()), group=str(os.getegid()),
        files=[dict(name="a", content="x", mode=0o640)]))
    assert not failed, result.get("msg")
    assert stat.S_IMODE((directory / "a").stat().st_mode) == 0o640


def test_symlink_is_replaced_by_a_file(run_module, layout, tmp_path):
    directory, unit = layout
    target = tmp_path / "elsewhere"
    target.write_text("*nat\nCOMMIT\n")
    directory.mkdir(parents=True)
    os.symlink(str(target), str(directory / "rules.v4"))
    result, failed = run_module(persist.main, args(directory, unit))
    assert not failed
    assert str(directory / "rules.v4") in result["written"]
    assert not os.path.islink(str(directory / "rules.v4"))
    assert target.read_text() == "*nat\nCOMMIT\n"


def test_check_mode_writes_nothing_and_predicts_the_writes(run_module, layout):
    directory, unit = layout
    result, failed = run_module(persist.main, args(directory, unit, _ansible_check_mode=True))
    assert not failed
    assert result["changed"] is True
    assert result["written"] == [str(p) for p in managed(directory, unit)]
    assert not directory.parent.exists()
    assert os.listdir(str(unit.parent)) == []
    # Once written, check mode predicts exactly what changed.
    run_module(persist.main, args(directory, unit))
    before = snapshot(*managed(directory, unit))
    new = args(directory, unit, _ansible_check_mode=True)
    new["files"][2]["content"] = "MESHCAPTURE_TPROXY_ROUTES=true\n"
    result, failed = run_module(persist.main, new)
    assert (failed, result["changed"], result["written"]) == (False, True, [str(directory / "routes.env")])
    assert snapshot(*managed(directory, unit)) == before


def test_diff_shows_each_file_before_and_after(run_module, layout):
    directory, unit = layout
    result, failed = run_module(persist.main, args(directory, unit, _ansible_diff=True, _ansible_check_mode=True))
    assert not failed
    by_header = {}
    for entry in result["diff"]:
        by_header.setdefault(entry["before_header"], []).append(entry)
    # The directories to create, then per file its content and attributes.
    assert by_header[str(directory)] == [dict(
        before_header=str(directory), after_header=str(directory), before=dict(path=str(directory), state="absent"),
        after=dict(path=str(directory), state="directory", mode="0755", owner=USER, group=GROUP))]
    # A new file: its content, its attributes in the header.
    assert by_header[str(unit)] == [dict(
        before_header=str(unit), after_header="%s (mode 0644, owner %s, group %s)" % (unit, USER, GROUP),
        before="", after="[Unit]\n")]
    script = by_header[str(directory / "meshcapture-restore.sh")][0]
    assert script["after_header"].endswith("(mode 0755, owner %s, group %s)" % (USER, GROUP))
    assert len(result["diff"]) == 2 + 5  # two directories, five files
    run_module(persist.main, args(directory, unit))
    new = args(directory, unit, _ansible_diff=True)
    new["files"][0]["content"] = "*nat\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n"
    result, failed = run_module(persist.main, new)
    assert not failed
    assert result["diff"] == [dict(before_header=str(directory / "rules.v4"), after_header=str(directory / "rules.v4"),
                                   before="*nat\nCOMMIT\n", after="*nat\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n")]


def test_no_diff_without_diff_mode(run_module, layout):
    directory, unit = layout
    result, dummy = run_module(persist.main, args(directory, unit))
    assert "diff" not in result


def test_systemd_running_is_reported(run_module, layout, tmp_path):
    directory, unit = layout
    (tmp_path / "systemd-booted").mkdir()
    for state in ("present", "absent"):
        result, failed = run_module(persist.main, args(directory, unit, state=state))
        assert (failed, result["systemd_running"]) == (False, True)


def test_the_constant_is_where_systemd_says_it_runs():
    assert SYSTEMD_BOOTED_PATH == "/run/systemd/system"


def test_absent_removes_everything_and_the_empty_directory(run_module, layout):
    directory, unit = layout
    run_module(persist.main, args(directory, unit))
    result, failed = run_module(persist.main, args(directory, unit, state="absent", _ansible_diff=True))
    assert not failed
    assert result["changed"] is True
    assert result["removed"] == [str(p) for p in managed(directory, unit)] + [str(directory)]
    assert result["existing"] == [str(p) for p in managed(directory, unit)]
    assert result["written"] == []
    assert not directory.exists()
    assert directory.parent.exists()  # only the directory itself is removed
    assert not unit.exists() and unit.parent.exists()
    assert dict(before_header=str(unit), after_header=str(unit), before="[Unit]\n", after="") in result["diff"]
    assert result["diff"][-1] == dict(before_header=str(directory), after_header=str(directory),
                                      before=dict(path=str(directory), state="directory"),
                                      after=dict(path=str(directory), state="absent"))
    result, failed = run_module(persist.main, args(directory, unit, state="absent"))
    assert (failed, result["changed"], result["removed"], result["existing"]) == (False, False, [], [])


def test_absent_keeps_other_files_and_the_directory(run_module, layout):
    directory, unit = layout
    run_module(persist.main, args(directory, unit))
    (directory / "rules.v4.dpkg-old").write_text("keep me")
    (directory / ".hidden").write_text("keep me too")
    result, failed = run_module(persist.main, args(directory, unit, state="absent"))
    assert not failed
    assert result["removed"] == [str(p) for p in managed(directory, unit)]
    assert sorted(os.listdir(str(directory))) == [".hidden", "rules.v4.dpkg-old"]
    assert not unit.exists()


def test_absent_of_only_some_files_keeps_the_rest(run_module, layout):
    directory, unit = layout
    run_module(persist.main, args(directory, unit))
    result, failed = run_module(persist.main, dict(state="absent", path=str(directory), files=[dict(name="rules.v6")]))
    assert (failed, result["removed"]) == (False, [str(directory / "rules.v6")])
    assert listing(directory) == [".current", ".set-*", "meshcapture-restore.sh", "routes.env", "rules.v4"]
    assert active_set(directory)[1] == ["meshcapture-restore.sh", "routes.env", "rules.v4"]


def test_absent_in_check_mode_removes_nothing(run_module, layout):
    directory, unit = layout
    run_module(persist.main, args(directory, unit))
    before = snapshot(*managed(directory, unit))
    result, failed = run_module(persist.main, args(directory, unit, state="absent", _ansible_check_mode=True))
    assert not failed
    assert result["changed"] is True
    assert result["removed"] == [str(p) for p in managed(directory, unit)] + [str(directory)]
    assert snapshot(*managed(directory, unit)) == before


def test_absent_without_the_directory_changes_nothing(run_module, layout):
    directory, unit = layout
    result, failed = run_module(persist.main, args(directory, unit, state="absent"))
    assert (failed, result["changed"], result["removed"]) == (False, False, [])


NAME_ERRORS = [
    ("a/b", "files[1].name: must be a plain file name inside path, without '/' (got 'a/b')"),
    ("/abs", "files[1].name: must be a plain file name inside path, without '/' (got '/abs')"),
    ("..", "files[1].name: must be a file name, not '.' or '..' (got '..')"),
    (".", "files[1].name: must be a file name, not '.' or '..' (got '.')"),
    ("", "files[1].name: must not be empty (got '')"),
    ("x\ny", "files[1].name: must not contain control characters (got 'x\\ny')"),
    ("x\ty", "files[1].name: must not contain control characters (got 'x\\ty')"),
    (".current", "files[1].name: is a name the module keeps the file set under (got '.current')"),
    (".set-0123", "files[1].name: is a name the module keeps the file set under (got '.set-0123')"),
]


@pytest.mark.parametrize("state", ["present", "absent"])
@pytest.mark.parametrize("name, message", NAME_ERRORS, ids=[repr(n) for n, m in NAME_ERRORS])
def test_bad_name_fails_with_exact_message_before_any_change(run_module, layout, state, name, message):
    directory, unit = layout
    params = args(directory, unit, state=state)
    params["files"][1]["name"] = name
    result, failed = run_module(persist.main, params)
    assert failed
    assert result["msg"] == message
    assert not directory.parent.exists()
    assert not unit.exists()


@pytest.mark.parametrize("change, message", [
    (dict(path="etc/meshcapture"), "path: must be an absolute path (got 'etc/meshcapture')"),
    (dict(extra_files=[dict(path="unit.service", content="")]),
     "extra_files[0].path: must be the absolute path of a file (got 'unit.service')"),
    (dict(files=[dict(name="a", content="x", mode="u+x")]),
     "files[0].mode: must be an octal mode such as '0644' (got 'u+x')"),
    (dict(files=[dict(name="a", content="x", mode="99")]),
     "files[0].mode: must be an octal mode such as '0644' (got '99')"),
    (dict(files=[dict(name="a", content="x", mode=0o17777)]),
     "files[0].mode: must be an octal mode between '0000' and '07777' (got 8191)"),
    (dict(directory_mode="rwx"), "directory_mode: must be an octal mode such as '0644' (got 'rwx')"),
    (dict(directory_mode="0775"), "directory_mode: must not be writable by group or others (got '0775')"),
    (dict(directory_mode="0757"), "directory_mode: must not be writable by group or others (got '0757')"),
    (dict(files=[dict(name="a")]), "files[0].content: is required with state=present (got None)"),
    (dict(files=[dict(name="a", content=""), dict(name="a", content="")]),
     "files[1]: names the same file as files[0] (got '{d}/a')"),
    (dict(owner="no-such-user-mcs"), "owner: no such user on the target (got 'no-such-user-mcs')"),
    (dict(group="no-such-group-mcs"), "group: no such group on the target (got 'no-such-group-mcs')"),
], ids=["relative-path", "relative-extra", "symbolic-mode", "not-octal", "mode-range", "directory-mode",
        "directory-mode-group-writable", "directory-mode-other-writable",
        "no-content", "duplicate", "owner", "group"])
def test_bad_option_fails_with_exact_message(run_module, layout, change, message):
    directory, unit = layout
    result, failed = run_module(persist.main, args(directory, unit, **change))
    assert failed
    assert result["msg"] == message.format(d=directory)
    assert not directory.parent.exists()


def test_missing_extra_directory_fails_before_any_change(run_module, layout, tmp_path):
    directory, unit = layout
    params = args(directory, unit)
    params["extra_files"].append(dict(path=str(tmp_path / "nowhere" / "x.service"), content=""))
    result, failed = run_module(persist.main, params)
    assert failed
    assert result["msg"] == "extra_files[1].path: directory %s does not exist (got %r)" % (
        tmp_path / "nowhere", str(tmp_path / "nowhere" / "x.service"))
    assert not directory.parent.exists()
    assert not unit.exists()


def test_directory_in_the_way_fails_before_any_change(run_module, layout):
    directory, unit = layout
    (directory / "routes.env").mkdir(parents=True)
    result, failed = run_module(persist.main, args(directory, unit))
    assert failed
    assert result["msg"] == "files[2]: is a directory, not a file (got %r)" % str(directory / "routes.env")
    assert os.listdir(str(directory)) == ["routes.env"]
    assert not unit.exists()


def test_path_that_is_a_file_fails(run_module, layout):
    directory, unit = layout
    directory.parent.mkdir(parents=True)
    directory.write_text("")
    result, failed = run_module(persist.main, args(directory, unit))
    assert failed
    assert result["msg"] == "path: exists and is not a directory (got %r)" % str(directory)
    # state=absent leaves it alone: nothing of ours can be in it.
    result, failed = run_module(persist.main, args(directory, unit, state="absent"))
    assert (failed, result["changed"]) == (False, False)
    assert directory.is_file()


def test_content_is_ignored_with_state_absent(run_module, layout):
    directory, unit = layout
    run_module(persist.main, args(directory, unit))
    params = args(directory, unit, state="absent", files=[dict(name="rules.v4", content="other")],
                  extra_files=[dict(path=str(unit), content="other")])
    result, failed = run_module(persist.main, params)
    assert (failed, result["removed"]) == (False, [str(directory / "rules.v4"), str(unit)])


def test_bad_state_is_refused_by_ansible(run_module, layout):
    directory, unit = layout
    result, failed = run_module(persist.main, args(directory, unit, state="rendered"))
    assert failed
    assert result["msg"] == "value of state must be one of: present, absent, got: rendered"


# ------------------------------------------------- directories another user could change
ROOT = os.geteuid() == 0
REFUSED = "path: {why}: refusing a directory that another user could change (got '{d}')"


def _loose(mode):
    def make(directory):
        directory.mkdir(parents=True)
        directory.chmod(mode)
    return make


def _owned_by_nobody(directory):
    directory.mkdir(parents=True)
    os.chown(str(directory), 65534, 65534)


def _symlink(directory):
    real = directory.parent / "real"
    real.mkdir(parents=True)
    directory.symlink_to(real)


def _symlinked_parent(owner):
    def make(directory):
        real = directory.parent.parent / "real"
        (real / directory.name).mkdir(parents=True)
        directory.parent.symlink_to(real)
        os.lchown(str(directory.parent), owner, owner)
    return make


def _parent(mode=None, owner=None):
    def make(directory):
        directory.mkdir(parents=True)
        if mode is not None:
            directory.parent.chmod(mode)
        if owner is not None:
            os.chown(str(directory.parent), owner, owner)
    return make


UNSAFE = [
    ("mode-0777", _loose(0o777), "is writable by group and others (mode 0777)", False),
    ("mode-0770", _loose(0o770), "is writable by group (mode 0770)", False),
    ("mode-0757", _loose(0o757), "is writable by others (mode 0757)", False),
    ("owned-by-nobody", _owned_by_nobody, "is owned by uid 65534, not by uid {uid} (the user running this)", True),
    ("symlink", _symlink, "is a symbolic link", False),
    ("symlinked-parent-owned-by-nobody", _symlinked_parent(65534), "{p} is a symbolic link owned by uid 65534", True),
    ("parent-0777-without-sticky-bit", _parent(mode=0o777),
     "{p} is writable by group and others (mode 0777) without the sticky bit", False),
    ("parent-owned-by-nobody", _parent(owner=65534), "{p} is owned by uid 65534, not by root or uid {uid}", True),
]


@pytest.mark.parametrize("state", ["present", "absent"])
@pytest.mark.parametrize("make, why, needs_root", [u[1:] for u in UNSAFE], ids=[u[0] for u in UNSAFE])
def test_directory_another_user_could_change_is_refused(run_module, layout, state, make, why, needs_root):
    if needs_root and not ROOT:
        pytest.skip("chown needs root")
    directory, unit = layout
    make(directory)
    before = sorted(os.listdir(str(directory))) if directory.is_dir() else None
    result, failed = run_module(persist.main, args(directory, unit, state=state))
    assert failed
    assert result["msg"] == REFUSED.format(why=why.format(p=directory.parent, uid=os.geteuid()), d=directory)
    assert (sorted(os.listdir(str(directory))) if directory.is_dir() else None) == before
    assert not unit.exists()


def test_refused_before_creating_anything_under_a_loose_parent(run_module, layout):
    directory, unit = layout
    directory.parent.mkdir()
    directory.parent.chmod(0o777)
    result, failed = run_module(persist.main, args(directory / "deeper", unit))
    assert failed
    assert result["msg"] == REFUSED.format(
        why="%s is writable by group and others (mode 0777) without the sticky bit" % directory.parent,
        d=directory / "deeper")
    assert os.listdir(str(directory.parent)) == []


def test_sticky_parent_and_root_owned_symlink_are_trusted(run_module, layout):
    directory, unit = layout
    directory.parent.mkdir()
    directory.parent.chmod(0o1777)  # as /tmp
    real = directory.parent.parent / "real"
    real.mkdir()
    (directory.parent / "link").symlink_to(real)  # as /var/run -> /run
    result, failed = run_module(persist.main, args(directory.parent / "link" / "meshcapture", unit))
    assert not failed, result["msg"]
    assert active_set(real / "meshcapture")[1] == ["meshcapture-restore.sh", "routes.env", "rules.v4", "rules.v6"]


def test_created_directories_are_owned_by_the_running_user(run_module, layout):
    directory, unit = layout
    result, failed = run_module(persist.main, args(directory, unit, directory_mode="0700"))
    assert not failed
    for path in (directory, directory.parent, directory / active_set(directory)[0]):
        st = path.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o700)


# ------------------------------------------------- the set: replaced in one step
def _contents(directory):
    set_name, names = active_set(directory)
    return set_name, dict((name, (directory / set_name / name).read_text()) for name in names)


@pytest.mark.parametrize("failing, errno_, reason", [
    ("rules.v6", errno.ENOSPC, "No space left on device"),
    ("rules.v4", errno.EROFS, "Read-only file system"),
    ("meshcapture-restore.sh", errno.EIO, "Input/output error"),
], ids=["enospc-second-file", "erofs-first-file", "eio-last-file"])
def test_failed_write_leaves_the_previous_set_complete_and_active(run_module, layout, monkeypatch,
                                                                  failing, errno_, reason):
    directory, unit = layout
    run_module(persist.main, args(directory, unit))
    before = _contents(directory)
    new = args(directory, unit)
    for item in new["files"]:
        item["content"] = "new " + item["name"] + "\n"
    write_file = persist.write_file

    def fail_on(path, *rest, **kwargs):
        if os.path.basename(path) == failing:
            raise OSError(errno_, reason, path)
        return write_file(path, *rest, **kwargs)

    monkeypatch.setattr(persist, "write_file", fail_on)
    result, failed = run_module(persist.main, new)
    assert failed
    assert re.match(r"^cannot write %s/\.set-[0-9a-f]{16}\.tmp/%s: %s$" % (
        re.escape(str(directory)), re.escape(failing), reason), result["msg"]), result["msg"]
    assert result["written"] == []
    assert _contents(directory) == before  # every old file, through .current and in the directory
    assert listing(directory) == [".current", ".set-*", "meshcapture-restore.sh", "routes.env", "rules.v4",
                                  "rules.v6"]  # nothing half-written left
    monkeypatch.setattr(persist, "write_file", write_file)
    result, failed = run_module(persist.main, new)  # once there is room again
    assert not failed
    assert _contents(directory)[1] == dict((f["name"], f["content"]) for f in new["files"])


def test_failed_switch_leaves_the_previous_set_active(run_module, layout, monkeypatch):
    directory, unit = layout
    run_module(persist.main, args(directory, unit))
    before = _contents(directory)
    new = args(directory, unit)
    new["files"][0]["content"] = "changed\n"

    def no_symlink(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", dst)

    monkeypatch.setattr(persist.os, "symlink", no_symlink)
    result, failed = run_module(persist.main, new)
    assert failed
    assert result["msg"] == "cannot write %s/.current: No space left on device" % directory
    assert _contents(directory) == before
    assert listing(directory) == [".current", ".set-*", "meshcapture-restore.sh", "routes.env", "rules.v4",
                                  "rules.v6"]


def test_files_of_an_older_release_become_the_set(run_module, layout):
    """A directory of plain files (written before the file sets): its files become links into a set, other
    files stay as they are."""
    directory, unit = layout
    directory.mkdir(parents=True)
    params = args(directory, unit)
    for item in params["files"]:
        (directory / item["name"]).write_text(item["content"])
        (directory / item["name"]).chmod(int(item.get("mode", "0644"), 8))
    (directory / "notes.txt").write_text("mine")
    result, failed = run_module(persist.main, params)
    assert (failed, result["changed"]) == (False, True)
    assert listing(directory) == [".current", ".set-*", "meshcapture-restore.sh", "notes.txt", "routes.env",
                                  "rules.v4", "rules.v6"]
    result, failed = run_module(persist.main, params)
    assert (failed, result["changed"]) == (False, False)


def test_set_edited_in_place_is_written_again(run_module, layout):
    directory, unit = layout
    run_module(persist.main, args(directory, unit))
    set_name = active_set(directory)[0]
    with open(str(directory / "rules.v4"), "a") as f:  # the same file as the set's
        f.write("# edited\n")
    result, failed = run_module(persist.main, args(directory, unit))
    assert (failed, result["written"]) == (False, [str(directory / "rules.v4")])
    assert active_set(directory)[0] != set_name
    assert _contents(directory)[1]["rules.v4"] == "*nat\nCOMMIT\n"


def test_a_file_replaced_in_the_directory_is_linked_again(run_module, layout):
    directory, unit = layout
    run_module(persist.main, args(directory, unit))
    set_name = active_set(directory)[0]
    (directory / "routes.env").unlink()
    (directory / "routes.env").write_text("MESHCAPTURE_TPROXY_ROUTES=false\n")  # same content, another file
    result, failed = run_module(persist.main, args(directory, unit))
    assert (failed, result["written"]) == (False, [str(directory / "routes.env")])
    assert active_set(directory)[0] == set_name  # the set itself was right


@pytest.mark.parametrize("target", ["../elsewhere", "/etc", ".set-0123456789abcdef.tmp", "rules.v4"],
                         ids=["outside", "absolute", "temporary", "not-a-set"])
def test_current_that_is_not_a_set_is_refused(run_module, layout, target):
    directory, unit = layout
    run_module(persist.main, args(directory, unit))
    (directory / ".current").unlink()
    (directory / ".current").symlink_to(target)
    result, failed = run_module(persist.main, args(directory, unit))
    assert failed
    assert result["msg"] == ("path: %s/.current is not a symbolic link to a .set-* directory of this module (got %r)"
                             % (directory, str(directory)))


def test_loose_set_directory_is_refused(run_module, layout):
    directory, unit = layout
    run_module(persist.main, args(directory, unit))
    set_dir = directory / active_set(directory)[0]
    set_dir.chmod(0o777)
    result, failed = run_module(persist.main, args(directory, unit))
    assert failed
    assert result["msg"] == "path: %s: is writable by group and others (mode 0777) (got %r)" % (
        set_dir, str(directory))


def test_held_lock_fails_before_any_change(run_module, layout, monkeypatch, tmp_path):
    from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_store import current_netns_id
    directory, unit = layout
    monkeypatch.setattr(persist, "LOCK_TIMEOUT", 0.2)
    (tmp_path / "lock").mkdir(mode=0o700)
    lock = tmp_path / "lock" / ("lock-%s" % current_netns_id())
    with open(str(lock), "w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        result, failed = run_module(persist.main, args(directory, unit))
    assert failed
    assert result["msg"] == ("lock %s is held by another run against this host (another rules run or the boot-time "
                             "restore); gave up after 0 s" % lock)
    assert not directory.exists() or os.listdir(str(directory)) == []
    assert not unit.exists()
