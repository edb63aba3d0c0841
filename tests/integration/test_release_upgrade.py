"""Upgrading a host's capture across Istio releases, with real traffic after each step.

One host (tests/release_traffic.py's topology, with rules of other software
in the iptables tables and an nftables table of its own) goes through:
the Istio 1.17 capture (iptables-nft), the 1.26 capture over it, Istio
1.28's native nftables capture (migrate: true, which removes the iptables
capture), and state absent.  After each step the probes must land where the
capture sends them (nothing captured at the end), and at the end
`iptables-save`, `ip6tables-save` and `nft list ruleset` print exactly what
they printed before the first step.
"""

import re

import pytest

import release_traffic
from release_traffic import REDIRECT_DNS, apply_release, assert_steers, redirect_dns_checks
from rules_helpers import add_foreign, apply, assert_same, ok, saves

pytestmark = pytest.mark.netns

FOREIGN_NFT = """\
table inet foreign_fw {
\tchain input {
\t\ttype filter hook input priority 10; policy accept;
\t\ttcp dport 2222 counter accept
\t}
}
"""
_COUNTER = re.compile(r"counter packets \d+ bytes \d+")


def nft_ruleset(ns):
    """`nft list ruleset` with counter values dropped (traffic moves them)."""
    return _COUNTER.sub("counter", ns.run(["nft", "list", "ruleset"]).stdout)


def uncaptured_checks():
    """Where the probes land without a capture: at the app, the service, the resolver."""
    checks = []
    for family in (4, 6):
        a = release_traffic.ADDR[family]
        checks += [
            (dict(proto="tcp", dst=a["service"], port=80, uid=release_traffic.APP, gid=release_traffic.APP), "host",
             dict(banner="peer:80")),
            (dict(proto="udp", dst=a["dns"], port=53, uid=release_traffic.APP, gid=release_traffic.APP), "host",
             dict(banner="peer:53")),
            (dict(proto="tcp", dst=a["host"], port=8080), "peer", dict(banner="host:8080")),
        ]
    return checks


@pytest.fixture
def supported():
    reason = release_traffic.releases_unsupported_reason()
    if reason:
        pytest.skip(reason)


def test_upgrade_1_17_to_1_26_to_native_1_28_then_absent(supported, topology, tmp_path):
    host, peer = release_traffic.build(topology)
    add_foreign(host)
    host.run(["nft", "-f", "-"], input=FOREIGN_NFT)
    before_saves, before_nft = saves(host), nft_ruleset(host)
    assert_steers(host, peer, uncaptured_checks(), "before")

    for release in ("1.17", "1.26"):
        result = ok(apply_release(host, tmp_path, release, "iptables-nft", REDIRECT_DNS))
        assert result["changed"] is True and result["backend"] == "iptables-nft"
        assert_steers(host, peer, redirect_dns_checks(), "Istio %s, iptables-nft" % release)

    result = ok(apply_release(host, tmp_path, "1.28", "nftables", REDIRECT_DNS, migrate=True))
    assert result["changed"] is True and result["backend"] == "nftables"
    assert result["migrated_from"] == ["iptables-nft"]
    assert_steers(host, peer, redirect_dns_checks(), "Istio 1.28, nftables")
    # The iptables capture is gone: the iptables tables are as before.
    assert_same(saves(host), before_saves)

    result = ok(apply(host, tmp_path, state="absent", backend="nftables", migrate=True))
    assert result["changed"] is True
    assert_steers(host, peer, uncaptured_checks(), "after state absent")
    assert_same(saves(host), before_saves)
    assert_same(nft_ruleset(host), before_nft, "nft list ruleset")
    assert ok(apply(host, tmp_path, state="absent", backend="nftables", migrate=True))["changed"] is False


def test_native_1_27_to_1_28_to_sets_layout_replaces_tables(supported, topology, tmp_path):
    """Between releases and layouts of the nftables backend: the changed
    tables are replaced, no migrate needed, capture all along."""
    host, peer = release_traffic.build(topology)
    options, checks = release_traffic.CHECKS["tproxy-groups"]
    steps = (("1.27", {}), ("1.28", {}), ("1.28", dict(nft_layout="sets")))
    listings = []
    for release, extra in steps:
        result = ok(apply_release(host, tmp_path, release, "nftables", options, **extra))
        assert result["changed"] is True and result["migrated_from"] == []
        what = "Istio %s, nftables %s" % (release, extra.get("nft_layout", "istio"))
        assert result["restore"]["nft"].startswith("table inet " if extra else "add table inet "), what
        assert_steers(host, peer, checks(), what)
        listings.append(nft_ruleset(host))
    assert len(set(listings)) == len(steps), "each step must have replaced the tables"
    ok(apply(host, tmp_path, state="absent", backend="nftables"))
    assert "istio-proxy" not in host.run(["nft", "list", "tables"]).stdout
