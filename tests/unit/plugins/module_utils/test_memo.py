"""The rendering memo of the apply engine (capture_store.RenderMemo, memo_key),
and the store's trust checks and writes (ensure_private_dir, write_atomic,
keep_cache, current_netns_id)."""

import errno
import json
import os
import stat
import subprocess

import pytest

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import CaptureError
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_store import (
    RenderMemo,
    StoreWriteError,
    UnsafePathError,
    check_private_dir,
    current_netns_id,
    ensure_private_dir,
    keep_cache,
    memo_key,
    write_atomic,
)

ROOT = os.geteuid() == 0
RENDERED = {"commands": ["iptables -t nat -N ISTIO_INBOUND"], "restore": {"ipv4": "*nat\nCOMMIT\n", "ipv6": ""},
            "config": {"proxy_port": "15001"}, "warnings": []}

PARAMS = {"state": "present", "proxy_port": 15001, "outbound_ip_ranges_exclude": ["10.0.0.0/8"]}
CODE = "0" * 64
FILES = {"/etc/resolv.conf": "nameserver 192.0.2.53\n", "/etc/passwd": [1, 2, 3, 4], "/etc/group": [1, 2, 5, 6]}


def test_key_is_stable_and_order_independent():
    reordered = dict(reversed(list(PARAMS.items())))
    assert memo_key(PARAMS, CODE, FILES) == memo_key(reordered, CODE, dict(FILES))


@pytest.mark.parametrize("change", [
    ("params", dict(PARAMS, proxy_port=15002)),
    ("params", dict(PARAMS, outbound_ip_ranges_exclude=["10.0.0.0/8", "192.0.2.0/24"])),
    ("code", "1" * 64),
    ("files", dict(FILES, **{"/etc/resolv.conf": "nameserver 198.51.100.53\n"})),
    ("files", dict(FILES, **{"/etc/passwd": [1, 2, 3, 5]})),
    ("files", dict(FILES, **{"/etc/group": None})),
], ids=["option", "list-option", "code", "resolv.conf", "passwd", "group-missing"])
def test_key_changes_with_every_input(change):
    what, value = change
    inputs = {"params": PARAMS, "code": CODE, "files": FILES}
    inputs[what] = value
    assert memo_key(inputs["params"], inputs["code"], inputs["files"]) != memo_key(PARAMS, CODE, FILES)


def test_store_load_replace_remove(tmp_path):
    memo = RenderMemo(str(tmp_path / "state"), netns_id="4-1234")
    assert memo.load("k1") is None
    memo.store("k1", RENDERED)
    assert memo.path == str(tmp_path / "state" / "rendered-4-1234.json")
    assert memo.load("k1") == RENDERED
    assert memo.load("k2") is None
    other = dict(RENDERED, commands=[])
    memo.store("k2", other)  # one file per namespace: a new key replaces it
    assert memo.load("k1") is None and memo.load("k2") == other
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["rendered-4-1234.json"]
    # The state directory is created private, the memo only readable by its owner.
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state" / "rendered-4-1234.json").stat().st_mode) == 0o600
    memo.remove()
    memo.remove()  # idempotent
    assert memo.load("k2") is None


@pytest.mark.parametrize("content", [
    "", "{", "[]", json.dumps({"key": "k1"}), json.dumps({"rendered": RENDERED}),
    json.dumps({"key": "k1", "rendered": {}}),
    json.dumps({"key": "k1", "rendered": dict(RENDERED, commands="iptables -F")}),
    json.dumps({"key": "k1", "rendered": dict(RENDERED, restore={"ipv4": ["*nat"]})}),
    json.dumps({"key": "k1", "rendered": dict(RENDERED, restore=None)}),
    json.dumps({"key": "k1", "rendered": dict(RENDERED, config=[])}),
    json.dumps({"key": "k1", "rendered": dict(RENDERED, warnings=[1])}),
    json.dumps({"key": "k1", "rendered": dict(RENDERED, nft_tables={"t": 1})}),
], ids=["empty", "truncated", "not-a-dict", "no-rendering", "no-key", "empty-rendering", "commands-not-a-list",
        "payload-not-text", "no-restore", "config-not-a-dict", "warning-not-text", "nft-table-not-text"])
def test_damaged_memo_is_a_miss(tmp_path, content):
    (tmp_path / "rendered-4-1.json").write_text(content)
    (tmp_path / "rendered-4-1.json").chmod(0o600)
    memo = RenderMemo(str(tmp_path), netns_id="4-1")
    assert memo.load("k1") is None


# ------------------------------------------------- a memo another user could have written
INJECTED = dict(RENDERED, restore={"ipv4": "*nat\n-A OUTPUT -d 203.0.113.66/32 -j ACCEPT\nCOMMIT\n", "ipv6": ""})


def _tampered(directory, name="rendered-4-1.json"):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps({"key": "k1", "rendered": INJECTED}))
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("mode, why", [
    (0o777, "is writable by group and others (mode 0777)"),
    (0o770, "is writable by group (mode 0770)"),
    (0o1777, "is writable by group and others (mode 1777)"),
], ids=["0777", "0770", "sticky-1777"])
def test_memo_in_a_loose_state_dir_is_refused(tmp_path, mode, why):
    state = tmp_path / "state"
    _tampered(state)
    state.chmod(mode)
    memo = RenderMemo(str(state), netns_id="4-1")
    with pytest.raises(UnsafePathError) as err:
        memo.load("k1")
    assert str(err.value) == "%s: %s" % (state, why)
    with pytest.raises(UnsafePathError):
        memo.store("k1", RENDERED)
    assert isinstance(err.value, CaptureError)


@pytest.mark.skipif(not ROOT, reason="chown needs root")
def test_memo_in_a_state_dir_owned_by_another_user_is_refused(tmp_path):
    state = tmp_path / "state"
    _tampered(state)
    os.chown(str(state), 65534, 65534)
    with pytest.raises(UnsafePathError) as err:
        RenderMemo(str(state), netns_id="4-1").load("k1")
    assert str(err.value) == "%s: is owned by uid 65534, not by uid 0 (the user running this)" % state


def test_memo_in_a_symlinked_state_dir_is_refused(tmp_path):
    _tampered(tmp_path / "real")
    (tmp_path / "state").symlink_to(tmp_path / "real")
    with pytest.raises(UnsafePathError) as err:
        RenderMemo(str(tmp_path / "state"), netns_id="4-1").load("k1")
    assert str(err.value) == "%s: is a symbolic link" % (tmp_path / "state")


@pytest.mark.skipif(not ROOT, reason="chown needs root")
def test_memo_under_a_parent_symlink_owned_by_another_user_is_refused(tmp_path):
    _tampered(tmp_path / "real" / "state")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    os.lchown(str(tmp_path / "link"), 65534, 65534)
    with pytest.raises(UnsafePathError) as err:
        RenderMemo(str(tmp_path / "link" / "state"), netns_id="4-1").load("k1")
    assert str(err.value) == "%s: %s is a symbolic link owned by uid 65534" % (
        tmp_path / "link" / "state", tmp_path / "link")


def _other_owner(path):
    os.chown(str(path), 65534, 65534)


def _second_link(path):
    os.link(str(path), str(path) + ".other")


def _symlink_to_elsewhere(path):
    elsewhere = path.parent.parent / "elsewhere.json"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)


@pytest.mark.parametrize("spoil, needs_root", [
    (lambda p: p.chmod(0o666), False),
    (lambda p: p.chmod(0o620), False),
    (_other_owner, True),
    (_second_link, False),
    (_symlink_to_elsewhere, False),
], ids=["mode-0666", "mode-0620", "owned-by-nobody", "hard-link", "symlink"])
def test_memo_file_another_user_could_have_written_is_a_miss(tmp_path, spoil, needs_root):
    if needs_root and not ROOT:
        pytest.skip("chown needs root")
    path = _tampered(tmp_path / "state")
    spoil(path)
    memo = RenderMemo(str(tmp_path / "state"), netns_id="4-1")
    assert memo.load("k1") is None
    memo.store("k1", RENDERED)  # replaced by a private one
    assert memo.load("k1") == RENDERED


def test_private_memo_is_trusted(tmp_path):
    _tampered(tmp_path / "state").parent.chmod(0o700)
    assert RenderMemo(str(tmp_path / "state"), netns_id="4-1").load("k1") == INJECTED


# ------------------------------------------------- ensure_private_dir, write_atomic, keep_cache
def test_ensure_private_dir_creates_missing_directories(tmp_path):
    path = tmp_path / "a" / "b"
    assert ensure_private_dir(str(path)) == str(path)
    for p in (tmp_path / "a", path):
        assert (stat.S_IMODE(p.stat().st_mode), p.stat().st_uid) == (0o700, os.geteuid())
    assert ensure_private_dir(str(path), create_mode=0o755) == str(path)  # an existing one is only checked
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert check_private_dir(str(path)) is True
    assert check_private_dir(str(tmp_path / "missing")) is False


@pytest.mark.parametrize("make, why", [
    (lambda p: p.mkdir(mode=0o777) or p.chmod(0o777), "{p}: is writable by group and others (mode 0777)"),
    (lambda p: p.mkdir() or p.chmod(0o775), "{p}: is writable by group (mode 0775)"),
    (lambda p: p.write_text(""), "{p}: is not a directory"),
    (lambda p: (p.parent / "real").mkdir() or p.symlink_to(p.parent / "real"), "{p}: is a symbolic link"),
], ids=["0777", "0775", "a-file", "symlink"])
def test_ensure_private_dir_refuses(tmp_path, make, why):
    path = tmp_path / "d"
    make(path)
    with pytest.raises(UnsafePathError) as err:
        ensure_private_dir(str(path))
    assert str(err.value) == why.format(p=path)
    assert err.value.path == str(path)


def test_ensure_private_dir_refuses_a_parent_symlink_into_a_loose_directory(tmp_path):
    (tmp_path / "loose" / "d").mkdir(parents=True)
    (tmp_path / "loose").chmod(0o777)
    (tmp_path / "link").symlink_to("loose")  # owned by root, but leads into a directory anyone can change
    with pytest.raises(UnsafePathError) as err:
        ensure_private_dir(str(tmp_path / "link" / "d"))
    assert str(err.value) == "%s: %s is writable by group and others (mode 0777) without the sticky bit" % (
        tmp_path / "link" / "d", tmp_path / "loose")


def test_ensure_private_dir_refuses_a_group_writable_create_mode(tmp_path):
    with pytest.raises(UnsafePathError) as err:
        ensure_private_dir(str(tmp_path / "d"), create_mode=0o775)
    assert str(err.value) == "%s: create_mode 0775 is writable by group or others" % (tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_write_atomic_failure_is_a_store_write_error(tmp_path, monkeypatch):
    target = tmp_path / "state" / "canonical" / "x.save"
    write_atomic(str(target), "old")
    real_fdopen = os.fdopen

    class Full(object):
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, *a: Full(real_fdopen(fd, *a)))
    with pytest.raises(StoreWriteError) as err:
        write_atomic(str(target), "new")
    assert str(err.value) == "%s: cannot write: No space left on device" % target
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(target))
    assert isinstance(err.value, CaptureError) and isinstance(err.value, OSError)
    assert keep_cache(str(target), "new") == "could not keep %s: cannot write: No space left on device" % target
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert sorted(os.listdir(str(target.parent))) == ["x.save"]  # no temporary file left


def test_write_atomic_into_a_directory_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreWriteError) as err:
        write_atomic(str(tmp_path / "file" / "state" / "x"), "text")
    assert str(err.value) == "%s: cannot write: Not a directory" % (tmp_path / "file" / "state")


def test_netns_id_is_what_the_restore_script_computes():
    """The restore script names the lock file with stat -L -c '%d-%i' /proc/self/ns/net."""
    out = subprocess.check_output(["stat", "-L", "-c", "%d-%i", "/proc/self/ns/net"]).decode().strip()
    assert current_netns_id() == out


# ------------------------------------------------- what a restore added
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_save import (  # noqa: E402
    added_by_restore,
    parse_save,
)

BEFORE = """*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:FOREIGN - [0:0]
-A PREROUTING -s 203.0.113.0/24 -j RETURN
-A OUTPUT -d 203.0.113.1/32 -j RETURN
-A OUTPUT -d 203.0.113.2/32 -j RETURN
-A FOREIGN -j ACCEPT
COMMIT
"""
AFTER = """*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:FOREIGN - [0:0]
:ISTIO_OUTPUT - [0:0]
-A PREROUTING -s 203.0.113.0/24 -j RETURN
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A OUTPUT -d 203.0.113.1/32 -j RETURN
-A OUTPUT -d 203.0.113.2/32 -j RETURN
-A OUTPUT -d 203.0.113.1/32 -j RETURN
-A FOREIGN -j ACCEPT
-A ISTIO_OUTPUT -j RETURN
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p udp -m udp --dport 53 -j CT --zone 1
COMMIT
"""


def test_added_by_restore_is_the_new_rules_and_chains():
    added = added_by_restore(parse_save(BEFORE), parse_save(AFTER))
    assert {t: dict(table.rules) for t, table in added.items()} == {
        "nat": {"OUTPUT": ["-p tcp -j ISTIO_OUTPUT", "-d 203.0.113.1/32 -j RETURN"],
                "ISTIO_OUTPUT": ["-j RETURN"]},
        "raw": {"PREROUTING": [], "OUTPUT": ["-p udp -m udp --dport 53 -j CT --zone 1"]},
    }
    assert added["nat"].user_chains() == ["ISTIO_OUTPUT"]
    assert added["raw"].user_chains() == []


def test_added_by_restore_of_nothing_is_empty():
    assert added_by_restore(parse_save(BEFORE), parse_save(BEFORE)) == {}
