"""capture_nft_apply: listing parsing, planning and the transaction text, with a fake nft."""

import json

import os

import pytest

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import ApplyError
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_nft_apply import (
    NftEngine,
    NftPlan,
    entries,
    legacy_capture_present,
    nft_capture_tables,
    READ_SCRIPT,
    parse_listing,
    parse_read,
    split_tables,
)

OWNED = ("istio-proxy-raw", "istio-proxy-mangle", "istio-proxy-nat")


def listing(*objects, handles=0, counter=0, reverse=False):
    """A `nft -j list ruleset` output."""
    objs = [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}]
    elems = [{"prefix": {"addr": "10.0.0.0", "len": 8}}, "192.0.2.1"]
    for kind, body in objects:
        body = dict(body, handle=handles + len(objs))
        if kind == "set":
            body["elem"] = list(reversed(elems)) if reverse else elems
        if kind == "rule":
            body["expr"] = [{"counter": {"packets": counter, "bytes": counter * 60}}, {"return": None}]
        objs.append({kind: body})
    return json.dumps({"nftables": objs})


NAT = [("table", {"family": "inet", "name": "istio-proxy-nat"}),
       ("set", {"family": "inet", "table": "istio-proxy-nat", "name": "s", "type": "ipv4_addr"}),
       ("chain", {"family": "inet", "table": "istio-proxy-nat", "name": "output", "type": "nat", "hook": "output",
                  "prio": -100, "policy": "accept"}),
       ("rule", {"family": "inet", "table": "istio-proxy-nat", "chain": "output"})]
FOREIGN = [("table", {"family": "inet", "name": "filter"}),
           ("chain", {"family": "inet", "table": "filter", "name": "ISTIO_LOOKALIKE"}),
           ("table", {"family": "ip", "name": "nat"}),
           ("chain", {"family": "ip", "table": "nat", "name": "ISTIO_OUTPUT"}),
           ("chain", {"family": "ip6", "table": "filter", "name": "ISTIO_X"})]


def test_owned_tables_compare_without_handles_counters_or_element_order():
    a, dummy = parse_listing(listing(*NAT), OWNED)
    b, dummy = parse_listing(listing(*NAT, handles=40, counter=7, reverse=True), OWNED)
    assert list(a) == ["istio-proxy-nat"] and a == b


def test_iptables_capture_chains_and_foreign_tables():
    tables, chains = parse_listing(listing(*(NAT + FOREIGN)), OWNED)
    assert list(tables) == ["istio-proxy-nat"]
    assert chains == ["ip nat ISTIO_OUTPUT"]  # ip6 filter is no capture table, inet filter is foreign


def test_a_rule_change_is_a_difference():
    changed = NAT[:3] + [("rule", {"family": "inet", "table": "istio-proxy-nat", "chain": "prerouting"})]
    assert parse_listing(listing(*NAT), OWNED)[0] != parse_listing(listing(*changed), OWNED)[0]


def test_unparsable_listing():
    with pytest.raises(Exception, match="cannot parse the output of nft -j list"):
        parse_listing("not json", OWNED)


TEXT = """\
table inet filter {
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t}
}
table inet istio-proxy-nat {
\tset istio-output-daddr4 {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = { 10.0.0.0/8, 127.0.0.1,
\t\t\t     169.254.169.254 }
\t}

\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta l4proto tcp counter packets 12 bytes 720 jump istio-output
\t}
}
"""


def test_split_tables_drops_counter_values():
    tables = split_tables(TEXT)
    assert list(tables) == ["filter", "istio-proxy-nat"]
    assert "counter jump istio-output" in tables["istio-proxy-nat"]
    assert tables["istio-proxy-nat"].endswith("\t}\n}\n")


def test_entries_are_rules_and_set_elements():
    assert entries("istio-proxy-nat", split_tables(TEXT)["istio-proxy-nat"]) == [
        "inet istio-proxy-nat set istio-output-daddr4: 10.0.0.0/8",
        "inet istio-proxy-nat set istio-output-daddr4: 127.0.0.1",
        "inet istio-proxy-nat set istio-output-daddr4: 169.254.169.254",
        "inet istio-proxy-nat chain output: meta l4proto tcp counter jump istio-output",
    ]


def test_transaction_replaces_creates_and_deletes():
    plan = NftPlan()
    plan.existing = ["istio-proxy-raw", "istio-proxy-nat"]
    plan.wanted = {"istio-proxy-nat": "table inet istio-proxy-nat {\n}\n",
                   "istio-proxy-mangle": "table inet istio-proxy-mangle {\n}\n"}
    plan.replace = ["istio-proxy-mangle", "istio-proxy-nat"]
    plan.delete = ["istio-proxy-raw"]
    assert plan.transaction() == (
        "table inet istio-proxy-mangle {\n}\n"
        "table inet istio-proxy-nat\ndelete table inet istio-proxy-nat\ntable inet istio-proxy-nat {\n}\n"
        "delete table inet istio-proxy-raw\n")
    assert NftPlan().transaction() == "" and not NftPlan().changed


def read_output(*objects):
    """What NftEngine.read's command prints for a ruleset of these objects."""
    chains = [o for o in objects if o[0] == "chain"]
    out = [listing(*chains)]
    for name in OWNED:
        out.append("@@ " + name)
        mine = [o for o in objects if o[1].get("name" if o[0] == "table" else "table") == name
                and o[1]["family"] == "inet"]
        if mine:
            out.append(listing(*mine))
    return "\n".join(out) + "\n"


class FakeNft(object):
    """The read answers `live` (objects); the scratch namespace answers `canonical`."""

    def __init__(self, live, canonical, fail=None):
        self.live, self.canonical, self.fail = read_output(*live), canonical, fail
        self.calls = []
        self.payloads = []  # what each `nft -f FILE` read from its file

    def __call__(self, argv, data=None):
        self.calls.append(argv)
        if argv[0] == "unshare":
            return 0, self.canonical + "\n" + TEXT, ""
        if argv[:2] == ["/bin/sh", "-c"] and argv[2] == READ_SCRIPT:
            return 0, self.live, ""
        if argv[1:2] == ["-f"]:
            assert data is None, "payloads go through a file, not a pipe"
            with open(argv[2]) as f:
                self.payloads.append(f.read())
            if self.fail:
                return 1, "", self.fail
        return 0, "", ""


PATHS = {"nft": "nft", "unshare": "unshare"}


def test_no_op_reads_once_and_writes_nothing(tmp_path):
    fake = FakeNft(NAT, listing(*NAT))
    engine = NftEngine(fake, PATHS, str(tmp_path), OWNED)
    plan = engine.plan({"istio-proxy-nat": "table inet istio-proxy-nat {\n}\n"})
    assert not plan.changed
    engine.apply(plan)
    assert [c[0] for c in fake.calls] == ["/bin/sh", "unshare"]
    # The canonical form is cached: the next run is one read.
    fake.calls[:] = []
    engine.apply(engine.plan({"istio-proxy-nat": "table inet istio-proxy-nat {\n}\n"}))
    assert fake.calls == [["/bin/sh", "-c", READ_SCRIPT, "nft"] + list(OWNED)]


def test_check_mode_writes_no_cache(tmp_path):
    fake = FakeNft([], listing(*NAT))
    engine = NftEngine(fake, PATHS, str(tmp_path / "state"), OWNED, check_mode=True)
    assert engine.plan({"istio-proxy-nat": "table inet istio-proxy-nat {\n}\n"}).replace == ["istio-proxy-nat"]
    assert not (tmp_path / "state").exists()


def test_absent_deletes_only_existing_owned_tables(tmp_path):
    fake = FakeNft(NAT + FOREIGN, "")
    engine = NftEngine(fake, PATHS, str(tmp_path), OWNED)
    plan = engine.plan({})
    assert plan.transaction() == "delete table inet istio-proxy-nat\n"
    assert plan.capture_chains == ["ip nat ISTIO_OUTPUT"]


def test_rejected_transaction_is_an_apply_error(tmp_path):
    fake = FakeNft(NAT, "", fail="Error: Could not process rule: No such file or directory")
    engine = NftEngine(fake, PATHS, str(tmp_path), OWNED)
    with pytest.raises(ApplyError) as err:
        engine.apply(engine.plan({}))
    assert err.value.msg == ("nftables: nft -f failed (rc 1), nothing was changed: "
                             "Error: Could not process rule: No such file or directory")
    assert err.value.cmd[:2] == ["nft", "-f"] and err.value.rc == 1
    # The transaction went through a private file, removed afterwards.
    assert fake.payloads == ["delete table inet istio-proxy-nat\n"]
    assert not os.path.exists(err.value.cmd[2])


def test_not_a_capture_table(tmp_path):
    engine = NftEngine(FakeNft([], ""), PATHS, str(tmp_path), OWNED)
    with pytest.raises(Exception, match="not a capture table: filter"):
        engine.plan({"filter": "table inet filter {\n}\n"})


@pytest.mark.parametrize("proc, save, expected", [
    ({}, ":ISTIO_OUTPUT - [0:0]\n", (False, [])),
    ({"/proc/net/ip_tables_names": "nat\n"}, "*nat\n:ISTIO_OUTPUT - [0:0]\nCOMMIT\n", (True, [])),
    ({"/proc/net/ip_tables_names": "filter\n"}, "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n", (False, [])),
])
def test_legacy_capture_present(proc, save, expected):
    calls = []

    def run(argv, data=None):
        calls.append(argv)
        return 0, save, ""

    saves = {"/proc/net/ip_tables_names": ("iptables-legacy-save", "/sbin/iptables-legacy-save"),
             "/proc/net/ip6_tables_names": ("ip6tables-legacy-save", "/sbin/ip6tables-legacy-save")}
    assert legacy_capture_present(lambda path: proc.get(path, ""), run, saves) == expected
    assert bool(calls) == bool(proc), "a save ran where no legacy table exists"


def test_legacy_tables_without_the_save_binary_warn():
    saves = {"/proc/net/ip_tables_names": ("iptables-legacy-save", None)}
    present, warnings = legacy_capture_present(lambda path: "nat\n", None, saves)
    assert present is False
    assert warnings == ["legacy iptables tables exist but iptables-legacy-save is missing: an iptables-legacy capture "
                        "cannot be detected"]


def test_read_output_with_a_table_that_has_chains_but_cannot_be_listed():
    out = read_output(*NAT).replace("@@ istio-proxy-nat\n" + listing(*NAT), "@@ istio-proxy-nat")
    with pytest.raises(Exception, match="nft -j list table inet istio-proxy-nat failed although the table has chains"):
        parse_read(out, OWNED)


def test_nft_capture_tables():
    out = listing(("chain", {"family": "inet", "table": "istio-proxy-nat", "name": "output"}),
                  ("chain", {"family": "inet", "table": "filter", "name": "input"}),
                  ("chain", {"family": "inet", "table": "istio-proxy-raw", "name": "output"}))
    assert nft_capture_tables(lambda argv, data=None: (0, out, ""), "nft", OWNED) == \
        ["istio-proxy-raw", "istio-proxy-nat"]
    assert nft_capture_tables(None, None, OWNED) == []
    assert nft_capture_tables(lambda argv, data=None: (1, "", "Error: cache initialization failed"), "nft", OWNED) == []
