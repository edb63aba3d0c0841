"""Reboots, and nftables tables of other software in the ip/ip6 families.

A reboot is simulated inside the namespace: every table goes (nft flush
ruleset; legacy: the tables are emptied), the state directory is emptied
(/run is a tmpfs), other software's boot scripts restore their rules, and
the capture's boot-time restore applies what the role persisted (the
module's boot_payload: its restore payloads with the ownership markers).
"""

import os
import re
import shutil

import pytest

from rules_helpers import (CONFIGS, FAMILIES, RESTORE, apply, assert_same, boot_payload, ok, restore, saves, state_dir,
                           write_wrapper)

pytestmark = pytest.mark.netns

# Another firewall's rules: among them an INVALID DROP in mangle PREROUTING,
# the same rule drop_invalid makes, and interface RETURNs in nat.
USER = {
    "ipv4": "*mangle\n-A PREROUTING -m conntrack --ctstate INVALID -j DROP\nCOMMIT\n"
            "*nat\n-A PREROUTING -i eth7 -j RETURN\n-A OUTPUT -o eth7 -j RETURN\nCOMMIT\n"
            "*filter\n-A INPUT -s 203.0.113.9/32 -j ACCEPT\nCOMMIT\n",
    "ipv6": "*mangle\n-A PREROUTING -m conntrack --ctstate INVALID -j DROP\nCOMMIT\n",
}
CASES = {
    # The capture's own generic rules: eth9 RETURNs, no INVALID DROP of its own.
    "exclude-iface": dict(CONFIGS["vm-redirect"], exclude_interfaces=["eth7", "eth9"], enable_inbound_ipv6=True),
    # drop_invalid: the capture's INVALID DROP next to the user's.
    "drop-invalid": dict(CONFIGS["kubevirt"]),
}
BACKENDS = ["iptables-nft", "iptables-legacy"]


def reboot(ns, tmp_path, backend, user, persisted):
    """Empty the tables and the state directory, then the boot scripts: the user's rules, then the capture's."""
    if backend == "iptables-nft":
        ns.run(["nft", "flush", "ruleset"])
    else:
        for family in FAMILIES:
            for table in ("raw", "mangle", "nat", "filter"):
                restore(ns, family, "*%s\nCOMMIT\n" % table, backend=backend, noflush=False)
    shutil.rmtree(state_dir(tmp_path), ignore_errors=True)
    for family in FAMILIES:
        if user.get(family):
            restore(ns, family, user[family], backend=backend)
    for family in FAMILIES:
        if persisted[family]:
            restore(ns, family, persisted[family], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_reboots_keep_ownership(netns_factory, tmp_path, backend, case):
    """After any number of reboots the capture converges without touching the
    user's rules (changed=false), and absent leaves exactly the user's rules;
    with iptables-nft, exactly the nftables ruleset the user had."""
    ns = netns_factory("reboot")
    opts = dict(CASES[case], backend=backend)
    for family in FAMILIES:
        restore(ns, family, USER[family], backend=backend)
    user = saves(ns, backend=backend)
    ruleset = ns.run(["nft", "list", "ruleset"]).stdout
    result = ok(apply(ns, tmp_path, **opts))
    persisted = boot_payload(ns, result, backend=backend)
    applied = _tables(saves(ns, backend=backend), backend)
    for dummy in range(2):
        reboot(ns, tmp_path, backend, USER, persisted)
        assert_same(_tables(saves(ns, backend=backend), backend), applied, "the boot-time restore differs")
        assert ok(apply(ns, tmp_path, **opts))["changed"] is False
    assert ok(apply(ns, tmp_path, state="absent", backend=backend))["changed"] is True
    if backend == "iptables-nft":
        assert_same(saves(ns, backend=backend), user)
        assert ns.run(["nft", "list", "ruleset"]).stdout == ruleset
    else:  # legacy tables cannot be unloaded: compared without the tables that hold nothing
        after = saves(ns, backend=backend)
        assert_same({f: without_empty_tables(after[f]) for f in FAMILIES},
                    {f: without_empty_tables(user[f]) for f in FAMILIES})


def _tables(saves_, backend):
    """Legacy: without the empty tables (the simulated reboot loads every table)."""
    if backend == "iptables-nft":
        return saves_
    return {f: without_empty_tables(text) for f, text in saves_.items()}


def without_empty_tables(save_text):
    blocks = re.findall(r"^\*.*?^COMMIT\n", save_text, re.M | re.S)
    builtin = r"(PREROUTING|INPUT|FORWARD|OUTPUT|POSTROUTING) "
    return "".join(b for b in blocks if re.search(r"^(-A |:(?!%s))" % builtin, b, re.M))


@pytest.mark.parametrize("prior", ["no-tables", "nat-output-only"])
def test_reboot_then_absent_leaves_the_tables_as_before(netns_factory, tmp_path, prior):
    """What the capture created (tables, base chains in the user's nat table)
    is known after reboots, from the marker in the persisted payload: absent
    deletes it, and a host that had no nf_tables tables has none again."""
    ns = netns_factory("rbtab")
    user = {"ipv4": "*nat\n-A OUTPUT -d 203.0.113.9/32 -j RETURN\nCOMMIT\n"} if prior == "nat-output-only" else {}
    for family, payload in user.items():
        restore(ns, family, payload)
    ruleset = ns.run(["nft", "list", "ruleset"]).stdout
    opts = dict(CONFIGS["dual-dns"])
    persisted = boot_payload(ns, ok(apply(ns, tmp_path, **opts)))
    for dummy in range(2):
        reboot(ns, tmp_path, "iptables-nft", user, persisted)
        assert ok(apply(ns, tmp_path, **opts))["changed"] is False
    assert ok(apply(ns, tmp_path, state="absent"))["changed"] is True
    assert ns.run(["nft", "list", "ruleset"]).stdout == ruleset
    assert ok(apply(ns, tmp_path, state="absent"))["changed"] is False


def test_absent_on_a_host_without_tables_creates_none(netns_factory, tmp_path):
    ns = netns_factory("notab")
    assert ok(apply(ns, tmp_path, state="absent"))["changed"] is False
    assert ns.run(["nft", "list", "ruleset"]).stdout == ""
    assert ok(apply(ns, tmp_path, **CONFIGS["vm-redirect"]))["changed"] is True
    assert ok(apply(ns, tmp_path, state="absent"))["changed"] is True
    assert ns.run(["nft", "list", "ruleset"]).stdout == ""


# ------------------------------------------------ other software's nft tables
WIKI_NAT = """table ip nat {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        tcp dport 8080 dnat to 192.0.2.5
    }

    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "eth0" masquerade
    }
}
"""
SET_NAT = """table ip nat {
    set blocked {
        type ipv4_addr
        elements = { 192.0.2.9 }
    }

    chain PREROUTING {
        type nat hook prerouting priority dstnat; policy accept;
        ip saddr @blocked return
    }
}
"""
FOREIGN_NFT = {"wiki": WIKI_NAT, "set": SET_NAT}


@pytest.mark.parametrize("layout", list(FOREIGN_NFT))
def test_foreign_nft_nat_table_is_refused_before_any_change(netns_factory, tmp_path, layout):
    """An `ip nat` table of nft's own making (base chains iptables does not
    name, or a set): the capture neither writes into it nor deletes it; the
    run fails before any change, naming the table."""
    ns = netns_factory("nftnat")
    ns.run(["nft", "-f", "-"], input=FOREIGN_NFT[layout])
    ruleset = ns.run(["nft", "list", "ruleset"]).stdout
    for state in ("present", "absent"):
        for repeat in range(2):
            result = apply(ns, tmp_path, state=state, **(CONFIGS["vm-redirect"] if state == "present" else {}))
            if state == "absent":
                assert not result.get("failed") and result["changed"] is False, result
                continue
            assert result.get("failed") is True, result
            assert result["msg"].startswith("ipv4: the nat table holds "), result["msg"]
            assert "(nft list table ip nat)" in result["msg"] and "nothing was changed" in result["msg"]
            assert ns.run(["nft", "list", "ruleset"]).stdout == ruleset


@pytest.mark.parametrize("layout", list(FOREIGN_NFT))
def test_foreign_nft_chains_added_to_the_capture_nat_table(netns_factory, tmp_path, layout):
    """Another program adds nft-only chains (or a set) to the ip nat table the
    capture uses: a changing run and absent fail before any change and keep
    them; no second jump is ever added; once they are gone, absent works."""
    ns = netns_factory("nftadd")
    ok(apply(ns, tmp_path, **CONFIGS["vm-redirect"]))
    extra = {"wiki": "add chain ip nat prerouting { type nat hook prerouting priority -90; policy accept; }\n"
                     "add rule ip nat prerouting tcp dport 8080 dnat to 192.0.2.5\n",
             "set": "add set ip nat blocked { type ipv4_addr; elements = { 192.0.2.9 }; }\n"}[layout]
    ns.run(["nft", "-f", "-"], input=extra)
    ruleset = ns.run(["nft", "list", "ruleset"]).stdout
    assert ok(apply(ns, tmp_path, **CONFIGS["vm-redirect"]))["changed"] is False
    for args in (CONFIGS["kubevirt"], dict(state="absent")):
        result = apply(ns, tmp_path, **args)
        assert result.get("failed") is True, result
        assert "the nat table holds" in result["msg"] and "nothing was changed" in result["msg"], result["msg"]
        assert ns.run(["nft", "list", "ruleset"]).stdout == ruleset
    assert ns.run(["nft", "list", "ruleset"]).stdout.count("jump ISTIO_INBOUND") == 1
    ns.run(["nft", "-f", "-"], input={"wiki": "delete chain ip nat prerouting\n",
                                      "set": "delete set ip nat blocked\n"}[layout])
    assert ok(apply(ns, tmp_path, state="absent"))["changed"] is True
    assert ns.run(["nft", "list", "ruleset"]).stdout == ""


def test_rollback_never_touches_foreign_nft_chains(netns_factory, tmp_path):
    """The IPv6 restore fails after IPv4 changed: the rollback is a --noflush
    inverse of the capture's changes, so another program's nft-only chains
    and sets in other ip tables stay exactly as they were."""
    ns = netns_factory("rbnft")
    ns.run(["nft", "-f", "-"], input=WIKI_NAT.replace("table ip nat", "table ip othernat"))
    ok(apply(ns, tmp_path, **CONFIGS["vm-redirect"]))
    ruleset = ns.run(["nft", "list", "ruleset"]).stdout
    directory = tmp_path / "bin"
    directory.mkdir()
    fail = 'case "$*" in *--counters*) ;; *) echo "injected failure" >&2; exit 3;; esac'
    for family in FAMILIES:
        name = RESTORE["iptables-nft"][family]
        write_wrapper(directory, name, shutil.which(name), fail if family == "ipv6" else "")
    from rules_helpers import finish_module, start_module
    result = finish_module(start_module(ns, tmp_path, path_dirs=[directory], **CONFIGS["kubevirt"]))
    assert result is not None and result.get("failed") is True, result
    assert ns.run(["nft", "list", "ruleset"]).stdout == ruleset
    assert os.path.isdir(state_dir(tmp_path))


def test_state_record_of_an_earlier_release_is_taken_over(netns_factory, tmp_path):
    """A capture applied by an earlier release of the module (no markers in
    the tables, its state record in state_dir): the next run writes the
    markers from that record (so the user's identical INVALID DROP stays the
    user's) and removes the record; absent then leaves the host as before,
    the nat table the capture created included."""
    import json
    ns = netns_factory("legrec")
    user = {"ipv4": "*mangle\n-A PREROUTING -m conntrack --ctstate INVALID -j DROP\nCOMMIT\n"
                    "*filter\n-A INPUT -s 203.0.113.9/32 -j ACCEPT\nCOMMIT\n"}
    restore(ns, "ipv4", user["ipv4"])
    before = saves(ns)
    ruleset = ns.run(["nft", "list", "ruleset"]).stdout
    opts = dict(CONFIGS["kubevirt"])
    opts["enable_inbound_ipv6"] = False
    ok(apply(ns, tmp_path, **opts))
    # What the earlier release left: the same rules, no marker, a record.
    from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_marker import MARKER_CHAIN
    from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_save import parse_save
    builtin = {}
    for table in ("raw", "mangle", "nat"):
        if MARKER_CHAIN in saves(ns)["ipv4"]:
            ns.run(["iptables-nft", "-t", table, "-F", MARKER_CHAIN], check=False)
            ns.run(["iptables-nft", "-t", table, "-X", MARKER_CHAIN], check=False)
    live = parse_save(saves(ns)["ipv4"])
    mine = parse_save(before["ipv4"])
    for name, table in live.items():
        for chain in ("PREROUTING", "OUTPUT"):
            specs = list(table.rules.get(chain, []))
            for spec in (mine[name].rules.get(chain, []) if name in mine else []):
                specs.remove(spec)
            if specs:
                builtin.setdefault(name, {})[chain] = specs
    assert builtin["mangle"]["PREROUTING"] == ["-m conntrack --ctstate INVALID -j DROP"]
    record = {"version": 1, "backend": "iptables-nft",
              "families": {"ipv4": {"builtin": builtin, "created_tables": ["nat"]},
                           "ipv6": {"builtin": {}, "created_tables": []}}}
    netns_id = ns.python("import os; st = os.stat('/proc/self/ns/net'); print('%d-%d' % (st.st_dev, st.st_ino))"
                         ).stdout.strip()
    path = os.path.join(state_dir(tmp_path), "netns-%s.json" % netns_id)
    with open(path, "w") as f:
        json.dump(record, f)
    assert MARKER_CHAIN not in saves(ns)["ipv4"]

    taken = ok(apply(ns, tmp_path, **opts))
    assert taken["changed"] is True and taken["added"] == taken["removed"] == []
    assert not os.path.exists(path), "the earlier release's record is left"
    assert ok(apply(ns, tmp_path, **opts))["changed"] is False
    assert ok(apply(ns, tmp_path, state="absent"))["changed"] is True
    assert_same(saves(ns), before)
    assert ns.run(["nft", "list", "ruleset"]).stdout == ruleset
