"""The capture_plan filter: the options merge (explicit variables over
cluster.env), the connection guard, the policy routing wanted now and the
one a previous run recorded in routes.env, and its argument errors.

cluster.env and routes.env come as the result of the read script the action
meshcapture.sidecar.capture runs on the host (capture_plan.read_script):
one section per file, a line "#meshcapture-file <name>" then the file's
content and the newline of an echo, or the line "#meshcapture-missing".
"""

import shlex
import subprocess

import pytest

from ansible.errors import AnsibleFilterError

from ansible_collections.meshcapture.sidecar.plugins.filter.capture_plan import FilterModule
from ansible_collections.meshcapture.sidecar.plugins.plugin_utils.capture_plan import (
    READ_SCRIPT, capture_plan, read_script, read_sections)


# capture_cluster_env in the tests that read a cluster.env.
CLUSTER_ENV_PATH = "/var/lib/istio/envoy/cluster.env"
MISSING_CLUSTER_ENV = ("capture_cluster_env: /var/lib/istio/envoy/cluster.env does not exist on the host "
                       "or cannot be read")
NO_ROUTES_SECTION = "capture_plan: the output of the read task has no routes.env section"

DEFAULT_ROUTES = {"tproxy": False, "mark": 1337, "table": 133, "ipv6": False}
# The routes dicts hold real bools and ints (True == 1 would hide a mix-up).
ROUTES_TYPES = {"tproxy": bool, "mark": int, "table": int, "ipv6": bool}

# A cluster.env as istioctl writes it (abridged).
ISTIOCTL_CLUSTER_ENV = (
    "CANONICAL_REVISION='latest'\n"
    "CANONICAL_SERVICE='vm-app'\n"
    "ISTIO_INBOUND_PORTS='*'\n"
    "ISTIO_LOCAL_EXCLUDE_PORTS='15090,15021,15020'\n"
    "ISTIO_META_CLUSTER_ID='Kubernetes'\n"
    "ISTIO_META_DNS_CAPTURE='true'\n"
    "ISTIO_META_MESH_ID=''\n"
    "ISTIO_SERVICE_CIDR='*'\n"
    "POD_NAMESPACE='vm-namespace'\n"
    "SERVICE_ACCOUNT='vm-sa'\n"
)

# A routes.env as the role writes it (roles/capture/vars/main.yml).
ROLE_ROUTES_ENV = (
    "# Managed by Ansible (meshcapture.sidecar.capture): the settings that\n"
    "# meshcapture-restore.sh restores at boot.\n"
    "MESHCAPTURE_IPTABLES_BACKEND=iptables-nft\n"
    "MESHCAPTURE_TPROXY_ROUTES=true\n"
    "MESHCAPTURE_TPROXY_MARK=1400\n"
    "MESHCAPTURE_TPROXY_ROUTE_TABLE=140\n"
    "MESHCAPTURE_INBOUND_IPV6=false\n"
)


def raw_stdout(cluster_env=None, routes_env=None):
    """The output of the read task's shell for files holding these texts (None: the file is missing)."""
    out = ""
    for name, text in (("cluster.env", cluster_env), ("routes.env", routes_env)):
        out += "#meshcapture-file %s\n" % name  # printf '#meshcapture-file %s\n' "$1"
        if text is None:
            out += "#meshcapture-missing\n"  # echo '#meshcapture-missing'
        else:
            out += text + "\n"  # cat -- "$2"; echo
    return out


def raw_result(stdout):
    """What ansible.builtin.raw registers for that output."""
    return {"changed": False, "rc": 0, "stdout": stdout, "stdout_lines": stdout.splitlines(),
            "stderr": "", "stderr_lines": []}


def crlf(text):
    """The output as it comes through a TTY (ansible.builtin.raw over ssh -tt)."""
    return text.replace("\n", "\r\n")


def plan(options=None, cluster_env=None, routes_env=None, **kwargs):
    """capture_plan with the explicit options as a dict (None values included) and plain-text env files.

    The read task's result is built from the texts (None: missing); cluster_env_path is set when a
    cluster.env text is given. Both can be overridden with the read and cluster_env_path keywords.
    """
    options = options or {}
    kwargs.setdefault("read", raw_result(raw_stdout(cluster_env, routes_env)))
    kwargs.setdefault("cluster_env_path", None if cluster_env is None else CLUSTER_ENV_PATH)
    return capture_plan(list(options), list(options.values()), **kwargs)


# ---------------------------------------------------------------------------
# Options: explicit variables, then cluster.env, then the module defaults
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("explicit, cluster_env, expected", [
    pytest.param({"proxy_port": 15001, "backend": "iptables-nft"}, None,
                 {"proxy_port": 15001, "backend": "iptables-nft"},
                 id="no-cluster-env-explicit-only"),
    pytest.param({"proxy_port": None, "backend": "iptables-legacy", "trace_logging": None}, None,
                 {"backend": "iptables-legacy"},
                 id="none-values-left-out"),
    pytest.param({"proxy_port": None, "inbound_ports_include": None}, None, {},
                 id="all-none-no-cluster-env"),
    pytest.param({}, None, {},
                 id="no-names"),
    pytest.param({"inbound_ports_include": None, "inbound_ports_exclude": None}, ISTIOCTL_CLUSTER_ENV,
                 {"inbound_ports_include": "*", "inbound_ports_exclude": "15090,15021,15020",
                  "redirect_dns": "true", "outbound_ip_ranges_include": "*"},
                 id="cluster-env-only-capture-keys"),
    pytest.param({"inbound_ports_exclude": "15090,22", "redirect_dns": None}, ISTIOCTL_CLUSTER_ENV,
                 {"inbound_ports_include": "*", "inbound_ports_exclude": "15090,22",
                  "redirect_dns": "true", "outbound_ip_ranges_include": "*"},
                 id="explicit-wins-none-keeps-cluster-env"),
    pytest.param({"redirect_dns": False, "outbound_ip_ranges_include": ["10.0.0.0/8"]}, ISTIOCTL_CLUSTER_ENV,
                 {"inbound_ports_include": "*", "inbound_ports_exclude": "15090,15021,15020",
                  "redirect_dns": False, "outbound_ip_ranges_include": ["10.0.0.0/8"]},
                 id="explicit-false-and-list-win"),
    pytest.param({"proxy_port": 0, "inbound_ports_include": ""}, "ENVOY_PORT=15001\nISTIO_INBOUND_PORTS='*'\n",
                 {"proxy_port": 0, "inbound_ports_include": ""},
                 id="explicit-zero-and-empty-string-win"),
    pytest.param({"backend": "iptables-nft"}, "ENVOY_PORT=15001\n",
                 {"backend": "iptables-nft", "proxy_port": "15001"},
                 id="cluster-env-and-explicit-different-keys"),
    pytest.param({"proxy_port": None}, "", {},
                 id="empty-cluster-env"),
    pytest.param({}, "# comment\n\nexport ISTIO_INBOUND_INTERCEPTION_MODE=\"TPROXY\"  # tproxy\nISTIO_SERVICE_CIDR=\n",
                 {"inbound_interception_mode": "TPROXY"},
                 id="cluster-env-export-comments-empty-values"),
    pytest.param({}, "ISTIO_INBOUND_PORTS='8080'\nISTIO_INBOUND_PORTS='9090'\n",
                 {"inbound_ports_include": "9090"},
                 id="cluster-env-last-assignment-wins"),
])
def test_options(explicit, cluster_env, expected):
    result = plan(explicit, cluster_env=cluster_env, connection_guard=False)
    assert result["options"] == expected
    assert result["rules_args"] == expected


def test_options_do_not_touch_the_arguments():
    names = ("proxy_port", "inbound_ports_exclude")
    excluded = ["15090"]
    values = [None, excluded]
    read = raw_result(raw_stdout("ISTIO_INBOUND_PORTS='*'\n"))
    result = capture_plan(names, values, read=read, cluster_env_path=CLUSTER_ENV_PATH)
    assert result["rules_args"]["inbound_ports_exclude"] == ["15090", "22"]
    assert result["options"]["inbound_ports_exclude"] is excluded
    assert excluded == ["15090"]
    assert values == [None, ["15090"]]
    assert read == raw_result(raw_stdout("ISTIO_INBOUND_PORTS='*'\n"))


def test_whole_plan():
    result = plan({"proxy_port": None, "inbound_ports_exclude": None, "enable_inbound_ipv6": True},
                  cluster_env=ISTIOCTL_CLUSTER_ENV, routes_env=ROLE_ROUTES_ENV, port=2222)
    assert result == {
        "options": {"inbound_ports_include": "*", "inbound_ports_exclude": "15090,15021,15020",
                    "redirect_dns": "true", "outbound_ip_ranges_include": "*", "enable_inbound_ipv6": True},
        "rules_args": {"inbound_ports_include": "*", "inbound_ports_exclude": ["15090", "15021", "15020", "2222"],
                       "redirect_dns": "true", "outbound_ip_ranges_include": "*", "enable_inbound_ipv6": True},
        "guard": {"port": 2222, "ports": [2222], "refuse": False, "needed": True,
                  "excluded": ["15090", "15021", "15020", "2222"]},
        "routes_wanted": {"tproxy": False, "mark": 1337, "table": 133, "ipv6": True},
        "routes_previous": {"tproxy": True, "mark": 1400, "table": 140, "ipv6": False},
    }


# ---------------------------------------------------------------------------
# Connection guard
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("explicit, cluster_env, kwargs, guard", [
    # Inbound '*': the connection port is added to the exclusions.
    pytest.param({"inbound_ports_include": "*"}, None, {},
                 {"port": 22, "refuse": False, "needed": True, "excluded": ["22"]},
                 id="star-no-exclude-needed"),
    pytest.param({"inbound_ports_include": ["*"]}, None, {},
                 {"port": 22, "refuse": False, "needed": True, "excluded": ["22"]},
                 id="star-list-needed"),
    pytest.param({"inbound_ports_include": " * "}, None, {},
                 {"port": 22, "refuse": False, "needed": True, "excluded": ["22"]},
                 id="star-with-spaces-needed"),
    pytest.param({"inbound_ports_include": "*", "inbound_ports_exclude": "15090, 15021,,15020 "}, None, {},
                 {"port": 22, "refuse": False, "needed": True, "excluded": ["15090", "15021", "15020", "22"]},
                 id="star-exclude-string-needed"),
    pytest.param({"inbound_ports_include": "*", "inbound_ports_exclude": [15090, "15021"]}, None, {},
                 {"port": 22, "refuse": False, "needed": True, "excluded": ["15090", "15021", "22"]},
                 id="star-exclude-list-needed"),
    pytest.param({"inbound_ports_include": "*", "inbound_ports_exclude": 15090}, None, {},
                 {"port": 22, "refuse": False, "needed": True, "excluded": ["15090", "22"]},
                 id="star-exclude-scalar-int-needed"),
    # The port is already excluded: nothing to add.
    pytest.param({"inbound_ports_include": "*", "inbound_ports_exclude": "15090,22"}, None, {},
                 {"port": 22, "refuse": False, "needed": False, "excluded": ["15090", "22", "22"]},
                 id="star-port-excluded-string"),
    pytest.param({"inbound_ports_include": "*", "inbound_ports_exclude": [22]}, None, {},
                 {"port": 22, "refuse": False, "needed": False, "excluded": ["22", "22"]},
                 id="star-port-excluded-int-list"),
    pytest.param({"inbound_ports_include": "*", "inbound_ports_exclude": " 022 "}, None, {},
                 {"port": 22, "refuse": False, "needed": False, "excluded": ["022", "22"]},
                 id="star-port-excluded-leading-zero"),
    # The inbound ports name the connection port: the role refuses.
    pytest.param({"inbound_ports_include": ["8080", "22"]}, None, {},
                 {"port": 22, "refuse": True, "needed": False, "excluded": ["22"]},
                 id="list-names-port-refuse"),
    pytest.param({"inbound_ports_include": [8080, 22]}, None, {},
                 {"port": 22, "refuse": True, "needed": False, "excluded": ["22"]},
                 id="int-list-names-port-refuse"),
    pytest.param({"inbound_ports_include": "8080, 22 ,9090"}, None, {},
                 {"port": 22, "refuse": True, "needed": False, "excluded": ["22"]},
                 id="string-with-spaces-names-port-refuse"),
    pytest.param({"inbound_ports_include": "22"}, None, {},
                 {"port": 22, "refuse": True, "needed": False, "excluded": ["22"]},
                 id="string-port-only-refuse"),
    pytest.param({"inbound_ports_include": 22, "inbound_ports_exclude": "15090"}, None, {},
                 {"port": 22, "refuse": True, "needed": False, "excluded": ["15090", "22"]},
                 id="scalar-int-port-refuse"),
    pytest.param({"inbound_ports_include": "8080,9090"}, None, {},
                 {"port": 22, "refuse": False, "needed": False, "excluded": ["22"]},
                 id="other-ports-neither"),
    pytest.param({"inbound_ports_include": "8022,2200"}, None, {},
                 {"port": 22, "refuse": False, "needed": False, "excluded": ["22"]},
                 id="ports-containing-22-digits-neither"),
    pytest.param({"inbound_ports_include": None}, None, {},
                 {"port": 22, "refuse": False, "needed": False, "excluded": ["22"]},
                 id="no-inbound-neither"),
    pytest.param({"inbound_ports_include": ""}, None, {},
                 {"port": 22, "refuse": False, "needed": False, "excluded": ["22"]},
                 id="empty-inbound-neither"),
    pytest.param({"inbound_ports_include": []}, None, {},
                 {"port": 22, "refuse": False, "needed": False, "excluded": ["22"]},
                 id="empty-inbound-list-neither"),
    # Several connection ports (the SSH session's and ansible_port): every one is guarded.
    pytest.param({"inbound_ports_include": "*"}, None, {"port": [2222, 22]},
                 {"port": 2222, "ports": [2222, 22], "refuse": False, "needed": True, "excluded": ["2222", "22"]},
                 id="two-ports-star-both-added"),
    pytest.param({"inbound_ports_include": "*", "inbound_ports_exclude": "2222"}, None, {"port": [2222, 22]},
                 {"port": 22, "ports": [2222, 22], "refuse": False, "needed": True, "excluded": ["2222", "22"]},
                 id="two-ports-star-one-excluded-other-added"),
    pytest.param({"inbound_ports_include": "*", "inbound_ports_exclude": "22,2222"}, None, {"port": [2222, 22]},
                 {"port": 2222, "ports": [2222, 22], "refuse": False, "needed": False,
                  "excluded": ["22", "2222", "2222", "22"]},
                 id="two-ports-star-both-excluded"),
    pytest.param({"inbound_ports_include": "8080,22"}, None, {"port": [2222, 22]},
                 {"port": 22, "ports": [2222, 22], "refuse": True, "needed": False, "excluded": ["2222", "22"]},
                 id="two-ports-second-named-refuse"),
    pytest.param({"inbound_ports_include": "2222"}, None, {"port": ["2222", 2222]},
                 {"port": 2222, "ports": [2222], "refuse": True, "needed": False, "excluded": ["2222"]},
                 id="repeated-port-once"),
    pytest.param({"inbound_ports_include": "*"}, None, {"port": []},
                 {"port": 22, "ports": [22], "refuse": False, "needed": True, "excluded": ["22"]},
                 id="no-port-known-22"),
    # Only for state=present, with the guard on.
    pytest.param({"inbound_ports_include": "*"}, None, {"state": "absent"},
                 {"port": 22, "refuse": False, "needed": False, "excluded": ["22"]},
                 id="absent-star-neither"),
    pytest.param({"inbound_ports_include": "22"}, None, {"state": "absent"},
                 {"port": 22, "refuse": False, "needed": False, "excluded": ["22"]},
                 id="absent-port-neither"),
    pytest.param({"inbound_ports_include": "*"}, None, {"connection_guard": False},
                 {"port": 22, "refuse": False, "needed": False, "excluded": ["22"]},
                 id="guard-false-star-neither"),
    pytest.param({"inbound_ports_include": "22"}, None, {"connection_guard": False},
                 {"port": 22, "refuse": False, "needed": False, "excluded": ["22"]},
                 id="guard-false-port-neither"),
    pytest.param({"inbound_ports_include": "*"}, None, {"connection_guard": "false"},
                 {"port": 22, "refuse": False, "needed": False, "excluded": ["22"]},
                 id="guard-string-false-star-neither"),
    pytest.param({"inbound_ports_include": "22"}, None, {"connection_guard": "no"},
                 {"port": 22, "refuse": False, "needed": False, "excluded": ["22"]},
                 id="guard-string-no-port-neither"),
    pytest.param({"inbound_ports_include": "*"}, None, {"connection_guard": "true"},
                 {"port": 22, "refuse": False, "needed": True, "excluded": ["22"]},
                 id="guard-string-true-star-needed"),
    pytest.param({"inbound_ports_include": "22"}, None, {"connection_guard": "yes"},
                 {"port": 22, "refuse": True, "needed": False, "excluded": ["22"]},
                 id="guard-string-yes-port-refuse"),
    # The connection port.
    pytest.param({"inbound_ports_include": "*"}, None, {"port": "2222"},
                 {"port": 2222, "refuse": False, "needed": True, "excluded": ["2222"]},
                 id="port-string-star-needed"),
    pytest.param({"inbound_ports_include": "8080,2222"}, None, {"port": "2222"},
                 {"port": 2222, "refuse": True, "needed": False, "excluded": ["2222"]},
                 id="port-string-listed-refuse"),
    pytest.param({"inbound_ports_include": "22"}, None, {"port": 2222},
                 {"port": 2222, "refuse": False, "needed": False, "excluded": ["2222"]},
                 id="port-2222-inbound-22-neither"),
    pytest.param({"inbound_ports_include": "*", "inbound_ports_exclude": "2222"}, None, {"port": 2222},
                 {"port": 2222, "refuse": False, "needed": False, "excluded": ["2222", "2222"]},
                 id="port-2222-excluded"),
    pytest.param({"inbound_ports_include": "*"}, None, {"port": None},
                 {"port": 22, "refuse": False, "needed": True, "excluded": ["22"]},
                 id="port-none-is-22-needed"),
    pytest.param({"inbound_ports_include": "22"}, None, {"port": None},
                 {"port": 22, "refuse": True, "needed": False, "excluded": ["22"]},
                 id="port-none-is-22-refuse"),
    # Inbound ports from cluster.env.
    pytest.param({"inbound_ports_include": None, "inbound_ports_exclude": None}, "ISTIO_INBOUND_PORTS='*'\n", {},
                 {"port": 22, "refuse": False, "needed": True, "excluded": ["22"]},
                 id="cluster-env-star-needed"),
    pytest.param({"inbound_ports_include": None, "inbound_ports_exclude": None}, ISTIOCTL_CLUSTER_ENV, {},
                 {"port": 22, "refuse": False, "needed": True, "excluded": ["15090", "15021", "15020", "22"]},
                 id="cluster-env-star-with-excludes-needed"),
    pytest.param({"inbound_ports_include": None, "inbound_ports_exclude": "15090"},
                 "ISTIO_INBOUND_PORTS='*'\nISTIO_LOCAL_EXCLUDE_PORTS='22'\n", {},
                 {"port": 22, "refuse": False, "needed": True, "excluded": ["15090", "22"]},
                 id="cluster-env-star-explicit-exclude-wins-needed"),
    pytest.param({"inbound_ports_include": None, "inbound_ports_exclude": None},
                 "ISTIO_INBOUND_PORTS='*'\nISTIO_LOCAL_EXCLUDE_PORTS='15090,22'\n", {},
                 {"port": 22, "refuse": False, "needed": False, "excluded": ["15090", "22", "22"]},
                 id="cluster-env-star-port-excluded"),
    pytest.param({"inbound_ports_include": None}, "ISTIO_INBOUND_PORTS='8080,22'\n", {},
                 {"port": 22, "refuse": True, "needed": False, "excluded": ["22"]},
                 id="cluster-env-names-port-refuse"),
    pytest.param({"inbound_ports_include": "8080"}, "ISTIO_INBOUND_PORTS='*'\n", {},
                 {"port": 22, "refuse": False, "needed": False, "excluded": ["22"]},
                 id="explicit-inbound-wins-over-cluster-env-star"),
    pytest.param({"inbound_ports_include": "*"}, "ISTIO_INBOUND_PORTS='22'\n", {},
                 {"port": 22, "refuse": False, "needed": True, "excluded": ["22"]},
                 id="explicit-star-wins-over-cluster-env-port"),
])
def test_guard(explicit, cluster_env, kwargs, guard):
    result = plan(explicit, cluster_env=cluster_env, **kwargs)
    assert result["guard"] == dict(guard, ports=guard.get("ports", [guard["port"]]))
    assert [type(result["guard"][key]) for key in ("port", "refuse", "needed")] == [int, bool, bool]
    # The guard changes the rules arguments only when needed, and never the options.
    if guard["needed"]:
        assert result["rules_args"] == dict(result["options"], inbound_ports_exclude=guard["excluded"])
    else:
        assert result["rules_args"] == result["options"]
    assert result["rules_args"] is not result["options"]


@pytest.mark.parametrize("explicit, cluster_env, options_exclude, rules_exclude", [
    pytest.param({"inbound_ports_include": "*"}, None, None, ["22"],
                 id="explicit-star-no-exclude"),
    pytest.param({"inbound_ports_include": "*", "inbound_ports_exclude": "15090,15021"}, None,
                 "15090,15021", ["15090", "15021", "22"],
                 id="explicit-star-exclude-string"),
    pytest.param({}, ISTIOCTL_CLUSTER_ENV, "15090,15021,15020", ["15090", "15021", "15020", "22"],
                 id="cluster-env-star-exclude-string"),
])
def test_guard_appends_port_to_rules_args_only(explicit, cluster_env, options_exclude, rules_exclude):
    result = plan(explicit, cluster_env=cluster_env)
    assert result["options"].get("inbound_ports_exclude") == options_exclude
    assert result["rules_args"]["inbound_ports_exclude"] == rules_exclude


# ---------------------------------------------------------------------------
# Policy routing wanted now
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("explicit, cluster_env, wanted", [
    pytest.param({}, None, DEFAULT_ROUTES,
                 id="defaults"),
    pytest.param({"inbound_interception_mode": None, "inbound_tproxy_mark": None,
                  "inbound_tproxy_route_table": None, "enable_inbound_ipv6": None}, None, DEFAULT_ROUTES,
                 id="all-none-defaults"),
    pytest.param({}, ISTIOCTL_CLUSTER_ENV, DEFAULT_ROUTES,
                 id="istioctl-cluster-env-defaults"),
    pytest.param({"inbound_interception_mode": "REDIRECT"}, None, DEFAULT_ROUTES,
                 id="redirect-explicit"),
    pytest.param({}, "ISTIO_INBOUND_INTERCEPTION_MODE='TPROXY'\nISTIO_INBOUND_TPROXY_MARK='1400'\n"
                     "ISTIO_INBOUND_TPROXY_ROUTE_TABLE='140'\n",
                 {"tproxy": True, "mark": 1400, "table": 140, "ipv6": False},
                 id="tproxy-cluster-env-strings-to-ints"),
    pytest.param({}, "ISTIO_INBOUND_INTERCEPTION_MODE=TPROXY\n",
                 {"tproxy": True, "mark": 1337, "table": 133, "ipv6": False},
                 id="tproxy-cluster-env-default-mark-table"),
    pytest.param({"inbound_interception_mode": "TPROXY", "inbound_tproxy_mark": 1500,
                  "inbound_tproxy_route_table": 150}, None,
                 {"tproxy": True, "mark": 1500, "table": 150, "ipv6": False},
                 id="tproxy-explicit-ints"),
    pytest.param({"inbound_interception_mode": "TPROXY", "inbound_tproxy_mark": " 1500 ",
                  "inbound_tproxy_route_table": "150"}, None,
                 {"tproxy": True, "mark": 1500, "table": 150, "ipv6": False},
                 id="tproxy-explicit-strings-to-ints"),
    pytest.param({"inbound_interception_mode": "REDIRECT", "inbound_tproxy_mark": 1500},
                 "ISTIO_INBOUND_INTERCEPTION_MODE='TPROXY'\nISTIO_INBOUND_TPROXY_MARK='1400'\n"
                 "ISTIO_INBOUND_TPROXY_ROUTE_TABLE='140'\n",
                 {"tproxy": False, "mark": 1500, "table": 140, "ipv6": False},
                 id="explicit-wins-over-cluster-env"),
    pytest.param({"enable_inbound_ipv6": "yes"}, None,
                 {"tproxy": False, "mark": 1337, "table": 133, "ipv6": True},
                 id="ipv6-string-yes"),
    pytest.param({"enable_inbound_ipv6": True}, None,
                 {"tproxy": False, "mark": 1337, "table": 133, "ipv6": True},
                 id="ipv6-true"),
    pytest.param({"enable_inbound_ipv6": "false"}, None, DEFAULT_ROUTES,
                 id="ipv6-string-false"),
    pytest.param({"enable_inbound_ipv6": False}, None, DEFAULT_ROUTES,
                 id="ipv6-false"),
    pytest.param({"inbound_interception_mode": "TPROXY", "enable_inbound_ipv6": "yes"}, None,
                 {"tproxy": True, "mark": 1337, "table": 133, "ipv6": True},
                 id="tproxy-and-ipv6"),
])
def test_routes_wanted(explicit, cluster_env, wanted):
    result = plan(explicit, cluster_env=cluster_env)["routes_wanted"]
    assert result == wanted
    assert {key: type(value) for key, value in result.items()} == ROUTES_TYPES


def test_routes_wanted_do_not_depend_on_state():
    explicit = {"inbound_interception_mode": "TPROXY", "enable_inbound_ipv6": True}
    wanted = {"tproxy": True, "mark": 1337, "table": 133, "ipv6": True}
    assert plan(explicit, state="absent", connection_guard=False)["routes_wanted"] == wanted


# ---------------------------------------------------------------------------
# Policy routing a previous run recorded (routes.env)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("routes_env, previous", [
    pytest.param(None, None,
                 id="no-routes-env"),
    pytest.param(ROLE_ROUTES_ENV, {"tproxy": True, "mark": 1400, "table": 140, "ipv6": False},
                 id="role-written-tproxy"),
    pytest.param("# Managed by Ansible\nMESHCAPTURE_IPTABLES_BACKEND=iptables-legacy\n"
                 "MESHCAPTURE_TPROXY_ROUTES=false\nMESHCAPTURE_TPROXY_MARK=1337\n"
                 "MESHCAPTURE_TPROXY_ROUTE_TABLE=133\nMESHCAPTURE_INBOUND_IPV6=true\n",
                 {"tproxy": False, "mark": 1337, "table": 133, "ipv6": True},
                 id="role-written-ipv6"),
    pytest.param("# Managed by Ansible (meshcapture.sidecar.capture): the policy routing that\n"
                 "# meshcapture-restore.sh restores at boot.\n"
                 "MESHCAPTURE_TPROXY_ROUTES=true\nMESHCAPTURE_TPROXY_MARK=1500\n"
                 "MESHCAPTURE_TPROXY_ROUTE_TABLE=150\nMESHCAPTURE_INBOUND_IPV6=true\n",
                 {"tproxy": True, "mark": 1500, "table": 150, "ipv6": True},
                 id="older-release-without-backend"),
    pytest.param("", DEFAULT_ROUTES,
                 id="empty-file-defaults"),
    pytest.param("# only a comment\n\n", DEFAULT_ROUTES,
                 id="comments-only-defaults"),
    pytest.param("MESHCAPTURE_TPROXY_ROUTES=true\n", {"tproxy": True, "mark": 1337, "table": 133, "ipv6": False},
                 id="missing-mark-table-ipv6-defaults"),
    pytest.param("MESHCAPTURE_TPROXY_MARK=1400\nMESHCAPTURE_INBOUND_IPV6=true\n",
                 {"tproxy": False, "mark": 1400, "table": 133, "ipv6": True},
                 id="missing-routes-table-defaults"),
    pytest.param("MESHCAPTURE_IPTABLES_BACKEND=iptables-nft\n", DEFAULT_ROUTES,
                 id="backend-only-defaults"),
])
def test_routes_previous(routes_env, previous):
    result = plan(routes_env=routes_env)["routes_previous"]
    assert result == previous
    if result is not None:
        assert {key: type(value) for key, value in result.items()} == ROUTES_TYPES


def test_routes_previous_round_trip():
    """What the role writes from routes_wanted reads back as the same routes_previous."""
    wanted = plan({"inbound_interception_mode": "TPROXY", "inbound_tproxy_mark": "1400",
                   "inbound_tproxy_route_table": 140, "enable_inbound_ipv6": "yes"})["routes_wanted"]
    written = ("MESHCAPTURE_IPTABLES_BACKEND=iptables-nft\n"
               "MESHCAPTURE_TPROXY_ROUTES=%s\nMESHCAPTURE_TPROXY_MARK=%d\n"
               "MESHCAPTURE_TPROXY_ROUTE_TABLE=%d\nMESHCAPTURE_INBOUND_IPV6=%s\n"
               % (str(wanted["tproxy"]).lower(), wanted["mark"], wanted["table"], str(wanted["ipv6"]).lower()))
    assert plan(routes_env=written)["routes_previous"] == wanted == {"tproxy": True, "mark": 1400, "table": 140,
                                                                     "ipv6": True}


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("names, values, message", [
    pytest.param(["proxy_port", "backend"], [None], "capture_plan: 2 option names but 1 values",
                 id="fewer-values"),
    pytest.param([], [None], "capture_plan: 0 option names but 1 values",
                 id="values-without-names"),
    pytest.param(["proxy_port"], [], "capture_plan: 1 option names but 0 values",
                 id="names-without-values"),
])
def test_length_mismatch(names, values, message):
    with pytest.raises(AnsibleFilterError) as excinfo:
        capture_plan(names, values)
    assert str(excinfo.value) == message


@pytest.mark.parametrize("cluster_env, routes_env, message", [
    pytest.param("ISTIO_INBOUND_PORTS='*'\ngarbage\n", None,
                 "cluster_env: line 2 is not KEY=VALUE: 'garbage'", id="cluster-env-not-key-value"),
    pytest.param("ISTIO_INBOUND_PORTS='*'\ngarbage", None,
                 "cluster_env: line 2 is not KEY=VALUE: 'garbage'", id="cluster-env-not-key-value-no-final-newline"),
    pytest.param(None, "MESHCAPTURE_TPROXY_MARK='1400\n",
                 "cluster_env: line 1: unterminated ' quote", id="routes-env-unterminated-quote"),
])
def test_env_parse_errors(cluster_env, routes_env, message):
    with pytest.raises(AnsibleFilterError) as excinfo:
        plan(cluster_env=cluster_env, routes_env=routes_env)
    assert str(excinfo.value) == message


@pytest.mark.parametrize("read, cluster_env_path, state", [
    pytest.param(raw_result(raw_stdout()), CLUSTER_ENV_PATH, "present",
                 id="both-missing"),
    pytest.param(raw_result(raw_stdout(None, ROLE_ROUTES_ENV)), CLUSTER_ENV_PATH, "present",
                 id="routes-env-present"),
    pytest.param(raw_result(crlf(raw_stdout(None, ROLE_ROUTES_ENV))), CLUSTER_ENV_PATH, "present",
                 id="crlf"),
    pytest.param(raw_result("#meshcapture-file routes.env\n#meshcapture-missing\n"), CLUSTER_ENV_PATH, "present",
                 id="no-cluster-env-section"),
    pytest.param(None, CLUSTER_ENV_PATH, "present",
                 id="read-none"),
    pytest.param({}, CLUSTER_ENV_PATH, "present",
                 id="read-empty"),
    pytest.param(raw_result(raw_stdout()), CLUSTER_ENV_PATH, None,
                 id="default-state"),
])
def test_missing_cluster_env(read, cluster_env_path, state):
    kwargs = {} if state is None else {"state": state}
    with pytest.raises(AnsibleFilterError) as excinfo:
        capture_plan(["backend"], ["iptables-nft"], read=read, cluster_env_path=cluster_env_path, **kwargs)
    assert str(excinfo.value) == MISSING_CLUSTER_ENV


def test_missing_cluster_env_names_the_path():
    with pytest.raises(AnsibleFilterError) as excinfo:
        plan(read=raw_result(raw_stdout()), cluster_env_path="/etc/istio env/it's cluster.env")
    assert str(excinfo.value) == ("capture_cluster_env: /etc/istio env/it's cluster.env does not exist on the host "
                                  "or cannot be read")


@pytest.mark.parametrize("read, options, previous", [
    pytest.param(raw_result(raw_stdout()), {"backend": "iptables-nft"}, None,
                 id="both-missing"),
    pytest.param(raw_result(raw_stdout(None, ROLE_ROUTES_ENV)), {"backend": "iptables-nft"},
                 {"tproxy": True, "mark": 1400, "table": 140, "ipv6": False},
                 id="routes-env-present"),
    pytest.param(None, {"backend": "iptables-nft"}, None,
                 id="read-none"),
    # The file is read when it is there.
    pytest.param(raw_result(raw_stdout("ISTIO_INBOUND_PORTS='*'\n", ROLE_ROUTES_ENV)),
                 {"backend": "iptables-nft", "inbound_ports_include": "*"},
                 {"tproxy": True, "mark": 1400, "table": 140, "ipv6": False},
                 id="cluster-env-present"),
])
def test_missing_cluster_env_absent(read, options, previous):
    """An uninstall does not need cluster.env (it may be gone already)."""
    result = plan({"backend": "iptables-nft", "proxy_port": None}, read=read, cluster_env_path=CLUSTER_ENV_PATH,
                  state="absent")
    assert result["options"] == result["rules_args"] == options
    assert result["guard"] == {"port": 22, "ports": [22], "refuse": False, "needed": False, "excluded": ["22"]}
    assert result["routes_previous"] == previous


@pytest.mark.parametrize("cluster_env_path, cluster_env, state", [
    pytest.param("", None, "present", id="empty-path-missing"),
    pytest.param(None, None, "present", id="none-path-missing"),
    pytest.param("", None, "absent", id="empty-path-missing-absent"),
    # Only a set capture_cluster_env is read (the role's shell prints the file only then).
    pytest.param("", ISTIOCTL_CLUSTER_ENV, "present", id="empty-path-section-ignored"),
    pytest.param(None, ISTIOCTL_CLUSTER_ENV, "present", id="none-path-section-ignored"),
])
def test_cluster_env_path_unset(cluster_env_path, cluster_env, state):
    result = plan({"backend": "iptables-nft", "proxy_port": None, "inbound_ports_include": "8080"},
                  cluster_env=cluster_env, routes_env=ROLE_ROUTES_ENV, cluster_env_path=cluster_env_path,
                  state=state)
    assert result["options"] == result["rules_args"] == {"backend": "iptables-nft", "inbound_ports_include": "8080"}
    assert result["routes_previous"] == {"tproxy": True, "mark": 1400, "table": 140, "ipv6": False}


@pytest.mark.parametrize("read, cluster_env_path", [
    pytest.param(raw_result(""), None, id="empty-stdout"),
    pytest.param({"rc": 0}, None, id="no-stdout-key"),
    pytest.param({"rc": 0, "stdout": None}, None, id="stdout-none"),
    pytest.param(raw_result("Welcome to vm-1\nMESHCAPTURE_TPROXY_ROUTES=true\n"), None, id="noise-only"),
    pytest.param(raw_result("#meshcapture-file cluster.env\n#meshcapture-missing\n"), None,
                 id="cluster-env-section-only-missing"),
    pytest.param(raw_result("#meshcapture-file cluster.env\nISTIO_INBOUND_PORTS='*'\n\n"), CLUSTER_ENV_PATH,
                 id="cluster-env-section-only-present"),
    pytest.param(raw_result("#meshcapture-file cluster.env\n#meshcapture-file routes\n#meshcapture-missing\n"),
                 None, id="other-section-name"),
    pytest.param(raw_result("#meshcapture-file cluster.env\r\n#meshcapture-missing\r\n"), None,
                 id="crlf-cluster-env-section-only"),
    # The section check comes before the cluster.env check.
    pytest.param(raw_result("#meshcapture-file cluster.env\n#meshcapture-missing\n"), CLUSTER_ENV_PATH,
                 id="cluster-env-missing-too"),
])
def test_no_routes_env_section(read, cluster_env_path):
    with pytest.raises(AnsibleFilterError) as excinfo:
        capture_plan([], [], read=read, cluster_env_path=cluster_env_path)
    assert str(excinfo.value) == NO_ROUTES_SECTION


@pytest.mark.parametrize("read, message", [
    pytest.param(raw_stdout(None, ROLE_ROUTES_ENV),
                 "capture_plan: read must be the registered result of the read task, got str",
                 id="stdout-instead-of-result"),
    pytest.param(raw_stdout(None, ROLE_ROUTES_ENV).splitlines(),
                 "capture_plan: read must be the registered result of the read task, got list",
                 id="stdout-lines-instead-of-result"),
    pytest.param(("stdout", raw_stdout()),
                 "capture_plan: read must be the registered result of the read task, got tuple",
                 id="tuple"),
    pytest.param(1, "capture_plan: read must be the registered result of the read task, got int",
                 id="int"),
    pytest.param(True, "capture_plan: read must be the registered result of the read task, got bool",
                 id="bool"),
])
def test_read_not_a_mapping(read, message):
    with pytest.raises(AnsibleFilterError) as excinfo:
        capture_plan([], [], read=read)
    assert str(excinfo.value) == message
    with pytest.raises(AnsibleFilterError) as excinfo:
        read_sections(read)
    assert str(excinfo.value) == message


# ---------------------------------------------------------------------------
# The read task's output
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("read, sections", [
    pytest.param(None, {},
                 id="none"),
    pytest.param({}, {},
                 id="empty-dict"),
    pytest.param({"rc": 0}, {},
                 id="no-stdout-key"),
    pytest.param({"rc": 0, "stdout": None}, {},
                 id="stdout-none"),
    pytest.param(raw_result(""), {},
                 id="empty-stdout"),
    pytest.param(raw_result("Welcome\n#meshcapture-missing\nA=1\n"), {},
                 id="noise-only"),
    pytest.param(raw_result(raw_stdout()), {"cluster.env": None, "routes.env": None},
                 id="both-missing"),
    # cat then echo: a file that ends with a newline gets a blank line more.
    pytest.param(raw_result(raw_stdout("A=1\n", "B=2\nC=3\n")),
                 {"cluster.env": "A=1\n\n", "routes.env": "B=2\nC=3\n\n"},
                 id="final-newline-plus-echo"),
    pytest.param(raw_result(raw_stdout("A=1", "B=2\nC=3")), {"cluster.env": "A=1\n", "routes.env": "B=2\nC=3\n"},
                 id="no-final-newline"),
    pytest.param(raw_result(raw_stdout("", "")), {"cluster.env": "\n", "routes.env": "\n"},
                 id="empty-files"),
    pytest.param(raw_result(raw_stdout("\n", None)), {"cluster.env": "\n\n", "routes.env": None},
                 id="newline-only-file"),
    pytest.param(raw_result(crlf(raw_stdout("A=1\nB=2\n", None))), {"cluster.env": "A=1\nB=2\n\n", "routes.env": None},
                 id="crlf"),
    pytest.param(raw_result(crlf(raw_stdout("", "B=2"))), {"cluster.env": "\n", "routes.env": "B=2\n"},
                 id="crlf-empty-file-and-no-final-newline"),
    pytest.param(raw_result("Last login: Mon Jan  1 00:00:00 2024\nISTIO_INBOUND_PORTS=22\n#meshcapture-missing\n"
                            + raw_stdout(None, "B=2\n")),
                 {"cluster.env": None, "routes.env": "B=2\n\n"},
                 id="noise-before-first-section"),
    # The marker means missing as the first line of a section only.
    pytest.param(raw_result(raw_stdout("A=1\n#meshcapture-missing\n", None)),
                 {"cluster.env": "A=1\n#meshcapture-missing\n\n", "routes.env": None},
                 id="missing-marker-later-is-content"),
    pytest.param(raw_result("#meshcapture-file routes.env \t\n#meshcapture-missing\n"), {"routes.env": None},
                 id="section-name-stripped"),
    pytest.param(raw_result(raw_stdout(None, "B=2").rstrip("\n")), {"cluster.env": None, "routes.env": "B=2\n"},
                 id="stdout-without-final-newline"),
    pytest.param(raw_result("#meshcapture-file routes.env\n#meshcapture-missing\n"
                            "#meshcapture-file cluster.env\nA=1\n"),
                 {"cluster.env": "A=1\n", "routes.env": None},
                 id="other-order"),
])
def test_read_sections(read, sections):
    assert read_sections(read) == sections


@pytest.mark.parametrize("read", [
    pytest.param(None, id="none"),
    pytest.param({}, id="empty-dict"),
])
def test_nothing_read_is_both_missing(read):
    explicit = {"backend": "iptables-nft", "inbound_ports_include": "*"}
    assert plan(explicit, read=read) == plan(explicit) == {
        "options": {"backend": "iptables-nft", "inbound_ports_include": "*"},
        "rules_args": {"backend": "iptables-nft", "inbound_ports_include": "*", "inbound_ports_exclude": ["22"]},
        "guard": {"port": 22, "ports": [22], "refuse": False, "needed": True, "excluded": ["22"]},
        "routes_wanted": DEFAULT_ROUTES,
        "routes_previous": None,
    }


@pytest.mark.parametrize("noise", [
    pytest.param("Welcome to vm-1!\n\n", id="greeting"),
    pytest.param("Last login: Mon Jan  1 00:00:00 2024 from 10.0.0.1\r\n", id="last-login-crlf"),
    pytest.param("ISTIO_INBOUND_PORTS='22'\nMESHCAPTURE_TPROXY_ROUTES=true\n", id="key-value-lines"),
    pytest.param("#meshcapture-missing\n", id="missing-marker"),
    pytest.param("# meshcapture-file routes.env\n#meshcapture-fileroutes.env\n", id="near-miss-section-lines"),
    pytest.param("Welcome to vm-1!", id="greeting-without-newline"),
    pytest.param("\x1b]0;vm-1\x07", id="terminal-title-without-newline"),
])
def test_noise_before_first_section(noise):
    explicit = {"proxy_port": None}
    expected = plan(explicit, cluster_env=ISTIOCTL_CLUSTER_ENV, routes_env=ROLE_ROUTES_ENV)
    result = plan(explicit, cluster_env=ISTIOCTL_CLUSTER_ENV, routes_env=ROLE_ROUTES_ENV,
                  read=raw_result(noise + raw_stdout(ISTIOCTL_CLUSTER_ENV, ROLE_ROUTES_ENV)))
    assert result == expected
    assert result["options"] == {"inbound_ports_include": "*", "inbound_ports_exclude": "15090,15021,15020",
                                 "redirect_dns": "true", "outbound_ip_ranges_include": "*"}
    assert result["routes_previous"] == {"tproxy": True, "mark": 1400, "table": 140, "ipv6": False}


@pytest.mark.parametrize("cluster_env, routes_env, options, previous", [
    pytest.param(ISTIOCTL_CLUSTER_ENV, ROLE_ROUTES_ENV,
                 {"inbound_ports_include": "*", "inbound_ports_exclude": "15090,15021,15020",
                  "redirect_dns": "true", "outbound_ip_ranges_include": "*"},
                 {"tproxy": True, "mark": 1400, "table": 140, "ipv6": False},
                 id="both-files"),
    pytest.param(None, ROLE_ROUTES_ENV, {}, {"tproxy": True, "mark": 1400, "table": 140, "ipv6": False},
                 id="cluster-env-missing"),
    pytest.param("ISTIO_INBOUND_INTERCEPTION_MODE=TPROXY\n", None, {"inbound_interception_mode": "TPROXY"}, None,
                 id="routes-env-missing"),
    pytest.param(None, None, {}, None,
                 id="both-missing"),
    pytest.param("", "", {}, DEFAULT_ROUTES,
                 id="empty-files"),
    pytest.param("ISTIO_INBOUND_PORTS='8080'", "MESHCAPTURE_INBOUND_IPV6=true",
                 {"inbound_ports_include": "8080"}, {"tproxy": False, "mark": 1337, "table": 133, "ipv6": True},
                 id="no-final-newlines"),
    # A file with CRLF line ends comes through a TTY as CR CR LF.
    pytest.param("ISTIO_INBOUND_PORTS='8080'\r\n", "MESHCAPTURE_TPROXY_MARK=1400\r\n",
                 {"inbound_ports_include": "8080"}, {"tproxy": False, "mark": 1400, "table": 133, "ipv6": False},
                 id="crlf-files"),
])
def test_crlf_output(cluster_env, routes_env, options, previous):
    """Through a TTY every line ends with CR LF: the plan is the same."""
    lf = plan(cluster_env=cluster_env, routes_env=routes_env)
    tty = plan(cluster_env=cluster_env, routes_env=routes_env,
               read=raw_result(crlf(raw_stdout(cluster_env, routes_env))))
    assert tty == lf
    assert tty["options"] == options
    assert tty["routes_previous"] == previous


@pytest.mark.parametrize("cluster_env, routes_env, options, previous", [
    pytest.param("", None, {"backend": "iptables-nft"}, None,
                 id="empty-cluster-env"),
    pytest.param(None, "", {"backend": "iptables-nft"}, DEFAULT_ROUTES,
                 id="empty-routes-env"),
    pytest.param("", "", {"backend": "iptables-nft"}, DEFAULT_ROUTES,
                 id="both-empty"),
])
def test_empty_files(cluster_env, routes_env, options, previous):
    """An empty file is a section with only the newline of the echo: it exists, with nothing in it."""
    read = raw_result(raw_stdout(cluster_env, routes_env))
    assert read["stdout"].count("\n\n") == [cluster_env, routes_env].count("")
    result = plan({"backend": "iptables-nft", "proxy_port": None}, cluster_env=cluster_env, routes_env=routes_env,
                  read=read)
    assert result["options"] == result["rules_args"] == options
    assert result["routes_wanted"] == DEFAULT_ROUTES
    assert result["routes_previous"] == previous


@pytest.mark.parametrize("cluster_env, routes_env, options, previous", [
    pytest.param("ISTIO_INBOUND_PORTS='*'\nISTIO_LOCAL_EXCLUDE_PORTS='15090'", None,
                 {"inbound_ports_include": "*", "inbound_ports_exclude": "15090"}, None,
                 id="cluster-env"),
    pytest.param(None, "MESHCAPTURE_TPROXY_ROUTES=true\nMESHCAPTURE_TPROXY_MARK=1400",
                 {}, {"tproxy": True, "mark": 1400, "table": 133, "ipv6": False},
                 id="routes-env"),
    pytest.param("ISTIO_INBOUND_INTERCEPTION_MODE=TPROXY\n# the end", "MESHCAPTURE_TPROXY_ROUTE_TABLE=140",
                 {"inbound_interception_mode": "TPROXY"}, {"tproxy": False, "mark": 1337, "table": 140, "ipv6": False},
                 id="both-comment-last"),
    pytest.param("ENVOY_PORT=15001", "MESHCAPTURE_INBOUND_IPV6=true",
                 {"proxy_port": "15001"}, {"tproxy": False, "mark": 1337, "table": 133, "ipv6": True},
                 id="both-single-line"),
])
def test_no_final_newline(cluster_env, routes_env, options, previous):
    """cat then echo: the echo ends the last line of a file without a final newline."""
    result = plan(cluster_env=cluster_env, routes_env=routes_env, connection_guard=False)
    assert result["options"] == options
    assert result["routes_previous"] == previous
    assert result == plan(cluster_env=None if cluster_env is None else cluster_env + "\n",
                          routes_env=None if routes_env is None else routes_env + "\n", connection_guard=False)


# ---------------------------------------------------------------------------
# The read script, run for real (the action meshcapture.sidecar.capture runs
# read_script()'s output on the host with /bin/sh)
# ---------------------------------------------------------------------------


def read_task_script(cluster_env_path, routes_env_path):
    """The read script for these paths, as the action builds it."""
    script = read_script(cluster_env_path, routes_env_path)
    assert script == READ_SCRIPT % (shlex.quote(cluster_env_path), shlex.quote(routes_env_path))
    return script


@pytest.mark.parametrize("cluster_env, routes_env, explicit, options, previous", [
    pytest.param(ISTIOCTL_CLUSTER_ENV, ROLE_ROUTES_ENV, {"inbound_ports_exclude": "15090,22", "proxy_port": None},
                 {"inbound_ports_include": "*", "inbound_ports_exclude": "15090,22",
                  "redirect_dns": "true", "outbound_ip_ranges_include": "*"},
                 {"tproxy": True, "mark": 1400, "table": 140, "ipv6": False},
                 id="both-files"),
    # capture_cluster_env unset ('' after default('', true) | quote), no earlier run.
    pytest.param(None, None, {"backend": "iptables-nft", "proxy_port": None}, {"backend": "iptables-nft"}, None,
                 id="no-cluster-env-path-no-routes-env"),
])
def test_read_task_shell(tmp_path, cluster_env, routes_env, explicit, options, previous):
    # Directory names that need quoting.
    cluster_env_file = tmp_path / "istio's envoy" / "cluster.env"
    routes_env_file = tmp_path / "persist dir" / "routes.env"
    cluster_env_file.parent.mkdir()
    routes_env_file.parent.mkdir()
    cluster_env_path = ""
    if cluster_env is not None:
        cluster_env_file.write_text(cluster_env)
        cluster_env_path = str(cluster_env_file)
    if routes_env is not None:
        routes_env_file.write_text(routes_env)
    script = read_task_script(cluster_env_path, str(routes_env_file))
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, check=True).stdout
    # The helper the other tests use builds the same output.
    assert out == raw_stdout(cluster_env, routes_env)
    result = capture_plan(list(explicit), list(explicit.values()), read={"stdout": out, "rc": 0},
                          cluster_env_path=cluster_env_path)
    assert result["options"] == options
    assert result["routes_previous"] == previous


# ---------------------------------------------------------------------------
# Plugin entry point
# ---------------------------------------------------------------------------

def test_filter_module_exposes_capture_plan():
    assert FilterModule().filters() == {"capture_plan": capture_plan}
