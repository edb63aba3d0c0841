"""meshcapture.sidecar.rules with backend nftables against the real kernel.

Every module run happens inside a namespace the test created, with its
state_dir under the test's tmp_path.  The capture owns the inet tables
istio-proxy-raw / -mangle / -nat; other software's tables (native nftables
and iptables-nft's ip/ip6 tables) must stay byte for byte as they are.
"""

import shutil
import subprocess

import pytest

import netns
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import ApplyError
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_nft import NFT_TABLES
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_nft_apply import NftEngine, split_tables
from netns import MarkedMonitor
from rules_helpers import CONFIGS, add_foreign, apply, ok, restore, save
from tests.integration.test_rules_traffic import ADDR, APP_UID, CAPTURE, build, connect

pytestmark = pytest.mark.netns

OWNED = tuple(NFT_TABLES.values())
NFT = dict(backend="nftables")

# Native nftables tables of other software: a user's inet filter, a
# firewalld-like table with a named set, a docker-like ip nat table.
FOREIGN_NFT = """\
table inet filter {
    chain input {
        type filter hook input priority filter; policy accept;
        ip saddr 203.0.113.9 accept
    }
}
table inet firewalld {
    set allowed {
        type ipv4_addr
        flags interval
        elements = { 203.0.113.0/24 }
    }

    chain filter_INPUT {
        type filter hook input priority filter + 10; policy accept;
        ip saddr @allowed accept
    }
}
table ip dockerlike {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr 203.0.113.10 tcp dport 80 dnat to 192.0.2.99:8080
    }
}
"""


def add_all_foreign(ns):
    """iptables-nft rules of other software (ip/ip6 raw, mangle, nat, filter) and native tables."""
    add_foreign(ns)
    ns.run(["nft", "-f", "-"], input=FOREIGN_NFT)


def ruleset(ns, handles=False):
    return ns.run(["nft"] + (["-a"] if handles else []) + ["list", "ruleset"]).stdout


def owned(ns):
    """{table: listing} of the capture's tables (counter values dropped)."""
    return {name: text for name, text in split_tables(ruleset(ns)).items() if name in OWNED}


def foreign(ns):
    return {name: text for name, text in split_tables(ruleset(ns)).items() if name not in OWNED}


def reference(netns_factory, payload):
    """The listing of the payload loaded into an empty namespace."""
    ref = netns_factory("nftref")
    ref.run(["nft", "-f", "-"], input=payload)
    return owned(ref)


def apply_monitored(ns, tmp_path, **opts):
    """(module result, nft monitor events of the run, number of nft transactions it made)."""
    monitor = MarkedMonitor(ns, ["nft", "monitor"], _marker, keep=lambda line: "mcs_mark2_" not in line)
    try:
        result = apply(ns, tmp_path, **opts)
        window = monitor.mark()
    finally:
        monitor.close()
    events = [e for e in window if not e.startswith("# new generation")]
    # The window also holds the generation lines of the previous marker's
    # delete and of this marker's add, around the run's own.
    return result, events, len(window) - len(events) - 2


def _marker(serial):
    name = "mcs_mark2_%d" % serial
    return ([["nft", "add table inet %s" % name], ["nft", "delete table inet %s" % name]],
            lambda line: line.startswith("delete table inet %s" % name))


# ------------------------------------------------------------------ battery
@pytest.mark.parametrize("name", list(CONFIGS))
def test_check_apply_idempotent_check(netns_factory, tmp_path, name):
    ns = netns_factory("nftapply")
    add_all_foreign(ns)
    opts = dict(CONFIGS[name], **NFT)
    untouched = ruleset(ns)

    # 1. check mode: changed, nothing written (ruleset nor state_dir), diff in nft list form.
    check = ok(apply(ns, tmp_path, check=True, diff=True, **opts))
    assert check["changed"] is True and check["backend"] == "nftables"
    assert ruleset(ns) == untouched, "check mode changed the ruleset"
    assert not (tmp_path / "meshcapture-state").exists(), "check mode wrote into state_dir"
    assert check["removed"] == [] and check["migrated_from"] == []
    assert check["summary"] == {"added": len(check["added"]), "removed": 0} and check["added"]
    (diff,) = check["diff"]
    assert diff["before"] == ""
    assert check["restore"]["nft"] and set(check["restore"]) == {"ipv4", "ipv6", "nft"}

    # 2. apply: one nft transaction; the tables equal the payload loaded on an empty host.
    applied, events, transactions = apply_monitored(ns, tmp_path, **opts)
    ok(applied)
    assert applied["changed"] is True and sorted(applied["added"]) == sorted(check["added"])
    assert transactions == 1, events
    live = owned(ns)
    assert live == reference(netns_factory, applied["restore"]["nft"])
    assert "".join(live[t] for t in OWNED if t in live) == diff["after"]
    assert foreign(ns) == foreign_of(untouched), "a foreign table changed"
    assert "ISTIO" not in save(ns, "ipv4") + save(ns, "ipv6"), "rules went into the iptables tables"

    # The canonical form and the rendering are kept for the next run.
    state = tmp_path / "meshcapture-state"
    assert len(list((state / "canonical").glob("*.nft.json"))) == 1
    (memo,) = state.glob("rendered-*.json")
    stamp = memo.stat().st_mtime_ns

    # 3. idempotence: no change and no write at all (nft monitor sees nothing, handles stay).
    handles = ruleset(ns, handles=True)
    again, events, transactions = apply_monitored(ns, tmp_path, diff=True, **opts)
    assert ok(again)["changed"] is False
    assert events == [] and transactions == 0, "the idempotent run wrote to the ruleset"
    assert again["added"] == again["removed"] == [] and again["summary"] == {"added": 0, "removed": 0}
    (same,) = again["diff"]
    assert same["before"] == same["after"] == diff["after"]
    assert ruleset(ns, handles=True) == handles
    assert memo.stat().st_mtime_ns == stamp, "the memo was rewritten"
    assert again["restore"] == applied["restore"]

    # 4. check mode again.
    assert ok(apply(ns, tmp_path, check=True, **opts))["changed"] is False
    assert ruleset(ns, handles=True) == handles


def foreign_of(text):
    return {name: t for name, t in split_tables(text).items() if name not in OWNED}


PAIRS = [("vm-redirect", "tproxy"), ("tproxy", "dual-dns"), ("dual-dns", "trace"), ("trace", "kubevirt"),
         ("kubevirt", "groups"), ("groups", "vm-redirect"), ("dual-dns", "vm-redirect")]


@pytest.mark.parametrize("a, b", PAIRS, ids=["%s->%s" % pair for pair in PAIRS])
def test_config_change_converges_to_exactly_the_new_ruleset(netns_factory, tmp_path, a, b):
    ns = netns_factory("nftchg")
    add_all_foreign(ns)
    untouched = foreign(ns)
    ok(apply(ns, tmp_path, **dict(CONFIGS[a], **NFT)))
    result, events, transactions = apply_monitored(ns, tmp_path, **dict(CONFIGS[b], **NFT))
    assert ok(result)["changed"] is True
    assert transactions == 1, events
    assert owned(ns) == reference(netns_factory, result["restore"]["nft"])
    assert foreign(ns) == untouched
    assert ok(apply(ns, tmp_path, **dict(CONFIGS[b], **NFT)))["changed"] is False


# ------------------------------------------------------------------- absent
@pytest.mark.parametrize("name", list(CONFIGS))
def test_absent_restores_the_ruleset_byte_for_byte(netns_factory, tmp_path, name):
    ns = netns_factory("nftabs")
    add_all_foreign(ns)
    before = ruleset(ns, handles=True)
    ok(apply(ns, tmp_path, **dict(CONFIGS[name], **NFT)))
    check = ok(apply(ns, tmp_path, state="absent", check=True, diff=True, **NFT))
    assert check["changed"] is True and check["diff"][0]["after"] == "" and check["removed"]
    gone, events, transactions = apply_monitored(ns, tmp_path, state="absent", **NFT)
    assert ok(gone)["changed"] is True and sorted(gone["removed"]) == sorted(check["removed"])
    assert transactions == 1, events
    assert ruleset(ns, handles=True) == before
    again, events, transactions = apply_monitored(ns, tmp_path, state="absent", **NFT)
    assert ok(again)["changed"] is False and events == [] and transactions == 0


# -------------------------------------------------------------- coexistence
def test_nftables_refused_while_an_iptables_capture_is_present(netns_factory, tmp_path):
    ns = netns_factory("nftcoex")
    ok(apply(ns, tmp_path, **CONFIGS["dual-dns"]))
    before = ruleset(ns, handles=True)
    result = apply(ns, tmp_path, **dict(CONFIGS["dual-dns"], **NFT))
    assert result.get("failed") is True
    assert result["msg"] == ("backend nftables: a capture of backend iptables-nft is present (ISTIO_* chains in "
                             "ip nat, ip6 nat); remove it first (state=absent with "
                             "backend=iptables-nft) or set migrate=true")
    assert ruleset(ns, handles=True) == before


def test_nftables_refused_while_a_legacy_capture_is_present(netns_factory, tmp_path):
    ns = netns_factory("nftcoexl")
    ok(apply(ns, tmp_path, backend="iptables-legacy", **CONFIGS["vm-redirect"]))
    before = ruleset(ns, handles=True), ns.run(["iptables-legacy-save"]).stdout.count("\n-A")
    result = apply(ns, tmp_path, **dict(CONFIGS["vm-redirect"], **NFT))
    assert result.get("failed") is True
    assert result["msg"] == ("backend nftables: a capture of backend iptables-legacy is present (ISTIO_* chains in "
                             "legacy tables); remove it first (state=absent with backend=iptables-legacy) or set "
                             "migrate=true")
    assert (ruleset(ns, handles=True), ns.run(["iptables-legacy-save"]).stdout.count("\n-A")) == before


@pytest.mark.parametrize("backend", ["auto", "iptables-nft", "iptables-legacy"])
def test_iptables_refused_while_an_nftables_capture_is_present(netns_factory, tmp_path, backend):
    ns = netns_factory("nftcoexr")
    ok(apply(ns, tmp_path, **dict(CONFIGS["dual-dns"], **NFT)))
    before = ruleset(ns, handles=True)
    result = apply(ns, tmp_path, backend=backend, **CONFIGS["dual-dns"])
    assert result.get("failed") is True
    assert result["msg"] == ("backend %s: a capture of backend nftables is present (inet istio-proxy-raw, "
                             "inet istio-proxy-nat); remove it first (state=absent with backend=nftables) or set "
                             "migrate=true" % ("iptables-nft" if backend == "auto" else backend))
    assert ruleset(ns, handles=True) == before
    assert "ISTIO" not in ns.run(["iptables-legacy-save"]).stdout


# ---------------------------------------------------------------- migration
def probe_capture(host, peer, family=4):
    """Outbound lands on 15001 and inbound on 15006, with their original destinations."""
    a = ADDR[family]
    answer, dummy = connect(host, 15001, family, host, a["service"], dport=80, banner="OUTBOUND", uid=APP_UID,
                            gid=APP_UID)
    assert answer["ok"] and answer["banner"] == "OUTBOUND", answer
    assert answer["orig_dst"] == netns.fmt_addr(a["service"], 80)
    answer, dummy = connect(host, 15006, family, peer, a["host"], dport=8080, banner="INBOUND")
    assert answer["ok"] and answer["banner"] == "INBOUND", answer
    assert answer["orig_dst"] == netns.fmt_addr(a["host"], 8080)


@pytest.mark.parametrize("old", ["iptables-nft", "iptables-legacy"])
def test_migrate_both_ways_keeps_traffic_captured(topology, tmp_path, old):
    host, peer = build(topology)
    before = ruleset(host, handles=True)
    ok(apply(host, tmp_path, backend=old, **CAPTURE))
    applied = ruleset(host, handles=True), ns_saves(host, old)
    check = ok(apply(host, tmp_path, check=True, migrate=True, **dict(CAPTURE, **NFT)))
    assert check["changed"] is True and check["migrated_from"] == [old]
    assert (ruleset(host, handles=True), ns_saves(host, old)) == applied, "check mode changed something"

    there = ok(apply(host, tmp_path, migrate=True, **dict(CAPTURE, **NFT)))
    assert there["changed"] is True and there["migrated_from"] == [old]
    assert any(r.startswith("ipv4 -t nat -A ISTIO_") for r in there["removed"]), there["removed"]
    assert sorted(owned(host)) == ["istio-proxy-nat", "istio-proxy-raw"]
    assert "ISTIO" not in ns_saves(host, old)
    for family in (4, 6):
        probe_capture(host, peer, family)
    assert ok(apply(host, tmp_path, migrate=True, **dict(CAPTURE, **NFT)))["changed"] is False

    back = ok(apply(host, tmp_path, backend=old, migrate=True, **CAPTURE))
    assert back["changed"] is True and back["migrated_from"] == ["nftables"]
    assert owned(host) == {} and "ISTIO_OUTPUT" in ns_saves(host, old)
    for family in (4, 6):
        probe_capture(host, peer, family)
    ok(apply(host, tmp_path, backend=old, state="absent", **CAPTURE))
    if old == "iptables-nft":
        assert ruleset(host, handles=True) == before


def ns_saves(ns, backend):
    return "".join(save(ns, family, backend=backend) for family in ("ipv4", "ipv6"))


def test_absent_with_migrate_removes_both_kinds(netns_factory, tmp_path):
    ns = netns_factory("nftboth")
    before = ruleset(ns, handles=True)
    ok(apply(ns, tmp_path, **CONFIGS["vm-redirect"]))
    ns.run(["nft", "-f", "-"], input=ok(apply(ns, tmp_path, state="rendered", **dict(CONFIGS["tproxy"], **NFT)))
           ["restore"]["nft"])
    gone = ok(apply(ns, tmp_path, state="absent", migrate=True, **NFT))
    assert gone["changed"] is True and gone["migrated_from"] == ["iptables-nft"]
    assert ruleset(ns, handles=True) == before


def test_both_captures_at_once_redirect_once(topology, tmp_path):
    """The instant between the two transactions of a migration: both nat
    captures hook nat output/prerouting.  A connection's NAT binding is set
    by the first nat chain that redirects; the second sees it done.  The
    connection lands on 15001 / 15006 once, with its original destination."""
    host, peer = build(topology)
    ok(apply(host, tmp_path, **CAPTURE))
    payload = ok(apply(host, tmp_path, state="rendered", **dict(CAPTURE, **NFT)))["restore"]["nft"]
    host.run(["nft", "-f", "-"], input=payload)
    assert "ISTIO_OUTPUT" in save(host, "ipv4") and sorted(owned(host)) == ["istio-proxy-nat", "istio-proxy-raw"]
    for family in (4, 6):
        probe_capture(host, peer, family)


# ---------------------------------------------------------------- bad input
MALFORMED = [
    ("port-newline", "inbound_ports_include", ["80\ndelete table inet filter"]),
    ("port-brace", "outbound_ports_exclude", ["22 }"]),
    ("cidr-semicolon", "outbound_ip_ranges_exclude", ["10.0.0.0/8; flush ruleset"]),
    ("iface-quote", "exclude_interfaces", ['eth0"']),
    ("uid-space", "proxy_uid", ["13 37"]),
    ("group-brace", "owner_groups_exclude", ["{x}"]),
    ("dns4-family", "dns_servers_v4", ["2001:db8::53"]),
    ("mark-zero", "inbound_tproxy_mark", 0),
]


@pytest.mark.parametrize("option, value", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_input_fails_naming_the_option(netns_factory, tmp_path, option, value):
    ns = netns_factory("nftbad")
    add_all_foreign(ns)
    opts = dict(CONFIGS["dual-dns"], inbound_interception_mode="TPROXY", **NFT)
    ok(apply(ns, tmp_path, **opts))
    before = ruleset(ns, handles=True)
    result = apply(ns, tmp_path, **dict(opts, **{option: value}))
    assert result.get("failed") is True, result
    assert result["msg"].startswith(option + ": "), result["msg"]
    assert ruleset(ns, handles=True) == before


# ------------------------------------------------------------------ atomic
def test_rejected_transaction_changes_nothing(netns_factory, tmp_path):
    """nft -f commits all or nothing: a transaction the kernel rejects at its
    end (after the table replacements) leaves every table as it was."""
    ns = netns_factory("nftatom")
    add_all_foreign(ns)
    ok(apply(ns, tmp_path, **dict(CONFIGS["vm-redirect"], **NFT)))
    before = ruleset(ns, handles=True)
    wanted = ok(apply(ns, tmp_path, state="rendered", **dict(CONFIGS["dual-dns"], **NFT)))

    def runner(argv, data=None):
        if argv[1:2] == ["-f"] and argv[0] == paths["nft"]:  # the transaction, from its file
            assert data is None
            with open(argv[2], "a") as f:
                f.write("add rule inet istio-proxy-nat no-such-chain accept\n")
        proc = subprocess.run(["ip", "netns", "exec", ns.name] + argv, input=data, capture_output=True, text=True,
                              check=False)
        return proc.returncode, proc.stdout, proc.stderr

    paths = {"nft": shutil.which("nft"), "unshare": shutil.which("unshare")}
    engine = NftEngine(runner, paths, str(tmp_path / "engine"), OWNED)
    tables = split_payload(wanted["restore"]["nft"])
    plan = engine.plan(tables)
    assert plan.replace == ["istio-proxy-raw", "istio-proxy-nat"]
    with pytest.raises(ApplyError) as err:
        engine.apply(plan)
    assert err.value.msg.startswith("nftables: nft -f failed (rc 1), nothing was changed: ")
    assert ruleset(ns, handles=True) == before


def split_payload(payload):
    out, name = {}, None
    for line in payload.splitlines(True):
        if line.startswith("table inet "):
            name = line.split()[2]
            out[name] = ""
        out[name] += line
    return out


def test_iptables_foreign_tables_untouched_by_nft_absent(netns_factory, tmp_path):
    """iptables-nft's own ip nat with other software's rules is never named."""
    ns = netns_factory("nftipt")
    restore(ns, "ipv4", "*nat\n-A OUTPUT -d 203.0.113.11/32 -j RETURN\nCOMMIT\n")
    before = ruleset(ns, handles=True)
    ok(apply(ns, tmp_path, **dict(CONFIGS["groups"], **NFT)))
    ok(apply(ns, tmp_path, state="absent", **NFT))
    assert ruleset(ns, handles=True) == before
