"""The capture_plan filter: the options merge (explicit variables over
cluster.env), the connection guard, the policy routing wanted now and the
one a previous run recorded in routes.env, and its argument errors.

cluster.env and routes.env are passed base64-encoded, as
ansible.builtin.slurp returns them.
"""

import base64

import pytest

from ansible.errors import AnsibleFilterError

from ansible_collections.meshcapture.sidecar.plugins.filter.capture_plan import FilterModule, capture_plan

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


def b64(text):
    """What ansible.builtin.slurp returns as content for a file holding text."""
    return base64.b64encode(text.encode()).decode()


def plan(options=None, cluster_env=None, routes_env=None, **kwargs):
    """capture_plan with the explicit options as a dict (None values included) and plain-text env files."""
    options = options or {}
    return capture_plan(list(options), list(options.values()),
                        cluster_env_content=None if cluster_env is None else b64(cluster_env),
                        routes_env_content=None if routes_env is None else b64(routes_env),
                        **kwargs)


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
    result = capture_plan(names, values, cluster_env_content=b64("ISTIO_INBOUND_PORTS='*'\n"))
    assert result["rules_args"]["inbound_ports_exclude"] == ["15090", "22"]
    assert result["options"]["inbound_ports_exclude"] is excluded
    assert excluded == ["15090"]
    assert values == [None, ["15090"]]


def test_whole_plan():
    result = plan({"proxy_port": None, "inbound_ports_exclude": None, "enable_inbound_ipv6": True},
                  cluster_env=ISTIOCTL_CLUSTER_ENV, routes_env=ROLE_ROUTES_ENV, port=2222)
    assert result == {
        "options": {"inbound_ports_include": "*", "inbound_ports_exclude": "15090,15021,15020",
                    "redirect_dns": "true", "outbound_ip_ranges_include": "*", "enable_inbound_ipv6": True},
        "rules_args": {"inbound_ports_include": "*", "inbound_ports_exclude": ["15090", "15021", "15020", "2222"],
                       "redirect_dns": "true", "outbound_ip_ranges_include": "*", "enable_inbound_ipv6": True},
        "guard": {"port": 2222, "refuse": False, "needed": True, "excluded": ["15090", "15021", "15020", "2222"]},
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
    assert result["guard"] == guard
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


@pytest.mark.parametrize("kwargs, prefix", [
    pytest.param({"routes_env_content": "not base64!"},
                 "capture_plan: routes_env_content is not base64 (", id="routes-env-bad-characters"),
    pytest.param({"routes_env_content": "abc"},
                 "capture_plan: routes_env_content is not base64 (", id="routes-env-bad-padding"),
    pytest.param({"routes_env_content": "\u00e9t\u00e9"},
                 "capture_plan: routes_env_content is not base64 (", id="routes-env-non-ascii"),
    pytest.param({"routes_env_content": "TUVTSENBUFRVUkVfVFBST1hZX1JPVVRFUz10cnVlCg==\n"},
                 "capture_plan: routes_env_content is not base64 (", id="routes-env-trailing-newline"),
    pytest.param({"routes_env_content": "TUVTSENBUFRVUkVfVFBST1hZX1JPVVRFUz10cnVlCg==", "cluster_env_content": "*"},
                 "capture_plan: cluster_env_content is not base64 (", id="cluster-env-bad-characters"),
])
def test_not_base64(kwargs, prefix):
    with pytest.raises(AnsibleFilterError) as excinfo:
        capture_plan([], [], **kwargs)
    assert str(excinfo.value).startswith(prefix)
    assert str(excinfo.value).endswith(")")


@pytest.mark.parametrize("kwargs, message", [
    pytest.param({"cluster_env_content": b64("ISTIO_INBOUND_PORTS='*'\ngarbage\n")},
                 "cluster_env: line 2 is not KEY=VALUE: 'garbage'", id="cluster-env-not-key-value"),
    pytest.param({"routes_env_content": b64("MESHCAPTURE_TPROXY_MARK='1400\n")},
                 "cluster_env: line 1: unterminated ' quote", id="routes-env-unterminated-quote"),
])
def test_env_parse_errors(kwargs, message):
    with pytest.raises(AnsibleFilterError) as excinfo:
        capture_plan([], [], **kwargs)
    assert str(excinfo.value) == message


# ---------------------------------------------------------------------------
# Plugin entry point
# ---------------------------------------------------------------------------

def test_filter_module_exposes_capture_plan():
    assert FilterModule().filters() == {"capture_plan": capture_plan}
