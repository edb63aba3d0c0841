"""End to end: rules in TPROXY mode + routes, with real connections.

A peer connects to included ports of the host: the connection lands on a
transparent listener on 15006 that sees the original destination address
and port; an excluded port reaches the app; outbound traffic of the host
still lands on 15001 with its original destination.
"""

import pytest

import netns
from module_runner import run_module

pytestmark = pytest.mark.netns

# routes is the same for every backend: the TPROXY mark's local route.
BACKENDS = pytest.mark.parametrize("backend", ["iptables-nft", "nftables"])

APP_PORT, EXCLUDED_PORT = 8080, 9090
OUTBOUND_DST = {4: "198.51.100.7", 6: "2001:db8:ffff::7"}


def _capture(ns, tmp_path, backend, state="present", **extra):
    options = dict(inbound_interception_mode="TPROXY", inbound_ports_include=["*"],
                   inbound_ports_exclude=[str(EXCLUDED_PORT)], outbound_ip_ranges_include=["*"],
                   enable_inbound_ipv6=True, state_dir=str(tmp_path / "state"), backend=backend, **extra)
    rules = run_module("rules", dict(options, state=state), netns=ns)
    routes = run_module("routes", dict(state=state, enable_inbound_ipv6=True), netns=ns)
    assert not rules.get("failed"), rules.get("msg")
    assert not routes.get("failed"), routes.get("msg")
    return rules, routes


@BACKENDS
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_tproxy_inbound_lands_on_transparent_listener(host_and_peer, tmp_path, family, backend):
    host, peer = host_and_peer
    _capture(host, tmp_path, backend)
    host_addr = netns.HOST_V4 if family == 4 else netns.HOST_V6
    with netns.tcp_listener(host, 15006, family, transparent=True, banner="INBOUND15006") as inbound, \
            netns.tcp_listener(host, EXCLUDED_PORT, family, banner="APP") as app:
        captured = netns.tcp_connect(peer, host_addr, APP_PORT)
        excluded = netns.tcp_connect(peer, host_addr, EXCLUDED_PORT)
        reports = inbound.result(), app.result()
    assert captured["ok"], captured
    assert captured["banner"] == "INBOUND15006"
    assert captured["orig_dst"] == netns.fmt_addr(host_addr, APP_PORT)
    assert excluded["ok"] and excluded["banner"] == "APP", excluded
    assert all(len(report["connections"]) == 1 for report in reports), reports


@BACKENDS
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_tproxy_mode_still_captures_outbound(host_and_peer, tmp_path, family, backend):
    host, peer = host_and_peer
    _capture(host, tmp_path, backend)
    dst = OUTBOUND_DST[family]
    with netns.tcp_listener(host, 15001, family, banner="OUTBOUND15001"):
        result = netns.tcp_connect(host, dst, 80, uid=1000, gid=1000)
    assert result["ok"], result
    assert result["banner"] == "OUTBOUND15001"
    assert result["orig_dst"] == netns.fmt_addr(dst, 80)


@BACKENDS
def test_tproxy_uninstall_restores_plain_routing(host_and_peer, tmp_path, backend):
    host, peer = host_and_peer
    before = host.run(["ip", "rule", "show"]).stdout
    nft_before = host.run(["nft", "list", "ruleset"]).stdout
    _capture(host, tmp_path, backend)
    rules, routes = _capture(host, tmp_path, backend, state="absent")
    assert rules["changed"] and routes["changed"]
    assert host.run(["ip", "rule", "show"]).stdout == before
    assert host.run(["ip", "route", "show", "table", "133"], check=False).stdout == ""
    assert host.run(["nft", "list", "ruleset"]).stdout == nft_before
    with netns.tcp_listener(host, APP_PORT, 4, banner="APP"):
        direct = netns.tcp_connect(peer, netns.HOST_V4, APP_PORT)
    assert direct["ok"] and direct["banner"] == "APP", direct
