"""The rules module with state=rendered, and its argument errors."""

import re

import pytest

from ansible_collections.meshcapture.sidecar.plugins.modules import rules
from tests.unit.corpus import all_cases, golden_cases

CASES = all_cases()
RELEASE_CASES = golden_cases()


@pytest.mark.parametrize("options, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rendered_returns_istio_commands(run_module, options, expected):
    result, failed = run_module(rules.main, dict(options, state="rendered"))
    assert not failed, result.get("msg")
    assert result["commands"] == expected
    assert result["changed"] is False
    assert set(result["restore"]) == {"ipv4", "ipv6"}
    assert result["backend"] == "iptables-nft"


@pytest.mark.parametrize("case", RELEASE_CASES, ids=[c.id for c in RELEASE_CASES])
def test_rendered_returns_each_release_golden(run_module, case):
    """state=rendered with istio_version: the corpus of that release, compared as its cases.yaml says."""
    result, failed = run_module(rules.main, dict(case.options, state="rendered"))
    assert not failed, result.get("msg")
    assert case.actual(result) == case.expected()
    assert result["config"]["istio_version"] == case.options.get("istio_version", "1.17")


def test_rendered_restore_of_1_24_is_istio_payload(run_module):
    result, failed = run_module(rules.main, dict(state="rendered", istio_version="1.26.8", inbound_ports_include="*",
                                                 drop_invalid=True))
    assert not failed, result.get("msg")
    assert result["restore"]["ipv4"].splitlines()[:3] == ["* mangle", "-N ISTIO_DROP",
                                                          "-A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP"]
    assert result["restore"]["ipv6"] == ""


def test_rendered_accepts_cluster_env_strings(run_module):
    result, failed = run_module(rules.main, dict(
        state="rendered", inbound_ports_include="*", inbound_ports_exclude="22,15090",
        outbound_ip_ranges_include="*", outbound_ip_ranges_exclude="169.254.169.254/32"))
    assert not failed
    assert "iptables -t nat -A ISTIO_INBOUND -p tcp --dport 22 -j RETURN" in result["commands"]
    assert "iptables -t nat -A ISTIO_OUTPUT -d 169.254.169.254/32 -j RETURN" in result["commands"]
    assert result["config"]["inbound_ports_exclude"] == ["22", "15090"]


@pytest.mark.parametrize("compact, ranges, ports, uids", [
    (False, ["10.0.0.2/32", "10.0.0.4/32", "10.0.0.6/32"], ["30000", "30002"], ["1337"]),
    (True, "10.0.0.2/32,10.0.0.4/32,10.0.0.6/32", "30000,30002", "1337"),
], ids=["lists", "compact"])
def test_compact_result_joins_the_option_lists(run_module, compact, ranges, ports, uids):
    """compact_result: config and invocation hold the lists as comma-separated strings; empty lists,
    scalars and the commands stay as they are."""
    args = dict(state="rendered", compact_result=compact, outbound_ip_ranges_include="*",
                outbound_ip_ranges_exclude=["10.0.0.2/32", "10.0.0.4/32", "10.0.0.6/32"],
                outbound_ports_exclude="30000,30002")
    result, failed = run_module(rules.main, args)
    assert not failed, result.get("msg")
    full, dummy = run_module(rules.main, dict(args, compact_result=False))
    assert result["commands"] == full["commands"] and result["restore"] == full["restore"]
    # Without compact_result, AnsibleModule adds the invocation itself (exit_json, not run here).
    places = [result["config"]] + ([result["invocation"]["module_args"]] if compact else [])
    assert compact or "invocation" not in result
    for where in places:
        assert where["outbound_ip_ranges_exclude"] == ranges
        assert where["outbound_ports_exclude"] == ports
        assert where["proxy_uid"] == uids
        assert where["kube_virt_interfaces"] == []
        assert where["proxy_port"] == 15001


def test_rendered_honours_forced_backend(run_module):
    result, failed = run_module(rules.main, dict(state="rendered", backend="iptables-legacy"))
    assert (failed, result["backend"]) == (False, "iptables-legacy")


@pytest.mark.parametrize("args, message", [
    (dict(proxy_port=70000), "proxy_port: expected a port number between 1 and 65535 (got 70000)"),
    (dict(inbound_ports_include=["80\n*filter"]),
     "inbound_ports_include: expected a port number between 1 and 65535 (got '80\\n*filter')"),
    (dict(outbound_ip_ranges_exclude=["10.0.0.0/8", "bad"]),
     "outbound_ip_ranges_exclude: expected a CIDR (address/prefix length) (got 'bad')"),
    (dict(exclude_interfaces=["eth0 -j DROP"]),
     "exclude_interfaces: expected an interface name of 1-15 characters from [A-Za-z0-9_.@+-], "
     "not starting with '-' (got 'eth0 -j DROP')"),
    (dict(inbound_tproxy_route_table=255), "inbound_tproxy_route_table: is reserved by the kernel (got 255)"),
    (dict(dns_servers_v4=["2001:db8::53"]), "dns_servers_v4: expected an IPv4 address (got '2001:db8::53')"),
    (dict(inbound_interception_mode="tproxy"),
     "value of inbound_interception_mode must be one of: REDIRECT, TPROXY, got: tproxy"),
    (dict(state="latest"), "value of state must be one of: present, absent, rendered, got: latest"),
    (dict(istio_version="1.31"),
     "istio_version: unsupported Istio release; supported: 1.17, 1.18, 1.19, 1.20, 1.21, 1.22, 1.23, 1.24, 1.25, "
     "1.26, 1.27, 1.28, 1.29, 1.30 (a patch version such as 1.28.3 selects its release) (got '1.31')"),
    (dict(istio_version="1.20", host_ipv4_loopback_cidr="127.0.0.1/8"),
     "host_ipv4_loopback_cidr: not an option of Istio 1.20: it is new in Istio 1.21 (istio_version) "
     "(got '127.0.0.1/8')"),
    (dict(istio_version="1.26.1", trace_logging=True),
     "trace_logging: not an option of Istio 1.26: Istio 1.26 removed it (istio_version) (got True)"),
    (dict(istio_version="1.22", host_ipv4_loopback_cidr="10.0.0.1/8"),
     "host_ipv4_loopback_cidr: expected an IPv4 loopback address (127.0.0.0/8) (got '10.0.0.1/8')"),
    (dict(backend="nftables", istio_version="1.26", nft_layout="istio"),
     "nft_layout: Istio's native nftables capture is new in Istio 1.27; set istio_version to 1.27 or later, "
     "or use 'sets' (got 'istio')"),
    (dict(nft_layout="native"), "value of nft_layout must be one of: istio, sets, got: native"),
], ids=["port", "newline", "cidr", "interface", "table", "dns-family", "mode-choice", "state-choice",
        "version-unknown", "new-option-on-old-release", "removed-option", "cidr-not-loopback",
        "nft-istio-before-1.27", "nft-layout-choice"])
def test_bad_input_fails_with_exact_message(run_module, args, message):
    result, failed = run_module(rules.main, dict(args, state=args.get("state", "rendered")))
    assert failed
    assert result["msg"] == message


def test_bad_input_fails_before_touching_anything(run_module, monkeypatch):
    """state=present with a bad value never reaches a command."""
    calls = []
    monkeypatch.setattr(rules.AnsibleModule, "run_command", lambda self, *a, **k: calls.append(a))
    result, failed = run_module(rules.main, dict(state="present", inbound_ports_include=["0"]))
    assert failed and calls == []
    assert result["msg"].startswith("inbound_ports_include:")


def test_memo_key_covers_the_code_and_the_host_files(monkeypatch):
    params = {"state": "present", "redirect_dns": True}
    key = rules._memo_key(params)
    assert key is not None, "the module's sources must be readable, else no re-run is memoised"
    assert rules._memo_key(dict(params)) == key
    monkeypatch.setattr(rules, "_read_text", lambda path: "nameserver 203.0.113.53\n")
    assert rules._memo_key(params) != key


def test_memo_is_off_when_a_source_is_unreadable(monkeypatch):
    class NoSource:
        __name__ = "nosource"
        __spec__ = None

        class __loader__:  # noqa: N801  (a stand-in loader)
            @staticmethod
            def get_source(name):
                return None

    assert rules._code_digest(rules.capture_rules, NoSource) is None


def test_engine_gets_declaring_payloads_of_istio_form(run_module, monkeypatch, tmp_path):
    """From 1.24 the result's restore is Istio's payload ('-N CHAIN'); the engine applies the same rules with
    ':CHAIN - [0:0]' declarations, which --noflush accepts where the chains exist already."""
    seen = {}

    def converge(host, backend, state, rendered, ruleset, job):
        seen.update(rendered["restore"])
        return dict(changed=False, added=[], removed=[], diff=[], migrated_from=[])

    monkeypatch.setattr(rules, "converge", converge)
    result, failed = run_module(rules.main, dict(state="present", istio_version="1.26", inbound_ports_include="*",
                                                 state_dir=str(tmp_path)))
    assert not failed, result.get("msg")
    assert result["restore"]["ipv4"].startswith("* nat\n-N ISTIO_INBOUND\n")
    assert seen["ipv4"].startswith("*nat\n:ISTIO_INBOUND - [0:0]\n")
    assert "-N " not in seen["ipv4"]
    back = re.sub(r"^:(\S+) - \[0:0\]$", r"-N \1", re.sub(r"^\*", "* ", seen["ipv4"], flags=re.M), flags=re.M)
    assert back == result["restore"]["ipv4"]
