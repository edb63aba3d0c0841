"""The rules module's restore payloads are accepted by the real iptables.

Every case of the istio-1.17 corpora (tests/unit/corpus.py) is rendered by
the module (state=rendered, run inside a namespace of this test), and each
payload (IPv4 and IPv6) goes through ``iptables-*-restore --test`` and then a
real ``--noflush`` restore, both backends, inside ``unshare --net`` (a scratch
namespace that disappears with the command; never the machine's own).

Owner names the iptables owner match must resolve: the corpora use group
names ('java', 'ftp') that may not exist here.  Nothing is created on the
machine; a missing name is replaced by a numeric id in the rendered options
(see SUBSTITUTES), which the test ids do not show.
"""

import grp
import pwd
from concurrent.futures import ThreadPoolExecutor

import pytest

import netns
from rules_helpers import RESTORE, apply, ok
from tests.unit.corpus import all_cases

pytestmark = pytest.mark.netns

CASES = all_cases()
BACKENDS = ("iptables-nft", "iptables-legacy")
FAMILIES = ("ipv4", "ipv6")
OWNER_OPTIONS = {"proxy_uid": pwd.getpwnam, "proxy_gid": grp.getgrnam,
                 "owner_groups_include": grp.getgrnam, "owner_groups_exclude": grp.getgrnam}
SUBSTITUTES = {}  # missing name -> numeric id used instead (filled while rendering)


def _exists(lookup, name):
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def substitute_missing_owners(options):
    """Options with owner names unknown on this machine replaced by numeric ids."""
    out = dict(options)
    for option, lookup in OWNER_OPTIONS.items():
        values = out.get(option)
        if not values or values == ["*"]:
            continue
        replaced = []
        for value in values:
            if not str(value).isdigit() and not _exists(lookup, value):
                value = SUBSTITUTES.setdefault(value, str(60000 + len(SUBSTITUTES)))
            replaced.append(value)
        out[option] = replaced
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """{case name: (options, result)} rendered by the module, a few at a time."""
    tmp = tmp_path_factory.mktemp("rendered")
    with netns.Netns("render") as ns:
        cases = [(name, substitute_missing_owners(options)) for name, options, dummy in CASES]

        def render(case):
            name, options = case
            return name, (options, ok(apply(ns, tmp, state="rendered", **options)))
        with ThreadPoolExecutor(2) as pool:
            return dict(pool.map(render, cases))


def scratch_restore(backend, family, payload):
    """--test, then a real restore, in a scratch namespace; returns (rc, rules in the save, stderr)."""
    restore = RESTORE[backend][family]
    save = restore.replace("-restore", "-save")
    script = ('printf %s "$3" | "$1" -w 5 --noflush --test && printf %s "$3" | "$1" -w 5 --noflush '
              '&& "$2"')
    proc = netns.run(["unshare", "--net", "--", "/bin/sh", "-c", script, "sh", restore, save, payload], check=False)
    rules = [line for line in proc.stdout.splitlines() if line.startswith("-A ")]
    return proc.returncode, rules, proc.stderr


IDS = [(name, family, backend) for name, dummy, dummy in CASES for family in FAMILIES for backend in BACKENDS]


@pytest.mark.parametrize("name, family, backend", IDS, ids=["%s-%s-%s" % i for i in IDS])
def test_restore_payload_is_accepted(rendered, name, family, backend):
    options, result = rendered[name]
    payload = result["restore"][family]
    if family == "ipv6" and not options.get("enable_inbound_ipv6"):
        assert payload == "", "IPv6 rules without enable_inbound_ipv6"
        return
    assert payload
    rc, rules, stderr = scratch_restore(backend, family, payload)
    assert rc == 0, stderr
    # Every rule of the payload is in the kernel afterwards.
    wanted = [line for line in payload.splitlines() if line.startswith(("-A ", "-I "))]
    assert len(rules) == len(wanted)
    # ...and the module's commands for this family are the same rules.
    prefix = "iptables " if family == "ipv4" else "ip6tables "
    assert len([c for c in result["commands"] if c.startswith(prefix) and " -N " not in c]) == len(wanted)
