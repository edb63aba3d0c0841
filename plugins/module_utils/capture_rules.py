# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""A small iptables rule model and its renderers.

A Rule is (family, table, chain, position, params): position None means
append, an integer means insert at that position.  The verb is never part
of params; renderers decide it (commands, restore payload, delete form).
Pure Python, no Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from collections import namedtuple

IPV4 = "ipv4"
IPV6 = "ipv6"
FAMILIES = (IPV4, IPV6)
COMMAND = {IPV4: "iptables", IPV6: "ip6tables"}

BUILTIN_CHAINS = frozenset(("INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"))
# The tables a capture ruleset may use, in the order payloads list them.
TABLES = ("raw", "mangle", "nat")


class Rule(namedtuple("Rule", "family table chain position params")):
    """One iptables rule; params is a tuple of argv words."""

    __slots__ = ()

    @property
    def is_insert(self):
        return self.position is not None


class Ruleset(object):
    """An ordered list of rules per family, as the builder made them."""

    def __init__(self, rules_v4=None, rules_v6=None):
        self.rules = {IPV4: list(rules_v4 or []), IPV6: list(rules_v6 or [])}

    def __getitem__(self, family):
        return self.rules[family]

    def __len__(self):
        return len(self.rules[IPV4]) + len(self.rules[IPV6])

    def new_chains(self, family):
        """[(table, chain)] of non-built-in chains, in order of first use."""
        seen = []
        for rule in self.rules[family]:
            key = (rule.table, rule.chain)
            if rule.chain not in BUILTIN_CHAINS and key not in seen:
                seen.append(key)
        return seen


class Builder(object):
    """istio-iptables' IptablesBuilder: collects v4/v6 rules.

    IPv6 rules are dropped unless ipv6 is enabled; with trace logging an
    NFLOG rule is added next to every rule that carries a log command
    (istio's iptableslog identifiers).
    """

    def __init__(self, ipv6=False, trace_logging=False, quote_nflog_prefix=True):
        self.ipv6 = ipv6
        self.trace_logging = trace_logging
        # istio-iptables up to 1.23 wrote the prefix in double quotes.
        self.quote_nflog_prefix = quote_nflog_prefix
        self._rules = {IPV4: [], IPV6: []}

    def _log_params(self, log, params):
        if not (self.trace_logging and log and "-j" in params):
            return None
        match = params[:params.index("-j")]
        prefix = '"%s"' % log if self.quote_nflog_prefix else log
        # 1337 is istio's NFLOG group; 20 bytes hold the IPv4 header.
        return match + ("-j", "NFLOG", "--nflog-prefix", prefix,
                        "--nflog-group", "1337", "--nflog-size", "20")

    def _add(self, family, log, chain, table, position, params):
        if family == IPV6 and not self.ipv6:
            return
        params = tuple(params)
        logged = self._log_params(log, params)
        rules = self._rules[family]
        if position is None:
            # The log rule goes first so it sees the packet before the target.
            if logged:
                rules.append(Rule(family, table, chain, None, logged))
            rules.append(Rule(family, table, chain, None, params))
        else:
            # Inserted after the real rule at the same position: it ends up before it.
            rules.append(Rule(family, table, chain, position, params))
            if logged:
                rules.append(Rule(family, table, chain, position, logged))

    def append_v4(self, chain, table, *params, **kw):
        self._add(IPV4, kw.get("log"), chain, table, None, params)

    def append_v6(self, chain, table, *params, **kw):
        self._add(IPV6, kw.get("log"), chain, table, None, params)

    def append(self, chain, table, *params, **kw):
        self.append_v4(chain, table, *params, **kw)
        self.append_v6(chain, table, *params, **kw)

    def insert_v4(self, chain, table, position, *params, **kw):
        self._add(IPV4, kw.get("log"), chain, table, position, params)

    def insert_v6(self, chain, table, position, *params, **kw):
        self._add(IPV6, kw.get("log"), chain, table, position, params)

    def insert(self, chain, table, position, *params, **kw):
        self.insert_v4(chain, table, position, *params, **kw)
        self.insert_v6(chain, table, position, *params, **kw)

    def append_versioned(self, ipv4_value, ipv6_value, chain, table, *params, **kw):
        """Append a dual-stack rule whose VERSIONED placeholder differs per family."""
        self.append_v4(chain, table, *_substitute(params, ipv4_value), **kw)
        self.append_v6(chain, table, *_substitute(params, ipv6_value), **kw)

    def build(self):
        return Ruleset(self._rules[IPV4], self._rules[IPV6])


VERSIONED = object()


def _substitute(params, value):
    return tuple(value if p is VERSIONED else p for p in params)


def _verb(rule):
    if rule.is_insert:
        return ("-I", rule.chain, str(rule.position))
    return ("-A", rule.chain)


def restore_line(rule):
    """The rule as an iptables-restore line: '-A CHAIN ...' or '-I CHAIN N ...'."""
    return " ".join(_verb(rule) + rule.params)


def render_commands(ruleset, families=FAMILIES):
    """The iptables/ip6tables commands, exactly like istio-iptables prints them."""
    out = []
    for family in families:
        cmd = COMMAND[family]
        for table, chain in ruleset.new_chains(family):
            out.append("%s -t %s -N %s" % (cmd, table, chain))
        for rule in ruleset[family]:
            out.append(" ".join((cmd, "-t", rule.table) + _verb(rule) + rule.params))
    return out


def render_restore(ruleset, family, tables=TABLES):
    """An iptables-restore payload (for --noflush) that creates the ruleset.

    New chains are declared (':CHAIN - [0:0]'), which also empties a chain
    of that name; built-in chains keep their other rules.  Tables come in
    a fixed order; tables without rules are left out.
    """
    chains = ruleset.new_chains(family)
    lines = []
    for table in tables:
        rules = [r for r in ruleset[family] if r.table == table]
        if not rules:
            continue
        lines.append("*%s" % table)
        lines.extend(":%s - [0:0]" % chain for t, chain in chains if t == table)
        lines.extend(restore_line(r) for r in rules)
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


# Targets that are not chains a payload has to declare (istio's BuiltInChainsMap).
_NOT_DECLARED = BUILTIN_CHAINS | frozenset(("ACCEPT", "RETURN", "DROP"))


def render_restore_declared(ruleset, family):
    """The iptables-restore payload as istio-iptables 1.24 and later write it.

    For each table with rules, in alphabetical order: '* <table>', '-N <chain>'
    for each non-built-in chain in order of first use, then for chains that
    are only jump targets (a rule ending in '-j <chain>'), then the rules in
    the order added, then 'COMMIT'.  Meant for --noflush on a host without
    the chains, as istio-iptables applies it.
    """
    rules = ruleset[family]
    declared = {}
    seen = set()
    for rule in rules:
        if (rule.table, rule.chain) not in seen:
            seen.add((rule.table, rule.chain))
            if rule.chain not in _NOT_DECLARED:
                declared.setdefault(rule.table, []).append(rule.chain)
    for rule in rules:
        if len(rule.params) >= 2 and rule.params[-2] == "-j":
            target = rule.params[-1]
            if (rule.table, target) not in seen:
                seen.add((rule.table, target))
                if target not in _NOT_DECLARED:
                    declared.setdefault(rule.table, []).append(target)
    lines = []
    for table in sorted(set(rule.table for rule in rules)):
        lines.append("* %s" % table)
        lines.extend("-N %s" % chain for chain in declared.get(table, []))
        lines.extend(restore_line(rule) for rule in rules if rule.table == table)
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


def as_declaring_payload(payload):
    """A payload of either form with its chains declared as ':CHAIN - [0:0]'
    and its tables as '*table': with --noflush this also empties chains that
    exist already, where '-N CHAIN' (istio-iptables 1.24+) fails."""
    lines = []
    for line in payload.splitlines():
        if line.startswith("* "):
            line = "*" + line[2:]
        elif line.startswith("-N "):
            line = ":%s - [0:0]" % line[3:]
        lines.append(line)
    return "\n".join(lines) + "\n" if lines else ""


def render_delete_commands(ruleset, families=FAMILIES):
    """Commands that undo the ruleset: delete its built-in chain rules
    (latest first), then flush and delete its own chains."""
    out = []
    for family in families:
        cmd = COMMAND[family]
        for rule in reversed(ruleset[family]):
            if rule.chain in BUILTIN_CHAINS:
                out.append(" ".join((cmd, "-t", rule.table, "-D", rule.chain) + rule.params))
        chains = ruleset.new_chains(family)
        out.extend("%s -t %s -F %s" % (cmd, table, chain) for table, chain in chains)
        out.extend("%s -t %s -X %s" % (cmd, table, chain) for table, chain in chains)
    return out
