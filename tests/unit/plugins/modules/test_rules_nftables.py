"""The rules module with backend nftables: rendering, options, exact messages."""

import pytest

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_nft import NFT_TABLES
from ansible_collections.meshcapture.sidecar.plugins.modules import rules

VM = dict(inbound_ports_include=["*"], outbound_ip_ranges_include=["*"], outbound_ip_ranges_exclude=["10.0.0.0/8"],
          redirect_dns=True, dns_servers_v4=["192.0.2.53"])


def test_rendered_returns_the_nft_payload_beside_the_iptables_ones(run_module):
    result, failed = run_module(rules.main, dict(VM, state="rendered", backend="nftables"))
    assert not failed, result.get("msg")
    assert result["backend"] == "nftables"
    assert set(result["restore"]) == {"ipv4", "ipv6", "nft"}
    assert result["restore"]["ipv4"].startswith("*")
    payload = result["restore"]["nft"]
    assert [line.split()[2] for line in payload.splitlines() if line.startswith("table ")] == \
        [NFT_TABLES["raw"], NFT_TABLES["nat"]]
    assert "delete" not in payload and "flush" not in payload
    assert result["commands"], "the istio-iptables commands are returned too"


def test_rendered_iptables_backends_return_no_nft_payload(run_module):
    result, failed = run_module(rules.main, dict(VM, state="rendered"))
    assert not failed and set(result["restore"]) == {"ipv4", "ipv6"}


@pytest.mark.parametrize("args, message", [
    (dict(backend="nft"), "value of backend must be one of: auto, iptables-nft, iptables-legacy, nftables, got: nft"),
    (dict(backend="nftables", outbound_ports_exclude=["22 }"]),
     "outbound_ports_exclude: expected a port number between 1 and 65535 (got '22 }')"),
], ids=["backend-choice", "brace"])
def test_bad_input_fails_with_exact_message(run_module, args, message):
    result, failed = run_module(rules.main, dict(args, state="rendered"))
    assert failed
    assert result["msg"] == message


def test_migrate_must_be_a_bool(run_module):
    result, failed = run_module(rules.main, dict(migrate="sometimes", state="rendered"))
    assert failed
    # Ansible lists the valid booleans in set order: only the fixed part is compared.
    assert result["msg"].startswith("argument 'migrate' is of type str and we were unable to convert to bool: "
                                    "The value 'sometimes' is not a valid boolean.")


def test_missing_nft_fails_naming_the_package(run_module, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(rules.AnsibleModule, "run_command", lambda self, *a, **k: calls.append(a))
    monkeypatch.setattr(rules.AnsibleModule, "get_bin_path",
                        lambda self, name, *a, **k: None if name == "nft" else "/usr/sbin/" + name)
    result, failed = run_module(rules.main, dict(VM, backend="nftables", state_dir=str(tmp_path)))
    assert failed and calls == []
    assert result["msg"] == ("nft not found on the target: install the nftables package (Debian/Ubuntu: "
                             "apt-get install nftables; RHEL/Fedora: dnf install nftables)")
    assert result["backend"] == "nftables"
