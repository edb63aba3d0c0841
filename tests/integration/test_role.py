"""The capture role's edge cases, each on a throwaway namespace host: the
connection guard refusing an explicit port, validation failing and rolling
back, a mode switch cleaning up the old routing, capture_persist: false and an
uninstall without the original variables, a missing cluster.env. (The main paths run as molecule
scenarios, see molecule/.) Also the cluster_env filter's parsing.

Everything the role writes goes below pytest's tmp_path.
"""

import re
import sys

import pytest

import netns
from role_helpers import COLLECTIONS, PYTHON, run_role
from rules_helpers import nft_monitor


def cluster_env_filter():
    sys.path.insert(0, str(COLLECTIONS))
    try:
        from ansible_collections.meshcapture.sidecar.plugins.filter.cluster_env import cluster_env
    except ImportError:
        pytest.skip("run scripts/setup.sh first")
    return cluster_env


def save(ns):
    return ns.run(["iptables-nft-save"]).stdout + ns.run(["ip6tables-nft-save"]).stdout


def rules(ns, family=4):
    return ns.run(["ip", f"-{family}", "rule", "show"]).stdout


def test_cluster_env_filter_parses_what_istioctl_writes():
    cluster_env = cluster_env_filter()
    text = """# generated
CANONICAL_REVISION='latest'
ISTIO_INBOUND_PORTS='*'
ISTIO_LOCAL_EXCLUDE_PORTS='15090,15021,15020'
ISTIO_METAJSON_LABELS='{"app":"vm-app"}'
ISTIO_META_DNS_CAPTURE='true'
ISTIO_META_MESH_ID=''
export ENVOY_PORT=15001  # the proxy
ISTIO_SERVICE_CIDR="*"
ISTIO_SERVICE_CIDR="10.96.0.0/12"
ISTIO_EXCLUDE_INTERFACES="eth\\"1"
INVALID_DROP=true
"""
    assert cluster_env(text) == {
        "inbound_ports_include": "*",
        "inbound_ports_exclude": "15090,15021,15020",
        "redirect_dns": "true",
        "proxy_port": "15001",
        "outbound_ip_ranges_include": "10.96.0.0/12",  # the last assignment wins
        "exclude_interfaces": 'eth"1',
        "drop_invalid": "true",
    }
    assert cluster_env(text, raw=True)["ISTIO_META_MESH_ID"] == ""


@pytest.mark.parametrize("text", ["ENVOY_PORT='15001", "not an assignment", "ENVOY_PORT='1' trailing"])
def test_cluster_env_filter_rejects_broken_lines(text):
    from ansible.errors import AnsibleFilterError
    cluster_env = cluster_env_filter()
    with pytest.raises(AnsibleFilterError, match="line 1"):
        cluster_env(text)


@pytest.mark.netns
def test_guard_refuses_an_explicit_connection_port(netns_factory, tmp_path):
    ns = netns_factory("guard")
    proc = run_role(ns, tmp_path, capture_inbound_ports_include="8080,22")
    assert proc.returncode != 0
    assert "capture_inbound_ports_include includes port 22" in proc.stdout, proc.stdout
    assert "ISTIO" not in save(ns)


@pytest.mark.netns
def test_missing_cluster_env_fails_before_any_change(netns_factory, tmp_path):
    ns = netns_factory("clenv")
    missing = tmp_path / "no-such" / "cluster.env"
    proc = run_role(ns, tmp_path, capture_cluster_env=str(missing))
    assert proc.returncode != 0
    assert "capture_cluster_env: %s does not exist on the host or cannot be read" % missing in proc.stdout, proc.stdout
    assert "ISTIO" not in save(ns)
    assert not (tmp_path / "host" / "persist").exists()
    # An uninstall does not need the file.
    proc = run_role(ns, tmp_path, capture_cluster_env=str(missing), capture_state="absent")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.netns
def test_guard_uses_ansible_port(netns_factory, tmp_path):
    ns = netns_factory("guard")
    proc = run_role(ns, tmp_path, ansible_port=2222, capture_inbound_ports_include="*",
                    capture_inbound_ports_exclude=[15090], capture_persist=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING: capture_connection_guard" in proc.stdout
    ruleset = save(ns)
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 2222 -j RETURN" in ruleset
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN" in ruleset
    assert "--dport 22 " not in ruleset


@pytest.mark.netns
def test_validation_failure_rolls_back(host_and_peer, tmp_path):
    host, _peer = host_and_peer
    # Something (an Envoy, say) already listens on the proxy port.
    with netns.tcp_listener(host, 15001, timeout=300):
        proc = run_role(host, tmp_path, capture_inbound_ports_include="*",
                        capture_outbound_ip_ranges_include="*", capture_inbound_interception_mode="TPROXY",
                        capture_validate=True)
    assert proc.returncode != 0
    assert "did not pass validation and was rolled back" in proc.stdout, proc.stdout
    assert "port 15001 is already in use" in proc.stdout
    assert "ISTIO" not in save(host)
    assert "lookup 133" not in rules(host)
    assert not (tmp_path / "host" / "persist").exists()
    assert not (tmp_path / "host" / "systemd" / "meshcapture-capture.service").exists()


@pytest.mark.netns
def test_validation_of_an_address_not_captured_rolls_back(host_and_peer, tmp_path):
    host, _peer = host_and_peer
    proc = run_role(host, tmp_path, capture_outbound_ip_ranges_include="203.0.113.0/24",
                    capture_validate=True, capture_validate_dest="198.51.100.1", capture_validate_timeout=1)
    assert proc.returncode != 0
    assert "was not captured" in proc.stdout, proc.stdout
    assert "ISTIO" not in save(host)


@pytest.mark.netns
def test_mode_switch_persist_off_and_uninstall_without_the_variables(host_and_peer, tmp_path):
    host, _peer = host_and_peer
    persist = tmp_path / "host" / "persist"
    # 1. TPROXY with a custom mark and table, persisted.
    proc = run_role(host, tmp_path, capture_inbound_interception_mode="TPROXY", capture_inbound_ports_include="*",
                    capture_inbound_tproxy_mark=1400, capture_inbound_tproxy_route_table=140,
                    capture_outbound_ip_ranges_include="203.0.113.0/24", capture_validate=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fwmark 0x578 lookup 140" in rules(host)
    assert "MESHCAPTURE_TPROXY_MARK=1400" in (persist / "routes.env").read_text()
    # 2. Back to REDIRECT, not persisted: the old routing and the files go.
    proc = run_role(host, tmp_path, capture_inbound_ports_include="*", capture_persist=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lookup 140" not in rules(host)
    assert "ISTIO_IN_REDIRECT" in save(host)
    assert not persist.exists()
    assert not (tmp_path / "host" / "systemd" / "meshcapture-capture.service").exists()
    # 3. TPROXY again, then uninstall with none of the variables: routes.env
    #    tells the role which routing to remove.
    proc = run_role(host, tmp_path, capture_inbound_interception_mode="TPROXY", capture_inbound_ports_include="*",
                    capture_inbound_tproxy_mark=1400, capture_inbound_tproxy_route_table=140)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lookup 140" in rules(host)
    proc = run_role(host, tmp_path, capture_state="absent")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lookup 140" not in rules(host)
    assert "ISTIO" not in save(host)
    assert not persist.exists()


def logging_interpreter(tmp_path):
    """(interpreter, log): the venv's Python, logging the name of every module it runs."""
    log = tmp_path / "modules.log"
    wrapper = tmp_path / "python.sh"
    wrapper.write_text('#!/bin/sh\nbasename "$1" >> "%s"\nexec "%s" "$@"\n' % (log, PYTHON))
    wrapper.chmod(0o755)
    return str(wrapper), log


def modules_run(log):
    names = log.read_text().split() if log.exists() else []
    log.write_text("")
    return [name.replace("AnsiballZ_", "").replace(".py", "") for name in names]


@pytest.mark.netns
def test_module_runs_per_host_converge_no_op_and_drift(netns_factory, tmp_path):
    """A converge runs rules, routes and persist; a no-op re-run only rules; drift re-runs what it concerns."""
    ns = netns_factory("runs")
    interpreter, log = logging_interpreter(tmp_path)
    options = dict(ansible_python_interpreter=interpreter, capture_inbound_ports_include="*",
                   capture_inbound_ports_exclude=[22], capture_outbound_ip_ranges_include="*",
                   capture_enable_inbound_ipv6=True)
    persist = tmp_path / "host" / "persist"
    steps = [
        ("converge", None, ["rules", "routes", "persist"], "changed=1"),
        ("no-op", None, ["rules"], "changed=0"),
        ("address removed", lambda: ns.run(["ip", "-6", "addr", "del", "::6/128", "dev", "lo"]),
         ["rules", "routes"], "changed=1"),
        ("no-op again", None, ["rules"], "changed=0"),
        ("persisted file changed", lambda: (persist / "rules.v4").write_text("# edited\n"),
         ["rules", "persist"], "changed=1"),
        ("routes.env mode changed", lambda: (persist / "routes.env").chmod(0o600), ["rules", "persist"], "changed=1"),
        ("last no-op", None, ["rules"], "changed=0"),
    ]
    monitor = nft_monitor(ns)
    try:
        for label, drift, expected, recap in steps:
            if drift:
                drift()
            monitor.mark()
            proc = run_role(ns, tmp_path, **options)
            events = monitor.mark()
            assert proc.returncode == 0, label + "\n" + proc.stdout + proc.stderr
            assert modules_run(log) == expected, label
            assert recap in proc.stdout, label + "\n" + proc.stdout
            assert "[WARNING]" not in proc.stderr, label + "\n" + proc.stderr
            # The netns connection has no network session to protect: no conntrack primer.
            assert not [e for e in events if "meshcapture-conntrack-primer" in e], label
            if recap == "changed=0":
                assert events == [], label  # a re-run writes nothing to the kernel
    finally:
        monitor.close()
    assert "inet6 ::6/128" in ns.run(["ip", "-6", "addr", "show", "dev", "lo"]).stdout
    assert "# edited" not in (persist / "rules.v4").read_text()


@pytest.mark.netns
def test_check_mode_on_a_converged_host_runs_only_rules_and_changes_nothing(netns_factory, tmp_path):
    ns = netns_factory("check")
    interpreter, log = logging_interpreter(tmp_path)
    options = dict(ansible_python_interpreter=interpreter, capture_inbound_ports_include="*",
                   capture_inbound_ports_exclude=[22], capture_inbound_interception_mode="TPROXY")
    proc = run_role(ns, tmp_path, **options)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    modules_run(log)

    def state():
        return ([line for line in save(ns).splitlines() if not line.startswith("#")], rules(ns), rules(ns, 6),
                sorted(p.name for p in (tmp_path / "host").rglob("*")))

    before = state()
    # A drift the check-mode run must report but not repair.
    ns.run(["ip", "-4", "rule", "del", "fwmark", "1337", "lookup", "133"])
    drifted = state()
    proc = run_role(ns, tmp_path, cli=["--check", "--diff"], **options)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "changed=1" in proc.stdout
    assert "+ip -4 rule: fwmark 0x539 lookup 133" in proc.stdout, proc.stdout
    assert modules_run(log) == ["rules", "routes"]
    assert state() == drifted != before


def task_results(stdout, name):
    """The result lines (ok/changed/skipping/fatal) of the task called name ('' when it did not run)."""
    block = stdout.split("TASK [meshcapture.sidecar.capture : %s]" % name)
    return [] if len(block) < 2 else [line for line in block[1].split("TASK [")[0].splitlines()
                                      if line.startswith(("ok:", "changed:", "skipping:", "fatal:"))]


@pytest.mark.netns
def test_sidecar_env_task_says_what_it_does_in_both_states(netns_factory, tmp_path):
    ns = netns_factory("sidecar")
    sidecar_env = tmp_path / "host" / "sidecar.env"
    sidecar_env.parent.mkdir(parents=True)
    sidecar_env.write_text("ISTIO_AGENT_FLAGS=--log_output_level=info\n")
    options = dict(capture_inbound_ports_include="8080", capture_istio_sidecar_env=True)
    proc = run_role(ns, tmp_path, **options)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert task_results(proc.stdout, "Istio sidecar.env: set ISTIO_CUSTOM_IP_TABLES")[0].startswith("changed:")
    assert "ISTIO_CUSTOM_IP_TABLES=true" in sidecar_env.read_text()
    proc = run_role(ns, tmp_path, capture_state="absent", **options)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert task_results(proc.stdout, "Istio sidecar.env: remove ISTIO_CUSTOM_IP_TABLES")[0].startswith("changed:")
    assert "set ISTIO_CUSTOM_IP_TABLES" not in proc.stdout
    assert sidecar_env.read_text() == "ISTIO_AGENT_FLAGS=--log_output_level=info\n"


@pytest.mark.netns
@pytest.mark.parametrize("enable, reported", [(True, True), (False, False)], ids=["enable", "disabled-as-asked"])
def test_unit_not_enabled_is_reported_only_when_enabling_was_asked(netns_factory, tmp_path, enable, reported):
    """No systemd in a namespace: with capture_systemd_enable the role says why the unit is not enabled, on
    every run; with it false (what was asked) it says nothing and runs no task for it."""
    ns = netns_factory("unit")
    for dummy in ("converge", "re-run"):
        proc = run_role(ns, tmp_path, capture_inbound_ports_include="8080", capture_systemd_enable=enable)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert ("is written but not enabled: systemd is not running on this host" in proc.stdout) is reported
        assert ("Report that the restore unit is not enabled" in proc.stdout) is reported


@pytest.mark.netns
@pytest.mark.parametrize("version, expected", [("auto", "1.17"), ("1.28.3", "1.28")],
                         ids=["auto-none-installed", "explicit"])
def test_istio_version_reaches_the_rules_module(netns_factory, tmp_path, version, expected):
    # This machine has no Istio sidecar package or pilot-agent: auto falls back to 1.17.
    ns = netns_factory("istio")
    proc = run_role(ns, tmp_path, cli=["-v"], capture_inbound_ports_include="8080", capture_persist=False,
                    capture_istio_version=version)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r'"istio_version": "%s' % re.escape(expected), proc.stdout), proc.stdout
