# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""TPROXY policy routing and the IPv6 inbound address (istio ConfigureRoutes).

The objects this manages, per address family, are exactly:

- the rule ``fwmark <mark> lookup <table>`` (no other selector),
- the route ``local default dev lo table <table>``,
- and the address ``::6/128`` on ``lo``.

``plan()`` reads the current state once and computes the netlink calls
that converge it; ``apply()`` makes them.  Check mode is ``plan()`` alone.
Objects are shown in a text form modelled on ``ip rule`` / ``ip route`` /
``ip addr`` (``ip -4 rule: fwmark 0x539 lookup 133``).

Pure Python, no Ansible imports, and no pyroute2 import either: the caller
passes the netlink handle (a pyroute2 ``IPRoute``, or a fake in tests).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import socket
from collections import namedtuple

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import (
    MAX_U32,
    CaptureConfig,
    CaptureError,
    ConfigError,
    check_bool,
)

STATES = ("present", "absent")
FAMILY_FLAG = {socket.AF_INET: "-4", socket.AF_INET6: "-6"}
INBOUND_IPV6_ADDRESS = "::6"
# The order present adds kinds of object in; they are shown, and absent
# deletes them, in the reverse order.
ADD_ORDER = ("addr", "route", "rule")

# Kernel constants (linux/fib_rules.h, linux/rtnetlink.h, linux/if.h).
FR_ACT_TO_TBL = 1
FIB_RULE_INVERT = 0x2
RTN_LOCAL = 2
IFF_UP = 0x1
# The metric the kernel gives a route added without one (IP6_RT_PRIO_USER).
KERNEL_DEFAULT_METRIC = {socket.AF_INET: 0, socket.AF_INET6: 1024}

# Attributes a rule of ours may carry; any other one (iif, oif, uidrange,
# ipproto, port ranges, goto, ...) makes it someone else's rule.
_RULE_ATTRS = frozenset(("FRA_TABLE", "FRA_PRIORITY", "FRA_FWMARK", "FRA_FWMASK",
                         "FRA_PROTOCOL", "FRA_SUPPRESS_PREFIXLEN"))
# Likewise for routes (no gateway, multipath, preferred source, metrics, ...).
_ROUTE_ATTRS = frozenset(("RTA_TABLE", "RTA_OIF", "RTA_PRIORITY", "RTA_CACHEINFO", "RTA_PREF"))


class RoutesError(CaptureError):
    """The host state does not allow the wanted change, or netlink refused it."""


class RoutesConfig(object):
    """The validated options of the routes module.

    The options it shares with the ``rules`` module are validated by
    CaptureConfig, so both modules accept and reject the same values with
    the same messages.
    """

    def __init__(self, state, mark, table, enable_inbound_ipv6, ipv4, ipv6, manage_tproxy_routes):
        self.state = state
        self.mark = mark
        self.table = table
        self.enable_inbound_ipv6 = enable_inbound_ipv6
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.manage_tproxy_routes = manage_tproxy_routes

    @classmethod
    def from_params(cls, params):
        """Validate a dict of module options (missing or None -> default)."""
        shared = CaptureConfig.from_params(dict(
            (name, params.get(name))
            for name in ("inbound_tproxy_mark", "inbound_tproxy_route_table", "enable_inbound_ipv6")))
        state = params.get("state") or "present"
        if state not in STATES:
            raise ConfigError("state", state, "expected one of %s" % ", ".join(STATES))

        def flag(name, default=True):
            value = params.get(name)
            return default if value is None else check_bool(name, value)

        return cls(state, int(shared.inbound_tproxy_mark), shared.inbound_tproxy_route_table,
                   shared.enable_inbound_ipv6, flag("ipv4"), flag("ipv6"), flag("manage_tproxy_routes"))


Action = namedtuple("Action", "verb line method kwargs")
Action.__doc__ = """One netlink call: ``getattr(ipr, method)(verb, **kwargs)``; line is its text form."""

# kind is also the name of the IPRoute method that adds and deletes it.
_Managed = namedtuple("_Managed", "kind line kwargs")


class Plan(namedtuple("Plan", "before_lines after_lines actions warnings")):
    """What plan() found and would do.

    before_lines / after_lines: the managed objects present before and
    after (in text form, rules first, then routes, then the address);
    actions: the netlink calls, in the order apply() makes them;
    warnings: messages for the user (e.g. IPv6 skipped).
    """

    __slots__ = ()

    @property
    def changed(self):
        return bool(self.actions)

    @property
    def added(self):
        return [a.line for a in self.actions if a.verb == "add"]

    @property
    def removed(self):
        return [a.line for a in self.actions if a.verb == "del"]

    def state_after(self):
        """after_lines by kind: ``{"rules": [...], "routes": [...], "addresses": [...]}``."""
        kinds = {"rule:": "rules", "route:": "routes", "addr:": "addresses"}
        out = dict((name, []) for name in kinds.values())
        for line in self.after_lines:
            out[kinds[line.split()[2]]].append(line)
        return out


def rule_line(family, mark, table):
    return "ip %s rule: fwmark %#x lookup %d" % (FAMILY_FLAG[family], mark, table)


def route_line(family, table):
    return "ip %s route: local default dev lo table %d" % (FAMILY_FLAG[family], table)


ADDRESS_LINE = "ip -6 addr: %s/128 dev lo" % INBOUND_IPV6_ADDRESS


def _table(msg, attr):
    """A rule's or route's table: the attribute holds ids above 255."""
    table = msg.get_attr(attr)
    return msg["table"] if table is None else table


def _attr_names(msg):
    return set(name for name, _value in msg["attrs"])


def _is_our_rule(msg, mark, table):
    return (msg["action"] == FR_ACT_TO_TBL
            and not msg["flags"] & FIB_RULE_INVERT
            and msg["src_len"] == msg["dst_len"] == msg["tos"] == 0
            and _attr_names(msg) <= _RULE_ATTRS
            and msg.get_attr("FRA_SUPPRESS_PREFIXLEN") in (None, MAX_U32)
            and msg.get_attr("FRA_FWMARK") == mark
            and msg.get_attr("FRA_FWMASK") in (None, MAX_U32)
            and _table(msg, "FRA_TABLE") == table)


def _is_default_route(msg):
    return msg["dst_len"] == msg["src_len"] == msg["tos"] == 0


def _is_our_route(msg, lo_index):
    return (_is_default_route(msg)
            and msg["type"] == RTN_LOCAL
            and msg.get_attr("RTA_OIF") == lo_index
            and _attr_names(msg) <= _ROUTE_ATTRS)


def _loopback(ipr):
    """(lo's index, whether it is up, why IPv6 cannot be set up on it or None)."""
    lo = ipr.link("get", ifname="lo")[0]
    af_spec = lo.get_attr("IFLA_AF_SPEC")
    inet6 = af_spec.get_attr("AF_INET6") if af_spec is not None else None
    conf = inet6.get_attr("IFLA_INET6_CONF") if inet6 is not None else None
    reason = None
    if inet6 is None:
        reason = "the kernel has no IPv6 support"
    elif conf is not None and conf.get("disable_ipv6"):
        # The kernel refuses IPv6 routes and addresses on such a device
        # (EACCES), and flushed those it had; rules are still accepted.
        reason = "IPv6 is disabled on lo (net.ipv6.conf.lo.disable_ipv6 = 1)"
    return lo["index"], bool(lo["flags"] & IFF_UP), reason


def _managed(cfg, families, lo_index):
    """The objects cfg manages, in display order, with their add arguments."""
    objects = []
    if cfg.manage_tproxy_routes:
        for family in families:
            # priority=None: no FRA_PRIORITY, so the kernel picks the
            # preference as for `ip rule add` (istio does the same).
            objects.append(_Managed("rule", rule_line(family, cfg.mark, cfg.table),
                                    dict(family=family, fwmark=cfg.mark, table=cfg.table, priority=None)))
        for family in families:
            objects.append(_Managed("route", route_line(family, cfg.table),
                                    dict(family=family, dst_len=0, type="local", scope="host",
                                         oif=lo_index, table=cfg.table)))
    if cfg.enable_inbound_ipv6 and socket.AF_INET6 in families:
        objects.append(_Managed("addr", ADDRESS_LINE, _address(lo_index)))
    return objects


def _address(lo_index):
    """The add and delete arguments of the inbound IPv6 address."""
    return dict(index=lo_index, family=socket.AF_INET6, address=INBOUND_IPV6_ADDRESS, prefixlen=128)


def _read(ipr, cfg, families, lo_index):
    """One read of the host: ({line: [delete kwargs per copy found]}, conflicts).

    conflicts maps the line of a managed route to a description of another
    default route in the table that would keep the kernel from adding it.
    """
    found, conflicts = {}, {}
    if cfg.manage_tproxy_routes:
        for msg in ipr.get_rules():
            family = msg["family"]
            if family in families and _is_our_rule(msg, cfg.mark, cfg.table):
                found.setdefault(rule_line(family, cfg.mark, cfg.table), []).append(dict(
                    family=family, fwmark=cfg.mark, table=cfg.table,
                    priority=msg.get_attr("FRA_PRIORITY") or 0))
        for msg in ipr.get_routes(table=cfg.table):
            family = msg["family"]
            if family not in families or not _is_default_route(msg):
                continue
            line = route_line(family, cfg.table)
            metric = msg.get_attr("RTA_PRIORITY") or 0
            if _is_our_route(msg, lo_index):
                found.setdefault(line, []).append(dict(
                    family=family, dst_len=0, type="local", scope="host", oif=lo_index, table=cfg.table,
                    priority=metric or None))
            elif metric == KERNEL_DEFAULT_METRIC[family]:
                conflicts[line] = ("table %d already has another %s default route with metric %d; remove it "
                                   "or choose another inbound_tproxy_route_table"
                                   % (cfg.table, "IPv4" if family == socket.AF_INET else "IPv6", metric))
    if cfg.enable_inbound_ipv6 and socket.AF_INET6 in families:
        for msg in ipr.get_addr(index=lo_index):
            if (msg["family"] == socket.AF_INET6 and msg["prefixlen"] == 128
                    and msg.get_attr("IFA_ADDRESS") == INBOUND_IPV6_ADDRESS):
                found.setdefault(ADDRESS_LINE, []).append(_address(lo_index))
    return found, conflicts


def _copies(managed, found, at_least):
    """The lines of the managed objects, once per copy found (at least at_least times)."""
    return [m.line for m in managed for _copy in range(max(at_least, len(found.get(m.line, ()))))]


def plan(cfg, ipr):
    """Read the host through ipr once and compute the Plan for cfg (a RoutesConfig).

    state=present adds what is missing (extra copies of an object, e.g. the
    same rule at two preferences, are left alone); state=absent deletes
    every copy of every managed object and nothing else.
    """
    warnings = []
    lo_index, lo_up, no_ipv6 = _loopback(ipr)
    families = [f for f, on in ((socket.AF_INET, cfg.ipv4), (socket.AF_INET6, cfg.ipv6)) if on]
    # Without IPv6 only present has something to skip: absent still removes
    # IPv6 rules of ours (disable_ipv6 keeps rules, flushes routes/addresses).
    if no_ipv6 and cfg.state == "present" and socket.AF_INET6 in families:
        families.remove(socket.AF_INET6)
        skipped = _managed(cfg, [socket.AF_INET6], lo_index)
        if skipped:
            warnings.append("%s; skipped: %s" % (no_ipv6, ", ".join(m.line for m in skipped)))

    managed = _managed(cfg, families, lo_index)
    found, conflicts = _read(ipr, cfg, families, lo_index)
    before = _copies(managed, found, 0)

    if cfg.state == "absent":
        # Rules first: no marked packet is sent to a table being emptied.
        actions = [Action("del", m.line, m.kind, kwargs) for m in managed for kwargs in found.get(m.line, ())]
        return Plan(before, [], actions, warnings)

    missing = [m for m in managed if m.line not in found]
    for m in missing:
        if m.line in conflicts:
            raise RoutesError("cannot add '%s': %s" % (m.line, conflicts[m.line]))
    if missing and not lo_up:
        raise RoutesError("the loopback interface lo is down; bring it up first (ip link set lo up)")
    # The address and the local routes exist before the rules that send
    # marked packets to their table.
    missing.sort(key=lambda m: ADD_ORDER.index(m.kind))
    actions = [Action("add", m.line, m.kind, m.kwargs) for m in missing]
    return Plan(before, _copies(managed, found, 1), actions, warnings)


def apply(plan, ipr):
    """Make the plan's netlink calls through ipr, in order."""
    for action in plan.actions:
        try:
            getattr(ipr, action.method)(action.verb, **action.kwargs)
        except Exception as exc:  # pyroute2's NetlinkError, which this file does not import
            raise RoutesError("cannot %s '%s': %s" % ("add" if action.verb == "add" else "delete", action.line, exc))
