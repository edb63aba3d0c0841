"""The generator reproduces istio-iptables of every release, case by case."""

import filecmp
import os

import pytest

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import CaptureConfig
from ansible_collections.meshcapture.sidecar.plugins.module_utils import capture_releases
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_generator import generate, restore_payloads
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_rules import (
    IPV4,
    IPV6,
    render_commands,
    render_delete_commands,
    render_restore,
    render_restore_declared,
)
from tests.unit.corpus import FIXTURES, SHARED_ROOT, SHARED, all_cases, golden_cases

CASES = all_cases()
RELEASE_CASES = golden_cases(every_release=True)


@pytest.mark.parametrize("options, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_commands_match_istio_golden(options, expected):
    assert render_commands(generate(CaptureConfig.from_params(options))) == expected


@pytest.mark.parametrize("case", RELEASE_CASES, ids=[c.id for c in RELEASE_CASES])
def test_release_rules_match_istio_golden(case):
    """Every iptables corpus (1.17 to 1.26), with every release it covers (1.19 with 1.18's, 1.27 to 1.30
    with 1.26's), compared as its cases.yaml header says."""
    cfg = CaptureConfig.from_params(case.options)
    ruleset = generate(cfg)
    rendered = dict(commands=render_commands(ruleset), restore=restore_payloads(cfg, ruleset))
    assert case.actual(rendered) == case.expected()


def test_every_release_has_a_corpus():
    """Each supported release is checked against a corpus (1.19 with 1.18's, 1.27 to 1.30 with 1.26's)."""
    covered = set(c.options.get("istio_version", "1.17") for c in RELEASE_CASES)
    assert covered == set(capture_releases.release_text(r) for r in capture_releases.SUPPORTED)


SHARED_CORPORA = sorted(name for name in os.listdir(SHARED_ROOT)
                        if os.path.isdir(os.path.join(SHARED_ROOT, name))) if os.path.isdir(SHARED_ROOT) else []


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/conformance not present")
@pytest.mark.parametrize("corpus", SHARED_CORPORA)
def test_vendored_corpus_is_the_shared_one(corpus):
    shared = os.path.join(SHARED_ROOT, corpus)
    vendored = os.path.join(FIXTURES, corpus)
    names = sorted(os.listdir(shared))
    match, mismatch, errors = filecmp.cmpfiles(shared, vendored, names, shallow=False)
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


def _release(version, **options):
    return generate(CaptureConfig.from_params(dict(options, istio_version=version)))


@pytest.mark.parametrize("version", [capture_releases.release_text(r) for r in capture_releases.SUPPORTED])
def test_default_options_give_rules_for_every_release(version):
    assert render_commands(_release(version, inbound_ports_include=["*"], outbound_ip_ranges_include=["*"]))


def test_releases_sharing_a_profile_render_the_same():
    """1.19 is 1.18 and 1.27 to 1.30 are 1.26, for the iptables rules."""
    options = dict(inbound_ports_include=["*"], outbound_ip_ranges_include=["10.0.0.0/8"], redirect_dns=True,
                   dns_servers_v4=["192.0.2.53"], inbound_interception_mode="TPROXY", enable_inbound_ipv6=True)
    assert render_commands(_release("1.19", **options)) == render_commands(_release("1.18", **options))
    for version in ("1.27", "1.28", "1.29", "1.30"):
        assert render_commands(_release(version, **options)) == render_commands(_release("1.26", **options))


def test_patch_version_selects_its_release():
    options = dict(redirect_dns=True, dns_servers_v4=["192.0.2.53"])
    assert render_commands(_release("1.20.3", **options)) == render_commands(_release("1.20", **options))
    assert render_commands(_release("1.20.3", **options)) != render_commands(_release("1.19", **options))


def test_unset_version_is_1_17():
    options = dict(redirect_dns=True, dns_servers_v4=["192.0.2.53"], inbound_ports_include=["*"],
                   outbound_ip_ranges_include=["10.0.0.0/8"])
    unset = generate(CaptureConfig.from_params(options))
    assert render_commands(unset) == render_commands(_release("1.17", **options))
    assert render_commands(unset) != render_commands(_release("1.18", **options))


# release, options, a line the rules have from that release on, the line they had before
BEHAVIOUR_LINES = [
    ("1.18", dict(), "iptables -t nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner "
     "--uid-owner 1337 -j ISTIO_IN_REDIRECT",
     "iptables -t nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT"),
    ("1.20", dict(redirect_dns=True, dns_servers_v4=["192.0.2.53"]),
     "iptables -t raw -A PREROUTING -p udp --sport 53 -s 192.0.2.53/32 -j CT --zone 1",
     "iptables -t raw -A PREROUTING -p udp --sport 53 -d 192.0.2.53/32 -j CT --zone 1"),
    ("1.23", dict(redirect_dns=True, dns_servers_v4=["192.0.2.53"]),
     "iptables -t raw -A ISTIO_OUTPUT -p udp --dport 53 -d 192.0.2.53/32 -j CT --zone 2",
     "iptables -t raw -A OUTPUT -p udp --dport 53 -d 192.0.2.53/32 -j CT --zone 2"),
    ("1.24", dict(drop_invalid=True), "iptables -t mangle -A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP",
     "iptables -t mangle -A PREROUTING -m conntrack --ctstate INVALID -j DROP"),
    ("1.24", dict(trace_logging=True),
     "iptables -t nat -A OUTPUT -p tcp -j NFLOG --nflog-prefix JumpOutbound --nflog-group 1337 --nflog-size 20",
     'iptables -t nat -A OUTPUT -p tcp -j NFLOG --nflog-prefix "JumpOutbound" --nflog-group 1337 --nflog-size 20'),
    ("1.25", dict(outbound_ports_exclude=["8443"]), "iptables -t nat -A ISTIO_OUTPUT -p udp --dport 8443 -j RETURN",
     None),
    ("1.25", dict(), "iptables -t nat -A OUTPUT -j ISTIO_OUTPUT", "iptables -t nat -A OUTPUT -p tcp -j ISTIO_OUTPUT"),
    ("1.25", dict(redirect_dns=True, capture_all_dns=True),
     "iptables -t nat -A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port 15053",
     "iptables -t nat -A ISTIO_OUTPUT -p udp --dport 53 -j REDIRECT --to-port 15053"),
]


def _previous(version):
    releases = capture_releases.SUPPORTED
    index = releases.index(capture_releases.parse_version(version)[0])
    return capture_releases.release_text(releases[index - 1])


@pytest.mark.parametrize("version, options, now, before", BEHAVIOUR_LINES,
                         ids=["%s-%d" % (c[0], i) for i, c in enumerate(BEHAVIOUR_LINES)])
def test_release_changes_take_effect_at_their_release(version, options, now, before):
    assert now in render_commands(_release(version, **options))
    assert now not in render_commands(_release(_previous(version), **options))
    if before:
        assert before in render_commands(_release(_previous(version), **options))
        assert before not in render_commands(_release(version, **options))


def test_host_ipv4_loopback_cidr_is_used_verbatim():
    commands = render_commands(_release("1.21", host_ipv4_loopback_cidr="127.0.0.1/8", inbound_ports_include=["*"],
                                        inbound_interception_mode="TPROXY"))
    assert "iptables -t nat -A ISTIO_OUTPUT -d 127.0.0.1/8 -j RETURN" in commands
    assert ("iptables -t mangle -A ISTIO_TPROXY ! -d 127.0.0.1/8 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff "
            "--on-port 15006") in commands
    assert "127.0.0.1/32" not in "\n".join(commands)


def test_dns_without_servers_is_off_from_1_25():
    cfg = CaptureConfig.from_params(dict(istio_version="1.25", redirect_dns=True, dns_servers_v4=[],
                                         dns_servers_v6=[]))
    assert not [c for c in render_commands(generate(cfg)) if "53" in c]
    assert cfg.warnings == ["redirect_dns is set, but there are no DNS servers and capture_all_dns is false: "
                            "Istio 1.25 captures no DNS then"]
    assert [c for c in render_commands(_release("1.24", redirect_dns=True, dns_servers_v4=[])) if "udp" in c]


def test_trace_logging_adds_no_rules_in_1_25():
    assert render_commands(_release("1.25", trace_logging=True)) == render_commands(_release("1.25"))


def test_declared_restore_form_declares_jump_only_targets():
    """A chain that is only jumped to is declared after the chains with rules."""
    from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_rules import Rule, Ruleset
    ruleset = Ruleset([Rule(IPV4, "nat", "OUTPUT", None, ("-j", "ISTIO_X")),
                       Rule(IPV4, "nat", "ISTIO_Y", None, ("-j", "RETURN")),
                       Rule(IPV4, "mangle", "PREROUTING", None, ("-j", "ACCEPT"))])
    assert render_restore_declared(ruleset, IPV4) == (
        "* mangle\n-A PREROUTING -j ACCEPT\nCOMMIT\n* nat\n-N ISTIO_Y\n-N ISTIO_X\n-A OUTPUT -j ISTIO_X\n"
        "-A ISTIO_Y -j RETURN\nCOMMIT\n")
    assert render_restore_declared(ruleset, IPV6) == ""


def test_restore_form_follows_the_release():
    options = dict(inbound_ports_include=["*"])
    before = restore_payloads(CaptureConfig.from_params(dict(options, istio_version="1.23")),
                              _release("1.23", **options))
    after = restore_payloads(CaptureConfig.from_params(dict(options, istio_version="1.24")),
                             _release("1.24", **options))
    assert before["ipv4"].startswith("*nat\n:ISTIO_INBOUND - [0:0]\n")
    assert after["ipv4"].startswith("* nat\n-N ISTIO_INBOUND\n")


def test_declaring_payload_of_istio_form_equals_the_collection_form():
    from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_rules import as_declaring_payload
    options = dict(istio_version="1.26", inbound_ports_include=["*"], inbound_interception_mode="TPROXY",
                   redirect_dns=True, dns_servers_v4=["192.0.2.53"], drop_invalid=True)
    cfg = CaptureConfig.from_params(options)
    ruleset = generate(cfg)
    istio = restore_payloads(cfg, ruleset)[IPV4]
    assert "-N ISTIO_DROP" in istio
    converted = as_declaring_payload(istio)
    assert ":ISTIO_DROP - [0:0]" in converted and "-N " not in converted and "* " not in converted
    assert as_declaring_payload(converted) == converted
    assert as_declaring_payload(render_restore(ruleset, IPV4)) == render_restore(ruleset, IPV4)
    assert as_declaring_payload("") == ""
