"""meshcapture.sidecar.routes against the real kernel, in throwaway namespaces.

Every module run happens inside a namespace the test created (see the
``ns`` fixture); the machine's own namespace is only read, to compare
namespace identities.
"""

import os
import re
import time

import pytest

from module_runner import run_module, warning_messages
from netns import MarkedMonitor

pytestmark = pytest.mark.netns

MARK = 1337

# State that is not the module's, set up before it runs and expected
# unchanged after present and absent: rules with another mark, or with our
# mark and table plus another selector; routes in other tables and other
# routes in ours, including a local default route in another table.
UNRELATED = [
    ["ip", "-4", "rule", "add", "fwmark", "7", "lookup", "77"],
    ["ip", "-6", "rule", "add", "fwmark", "7", "lookup", "77"],
    ["ip", "-4", "rule", "add", "fwmark", str(MARK), "iif", "lo", "lookup", "{table}"],
    ["ip", "-4", "route", "add", "203.0.113.0/24", "dev", "lo", "table", "134"],
    ["ip", "-4", "route", "add", "local", "default", "dev", "lo", "table", "134"],
    ["ip", "-4", "route", "add", "198.51.100.0/24", "dev", "lo", "table", "{table}"],
    ["ip", "-6", "route", "add", "2001:db8:1::/48", "dev", "lo", "table", "{table}"],
    ["ip", "-6", "addr", "add", "2001:db8::7/128", "dev", "lo", "nodad"],
]


def expected(table):
    """(rules, routes, addresses) of state=present with enable_inbound_ipv6, in text form."""
    rules = ["ip %s rule: fwmark 0x539 lookup %d" % (family, table) for family in ("-4", "-6")]
    routes = ["ip %s route: local default dev lo table %d" % (family, table) for family in ("-4", "-6")]
    return rules, routes, ["ip -6 addr: ::6/128 dev lo"]


@pytest.fixture
def ns(netns_factory):
    """A fresh namespace (lo up), proven not to be the one this test runs in."""
    namespace = netns_factory("routes")
    assert namespace.netns_id() != os.readlink("/proc/self/ns/net")
    return namespace


def snapshot(ns):
    """Every rule, route (all tables) and address of the namespace, as ip prints them."""
    settle(ns)
    return {what: ns.run(["ip", *what.split()]).stdout for what in (
        "-4 rule show", "-6 rule show", "-4 route show table all", "-6 route show table all", "addr show")}


def settle(ns, timeout=5.0):
    """Wait until no address is tentative (DAD on lo finishes asynchronously)."""
    deadline = time.monotonic() + timeout
    while ns.run(["ip", "-6", "addr", "show", "tentative"]).stdout.strip():
        assert time.monotonic() < deadline, "IPv6 addresses still tentative"
        time.sleep(0.05)


def netlink_monitor(ns):
    """``ip monitor`` of rules, routes and addresses, marked by adding and
    deleting a policy rule (see netns.MarkedMonitor)."""
    def marker(serial):
        rule = ["pref", str(200 + serial), "fwmark", str(200 + serial), "lookup", str(200 + serial)]
        end = "lookup %d" % (200 + serial)
        return ([["ip", "rule", "add", *rule], ["ip", "rule", "del", *rule]],
                lambda line: line.startswith("Deleted") and line.endswith(end))

    return MarkedMonitor(ns, ["ip", "monitor", "rule", "route", "address"], marker,
                         keep=lambda line: not re.search(r"lookup 2\d\d$", line))


def add_unrelated(ns, table):
    for argv in UNRELATED:
        ns.run([arg.format(table=table) for arg in argv])


@pytest.mark.parametrize("table", [133, 1000])
def test_present_idempotent_absent(ns, table):
    add_unrelated(ns, table)
    untouched = snapshot(ns)
    args = dict(inbound_tproxy_route_table=table, enable_inbound_ipv6=True)
    rules, routes, addresses = expected(table)

    result = run_module("routes", args, netns=ns, check=True, diff=True)
    assert result["changed"] is True
    assert sorted(result["added"]) == sorted(rules + routes + addresses)
    assert result["diff"] == {"before": "", "after": "".join(line + "\n" for line in rules + routes + addresses)}
    assert snapshot(ns) == untouched, "check mode changed the namespace"

    result = run_module("routes", args, netns=ns, diff=True)
    assert not result.get("failed"), result.get("msg")
    assert result["changed"] is True
    # The local routes and the address are added before the rules.
    assert result["added"] == addresses + routes + rules
    assert (result["rules"], result["routes"], result["addresses"]) == (rules, routes, addresses)
    assert result["removed"] == [] and "warnings" not in result
    applied = snapshot(ns)
    for family in ("-4", "-6"):
        assert re.search(r"^\d+:\s+from all fwmark 0x539 lookup %d\s*$" % table, applied[family + " rule show"], re.M)
        assert "local default dev lo table %d proto static " % table in applied[family + " route show table all"]
    assert "inet6 ::6/128 scope global" in applied["addr show"]

    monitor = netlink_monitor(ns)
    try:
        result = run_module("routes", args, netns=ns, diff=True)
        assert monitor.mark() == [], "the second run wrote over netlink"
    finally:
        monitor.close()
    assert result["changed"] is False
    assert result["added"] == result["removed"] == []
    assert result["diff"]["before"] == result["diff"]["after"]
    assert snapshot(ns) == applied

    absent = dict(args, state="absent")
    assert run_module("routes", absent, netns=ns, check=True)["changed"] is True
    assert snapshot(ns) == applied, "check mode changed the namespace"

    result = run_module("routes", absent, netns=ns, diff=True)
    assert result["changed"] is True
    assert result["removed"] == rules + routes + addresses
    assert result["diff"]["after"] == ""
    assert (result["rules"], result["routes"], result["addresses"]) == ([], [], [])
    assert snapshot(ns) == untouched, "absent left something behind or removed something else"

    assert run_module("routes", absent, netns=ns)["changed"] is False


def test_adopts_istio_state_and_removes_every_copy(ns):
    """Rules as istio or `ip rule add` make them, at any preference, are ours."""
    untouched = snapshot(ns)
    for pref in ("100", "32000"):
        ns.run(["ip", "-4", "rule", "add", "pref", pref, "fwmark", str(MARK), "lookup", "133"])
    ns.run(["ip", "-4", "route", "add", "local", "default", "dev", "lo", "table", "133"])

    result = run_module("routes", dict(ipv6=False), netns=ns)
    assert result["changed"] is False
    assert result["rules"] == ["ip -4 rule: fwmark 0x539 lookup 133"] * 2

    result = run_module("routes", dict(ipv6=False, state="absent"), netns=ns)
    assert result["removed"] == ["ip -4 rule: fwmark 0x539 lookup 133"] * 2 + [
        "ip -4 route: local default dev lo table 133"]
    assert snapshot(ns) == untouched


def test_ipv6_disabled_is_skipped_with_a_warning(ns):
    # disable_ipv6 does not make netlink fail across the board: IPv6 rules can
    # still be added, but routes and addresses on lo are refused (EACCES).
    ns.sysctl("net.ipv6.conf.all.disable_ipv6", 1)
    args = dict(enable_inbound_ipv6=True)

    result = run_module("routes", args, netns=ns)
    assert not result.get("failed"), result.get("msg")
    assert result["changed"] is True
    assert warning_messages(result) == [
        "IPv6 is disabled on lo (net.ipv6.conf.lo.disable_ipv6 = 1); skipped: ip -6 rule: fwmark 0x539 lookup 133, "
        "ip -6 route: local default dev lo table 133, ip -6 addr: ::6/128 dev lo"]
    assert result["rules"] == ["ip -4 rule: fwmark 0x539 lookup 133"]
    assert result["routes"] == ["ip -4 route: local default dev lo table 133"]
    assert result["addresses"] == []
    assert "fwmark 0x539 lookup 133" in ns.run(["ip", "-4", "rule"]).stdout
    assert "fwmark" not in ns.run(["ip", "-6", "rule"]).stdout

    assert run_module("routes", args, netns=ns)["changed"] is False
    result = run_module("routes", dict(args, state="absent"), netns=ns)
    assert result["removed"] == ["ip -4 rule: fwmark 0x539 lookup 133", "ip -4 route: local default dev lo table 133"]
    assert "warnings" not in result


@pytest.mark.parametrize("setup, message", [
    (["ip", "-4", "route", "add", "unreachable", "default", "table", "133"],
     "cannot add 'ip -4 route: local default dev lo table 133': table 133 already has another IPv4 default "
     "route with metric 0; remove it or choose another inbound_tproxy_route_table"),
    (["ip", "link", "set", "lo", "down"],
     "the loopback interface lo is down; bring it up first (ip link set lo up)"),
])
def test_refuses_without_changing_anything(ns, setup, message):
    ns.run(setup)
    before = snapshot(ns)
    for check in (True, False):
        result = run_module("routes", {}, netns=ns, check=check)
        assert result.get("failed") is True
        assert result["msg"] == message
    assert snapshot(ns) == before
