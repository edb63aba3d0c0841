"""The rendering memo of the apply engine (capture_store.RenderMemo, memo_key)."""

import json

import pytest

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_store import RenderMemo, memo_key

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
    memo.store("k1", {"commands": ["iptables -t nat -N ISTIO_INBOUND"]})
    assert memo.path == str(tmp_path / "state" / "rendered-4-1234.json")
    assert memo.load("k1") == {"commands": ["iptables -t nat -N ISTIO_INBOUND"]}
    assert memo.load("k2") is None
    memo.store("k2", {"commands": []})  # one file per namespace: a new key replaces it
    assert memo.load("k1") is None and memo.load("k2") == {"commands": []}
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["rendered-4-1234.json"]
    memo.remove()
    memo.remove()  # idempotent
    assert memo.load("k2") is None


@pytest.mark.parametrize("content", ["", "{", "[]", json.dumps({"key": "k1"}), json.dumps({"rendered": {}})],
                         ids=["empty", "truncated", "not-a-dict", "no-rendering", "no-key"])
def test_damaged_memo_is_a_miss(tmp_path, content):
    (tmp_path / "rendered-4-1.json").write_text(content)
    memo = RenderMemo(str(tmp_path), netns_id="4-1")
    assert memo.load("k1") is None


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
