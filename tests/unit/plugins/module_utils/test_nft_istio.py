"""capture_nft_istio: Istio's own native nftables capture (1.27, 1.28 to 1.30).

Every case of the istio-nft-1.27 and istio-nft-1.28 corpora is checked twice:
as text (the transaction Istio's test prints) and as the corpora's header
says, by loading the golden and the rendering with the real `nft -f` into
fresh network namespaces (`unshare --net`, gone when the command ends) and
comparing `nft list ruleset` with tables and chains sorted by name. Group
names the machine lacks get ids from a private /etc/group (`unshare
--mount` + a bind mount), the same for both loads.
"""

import os
import re
import shutil
import subprocess

import pytest
import yaml

from module_runner import run_module

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import CaptureConfig, ConfigError
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_nft_apply import NftPlan
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_nft_istio import (
    render_tables,
    render_transaction,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures")
RELEASES = ("1.27", "1.28")
NFT_MISSING = shutil.which("nft") is None or shutil.which("unshare") is None or os.geteuid() != 0
needs_nft = pytest.mark.skipif(NFT_MISSING, reason="needs root, nft and unshare (run scripts/setup.sh)")


def make_cfg(options, release):
    """A CaptureConfig of options for release ('1.27'), as the module builds it."""
    return CaptureConfig.from_params(dict(options, istio_version=release))


def load_corpus(release):
    directory = os.path.join(FIXTURES, "istio-nft-" + release)
    with open(os.path.join(directory, "cases.yaml")) as f:
        corpus = yaml.safe_load(f)
    cases = []
    for name, overrides in corpus["cases"].items():
        options = dict(corpus["base"])
        options.update(overrides or {})
        with open(os.path.join(directory, name + ".golden")) as f:
            cases.append(("%s/%s" % (release, name), release, options, f.read()))
    return cases


CASES = [case for release in RELEASES for case in load_corpus(release)]
IDS = [case[0] for case in CASES]


def group_names(options):
    return sorted(set(g for g in options["owner_groups_include"] + options["owner_groups_exclude"]
                      if g != "*" and not g.isdigit()))


def nft_listing(tmp_path, text, groups=(), tag="in"):
    """`nft list ruleset` after `nft -f` of text in a fresh network namespace,
    with a private /etc/group that has the given names (ids 61001, ...)."""
    path = tmp_path / (tag + ".nft")
    path.write_text(text)
    with open("/etc/group") as f:
        group_db = f.read()
    known = set(line.split(":", 1)[0] for line in group_db.splitlines())
    missing = [name for name in groups if name not in known]
    group_file = tmp_path / (tag + ".group")
    group_file.write_text(group_db + "".join("%s:x:%d:\n" % (n, 61001 + i) for i, n in enumerate(missing)))
    script = 'mount --bind "$1" /etc/group && nft -f "$2" && nft list ruleset'
    proc = subprocess.run(["unshare", "--mount", "--net", "--", "/bin/sh", "-c", script, "sh",
                           str(group_file), str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def sorted_listing(text):
    """[(table line, [(chain line, [rules in order])])], tables and chains sorted by name."""
    tables, table, block = {}, None, None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("table "):
            table = tables.setdefault(stripped, {})
        elif table is not None and line.startswith("\t") and not line.startswith("\t\t") and stripped.endswith("{"):
            block = table.setdefault(stripped, [])
        elif block is not None and line.startswith("\t\t"):
            block.append(re.sub(r"counter packets \d+ bytes \d+", "counter", stripped))
    return sorted((name, sorted(chains.items())) for name, chains in tables.items())


# ------------------------------------------------------------- the corpora
@pytest.mark.parametrize("release, options, golden", [c[1:] for c in CASES], ids=IDS)
def test_transaction_text_equals_istios(release, options, golden):
    assert render_transaction(make_cfg(options, release)) == golden


@needs_nft
@pytest.mark.parametrize("release, options, golden", [c[1:] for c in CASES], ids=IDS)
def test_loaded_ruleset_equals_the_golden(tmp_path, release, options, golden):
    groups = group_names(options)
    ours = nft_listing(tmp_path, render_transaction(make_cfg(options, release)), groups, "ours")
    theirs = nft_listing(tmp_path, golden, groups, "golden")
    assert sorted_listing(ours) == sorted_listing(theirs)
    assert sorted_listing(ours), "nothing was loaded"


@pytest.mark.parametrize("release, options, golden", [c[1:] for c in CASES], ids=IDS)
def test_tables_are_the_transaction_split_per_table(release, options, golden):
    tables = render_tables(make_cfg(options, release))
    assert "".join(tables.values()) == render_transaction(make_cfg(options, release))
    for name, text in tables.items():
        assert text.startswith("add table inet %s\nflush table inet %s\n" % (name, name))
        assert all(" inet %s " % name in line + " " for line in text.splitlines())


# ------------------------------------------------------------- semantics
with open(os.path.join(FIXTURES, "istio-nft-1.28", "cases.yaml")) as _f:
    BASE = yaml.safe_load(_f)["base"]


def _lines(release="1.28", **options):
    return render_transaction(make_cfg(dict(BASE, **options), release)).splitlines()


def test_counters_sit_right_before_the_final_statement_from_1_28():
    tproxy = dict(inbound_interception_mode="TPROXY", inbound_ports_include=["*"], enable_inbound_ipv6=True)
    new, old = _lines("1.28", **tproxy), _lines("1.27", **tproxy)
    assert [line.replace(" counter", "") for line in new] == old
    rules = [line for line in new if line.split()[1] == "rule"]
    assert all(line.count(" counter ") == 1 for line in rules)
    assert "add rule inet istio-proxy-mangle istio-tproxy meta l4proto tcp ip daddr != 127.0.0.1/32 " \
           "tproxy ip to :15006 meta mark set 1337 counter accept" in new
    assert "add rule inet istio-proxy-mangle istio-divert counter meta mark set 1337" in new
    assert "add rule inet istio-proxy-mangle output meta l4proto tcp ct mark 1337 counter meta mark set ct mark" \
        in new


@pytest.mark.parametrize("release", ["1.29", "1.30"])
def test_later_releases_render_as_1_28(release):
    options = dict(redirect_dns=True, dns_servers_v4=["192.0.2.53"], inbound_ports_include=["*"])
    assert _lines(release, **options) == _lines("1.28", **options)


@pytest.mark.parametrize("release", ["1.17", "1.26"])
def test_releases_before_1_27_have_no_native_layout(release):
    with pytest.raises(ConfigError) as err:
        render_transaction(make_cfg(BASE, release))
    assert str(err.value) == ("istio_version: Istio's native nftables layout exists from 1.27 on (got '%s')"
                              % release)


def test_an_insert_past_the_end_of_a_chain_is_an_append():
    lines = _lines(inbound_interception_mode="TPROXY", inbound_ports_include=[])
    inbound = [line for line in lines if " istio-proxy-mangle istio-inbound " in line]
    assert [line.split()[0] for line in inbound] == ["add", "add", "add"]
    assert not any(line.startswith("insert") for line in lines)


def test_kube_virt_interfaces_are_inserted_at_the_head_of_nat_prerouting():
    lines = _lines(kube_virt_interfaces=["eth1", "eth2"], outbound_ip_ranges_include=["*"])
    pre = [line for line in lines if " rule inet istio-proxy-nat prerouting " in line]
    assert pre == [
        "add rule inet istio-proxy-nat prerouting iifname eth1 counter return",
        "insert rule inet istio-proxy-nat prerouting index 0 iifname eth2 counter return",
        "insert rule inet istio-proxy-nat prerouting index 0 iifname eth1 counter jump istio-redirect",
        "insert rule inet istio-proxy-nat prerouting index 0 iifname eth2 counter jump istio-redirect",
    ]


def test_ipv6_rules_only_with_enable_inbound_ipv6():
    options = dict(inbound_interception_mode="TPROXY", inbound_ports_include=["*"], redirect_dns=True,
                   dns_servers_v4=["192.0.2.53"], dns_servers_v6=["2001:db8::53"],
                   outbound_ip_ranges_include=["2001:db8:1::/48", "198.51.100.0/24"])
    v4 = _lines(**options)
    assert not [line for line in v4 if "ip6 " in line]
    # The DNS jumps exist once either family has a server.
    assert "add rule inet istio-proxy-nat istio-output counter jump istio-output-dns" in v4
    dual = _lines(enable_inbound_ipv6=True, **options)
    assert "add rule inet istio-proxy-nat istio-output-dns ip6 daddr 2001:db8::53/128 udp dport 53 " \
           "counter redirect to :15053" in dual
    outputs = [line for line in dual if "jump istio-redirect" in line]
    assert outputs == ["add rule inet istio-proxy-nat istio-output ip daddr 198.51.100.0/24 counter jump istio-redirect",
                       "add rule inet istio-proxy-nat istio-output ip6 daddr 2001:db8:1::/48 counter jump "
                       "istio-redirect"]


def test_dns_without_servers_is_off():
    assert _lines(redirect_dns=True) == _lines()


def test_capture_all_dns_redirects_port_53():
    lines = _lines(redirect_dns=True, capture_all_dns=True)
    dns = [line for line in lines if " rule " in line and (" istio-output-dns " in line or " istio-proxy-raw " in line)]
    assert dns == [
        "add rule inet istio-proxy-nat istio-output-dns meta l4proto tcp tcp dport 53 counter redirect to :15053",
        "add rule inet istio-proxy-nat istio-output-dns udp dport 53 counter redirect to :15053",
        "add rule inet istio-proxy-raw output counter jump istio-output-dns",
        "add rule inet istio-proxy-raw istio-output-dns udp dport 53 meta skuid 1337 counter ct zone set 1",
        "add rule inet istio-proxy-raw istio-output-dns udp sport 15053 meta skuid 1337 counter ct zone set 2",
        "add rule inet istio-proxy-raw istio-output-dns udp dport 53 meta skgid 1337 counter ct zone set 1",
        "add rule inet istio-proxy-raw istio-output-dns udp sport 15053 meta skgid 1337 counter ct zone set 2",
        "add rule inet istio-proxy-raw prerouting counter jump istio-inbound",
        "add rule inet istio-proxy-raw istio-output-dns udp dport 53 counter ct zone set 2",
        "add rule inet istio-proxy-raw istio-inbound udp sport 53 counter ct zone set 1",
    ]


def test_loopback_include_keeps_the_lo_returns_out():
    lines = _lines(outbound_ip_ranges_include=["127.1.2.3/32"])
    assert not [line for line in lines if "skuid != " in line or "skgid != " in line]


def test_host_loopback_cidr_is_used_verbatim():
    lines = _lines(host_ipv4_loopback_cidr="127.0.0.1/8", inbound_interception_mode="TPROXY",
                   inbound_ports_include=["*"])
    assert "add rule inet istio-proxy-nat istio-output ip daddr 127.0.0.1/8 counter return" in lines
    # nat: the uid and gid jumps to istio-in-redirect, the return; mangle:
    # the TPROXY rule, the uid and gid marks.
    assert sum("127.0.0.1/8" in line for line in lines) == 6
    assert "127.0.0.0/8" not in "".join(lines)


def test_drop_invalid_matches_tcp_only():
    lines = _lines(drop_invalid=True)
    assert "add rule inet istio-proxy-mangle prerouting meta l4proto tcp ct state invalid counter jump istio-drop" \
        in lines
    assert "add rule inet istio-proxy-mangle istio-drop counter drop" in lines


def test_empty_owner_group_include_returns_everything():
    lines = _lines(owner_groups_include=[])
    assert "add rule inet istio-proxy-nat istio-output counter return" in lines


# ---------------------------------------------- with the nftables engine
@needs_nft
def test_tables_replace_a_live_capture_in_one_transaction(tmp_path):
    """The engine's transaction (NftPlan) over render_tables: create, then
    replace with another configuration and drop an unwanted table."""
    first = render_tables(make_cfg(dict(BASE, inbound_interception_mode="TPROXY", inbound_ports_include=["*"],
                                        redirect_dns=True, dns_servers_v4=["192.0.2.53"]), "1.28"))
    second = render_tables(make_cfg(dict(BASE, inbound_ports_include=["8080"]), "1.28"))
    assert list(first) == ["istio-proxy-nat", "istio-proxy-mangle", "istio-proxy-raw"]
    assert list(second) == ["istio-proxy-nat"]
    create = NftPlan()
    create.wanted, create.replace = first, list(first)
    replace = NftPlan()
    replace.existing, replace.wanted, replace.replace = list(first), second, list(second)
    replace.delete = ["istio-proxy-mangle", "istio-proxy-raw"]
    listed = nft_listing(tmp_path, create.transaction() + replace.transaction())
    assert sorted_listing(listed) == sorted_listing(nft_listing(tmp_path, "".join(second.values()), tag="want"))


# ------------------------------------------------------ through the module
@pytest.mark.parametrize("release", RELEASES)
def test_the_rules_module_renders_istios_transaction(release):
    """rules (state rendered, backend nftables) returns render_transaction
    as restore.nft from 1.27 on; nft_layout sets keeps the set translation."""
    cases = dict((c[0], c[2]) for c in CASES)
    case = cases["%s/tproxy" % release]
    args = dict(case, state="rendered", backend="nftables", istio_version=release)
    result = run_module("rules", args)
    assert not result.get("failed"), result.get("msg")
    assert result["restore"]["nft"] == render_transaction(make_cfg(case, release))
    no_dns = cases["%s/inbound-ports-tproxy" % release]
    sets = run_module("rules", dict(no_dns, state="rendered", backend="nftables", istio_version=release,
                                    nft_layout="sets"))
    assert not sets.get("failed"), sets.get("msg")
    assert sets["restore"]["nft"].startswith("table inet ")
