"""The routes module's argument errors and its missing-pyroute2 path.

Nothing here opens a netlink socket: IPRoute is replaced by a stand-in
that fails the test if the module gets as far as using it.
"""

import pytest
from ansible.module_utils.basic import missing_required_lib

from ansible_collections.meshcapture.sidecar.plugins.modules import routes, rules


@pytest.fixture(autouse=True)
def no_netlink(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the module opened a netlink socket")

    monkeypatch.setattr(routes, "IPRoute", refuse)


SHARED_OPTION_ERRORS = [
    ({"inbound_tproxy_route_table": 254}, "inbound_tproxy_route_table: is reserved by the kernel (got 254)"),
    ({"inbound_tproxy_route_table": 253}, "inbound_tproxy_route_table: is reserved by the kernel (got 253)"),
    ({"inbound_tproxy_route_table": 255}, "inbound_tproxy_route_table: is reserved by the kernel (got 255)"),
    ({"inbound_tproxy_route_table": 0}, "inbound_tproxy_route_table: must be between 1 and 4294967295 (got 0)"),
    ({"inbound_tproxy_route_table": 4294967296},
     "inbound_tproxy_route_table: must be between 1 and 4294967295 (got 4294967296)"),
    ({"inbound_tproxy_mark": 0}, "inbound_tproxy_mark: must be between 1 and 4294967295 (got 0)"),
    ({"inbound_tproxy_mark": -1}, "inbound_tproxy_mark: must be between 1 and 4294967295 (got -1)"),
    ({"inbound_tproxy_mark": 4294967296}, "inbound_tproxy_mark: must be between 1 and 4294967295 (got 4294967296)"),
]


@pytest.mark.parametrize("args, message", SHARED_OPTION_ERRORS)
def test_bad_shared_option_fails_like_rules(run_module, args, message):
    result, failed = run_module(routes.main, args)
    assert failed
    assert result["msg"] == message
    rules_result, rules_failed = run_module(rules.main, dict(args, state="rendered"))
    assert (rules_failed, rules_result["msg"]) == (True, message)


@pytest.mark.parametrize("args, message", [
    ({"state": "rendered"}, "value of state must be one of: present, absent, got: rendered"),
    ({"ipv6": "maybe"}, "argument 'ipv6' is of type str and we were unable to convert to bool: "
                        "The value 'maybe' is not a valid boolean."),
])
def test_bad_own_option_is_refused_by_ansible(run_module, args, message):
    """Types and choices are Ansible's to check (its messages, list of booleans elided)."""
    result, failed = run_module(routes.main, args)
    assert failed
    assert result["msg"].startswith(message)


def test_missing_pyroute2_is_reported_the_standard_way(run_module, monkeypatch):
    monkeypatch.setattr(routes, "HAS_PYROUTE2", False)
    monkeypatch.setattr(routes, "PYROUTE2_IMPORT_ERROR", "Traceback: No module named 'pyroute2'")
    result, failed = run_module(routes.main, {})
    assert failed
    assert result["msg"] == missing_required_lib("pyroute2")
    assert result["exception"] == "Traceback: No module named 'pyroute2'"
