"""The generator reproduces istio-iptables 1.17, case by case."""

import filecmp
import os

import pytest

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import CaptureConfig
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_generator import generate
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_rules import (
    IPV4,
    IPV6,
    render_commands,
    render_delete_commands,
    render_restore,
)
from tests.unit.corpus import FIXTURES, SHARED, all_cases

CASES = all_cases()


@pytest.mark.parametrize("options, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_commands_match_istio_golden(options, expected):
    assert render_commands(generate(CaptureConfig.from_params(options))) == expected


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/conformance not present")
def test_vendored_corpus_is_the_shared_one():
    vendored = os.path.join(FIXTURES, "istio-1.17")
    names = sorted(os.listdir(SHARED))
    match, mismatch, errors = filecmp.cmpfiles(SHARED, vendored, names, shallow=False)
    assert (mismatch, errors) == ([], [])


def _ruleset(**options):
    return generate(CaptureConfig.from_params(options))


def test_ipv6_rules_only_when_enabled():
    assert _ruleset()[IPV6] == []
    assert _ruleset(enable_inbound_ipv6=True)[IPV6]


def test_restore_payload_is_deterministic_and_declares_chains():
    ruleset = _ruleset(inbound_interception_mode="TPROXY", inbound_ports_include=["*"], redirect_dns=True,
                       dns_servers_v4=["192.0.2.53"], drop_invalid=True)
    payload = render_restore(ruleset, IPV4)
    assert payload == render_restore(ruleset, IPV4)
    tables = [line for line in payload.splitlines() if line.startswith("*")]
    assert tables == ["*raw", "*mangle", "*nat"]
    assert ":ISTIO_TPROXY - [0:0]" in payload
    assert "-I ISTIO_INBOUND 1 -p tcp -m mark --mark 1337 -j RETURN" in payload
    assert payload.count("COMMIT") == 3
    assert render_restore(ruleset, IPV6) == ""


def test_restore_payload_quotes_nflog_prefix_like_istio():
    payload = render_restore(_ruleset(trace_logging=True), IPV4)
    assert '-A OUTPUT -p tcp -j NFLOG --nflog-prefix "JumpOutbound" --nflog-group 1337 --nflog-size 20' in payload


def test_delete_commands_undo_builtin_rules_then_chains():
    commands = render_delete_commands(_ruleset(exclude_interfaces=["eth1"]))
    assert commands[0] == "iptables -t nat -D OUTPUT -p tcp -j ISTIO_OUTPUT"
    assert "iptables -t nat -D PREROUTING -i eth1 -j RETURN" in commands
    flushes = [c for c in commands if " -F " in c]
    deletes = [c for c in commands if " -X " in c]
    assert commands[-len(deletes):] == deletes
    assert len(flushes) == len(deletes) == 4


@pytest.mark.parametrize("given, expected", [
    (["10.1.2.3/8"], "-d 10.0.0.0/8 -j ISTIO_REDIRECT"),
    (["2001:DB8:0:0::1/32"], "-d 2001:db8::/32 -j ISTIO_REDIRECT"),
], ids=["v4-host-bits", "v6-uppercase-uncompressed"])
def test_cidrs_are_normalised_to_the_network(given, expected):
    commands = render_commands(_ruleset(outbound_ip_ranges_include=given, enable_inbound_ipv6=True))
    assert any(c.endswith(expected) for c in commands)


def test_loopback_include_keeps_loopback_traffic_captured():
    """istio: an explicit loopback range drops the '-o lo ... ! --uid-owner ... RETURN' rules."""
    commands = render_commands(_ruleset(outbound_ip_ranges_include=["127.0.0.1/32"]))
    assert not any("! --uid-owner" in c or "! --gid-owner" in c for c in commands)


def test_capture_all_dns_redirects_without_servers():
    commands = render_commands(_ruleset(redirect_dns=True, capture_all_dns=True, dns_servers_v4=["192.0.2.53"]))
    assert "iptables -t nat -A ISTIO_OUTPUT -p tcp --dport 53 -j REDIRECT --to-ports 15053" in commands
    assert "iptables -t nat -A OUTPUT -p udp --dport 53 -j REDIRECT --to-port 15053" in commands
    assert "iptables -t raw -A PREROUTING -p udp --sport 53 -j CT --zone 1" in commands
    assert not any("192.0.2.53" in c for c in commands)
