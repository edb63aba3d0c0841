"""capture_nft: the capture Ruleset as native nftables (issue 11).

The pure renderer is tested on text; the tests marked netns also hand each
payload to the real `nft` (check mode, then a load and a listing) inside a
scratch network namespace (`unshare --net`), never the machine's own.
"""

import ipaddress
import random
import shutil
import subprocess

import pytest

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import CaptureConfig, CaptureError
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_generator import generate
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_nft import (
    NFT_FAMILY,
    NFT_TABLES,
    NftRenderError,
    NftRuleset,
    final_order,
    merge_families,
    render_nft,
    render_nft_delete,
    render_nft_payload,
)
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_nft_rules import NftRule
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_rules import IPV4, IPV6, Rule, Ruleset
from tests.unit.corpus import all_cases

CASES = all_cases()
IDS = [c[0] for c in CASES]
NUMERIC_GROUPS = {"java": 60000, "ftp": 60001}.get  # the corpora's group names, as ids


def _ruleset(**options):
    return generate(CaptureConfig.from_params(options))


def _rules(text, chain):
    """The rule lines of one chain of a rendered table text."""
    block = text.split("\tchain %s {\n" % chain, 1)[1].split("\n\t}", 1)[0]
    return [line.strip() for line in block.splitlines() if not line.strip().startswith("type ")]


def _all_rules(text):
    return [line.strip() for line in text.splitlines()
            if line.startswith("\t\t") and not line.startswith("\t\t\t") and not line.strip().startswith(
                ("type ", "flags ", "auto-merge", "elements ")) and line.strip() != "}"]


def _rule(family, chain, *params, table="nat", position=None):
    return Rule(family, table, chain, position, tuple(params))


# ------------------------------------------------------------- the corpora
@pytest.mark.parametrize("options", [c[1] for c in CASES], ids=IDS)
def test_every_conformance_case_renders(options):
    ruleset = generate(CaptureConfig.from_params(options))
    rendered = render_nft(ruleset)
    assert isinstance(rendered, NftRuleset)
    assert rendered.tables and set(rendered.tables) <= set(NFT_TABLES.values())
    payload = rendered.payload()
    assert payload == render_nft_payload(render_nft(ruleset)), "not deterministic"
    assert payload.count("table %s " % NFT_FAMILY) == len(rendered.tables)
    for line in ("flush", "delete"):
        assert line not in payload
    if not options["enable_inbound_ipv6"]:
        # iptables-only-v4: no rule may match an IPv6 packet.
        for rule in _all_rules(payload):
            assert rule.startswith("meta nfproto ipv4") or " ip " in " " + rule, rule
            assert "ip6 " not in rule and "nfproto ipv6" not in rule, rule


def test_table_names_and_base_chains_follow_istio():
    rendered = render_nft(_ruleset(inbound_interception_mode="TPROXY", inbound_ports_include=["*"], redirect_dns=True,
                                   capture_all_dns=True, enable_inbound_ipv6=True, exclude_interfaces=["eth9"]))
    assert rendered.tables == ["istio-proxy-raw", "istio-proxy-mangle", "istio-proxy-nat"]
    hooks = [line.strip() for line in rendered.payload().splitlines() if line.strip().startswith("type ")]
    assert hooks == [
        "type filter hook prerouting priority raw; policy accept;",
        "type filter hook output priority raw; policy accept;",
        "type filter hook prerouting priority mangle; policy accept;",
        "type route hook output priority mangle; policy accept;",
        "type nat hook prerouting priority dstnat; policy accept;",
        "type nat hook output priority -100; policy accept;",
    ]
    mangle = rendered.table_text("istio-proxy-mangle")
    assert ["chain %s {" % c in mangle for c in ("istio-divert", "istio-tproxy", "istio-inbound")] == [True] * 3


def test_tproxy_keeps_iptables_drop_when_no_socket():
    """iptables' TPROXY drops what it finds no socket for; nft's tproxy falls through."""
    text = render_nft(_ruleset(inbound_interception_mode="TPROXY", inbound_ports_include=["*"])).payload()
    assert _rules(text, "istio-tproxy") == [
        "ip daddr != 127.0.0.1 meta l4proto tcp tproxy ip to :15006 meta mark set 0x00000539 accept",
        "ip daddr != 127.0.0.1 meta l4proto tcp drop",
    ]


def test_delete_lines():
    assert render_nft_delete(["istio-proxy-raw", "istio-proxy-nat"]) == (
        "delete table inet istio-proxy-raw\ndelete table inet istio-proxy-nat\n")
    assert render_nft_delete([]) == ""
    assert render_nft(Ruleset()).tables == [] and render_nft(Ruleset()).payload() == ""


# ------------------------------------------------------------- named sets
def test_excluded_cidrs_become_one_set_lookup_with_merged_elements():
    text = render_nft(_ruleset(outbound_ip_ranges_include="*", outbound_ip_ranges_exclude=[
        "203.0.113.0/25", "203.0.113.64/26", "203.0.113.128/25", "198.51.100.7/32", "198.51.100.9/32",
        "192.0.2.0/24", "192.0.2.128/26"])).payload()
    rules = _rules(text, "istio-output")
    assert rules[-2:] == ["ip daddr @istio-output-daddr4 return", "meta nfproto ipv4 jump istio-redirect"]
    # 127.0.0.1 (istio's loopback RETURN) joins the run; overlaps and neighbours are merged.
    assert ("elements = { 127.0.0.1, 192.0.2.0/24,\n\t\t\t     198.51.100.7, 198.51.100.9,\n"
            "\t\t\t     203.0.113.0/24 }") in text
    assert "flags interval\n\t\tauto-merge" in text


def test_unaligned_merge_is_written_as_a_range():
    text = render_nft(_ruleset(outbound_ip_ranges_exclude=["192.0.2.0/25", "192.0.2.128/26"])).payload()
    assert "127.0.0.1, 192.0.2.0-192.0.2.191" in text


def test_excluded_ports_become_one_set_lookup():
    text = render_nft(_ruleset(outbound_ports_exclude=["8443", "25", "9000"], inbound_ports_include=["*"],
                               inbound_ports_exclude=["22", "15090"], enable_inbound_ipv6=True)).payload()
    assert _rules(text, "istio-output")[0] == "tcp dport @istio-output-dport return"
    # 15008 (the tunnel port RETURN) and the excluded inbound ports are one run.
    assert _rules(text, "istio-inbound") == ["tcp dport @istio-inbound-dport return",
                                             "meta l4proto tcp jump istio-in-redirect"]
    assert "set istio-output-dport {\n\t\ttype inet_service\n\t\telements = { 25, 8443, 9000 }\n\t}" in text
    assert "elements = { 22, 15008, 15090 }" in text


def test_ten_thousand_cidrs_make_one_rule():
    cidrs = ["10.%d.%d.0/24" % (i // 256, i % 256) for i in range(0, 20000, 2)]
    rendered = render_nft(_ruleset(outbound_ip_ranges_include="*", outbound_ip_ranges_exclude=cidrs,
                                   outbound_ports_exclude=[str(p) for p in range(20000, 22000, 2)]))
    rules = _rules(rendered.payload(), "istio-output")
    assert rules.count("ip daddr @istio-output-daddr4 return") == 1
    assert rules[0] == "meta nfproto ipv4 tcp dport @istio-output-dport return"
    assert len(rules) < 12
    sets = rendered.table("istio-proxy-nat").sets
    assert len(sets["istio-output-daddr4"].elements) == 10001  # + 127.0.0.1
    assert len(sets["istio-output-dport"].elements) == 1000


@pytest.mark.parametrize("params_list, expected", [
    # different verdicts: two rules
    ([("-d", "192.0.2.1/32", "-j", "RETURN"), ("-d", "192.0.2.2/32", "-j", "ACCEPT")], 2),
    # a second difference (interface): no set
    ([("-o", "eth0", "-d", "192.0.2.1/32", "-j", "RETURN"), ("-o", "eth1", "-d", "192.0.2.2/32", "-j", "RETURN")], 2),
    # negated matches never become sets
    ([("!", "-d", "192.0.2.1/32", "-j", "RETURN"), ("!", "-d", "192.0.2.2/32", "-j", "RETURN")], 2),
    # a non-terminating statement
    ([("-d", "192.0.2.1/32", "-j", "MARK", "--set-mark", "1"), ("-d", "192.0.2.2/32", "-j", "MARK", "--set-mark", "1")],
     2),
    # a jump with overlapping entries would run the chain twice in iptables
    ([("-d", "192.0.2.0/24", "-j", "ISTIO_X"), ("-d", "192.0.2.1/32", "-j", "ISTIO_X")], 2),
    # a jump with disjoint entries: first match == membership
    ([("-d", "192.0.2.0/25", "-j", "ISTIO_X"), ("-d", "192.0.2.128/25", "-j", "ISTIO_X")], 1),
    ([("-p", "tcp", "--dport", "1", "-j", "RETURN"), ("-p", "udp", "--dport", "2", "-j", "RETURN")], 2),
    ([("-p", "tcp", "--dport", "1", "-j", "RETURN"), ("-p", "tcp", "--dport", "2", "-j", "RETURN"),
      ("-p", "tcp", "--dport", "3", "-j", "RETURN")], 1),
], ids=["verdict", "two-differences", "negated", "mark", "jump-overlap", "jump-disjoint", "proto", "ports"])
def test_set_coalescing_only_where_semantics_stay_equal(params_list, expected):
    rules = [_rule(IPV4, "ISTIO_OUTPUT", *p) for p in params_list] + [_rule(IPV4, "ISTIO_X", "-j", "RETURN")]
    text = render_nft(Ruleset(rules)).table_text("istio-proxy-nat")
    assert len(_rules(text, "istio-output")) == expected


# ------------------------------------------------------- v4/v6 and order
def test_dual_stack_rules_are_shared_or_restricted():
    text = render_nft(_ruleset(enable_inbound_ipv6=True, outbound_ip_ranges_include=["192.0.2.0/24"],
                               redirect_dns=True, dns_servers_v4=["192.0.2.53"], dns_servers_v6=[])).payload()
    rules = _rules(text, "istio-output")
    assert rules.count("meta skuid 1337 return") == 1  # identical in both families: once, unrestricted
    assert "ip daddr 192.0.2.0/24 jump istio-redirect" in rules
    assert "meta nfproto ipv4 return" in rules  # only IPv4 has an include list
    nat = text.split("table inet istio-proxy-nat", 1)[1]
    assert _rules(nat, "output")[0] == "meta l4proto tcp jump istio-output"


def _project(merged, family):
    return [rule for rule, restrict in merged if restrict in (None, family)]


def test_merge_keeps_each_familys_order():
    rng = random.Random(11)
    pool = [NftRule(None, (), ("jump", "c%d" % i)) for i in range(6)]
    for dummy in range(300):
        v4 = [rng.choice(pool) for dummy in range(rng.randint(0, 8))]
        v6 = [rng.choice(pool) for dummy in range(rng.randint(0, 8))]
        v4.insert(rng.randint(0, len(v4)), NftRule(IPV4, (), ("return",)))
        merged = merge_families(v4, v6)
        assert _project(merged, IPV4) == v4 and _project(merged, IPV6) == v6
        assert all(restrict is None or rule.family in (None, restrict) for rule, restrict in merged)


def test_merge_writes_identical_rules_once():
    a, b, c = (NftRule(None, (), ("jump", x)) for x in "abc")
    assert merge_families([a, b, c], [a, c]) == [(a, None), (b, IPV4), (c, None)]
    assert merge_families([a], []) == [(a, IPV4)]


def test_inserts_are_resolved_like_iptables():
    rules = [_rule(IPV4, "PREROUTING", "-i", "eth%d" % n, "-j", "RETURN", position=pos)
             for n, pos in ((0, None), (1, 1), (2, 2), (3, None), (4, 1))]
    order = [r.params[1] for r in final_order(Ruleset(rules))[IPV4][("nat", "PREROUTING")]]
    assert order == ["eth4", "eth1", "eth2", "eth0", "eth3"]
    with pytest.raises(NftRenderError, match="insert position 3"):
        final_order(Ruleset([_rule(IPV4, "PREROUTING", "-j", "RETURN", position=3)]))


def test_istio_inserts_in_final_order():
    text = render_nft(_ruleset(inbound_interception_mode="TPROXY", inbound_ports_include=["*"],
                               enable_inbound_ipv6=True)).payload()
    assert _rules(text.split("istio-proxy-mangle", 1)[1], "istio-inbound")[:5] == [
        "meta l4proto tcp meta mark 0x00000539 return",
        "meta l4proto tcp ip saddr 127.0.0.6 iifname \"lo\" return",
        "meta l4proto tcp ip6 saddr ::6 iifname \"lo\" return",
        "meta l4proto tcp iifname \"lo\" meta mark != 0x0000053a return",
        "meta l4proto tcp ct state established,related jump istio-divert",
    ]


# ---------------------------------------------------------------- words
@pytest.mark.parametrize("params, text", [
    (("-o", "veth+", "-j", "RETURN"), 'oifname "veth*" return'),
    (("-m", "owner", "!", "--uid-owner", "envoy", "-j", "RETURN"), 'meta skuid != "envoy" return'),
    (("-p", "udp", "!", "--sport", "53", "-j", "RETURN"), "udp sport != 53 return"),
    (("-m", "connmark", "--mark", "0x10/0xff", "-j", "ACCEPT"), "ct mark & 0x000000ff == 0x00000010 accept"),
    (("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED,NEW", "-j", "DROP"),
     "ct state established,related,new drop"),
    (("-p", "tcp", "-j", "REDIRECT"), "meta l4proto tcp redirect"),
    (("-p", "tcp", "--dport", "53", "-j", "REDIRECT", "--to-ports", "15053"), "tcp dport 53 redirect to :15053"),
    (("-j", "CONNMARK", "--restore-mark"), "meta mark set ct mark"),
    (("-j", "NFLOG", "--nflog-group", "5"), "log group 5"),
    (("-p", "tcp", "--dport", "1000:2000", "-j", "RETURN"), "tcp dport 1000-2000 return"),
    (("-p", "tcp", "-m", "multiport", "!", "--dports", "53,15008", "-m", "owner", "--uid-owner", "1337",
      "-j", "RETURN"), "tcp dport != { 53, 15008 } meta skuid 1337 return"),
    (("-p", "udp", "-m", "multiport", "--sports", "53,5353", "-j", "RETURN"), "udp sport { 53, 5353 } return"),
], ids=["iface-wildcard", "owner-name", "sport", "connmark-mask", "ctstate", "redirect", "redirect-port",
        "restore-mark", "nflog", "port-range", "multiport-negated", "multiport"])
def test_words(params, text):
    rendered = render_nft(Ruleset([_rule(IPV4, "OUTPUT", *params)]))
    assert _rules(rendered.payload(), "output") == ["meta nfproto ipv4 " + text]


def test_owner_names_resolve_when_asked():
    ruleset = Ruleset([_rule(IPV4, "OUTPUT", "-m", "owner", "--gid-owner", "java", "-j", "RETURN")])
    assert "meta skgid 60000 return" in render_nft(ruleset, resolve_owner=NUMERIC_GROUPS).payload()
    with pytest.raises(NftRenderError, match="does not resolve"):
        render_nft(ruleset, resolve_owner=lambda name: None)


@pytest.mark.parametrize("params", [
    ("-m", "comment", "--comment", "x", "-j", "RETURN"),
    ("--foo", "-j", "RETURN"),
    ("-j", "LOG"),
    ("-p", "icmp", "-j", "RETURN"),
    ("-d", "192.0.2.1;drop", "-j", "RETURN"),
    ("-d", "2001:db8::1", "-j", "RETURN"),
    ("-i", 'eth0"', "-j", "RETURN"),
    ("-m", "owner", "--uid-owner", 'a"b', "-j", "RETURN"),
    ("-m", "owner", "--uid-owner", "1337"),
    ("-m", "conntrack", "!", "--ctstate", "NEW", "-j", "RETURN"),
    ("--dport", "53", "-j", "RETURN"),
    ("-p", "tcp", "-j", "REDIRECT", "--to-ports", "99999"),
    ("-p", "tcp", "-j", "TPROXY", "--on-port", "15006", "--tproxy-mark", "1/0xff"),
    ("-j", "MARK", "--set-mark", "1", "--and-mark", "2"),
    ("-j", "NFLOG", "--nflog-prefix", '"a b"'),
    ("-j", "CT", "--zone", "1x"),
    ("-j", "RETURN", "extra"),
    ("-m", "mark", "--uid-owner", "1", "-j", "RETURN"),
    ("-m", "multiport", "--dports", "53,15008", "-j", "RETURN"),
    ("-p", "tcp", "-m", "multiport", "--dports", "53,x", "-j", "RETURN"),
    ("-p", "tcp", "-m", "multiport", "--dports", ",".join(str(p) for p in range(1, 17)), "-j", "RETURN"),
], ids=" ".join)
def test_unknown_or_bad_words_raise(params):
    with pytest.raises(NftRenderError) as err:
        render_nft(Ruleset([_rule(IPV4, "OUTPUT", *params)]))
    assert isinstance(err.value, CaptureError)
    assert "nat/OUTPUT" in str(err.value)


def test_unsupported_chains_raise():
    with pytest.raises(NftRenderError, match="POSTROUTING"):
        render_nft(Ruleset([_rule(IPV4, "POSTROUTING", "-j", "RETURN")]))
    with pytest.raises(NftRenderError, match="table filter"):
        render_nft(Ruleset([_rule(IPV6, "INPUT", "-j", "RETURN", table="filter")]))
    with pytest.raises(NftRenderError, match="same nftables chain"):
        render_nft(Ruleset([_rule(IPV4, "ISTIO_A", "-j", "RETURN"), _rule(IPV4, "istio-a", "-j", "RETURN")]))
    with pytest.raises(NftRenderError, match="chain name"):
        render_nft(Ruleset([_rule(IPV4, "BAD;NAME", "-j", "RETURN")]))


PORT_RANGES = Ruleset([_rule(IPV4, "OUTPUT", "-p", "tcp", "--dport", port, "-j", "RETURN")
                       for port in ("80", "1000:2000", "1500:2500", "2501", "9000:9001", "443")])


def test_port_ranges_become_an_interval_set():
    rendered = render_nft(PORT_RANGES)
    assert _rules(rendered.payload(), "output") == ["meta nfproto ipv4 tcp dport @output-dport return"]
    assert "flags interval\n\t\tauto-merge\n\t\telements = { 80, 443, 1000-2501, 9000-9001 }" in rendered.payload()


# ------------------------------------------------------ the real nft tool
def _nft_in_scratch_netns(tmp_path, payload, tables):
    path = tmp_path / "payload.nft"
    path.write_text(payload)
    script = 'nft -c -f "$1" && nft -f "$1" && shift && for t in "$@"; do nft list table inet "$t"; done'
    return subprocess.run(["unshare", "--net", "--", "/bin/sh", "-c", script, "sh", str(path)] + list(tables),
                          capture_output=True, text=True, timeout=60, check=False)


NFT_MISSING = shutil.which("nft") is None or shutil.which("unshare") is None


@pytest.mark.netns
@pytest.mark.skipif(NFT_MISSING, reason="nft / unshare not installed (run scripts/setup.sh)")
@pytest.mark.parametrize("options", [c[1] for c in CASES] + [dict(
    outbound_ip_ranges_include="*", enable_inbound_ipv6=True, outbound_ports_exclude=[str(p) for p in range(1, 40, 3)],
    outbound_ip_ranges_exclude=[str(ipaddress.ip_network("2001:db8:%x::/48" % i)) for i in range(0, 30, 2)]
    + ["192.0.2.%d/32" % i for i in range(0, 60, 3)] + ["198.51.100.0/25", "198.51.100.64/26", "::127.0.0.53/128"])],
    ids=IDS + ["sets"])
def test_nft_accepts_payload_and_lists_it_back_unchanged(tmp_path, options):
    """`nft -c -f` accepts the payload, `nft -f` loads it, and `nft list table`
    prints each table exactly as NftRuleset.table_text() renders it."""
    rendered = render_nft(generate(CaptureConfig.from_params(options)), resolve_owner=NUMERIC_GROUPS)
    proc = _nft_in_scratch_netns(tmp_path, rendered.payload(), rendered.tables)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == rendered.payload()


@pytest.mark.netns
@pytest.mark.skipif(NFT_MISSING, reason="nft / unshare not installed (run scripts/setup.sh)")
@pytest.mark.parametrize("ruleset", [PORT_RANGES, Ruleset([
    _rule(IPV4, "OUTPUT", "-p", "tcp", "-m", "multiport", "!", "--dports", "53,15008", "-j", "RETURN"),
    _rule(IPV4, "OUTPUT", "-p", "tcp", "-m", "multiport", "!", "--dports", "53,15009", "-j", "RETURN"),
    _rule(IPV4, "OUTPUT", "-p", "udp", "-m", "multiport", "--sports", "53,5353", "-j", "RETURN")])],
    ids=["port-ranges", "multiport"])
def test_nft_lists_port_range_sets_back_unchanged(tmp_path, ruleset):
    rendered = render_nft(ruleset)
    proc = _nft_in_scratch_netns(tmp_path, rendered.payload(), rendered.tables)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == rendered.payload()
