"""meshcapture.sidecar.rules state=present/absent against the real kernel.

Every module run happens inside a namespace the test created, with its
state_dir under the test's tmp_path.  iptables-save output is compared with
comment lines removed (see rules_helpers.save).
"""

import json
import os
import re
import shutil
import subprocess
from collections import Counter

import pytest

import netns
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_apply import Engine
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_save import parse_save
from rules_helpers import (CONFIGS, FAMILIES, add_foreign, assert_marked, nft_monitor, apply, assert_same, ok, restore,
                           run_commands, save, saves, state_dir, without_marker)

pytestmark = pytest.mark.netns

# The five configurations of the check/apply/idempotence battery.
BATTERY = ["vm-redirect", "tproxy", "dual-dns", "trace", "kubevirt"]


def entries(text):
    """Counter of (table, line) for the rule lines and ISTIO_* chain lines of
    an iptables-save dump (or of a diff's before/after, which has that form).
    The ownership marker chain is not part of it: see assert_marked."""
    out, table = Counter(), None
    for line in without_marker(text).splitlines():
        line = re.sub(r"^\[\d+:\d+\] ", "", line)
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":ISTIO_"):
            out[(table, line.split()[0])] += 1
        elif line.startswith("-A "):
            out[(table, line)] += 1
    return out


def as_added(family, counter):
    """The module's added/removed form ('ipv4 -t nat -A CHAIN spec') of entries()."""
    return Counter({"%s -t %s %s" % (family, table, line): n
                    for (table, line), n in counter.items() if line.startswith("-A ")})


def diff_by_family(result):
    diffs = result["diff"]
    assert isinstance(diffs, list)
    return {d["before_header"].split()[0]: d for d in diffs}


def state_files(tmp_path):
    directory = state_dir(tmp_path)
    return sorted(os.path.relpath(os.path.join(root, f), directory)
                  for root, dirs, files in os.walk(directory) for f in files)


def records(tmp_path):
    """{name: text} of the per-namespace state records."""
    directory = state_dir(tmp_path)
    out = {}
    for name in state_files(tmp_path):
        if name.startswith("netns-"):
            with open(os.path.join(directory, name)) as f:
                out[name] = f.read()
    return out


def send_udp(ns, port=9):
    """One datagram to 127.0.0.1:port, so counters of rules that see it move."""
    ns.python("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
              "s.sendto(b'x', ('127.0.0.1', %d))" % port)


# ------------------------------------------------------------------ battery
@pytest.mark.parametrize("name", BATTERY)
def test_check_apply_idempotent_check(netns_factory, tmp_path, name):
    ns = netns_factory("apply")
    add_foreign(ns)
    opts = CONFIGS[name]
    untouched = saves(ns, counters=True)

    # 1. check mode: changed, nothing written (tables nor state_dir), diff shows the additions.
    check = ok(apply(ns, tmp_path, check=True, diff=True, **opts))
    assert check["changed"] is True
    assert_same(saves(ns, counters=True), untouched, "check mode changed the tables")
    assert state_files(tmp_path) == [], "check mode wrote into state_dir"
    assert check["removed"] == []
    assert check["summary"] == {"added": len(check["added"]), "removed": 0}
    diffs = diff_by_family(check)
    assert sorted(diffs) == sorted(FAMILIES)
    for family in FAMILIES:
        assert diffs[family]["before"] == "", "a fresh namespace has no capture rules"
        assert diffs[family]["before_header"] == diffs[family]["after_header"] == "%s (iptables-nft)" % family

    # 2. apply: one transaction per table of the payloads, not one per rule.
    monitor = nft_monitor(ns)
    try:
        applied = ok(apply(ns, tmp_path, **opts))
        events = monitor.mark()
    finally:
        monitor.close()
    transactions = [e for e in events if e.startswith("# new generation")]
    tables = sum(payload.count("\n*") + payload.startswith("*") for payload in applied["restore"].values())
    assert 1 <= len(transactions) <= tables, transactions
    assert applied["changed"] is True and applied["backend"] == "iptables-nft"
    assert sorted(applied["added"]) == sorted(check["added"]) and applied["removed"] == []
    live = saves(ns, counters=True)
    for family in FAMILIES:
        # What was added to the tables is exactly what the check run's diff announced.
        new = entries(live[family]) - entries(untouched[family])
        assert entries(diffs[family]["after"]) == new, family
        assert Counter(a for a in check["added"] if a.startswith(family + " ")) == as_added(family, new)
        assert entries(untouched[family]) - entries(live[family]) == Counter(), "a foreign rule went away"
    if not opts.get("enable_inbound_ipv6"):
        assert "ISTIO" not in live["ipv6"]
    for family in FAMILIES:
        assert_marked(live[family], untouched[family])

    # 3. idempotence: no change, and no write at all (nft monitor sees nothing,
    #    every counter and handle stays).
    handles = ns.run(["nft", "-a", "list", "ruleset"]).stdout
    monitor = nft_monitor(ns)
    try:
        again = ok(apply(ns, tmp_path, diff=True, **opts))
        events = monitor.mark()
    finally:
        monitor.close()
    assert again["changed"] is False
    assert events == [], "the idempotent run wrote to the ruleset"
    assert again["added"] == again["removed"] == [] and again["summary"] == {"added": 0, "removed": 0}
    for family, diff in diff_by_family(again).items():
        assert diff["before"] == diff["after"]
        assert entries(diff["after"]) == entries(live[family]) - entries(untouched[family])
    assert_same(saves(ns, counters=True), live)
    assert ns.run(["nft", "-a", "list", "ruleset"]).stdout == handles

    # 4. check mode again.
    assert ok(apply(ns, tmp_path, check=True, **opts))["changed"] is False
    assert_same(saves(ns, counters=True), live)


@pytest.mark.parametrize("name", BATTERY)
def test_live_state_equals_restore_payload(netns_factory, tmp_path, name):
    """After apply, the tables equal a plain `iptables-nft-restore --noflush` of
    the module's own payload in a second namespace with the same foreign rules
    (plus the ownership marker, which names exactly the capture's rules in
    built-in chains)."""
    host, reference = netns_factory("live"), netns_factory("ref")
    add_foreign(host)
    add_foreign(reference)
    foreign = saves(host)
    result = ok(apply(host, tmp_path, **CONFIGS[name]))
    for family in FAMILIES:
        assert bool(result["restore"][family]) == (family == "ipv4" or bool(CONFIGS[name].get("enable_inbound_ipv6")))
        if result["restore"][family]:
            restore(reference, family, result["restore"][family])
    live = saves(host)
    assert_same(without_marker(live), saves(reference))
    for family in FAMILIES:
        assert_marked(live[family], foreign[family])


def test_rerun_uses_the_memoised_rendering(netns_factory, tmp_path):
    """A re-run with the same options loads the rendering kept in state_dir
    (one file per namespace, not rewritten), returns what a fresh rendering
    returns, and an uninstall removes it."""
    ns = netns_factory("memo")
    opts = CONFIGS["dual-dns"]
    rendered = ok(apply(ns, tmp_path, state="rendered", **opts))
    first = ok(apply(ns, tmp_path, **opts))
    memo = [f for f in state_files(tmp_path) if f.startswith("rendered-")]
    assert len(memo) == 1, state_files(tmp_path)
    stamp = os.stat(os.path.join(state_dir(tmp_path), memo[0])).st_mtime_ns
    again = ok(apply(ns, tmp_path, **opts))
    assert again["changed"] is False
    assert os.stat(os.path.join(state_dir(tmp_path), memo[0])).st_mtime_ns == stamp, "the memo was rewritten"
    for key in ("commands", "restore", "config"):
        assert first[key] == again[key] == rendered[key], key
    other = ok(apply(ns, tmp_path, **dict(opts, proxy_port=15011)))
    assert other["changed"] is True and other["commands"] != first["commands"]
    assert [f for f in state_files(tmp_path) if f.startswith("rendered-")] == memo
    ok(apply(ns, tmp_path, state="absent"))
    assert [f for f in state_files(tmp_path) if f.startswith("rendered-")] == []


def test_compact_result_leaves_commands_out_and_returns_the_boot_payload(netns_factory, tmp_path):
    """compact_result: present and absent results carry no commands (rendered
    always does); present returns what a boot restores, marker included."""
    ns = netns_factory("compact")
    opts = dict(CONFIGS["dual-dns"], compact_result=True)
    assert ok(apply(ns, tmp_path, state="rendered", **opts))["commands"]
    first = ok(apply(ns, tmp_path, **opts))
    assert "commands" not in first and first["restore"]["ipv4"]
    for family in FAMILIES:
        assert "-A MESHCAPTURE_OWNED -m comment" in first["boot_payload"][family], family
    again = ok(apply(ns, tmp_path, **opts))
    assert again["changed"] is False and "commands" not in again
    assert again["boot_payload"] == first["boot_payload"]
    assert "commands" not in ok(apply(ns, tmp_path, state="absent", compact_result=True))


@pytest.mark.parametrize("name", ["unsafe-mode", "symlink"])
def test_unsafe_state_dir_is_refused_before_any_change(netns_factory, tmp_path, name):
    ns = netns_factory("unsafe")
    before = saves(ns)
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    if name == "symlink":
        (tmp_path / "state").symlink_to(real)
        why = "is a symbolic link"
    else:
        (tmp_path / "state").mkdir()
        (tmp_path / "state").chmod(0o777)
        why = "writable by group and others"
    result = apply(ns, tmp_path, state_dir=str(tmp_path / "state"), **CONFIGS["vm-redirect"])
    assert result.get("failed"), result
    assert result["msg"].startswith("%s: " % (tmp_path / "state")) and why in result["msg"], result["msg"]
    assert saves(ns) == before


@pytest.mark.parametrize("name", ["dual-dns", "kubevirt"])
def test_first_apply_learns_the_canonical_form(netns_factory, tmp_path, name):
    """A first apply restores the payload without canonicalising it in a
    scratch namespace first; the canonical form it keeps (what the restore
    added, foreign rules around it) equals the scratch namespace's."""
    ns = netns_factory("learn")
    add_foreign(ns)
    result = ok(apply(ns, tmp_path, **CONFIGS[name]))

    def view(tables):  # {table: {chain: rules}} of the chains with rules and the capture's chains
        out = {t: {c: r for c, r in table.rules.items() if r or c.startswith("ISTIO_")} for t, table in tables.items()}
        return json.dumps({t: chains for t, chains in out.items() if chains}, sort_keys=True)

    cache_dir = os.path.join(state_dir(tmp_path), "canonical")
    learned = []
    for entry in os.listdir(cache_dir):
        with open(os.path.join(cache_dir, entry)) as f:
            learned.append(view(parse_save(f.read())))

    def runner(argv, data=None):
        proc = subprocess.run(argv, input=data, capture_output=True, text=True, check=False)
        return proc.returncode, proc.stdout, proc.stderr

    tools = ("iptables-nft-save", "iptables-nft-restore", "ip6tables-nft-save", "ip6tables-nft-restore", "unshare")
    paths = {tool: shutil.which(tool) for tool in tools}
    scratch = Engine(runner, "iptables-nft", paths, str(tmp_path / "scratch"), netns_id="test")
    expected = [view(scratch.canonical(family, payload)) for family, payload in result["restore"].items() if payload]
    assert sorted(learned) == sorted(expected)
    # ... and the next run is a no-op that reads it.
    assert ok(apply(ns, tmp_path, **CONFIGS[name]))["changed"] is False


# -------------------------------------------------------------- transitions
# Foreign rules for the transitions: filter and nat only, so the raw and
# mangle tables are the capture's own and must disappear when unused.
TRANSITION_FOREIGN = {
    "ipv4": "*nat\n-A OUTPUT -d 203.0.113.11/32 -j RETURN\n-A POSTROUTING -o eth0 -j MASQUERADE\nCOMMIT\n"
            "*filter\n-A INPUT -s 203.0.113.9/32 -j ACCEPT\nCOMMIT\n",
    "ipv6": "*nat\n-A OUTPUT -d 2001:db8:9::11/128 -j RETURN\nCOMMIT\n"
            "*filter\n-A INPUT -s 2001:db8:9::9/128 -j ACCEPT\nCOMMIT\n",
}
# REDIRECT vs TPROXY, IPv6 off/on, DNS off/on (listed servers / all), trace
# logging, kube-virt + excluded interface + drop_invalid.
TRANSITIONS = ["vm-redirect", "tproxy", "dual-dns", "trace", "kubevirt"]
PAIRS = [(a, b) for a in TRANSITIONS for b in TRANSITIONS if a != b]


def _transition_base(ns):
    for family in FAMILIES:
        restore(ns, family, TRANSITION_FOREIGN[family])


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """fresh(name) -> saves of a new namespace where only that configuration was applied."""
    cache = {}

    def get(name, base=_transition_base):
        key = (name, base)
        if key not in cache:
            with netns.Netns("fresh") as ns:
                base(ns)
                ok(apply(ns, tmp_path_factory.mktemp("fresh"), **CONFIGS[name]))
                cache[key] = saves(ns)
        return cache[key]
    return get


@pytest.mark.parametrize("a, b", PAIRS, ids=["%s->%s" % pair for pair in PAIRS])
def test_transition(netns_factory, tmp_path, fresh, a, b):
    ns = netns_factory("trans")
    _transition_base(ns)
    ok(apply(ns, tmp_path, **CONFIGS[a]))
    result = ok(apply(ns, tmp_path, **CONFIGS[b]))
    assert result["changed"] is True
    assert_same(saves(ns), fresh(b))
    assert ok(apply(ns, tmp_path, check=True, **CONFIGS[b]))["changed"] is False


# ------------------------------------------------------------------- absent
@pytest.mark.parametrize("name", list(CONFIGS))
def test_absent_restores_every_table(netns_factory, tmp_path, name):
    """Foreign rules in every table and chain survive byte for byte (counters
    included); absent needs no options; a second absent changes nothing."""
    ns = netns_factory("absent")
    add_foreign(ns)
    ns.run(["iptables-nft", "-A", "OUTPUT", "-o", "lo", "-p", "udp", "--dport", "9", "-j", "ACCEPT"])
    send_udp(ns)
    before = saves(ns, counters=True)
    assert re.search(r"^\[1:\d+\] -A OUTPUT -o lo -p udp", before["ipv4"], re.M), before["ipv4"]

    ok(apply(ns, tmp_path, **CONFIGS[name]))
    applied = saves(ns, counters=True)
    check = ok(apply(ns, tmp_path, check=True, diff=True, state="absent"))
    assert check["changed"] is True
    assert_same(saves(ns, counters=True), applied, "check mode changed the tables")
    for family, diff in diff_by_family(check).items():
        assert diff["after"] == ""
        assert entries(diff["before"]) == entries(applied[family]) - entries(before[family])
    result = ok(apply(ns, tmp_path, state="absent"))
    assert result["changed"] is True
    assert result["added"] == []
    assert_same(saves(ns, counters=True), before)
    assert [f for f in state_files(tmp_path) if f.startswith("netns-")] == [], "state record left behind"

    again = ok(apply(ns, tmp_path, state="absent"))
    assert again["changed"] is False and again["removed"] == []
    assert_same(saves(ns, counters=True), before)


PRIOR = {
    "no-tables": {},
    "filter-only": {"ipv4": "*filter\n-A INPUT -s 203.0.113.9/32 -j ACCEPT\nCOMMIT\n"},
    # Tables the capture uses, with only some of their base chains: nft has
    # no PREROUTING etc. until the capture puts a rule there.
    "nat-output-only": {"ipv4": "*nat\n-A OUTPUT -d 203.0.113.9/32 -j RETURN\nCOMMIT\n"
                                "*mangle\n-A POSTROUTING -o lo -j RETURN\nCOMMIT\n",
                        "ipv6": "*nat\n-A OUTPUT -d 2001:db8::9/128 -j RETURN\nCOMMIT\n"},
}


NOTAB = [(name, "no-tables") for name in CONFIGS] + [("tproxy", "filter-only"), ("dual-dns", "filter-only"),
                                                     ("tproxy", "nat-output-only"), ("dual-dns", "nat-output-only")]


@pytest.mark.parametrize("name, prior", NOTAB, ids=["%s-%s" % case for case in NOTAB])
def test_absent_deletes_the_tables_it_created(netns_factory, tmp_path, name, prior):
    """... and the base chains it created in tables that were there: the
    nftables ruleset ends as it began, not only the iptables-save view."""
    ns = netns_factory("notab")
    for family, payload in PRIOR[prior].items():
        restore(ns, family, payload)
    before = saves(ns, counters=True)
    ruleset = ns.run(["nft", "list", "ruleset"]).stdout
    ok(apply(ns, tmp_path, **CONFIGS[name]))
    assert ok(apply(ns, tmp_path, state="absent"))["changed"] is True
    assert_same(saves(ns, counters=True), before)
    assert ns.run(["nft", "list", "ruleset"]).stdout == ruleset
    assert [f for f in state_files(tmp_path) if f.startswith("netns-")] == [], "state record left behind"
    if prior == "no-tables":
        assert ns.run(["iptables-nft-save"]).stdout == ""
        assert ns.run(["ip6tables-nft-save"]).stdout == ""
        assert ns.run(["nft", "list", "ruleset"]).stdout == ""


def test_absent_keeps_a_created_base_chain_that_others_use(netns_factory, tmp_path):
    """A base chain the capture created, where other software has since put
    a rule, stays (with that rule) after absent."""
    ns = netns_factory("chain")
    restore(ns, "ipv4", PRIOR["nat-output-only"]["ipv4"])
    assert "chain PREROUTING" not in ns.run(["nft", "list", "table", "ip", "nat"]).stdout
    ok(apply(ns, tmp_path, **CONFIGS["dual-dns"]))
    assert "chain PREROUTING" in ns.run(["nft", "list", "table", "ip", "nat"]).stdout
    ns.run(["iptables-nft", "-t", "nat", "-A", "PREROUTING", "-s", "203.0.113.7/32", "-j", "RETURN"])
    after_foreign = saves(ns)
    assert ok(apply(ns, tmp_path, state="absent"))["changed"] is True
    assert "-A PREROUTING -s 203.0.113.7/32 -j RETURN" in save(ns, "ipv4")
    assert "ISTIO" not in save(ns, "ipv4") and "ISTIO" in after_foreign["ipv4"]
    assert "chain PREROUTING" in ns.run(["nft", "list", "table", "ip", "nat"]).stdout


# Rules of other software shaped like the capture's own, but with other
# values (another mark, uid, port or zone): never the capture's.
LOOKALIKE = {
    "ipv4": """\
*raw
-A OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 953 -j CT --zone 1
COMMIT
*mangle
-A PREROUTING -p tcp -m mark --mark 0x7 -j CONNMARK --save-mark
-A OUTPUT -p tcp -m connmark --mark 0x7 -j CONNMARK --restore-mark
-A OUTPUT -o lo -p tcp -m mark --mark 0x7 -j RETURN
COMMIT
*nat
-A OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 953 -j RETURN
-A OUTPUT -p udp -m udp --dport 53 -j REDIRECT --to-ports 5353
COMMIT
""",
    "ipv6": """\
*mangle
-A PREROUTING -p tcp -m mark --mark 0x7 -j CONNMARK --save-mark
COMMIT
*nat
-A OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 953 -j RETURN
COMMIT
""",
}


@pytest.mark.parametrize("name", ["dual-dns", "tproxy"])
def test_absent_keeps_lookalike_foreign_rules(netns_factory, tmp_path, name):
    ns = netns_factory("look")
    for family in FAMILIES:
        restore(ns, family, LOOKALIKE[family])
    before = saves(ns)
    applied = ok(apply(ns, tmp_path, **CONFIGS[name]))
    assert not any("953" in line or "0x7" in line or "5353" in line for line in applied["removed"]), \
        applied["removed"]
    ok(apply(ns, tmp_path, state="absent"))
    assert_same(saves(ns), before)


def test_absent_keeps_foreign_rule_identical_to_a_capture_rule(netns_factory, tmp_path):
    """Another firewall's INVALID DROP in mangle PREROUTING, identical to the
    rule drop_invalid adds: it was there before, so it is still there after absent."""
    ns = netns_factory("same")
    restore(ns, "ipv4", "*mangle\n-A PREROUTING -m conntrack --ctstate INVALID -j DROP\nCOMMIT\n")
    before = saves(ns)
    ok(apply(ns, tmp_path, **CONFIGS["kubevirt"]))
    ok(apply(ns, tmp_path, state="absent"))
    assert_same(saves(ns), before)


# ------------------------------------------------- rulesets of istio-iptables
ISTIO_LEFT = {
    "tproxy-dns": dict(CONFIGS["tproxy"], redirect_dns=True, dns_servers_v4=["192.0.2.53"],
                       dns_servers_v6=["2001:db8::53"]),
    "vm-redirect": CONFIGS["vm-redirect"],
    "trace": CONFIGS["trace"],
    "kubevirt-invalid": CONFIGS["kubevirt"],
}


def _istio_left(ns, tmp_path, name):
    """Simulate istio-iptables: its commands run one by one, no state record."""
    rendered = ok(apply(ns, tmp_path, state="rendered", **ISTIO_LEFT[name]))
    run_commands(ns, rendered["commands"])
    assert state_files(tmp_path) == []


@pytest.mark.parametrize("name", list(ISTIO_LEFT))
def test_istio_left_ruleset_converges(netns_factory, tmp_path, fresh, name):
    ns = netns_factory("istio")
    add_foreign(ns)
    _istio_left(ns, tmp_path, name)
    result = ok(apply(ns, tmp_path, **CONFIGS["dual-dns"]))
    assert result["changed"] is True
    assert_same(saves(ns), fresh("dual-dns", base=add_foreign))


@pytest.mark.parametrize("name", list(ISTIO_LEFT))
def test_istio_left_ruleset_absent(netns_factory, tmp_path, name):
    ns = netns_factory("istio")
    add_foreign(ns)
    before = saves(ns)
    _istio_left(ns, tmp_path, name)
    result = ok(apply(ns, tmp_path, state="absent"))
    assert result["changed"] is True
    assert_same(saves(ns), before, "absent left part of istio-iptables' ruleset (or removed a foreign rule)")
    assert ok(apply(ns, tmp_path, state="absent"))["changed"] is False


# ---------------------------------------------------------- partial leftovers
DAMAGE = {
    "missing-jump": [["iptables-nft", "-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", "ISTIO_OUTPUT"]],
    "duplicate-jump": [["iptables-nft", "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-j", "ISTIO_INBOUND"],
                       ["ip6tables-nft", "-t", "nat", "-I", "OUTPUT", "-p", "tcp", "-j", "ISTIO_OUTPUT"]],
    "flushed-chain": [["iptables-nft", "-t", "nat", "-F", "ISTIO_OUTPUT"]],
    "stray-rule": [["ip6tables-nft", "-t", "nat", "-I", "ISTIO_INBOUND", "-p", "tcp", "--dport", "22", "-j", "RETURN"]],
    "stale-chains": [["iptables-nft", "-t", "mangle", "-N", "ISTIO_DIVERT"],
                     ["iptables-nft", "-t", "mangle", "-A", "ISTIO_DIVERT", "-j", "MARK", "--set-mark", "1337"],
                     ["iptables-nft", "-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-j", "ISTIO_DIVERT"],
                     ["iptables-nft", "-t", "nat", "-N", "ISTIO_OLD"]],
    "dns-leftovers": [["iptables-nft", "-t", "raw", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-m", "owner",
                       "--uid-owner", "1337", "-j", "CT", "--zone", "1"],
                      ["iptables-nft", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-d",
                       "192.0.2.53/32", "-j", "REDIRECT", "--to-port", "15053"]],
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_partial_leftovers_converge(netns_factory, tmp_path, fresh, damage):
    ns = netns_factory("part")
    add_foreign(ns)
    opts = CONFIGS["vm-redirect"] if damage in ("stale-chains", "dns-leftovers") else CONFIGS["kubevirt"]
    ok(apply(ns, tmp_path, **opts))
    for argv in DAMAGE[damage]:
        ns.run(argv)
    assert ok(apply(ns, tmp_path, **opts))["changed"] is True
    name = "vm-redirect" if opts is CONFIGS["vm-redirect"] else "kubevirt"
    assert_same(saves(ns), fresh(name, base=add_foreign))


# ---------------------------------------------- foreign rules in our chains
def nat_output(ns):
    return [line for line in save(ns, "ipv4").split("*nat\n", 1)[1].splitlines() if line.startswith("-A OUTPUT ")]


@pytest.mark.parametrize("change", ["builtin-unchanged", "builtin-changed"])
def test_foreign_rules_keep_their_position(netns_factory, tmp_path, change):
    """nat OUTPUT: a foreign rule before ours and one added after ours keep
    their places relative to ours when the capture converges."""
    ns = netns_factory("pos")
    first, last = "-A OUTPUT -d 203.0.113.1/32 -j RETURN", "-A OUTPUT -d 203.0.113.2/32 -j RETURN"
    restore(ns, "ipv4", "*nat\n%s\nCOMMIT\n" % first)
    a = CONFIGS["vm-redirect"]
    ok(apply(ns, tmp_path, **a))
    restore(ns, "ipv4", "*nat\n%s\nCOMMIT\n" % last)
    if change == "builtin-unchanged":
        b = dict(a, outbound_ip_ranges_exclude=["169.254.169.254/32", "10.0.0.0/8"])
    else:
        b = dict(a, redirect_dns=True, dns_servers_v4=["192.0.2.53"], dns_servers_v6=[])
    result = ok(apply(ns, tmp_path, **b))
    assert result["changed"] is True
    rules = nat_output(ns)
    ours = [r for r in rules if r not in (first, last)]
    assert len(ours) == (1 if change == "builtin-unchanged" else 4), rules
    assert rules == [first] + ours + [last], "nat OUTPUT is now:\n" + "\n".join(rules)


def test_foreign_rule_between_ours_is_left_alone(netns_factory, tmp_path):
    """A foreign rule inserted between the capture's nat OUTPUT rules: the
    capture still counts as converged (no change) and absent removes only its own."""
    ns = netns_factory("between")
    opts = {**CONFIGS["dual-dns"], "enable_inbound_ipv6": False}
    ok(apply(ns, tmp_path, **opts))
    foreign = "-A OUTPUT -d 203.0.113.3/32 -j RETURN"
    ns.run(["iptables-nft", "-t", "nat", "-I", "OUTPUT", "2", "-d", "203.0.113.3", "-j", "RETURN"])
    assert nat_output(ns)[1] == foreign
    live = saves(ns, counters=True)
    assert ok(apply(ns, tmp_path, **opts))["changed"] is False
    assert_same(saves(ns, counters=True), live)
    ok(apply(ns, tmp_path, state="absent"))
    assert nat_output(ns) == [foreign]
    assert "ISTIO" not in save(ns, "ipv4") and "15053" not in save(ns, "ipv4")


# ------------------------------------------------------------------ backends
def test_backend_legacy_forced(netns_factory, tmp_path):
    ns, reference = netns_factory("legacy"), netns_factory("legref")
    for n in (ns, reference):
        add_foreign(n, backend="iptables-legacy")
    before = saves(ns, backend="iptables-legacy", counters=True)
    opts = dict(CONFIGS["dual-dns"], backend="iptables-legacy")

    check = ok(apply(ns, tmp_path, check=True, **opts))
    assert check["changed"] is True and check["backend"] == "iptables-legacy"
    assert_same(saves(ns, backend="iptables-legacy", counters=True), before)

    result = ok(apply(ns, tmp_path, **opts))
    assert result["changed"] is True and result["backend"] == "iptables-legacy"
    for family in FAMILIES:
        restore(reference, family, result["restore"][family], backend="iptables-legacy")
    live = saves(ns, backend="iptables-legacy", counters=True)
    assert_same(without_marker(saves(ns, backend="iptables-legacy")), saves(reference, backend="iptables-legacy"))
    for family in FAMILIES:
        assert_marked(live[family], before[family])
    assert ns.run(["nft", "list", "ruleset"]).stdout == "", "the legacy backend wrote nft rules"

    assert ok(apply(ns, tmp_path, **opts))["changed"] is False
    assert_same(saves(ns, backend="iptables-legacy", counters=True), live)

    assert ok(apply(ns, tmp_path, state="absent", backend="iptables-legacy"))["changed"] is True
    assert_same(saves(ns, backend="iptables-legacy", counters=True), before)
    assert ok(apply(ns, tmp_path, state="absent", backend="iptables-legacy"))["changed"] is False


def legacy_tables(ns):
    return ns.run(["cat", "/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"]).stdout.split()


@pytest.mark.parametrize("prior, expected", [
    ("legacy-rule", "iptables-legacy"),
    ("legacy-empty-table", "iptables-nft"),
    ("clean", "iptables-nft"),
    ("nft-rule", "iptables-nft"),
])
def test_backend_auto(netns_factory, tmp_path, prior, expected):
    ns = netns_factory("auto")
    if prior == "legacy-rule":
        ns.run(["iptables-legacy", "-t", "filter", "-A", "INPUT", "-s", "203.0.113.9", "-j", "ACCEPT"])
    elif prior == "legacy-empty-table":
        ns.run(["iptables-legacy", "-t", "nat", "-S"])
    elif prior == "nft-rule":
        ns.run(["iptables-nft", "-t", "filter", "-A", "INPUT", "-s", "203.0.113.9", "-j", "ACCEPT"])
    loaded = legacy_tables(ns)
    before = saves(ns, backend=expected)

    assert ok(apply(ns, tmp_path, check=True, **CONFIGS["vm-redirect"]))["backend"] == expected
    result = ok(apply(ns, tmp_path, **CONFIGS["vm-redirect"]))
    assert result["backend"] == expected
    assert "ISTIO_OUTPUT" in save(ns, "ipv4", backend=expected)
    if expected == "iptables-nft":
        # Detection reads /proc only: no legacy table appears where there was none.
        assert legacy_tables(ns) == loaded
        if not loaded:
            assert "ISTIO" not in ns.run(["iptables-legacy-save"]).stdout
    else:
        assert "ISTIO" not in ns.run(["nft", "list", "ruleset"]).stdout
    assert ok(apply(ns, tmp_path, state="absent"))["changed"] is True
    after = saves(ns, backend=expected)
    if expected == "iptables-legacy":
        # A legacy table, once loaded, stays (iptables cannot unload it): compare without empty tables.
        after = {family: without_empty_tables(text) for family, text in after.items()}
    assert_same(after, before)


@pytest.mark.parametrize("config", ["vm-redirect", "dual-dns"])
def test_legacy_absent_leaves_only_the_tables_the_kernel_keeps(netns_factory, tmp_path, config):
    """x_tables has no call that unregisters a table: once iptables-legacy
    used nat (or raw, mangle) in a namespace, that table stays, empty, until
    the namespace goes.  What absent can and does guarantee: no rule and no
    chain is left, only the empty tables the capture itself used; and an
    absent on a host without legacy tables creates none."""
    ns = netns_factory("legabs")
    assert legacy_tables(ns) == []
    assert ok(apply(ns, tmp_path, state="absent", backend="iptables-legacy"))["changed"] is False
    assert legacy_tables(ns) == []
    result = ok(apply(ns, tmp_path, backend="iptables-legacy", **CONFIGS[config]))
    used = sorted(set(line[1:] for family in FAMILIES for line in result["restore"][family].splitlines()
                      if line.startswith("*")))
    assert ok(apply(ns, tmp_path, state="absent", backend="iptables-legacy"))["changed"] is True
    assert sorted(set(legacy_tables(ns))) == used
    after = saves(ns, backend="iptables-legacy")
    assert {family: without_empty_tables(text) for family, text in after.items()} == {"ipv4": "", "ipv6": ""}
    assert ok(apply(ns, tmp_path, state="absent", backend="iptables-legacy"))["changed"] is False


def without_empty_tables(save_text):
    """A save without the tables that hold no rule and no user chain."""
    blocks = re.findall(r"^\*.*?^COMMIT\n", save_text, re.M | re.S)
    builtin = r"(PREROUTING|INPUT|FORWARD|OUTPUT|POSTROUTING) "
    return "".join(b for b in blocks if re.search(r"^(-A |:(?!%s))" % builtin, b, re.M))


# ---------------------------------------------------------- malformed input
MALFORMED = [
    ("port-newline", "inbound_ports_include", ["80\n-A INPUT -j DROP"]),
    ("port-space", "inbound_ports_exclude", ["22 -j ACCEPT"]),
    ("port-option", "outbound_ports_include", ["--dport"]),
    ("port-range", "outbound_ports_exclude", ["70000"]),
    ("port-zero", "outbound_ports_exclude", ["0"]),
    ("wildcard-mixed", "inbound_ports_include", ["*", "80"]),
    ("cidr-newline", "outbound_ip_ranges_include", ["10.0.0.0/8\n-A OUTPUT -j DROP"]),
    ("cidr-prefix", "outbound_ip_ranges_exclude", ["10.0.0.0/33"]),
    ("cidr-option", "outbound_ip_ranges_exclude", ["-d"]),
    ("iface-space", "kube_virt_interfaces", ["eth0 -j ACCEPT"]),
    ("iface-option", "exclude_interfaces", ["-o"]),
    ("iface-long", "exclude_interfaces", ["averyveryverylong0"]),
    ("uid-space", "proxy_uid", ["13 37"]),
    ("uid-option", "proxy_uid", ["--uid-owner"]),
    ("uid-range", "proxy_uid", ["4294967296"]),
    ("gid-newline", "proxy_gid", ["1337\n-j"]),
    ("group-include", "owner_groups_include", ["java -j ACCEPT"]),
    ("group-exclude", "owner_groups_exclude", ["-g"]),
    ("dns4-cidr", "dns_servers_v4", ["192.0.2.53/32"]),
    ("dns4-family", "dns_servers_v4", ["2001:db8::53"]),
    ("dns6-family", "dns_servers_v6", ["192.0.2.53"]),
    ("dns6-space", "dns_servers_v6", ["::1 -j DROP"]),
    ("mark-zero", "inbound_tproxy_mark", 0),
    ("mark-range", "inbound_tproxy_mark", 4294967296),
    ("table-reserved", "inbound_tproxy_route_table", 254),
    ("table-zero", "inbound_tproxy_route_table", 0),
    ("proxy-port-range", "proxy_port", 65536),
    ("capture-port-zero", "inbound_capture_port", 0),
    ("tunnel-port-negative", "inbound_tunnel_port", -1),
    ("port-string", "proxy_port", "15001 -j DROP"),
    ("groups-too-many", "owner_groups_include", [str(1000 + i) for i in range(65)]),
    # Well-formed names the machine does not know: iptables' owner match
    # cannot resolve them, the module must say which option holds them.
    ("unknown-group", "owner_groups_exclude", ["no-such-group-x"]),
    ("unknown-user", "proxy_uid", ["no-such-user-x"]),
]
MALFORMED_BASE = dict(CONFIGS["dual-dns"], inbound_interception_mode="TPROXY")


@pytest.fixture(scope="module")
def applied_ns(tmp_path_factory):
    """One namespace with foreign rules and a capture applied, for the malformed battery."""
    tmp = tmp_path_factory.mktemp("malformed")
    with netns.Netns("bad") as ns:
        add_foreign(ns)
        ok(apply(ns, tmp, **MALFORMED_BASE))
        yield ns, tmp


@pytest.mark.parametrize("option, value", [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed_input_fails_naming_the_option(applied_ns, option, value):
    ns, tmp = applied_ns
    before = saves(ns, counters=True)
    result = apply(ns, tmp, **dict(MALFORMED_BASE, **{option: value}))
    assert result.get("failed") is True, result
    assert option in result["msg"], result["msg"]
    assert_same(saves(ns, counters=True), before)


# ------------------------------------------------------------------ rollback
ROLLBACK = {
    # IPv4 changes inside the nat table only.
    "nat-only": (dict(inbound_ports_include=["8080"], outbound_ip_ranges_include=["*"], enable_inbound_ipv6=True),
                 dict(inbound_ports_include=["8080", "9090"], outbound_ip_ranges_include=["*"])),
    # IPv4 gains the raw and mangle tables (DNS zones, TPROXY marks).
    "new-tables": (dict(inbound_ports_include=["8080"], outbound_ip_ranges_include=["*"], enable_inbound_ipv6=True),
                   dict(inbound_ports_include=["*"], inbound_interception_mode="TPROXY",
                        outbound_ip_ranges_include=["*"], redirect_dns=True, dns_servers_v4=["192.0.2.53"])),
    # Foreign rules everywhere, IPv4 changes in every table; the IPv6
    # restore deletes the DNS rules of raw before it fails in nat.
    "foreign-ipv6-raw": (dict(CONFIGS["dual-dns"]),
                         {**CONFIGS["tproxy"], "enable_inbound_ipv6": False, "redirect_dns": True,
                          "dns_servers_v4": ["192.0.2.54"]}),
}


@pytest.mark.parametrize("case", list(ROLLBACK))
def test_ipv6_failure_rolls_ipv4_back(netns_factory, tmp_path, case):
    first, second = ROLLBACK[case]
    ns = netns_factory("rollbk")
    if case.startswith("foreign"):
        add_foreign(ns)
    ok(apply(ns, tmp_path, **first))
    # Another program's IPv6 chain jumps to ISTIO_REDIRECT: the capture may not delete it.
    ns.run(["ip6tables-nft", "-t", "nat", "-N", "FOREIGN_JUMP"])
    ns.run(["ip6tables-nft", "-t", "nat", "-A", "FOREIGN_JUMP", "-j", "ISTIO_REDIRECT"])
    before = saves(ns)
    record = records(tmp_path)

    result = apply(ns, tmp_path, **second)
    assert result.get("failed") is True, result
    assert "ipv6" in result["msg"], result["msg"]
    assert result["stderr"].strip(), result
    assert result["stderr"].strip() in result["msg"], result["msg"]
    assert "ipv4" in result["msg"] and "rolled back" in result["msg"], result["msg"]
    after = saves(ns)
    assert_same(after["ipv4"], before["ipv4"], "IPv4 was not put back as it was")
    # The failed IPv6 restore must not leave IPv6 half-changed either (a
    # restore commits table by table: raw/mangle blocks before the failing
    # nat block are already in).
    assert_same(after["ipv6"], before["ipv6"], "IPv6 is left half-changed by the failed restore")
    assert records(tmp_path) == record, "the failed run changed the state record"

    # Once the foreign reference is gone, the same run converges.
    ns.run(["ip6tables-nft", "-t", "nat", "-F", "FOREIGN_JUMP"])
    ns.run(["ip6tables-nft", "-t", "nat", "-X", "FOREIGN_JUMP"])
    assert ok(apply(ns, tmp_path, **second))["changed"] is True
    reference = netns_factory("rbref")
    if case.startswith("foreign"):
        add_foreign(reference)
    ok(apply(reference, tmp_path, **second))
    assert_same(saves(ns), saves(reference))


def test_ipv4_failure_leaves_nothing_half_applied(netns_factory, tmp_path):
    """A restore commits table by table: when IPv4's mangle block fails, its
    raw block (already committed) must be put back too."""
    ns = netns_factory("v4fail")
    first = {**CONFIGS["tproxy"], "redirect_dns": True, "dns_servers_v4": ["192.0.2.53"], "enable_inbound_ipv6": False}
    ok(apply(ns, tmp_path, **first))
    # Another program's mangle chain jumps to ISTIO_DIVERT: the capture may not delete it.
    ns.run(["iptables-nft", "-t", "mangle", "-N", "FOREIGN_JUMP"])
    ns.run(["iptables-nft", "-t", "mangle", "-A", "FOREIGN_JUMP", "-j", "ISTIO_DIVERT"])
    before = saves(ns)
    result = apply(ns, tmp_path, **CONFIGS["vm-redirect"])
    assert result.get("failed") is True, result
    assert "ipv4" in result["msg"] and result["stderr"].strip() in result["msg"], result["msg"]
    assert_same(saves(ns), before, "the failed IPv4 restore left IPv4 half-changed")


def test_rollback_keeps_foreign_counters(netns_factory, tmp_path):
    """IPv4 put back 'as it was' includes the packet counters of other software's rules."""
    ns = netns_factory("rbcnt")
    first, second = ROLLBACK["nat-only"]
    restore(ns, "ipv4", "*nat\n-A OUTPUT -o lo -p udp -m udp --dport 9 -j RETURN\nCOMMIT\n")
    ok(apply(ns, tmp_path, **first))
    send_udp(ns)
    ns.run(["ip6tables-nft", "-t", "nat", "-N", "FOREIGN_JUMP"])
    ns.run(["ip6tables-nft", "-t", "nat", "-A", "FOREIGN_JUMP", "-j", "ISTIO_REDIRECT"])
    before = save(ns, "ipv4", counters=True)
    assert re.search(r"^\[1:\d+\] -A OUTPUT -o lo -p udp", before, re.M), before
    assert apply(ns, tmp_path, **second).get("failed") is True
    assert_same(save(ns, "ipv4", counters=True), before)


# --------------------------------------------------------------------- scale
def test_large_ruleset_one_restore(netns_factory, tmp_path):
    """~3,000 rules go in with one transaction per table (nft monitor counts
    them), not a process per rule; idempotent without a write; removed again."""
    ns, reference = netns_factory("large"), netns_factory("lgref")
    opts = dict(inbound_ports_include=[str(p) for p in range(20000, 21000)],
                outbound_ip_ranges_include=["10.%d.%d.0/24" % (i // 256, i % 256) for i in range(500)]
                + ["fd00:%x::/32" % i for i in range(500)],
                enable_inbound_ipv6=True)
    monitor = nft_monitor(ns)
    try:
        result = ok(apply(ns, tmp_path, **opts))
        events = monitor.mark()
        assert result["changed"] is True and result["summary"]["added"] > 3000
        assert len([e for e in events if e.startswith("# new generation")]) == 2, "one per family (nat only)"
        again = ok(apply(ns, tmp_path, **opts))
        assert monitor.mark() == []
    finally:
        monitor.close()
    assert again["changed"] is False
    for family in FAMILIES:
        restore(reference, family, result["restore"][family])
    assert_same(without_marker(saves(ns)), saves(reference))
    assert ok(apply(ns, tmp_path, state="absent"))["changed"] is True
    assert ns.run(["nft", "list", "ruleset"]).stdout == ""


# ------------------------------------------------------------ Istio releases
RELEASES = ["1.17", "1.20", "1.22", "1.24", "1.26", "1.30"]
RELEASE_OPTS = dict(inbound_ports_include=["*"], inbound_ports_exclude=["22"], drop_invalid=True, redirect_dns=True,
                    dns_servers_v4=["192.0.2.53"], dns_servers_v6=["2001:db8::53"], exclude_interfaces=["eth9"],
                    kube_virt_interfaces=["eth1"], outbound_ip_ranges_include=["10.0.0.0/8", "2001:db8:ffff::/48"],
                    enable_inbound_ipv6=True)


@pytest.mark.parametrize("version", RELEASES)
def test_every_release_capture_is_owned(netns_factory, tmp_path, version):
    """The capture of any Istio release (1.17 to 1.30 rules: ISTIO_DROP,
    ISTIO_OUTPUT_DNS, raw jumps, DNS zones with source addresses) converges,
    is idempotent, and absent removes all of it, foreign rules untouched."""
    ns = netns_factory("rel")
    add_foreign(ns)
    before = saves(ns, counters=True)
    opts = dict(RELEASE_OPTS, istio_version=version)
    assert ok(apply(ns, tmp_path, **opts))["changed"] is True
    live = saves(ns)
    for family in FAMILIES:
        assert_marked(live[family], before[family])
    assert ok(apply(ns, tmp_path, **opts))["changed"] is False
    assert ok(apply(ns, tmp_path, state="absent"))["changed"] is True
    assert_same(saves(ns, counters=True), before)


@pytest.mark.parametrize("version", RELEASES)
def test_every_release_left_by_istio_is_removed(netns_factory, tmp_path, version):
    """A ruleset istio-iptables of that release left (its commands run one by
    one, no marker): absent removes all of it and nothing else."""
    ns = netns_factory("relist")
    add_foreign(ns)
    before = saves(ns)
    rendered = ok(apply(ns, tmp_path, state="rendered", **dict(RELEASE_OPTS, istio_version=version)))
    run_commands(ns, rendered["commands"])
    assert "ISTIO" in save(ns, "ipv4")
    assert ok(apply(ns, tmp_path, state="absent"))["changed"] is True
    assert_same(saves(ns), before)
