"""The action meshcapture.sidecar.capture: which modules it runs, with which
arguments, and what it returns, for the cases the role meets (a fresh host, a
no-op re-run, drift, a mode switch, the guard, check mode, failures, an
uninstall); and its helpers (list joining, routes.env, the fingerprint of the
persisted files, run for real with /bin/sh on files in tmp_path).

The modules and the host's shell are replaced by fakes here: the real ones run
in tests/integration/test_role.py and the molecule scenarios.
"""

import hashlib
import os
import subprocess
from unittest import mock

import pytest

from ansible.errors import AnsibleActionFail

from ansible_collections.meshcapture.sidecar.plugins.action import capture
from ansible_collections.meshcapture.sidecar.plugins.action.capture import (
    ActionModule,
    compact_lists,
    fingerprint_script,
    host_script,
    istio_version,
    os_family,
    parse_host,
    routes_env,
    session_port,
    unchanged,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
ROUTES_MODULE = os.path.join(REPO, "plugins", "modules", "routes.py")

PERSIST_DIR = "/etc/meshcapture"
UNIT = "/etc/systemd/system/meshcapture-capture.service"
SCRIPT = "#!/bin/sh\necho restore\n"
UNIT_TEXT = "[Unit]\n"
RESTORE = {"ipv4": "*nat\nCOMMIT\n", "ipv6": "*nat\nCOMMIT\n"}
VM_OPTIONS = {"inbound_ports_include": "*", "inbound_ports_exclude": ["22", "15090"],
              "outbound_ip_ranges_include": "*", "enable_inbound_ipv6": True, "proxy_port": None}
WANTED_IPV6 = {"tproxy": False, "mark": 1337, "table": 133, "ipv6": True}
TPROXY_140 = {"tproxy": True, "mark": 1400, "table": 140, "ipv6": False}
ROUTING_DIGEST = "d" * 64


def sha(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    pytest.param({"outbound_ip_ranges_exclude": ["10.0.0.1/32", "10.0.0.2/32"]},
                 {"outbound_ip_ranges_exclude": "10.0.0.1/32,10.0.0.2/32"}, id="cidrs-joined"),
    pytest.param({"outbound_ports_exclude": ["1", "2", "3"], "inbound_ports_exclude": ["22", "15090"]},
                 {"outbound_ports_exclude": "1,2,3", "inbound_ports_exclude": "22,15090"}, id="ports-joined"),
    pytest.param({"outbound_ports_exclude": ["1,2", "3"]}, {"outbound_ports_exclude": ["1,2", "3"]},
                 id="item-with-comma-kept-so-the-module-rejects-it"),
    pytest.param({"outbound_ports_exclude": [1, 2]}, {"outbound_ports_exclude": [1, 2]}, id="non-strings-kept"),
    pytest.param({"outbound_ports_exclude": ["1"]}, {"outbound_ports_exclude": ["1"]}, id="single-item-kept"),
    pytest.param({"proxy_uid": ["1337", "1338"]}, {"proxy_uid": ["1337", "1338"]}, id="other-lists-kept"),
    pytest.param({"inbound_ports_include": "*"}, {"inbound_ports_include": "*"}, id="strings-kept"),
])
def test_compact_lists(args, expected):
    assert compact_lists(args) == expected


@pytest.mark.parametrize("backend, routes, expected", [
    pytest.param("iptables-nft", WANTED_IPV6, (
        "MESHCAPTURE_IPTABLES_BACKEND=iptables-nft\nMESHCAPTURE_TPROXY_ROUTES=false\nMESHCAPTURE_TPROXY_MARK=1337\n"
        "MESHCAPTURE_TPROXY_ROUTE_TABLE=133\nMESHCAPTURE_INBOUND_IPV6=true\n"), id="ipv6"),
    pytest.param("iptables-legacy", TPROXY_140, (
        "MESHCAPTURE_IPTABLES_BACKEND=iptables-legacy\nMESHCAPTURE_TPROXY_ROUTES=true\nMESHCAPTURE_TPROXY_MARK=1400\n"
        "MESHCAPTURE_TPROXY_ROUTE_TABLE=140\nMESHCAPTURE_INBOUND_IPV6=false\n"), id="tproxy"),
])
def test_routes_env(backend, routes, expected):
    # The same text the role's template wrote before, so that an upgrade rewrites nothing.
    assert routes_env(backend, routes) == (
        "# Managed by Ansible (meshcapture.sidecar.capture): the settings that\n"
        "# meshcapture-restore.sh restores at boot.\n" + expected)


FILES = [("/p/a", "alpha\n", "0644"), ("/p/b", "beta\n", "0755")]
GOOD = ["regular file|644|root|root|" + sha("alpha\n"), "regular file|755|root|root|" + sha("beta\n")]


@pytest.mark.parametrize("lines, expected", [
    pytest.param(GOOD, True, id="all-right"),
    pytest.param(["regular empty file|644|root|root|" + sha("")], True, id="empty-file"),
    pytest.param([GOOD[0], "regular file|755|root|root|" + sha("other\n")], False, id="content"),
    pytest.param([GOOD[0], "regular file|775|root|root|" + sha("beta\n")], False, id="mode"),
    pytest.param([GOOD[0], "regular file|755|nobody|root|" + sha("beta\n")], False, id="owner"),
    pytest.param([GOOD[0], "regular file|755|root|staff|" + sha("beta\n")], False, id="group"),
    pytest.param([GOOD[0], "symbolic link|777|root|root|" + sha("beta\n")], False, id="symlink"),
    pytest.param([GOOD[0], "-"], False, id="missing"),
    pytest.param(GOOD[:1], False, id="fewer-lines"),
    pytest.param([GOOD[0], "regular file|7x5|root|root|" + sha("beta\n")], False, id="garbage-mode"),
])
def test_unchanged(lines, expected):
    files = [("/p/a", "", "0644")] if lines[0].startswith("regular empty") else FILES
    assert unchanged(files, "root", "root", lines) is expected


@pytest.mark.parametrize("mode", ["0999", "", True, "07777777"])
def test_unchanged_leaves_bad_modes_to_persist(mode):
    assert not unchanged([("/p/a", "alpha\n", mode)], "root", "root", GOOD[:1])


def test_fingerprint_script_on_real_files(tmp_path):
    regular = tmp_path / "it's a file"
    regular.write_text("alpha\n")
    os.chmod(str(regular), 0o640)
    link = tmp_path / "link"
    link.symlink_to(regular)
    directory = tmp_path / "dir"
    directory.mkdir()
    empty = tmp_path / "empty"
    empty.write_text("")
    paths = [str(regular), str(link), str(tmp_path / "missing"), str(directory), str(empty)]
    out = subprocess.run(["/bin/sh", "-c", fingerprint_script(paths)], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == "#meshcapture-file persisted"
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    group = subprocess.run(["id", "-gn"], capture_output=True, text=True, check=True).stdout.strip()
    assert out[1] == "regular file|640|%s|%s|%s" % (user, group, sha("alpha\n"))
    assert out[2].startswith("symbolic link|777|")
    assert out[3:5] == ["-", "-"]
    assert out[6] in ("systemd=0", "systemd=1")
    assert unchanged([(paths[4], "", "0644")], user, group, out[5:6])
    assert unchanged([(paths[0], "alpha\n", "0640")], user, group, out[1:2])
    assert not unchanged([(paths[1], "alpha\n", "0777")], user, group, out[2:3])


# ---------------------------------------------------------------------------
# The action, with fake modules and a fake host shell
# ---------------------------------------------------------------------------

def host_output(cluster_env=None, routes_env_text=None, persisted=None, record=None, systemd=False, host=None,
                session=None):
    """What the read command prints: cluster.env, routes.env, the persisted files' fingerprint, the routing, and
    with host ({key: value}) the host section, with session the SSH session section."""
    out = ""
    for name, text in (("cluster.env", cluster_env), ("routes.env", routes_env_text)):
        out += "#meshcapture-file %s\n" % name + ("#meshcapture-missing\n" if text is None else text + "\n")
    if persisted is not None:
        out += "#meshcapture-file persisted\n" + "".join(line + "\n" for line in persisted)
        out += "systemd=%d\n" % int(systemd)
    out += "#meshcapture-file routing\n%s\n%s\n" % (ROUTING_DIGEST, record or "-")
    if host is not None:
        out += "#meshcapture-file host\n" + "".join("%s=%s\n" % item for item in host.items())
    if session is not None:
        out += "#meshcapture-file session\n%s\n" % session
    return out


def persisted_lines(routes=None, backend="iptables-nft"):
    """The fingerprint of persisted files that are exactly what the action writes."""
    texts = [RESTORE["ipv4"], RESTORE["ipv6"], routes_env(backend, routes or WANTED_IPV6), SCRIPT, UNIT_TEXT]
    modes = ["644", "644", "644", "755", "644"]
    return ["regular file|%s|root|root|%s" % (mode, sha(text)) for mode, text in zip(modes, texts)]


class Fake(object):
    """Runs the action with fake modules (results by module name) and a fake host shell."""

    def __init__(self, args, stdout, results=None, check_mode=False, diff=False, responses=None):
        self.calls = []
        self.commands = []
        self.stdout = stdout
        # {text in a command: the shell's result} for the commands after the read
        self.responses = responses or {}
        self.results = dict({
            "meshcapture.sidecar.rules": {"changed": False, "restore": dict(RESTORE), "backend": "iptables-nft",
                                          "commands": ["iptables -t nat -N ISTIO_INBOUND"], "config": {}},
            "meshcapture.sidecar.routes": {"changed": False, "added": [], "removed": []},
            "meshcapture.sidecar.persist": {"changed": True, "written": ["x"], "systemd_running": False},
        }, **(results or {}))
        task = mock.MagicMock()
        task.args = dict(args)
        task.async_val = 0
        task.check_mode = check_mode
        task.diff = diff
        connection = mock.MagicMock()
        connection._shell.tmpdir = None
        connection.get_option.return_value = None  # the connection plugin names no port
        loader = mock.MagicMock()
        loader.module_loader.find_plugin_with_context.return_value = mock.MagicMock(
            resolved=True, plugin_resolved_path=ROUTES_MODULE)
        self.action = ActionModule(task, connection, mock.MagicMock(), mock.MagicMock(), mock.MagicMock())
        self.action._shared_loader_obj = loader  # ActionBase takes the global plugin loader
        self.action._low_level_execute_command = self.shell
        self.action._execute_module = self.module
        self.action._templar = mock.MagicMock()
        self.action._templar.template.side_effect = lambda value: value

    def shell(self, cmd, executable=None, **kwargs):
        assert executable == "/bin/sh"
        self.commands.append(cmd)
        if cmd.startswith("r() {"):
            return {"rc": 0, "stdout": self.stdout, "stderr": ""}
        for text, result in self.responses.items():
            if text in cmd:
                return dict(result)
        return {"rc": 0, "stdout": "", "stderr": ""}

    def module(self, module_name=None, module_args=None, task_vars=None, **kwargs):
        self.calls.append((module_name, dict(module_args)))
        return dict(self.results[module_name])

    def run(self):
        return self.action.run(task_vars={})

    def modules(self):
        return [(name.rsplit(".", 1)[1], args.get("state")) for name, args in self.calls]

    def records(self):
        return [cmd for cmd in self.commands if "umask 077" in cmd]

    def systemctl(self):
        """The commands after the read that run systemctl."""
        return [cmd for cmd in self.commands[1:] if "systemctl" in cmd]


def present_args(**kwargs):
    args = {"state": "present", "options": dict(VM_OPTIONS), "cluster_env": None, "port": 22,
            "persist_dir": PERSIST_DIR, "persist_files": [{"name": "meshcapture-restore.sh", "content": SCRIPT,
                                                           "mode": "0755"}],
            "persist_extra_files": [{"path": UNIT, "content": UNIT_TEXT, "mode": "0644"}]}
    args.update(kwargs)
    return args


def routing_key(routes=None):
    fake = Fake(present_args(), host_output())
    return fake.action._routing_key(routes or WANTED_IPV6)


def test_fresh_host_runs_every_module_and_records_the_routing():
    fake = Fake(present_args(), host_output(persisted=["-"] * 5),
                {"meshcapture.sidecar.rules": {"changed": True, "restore": dict(RESTORE), "backend": "iptables-nft"},
                 "meshcapture.sidecar.routes": {"changed": True, "added": ["ip -6 addr: ::6/128 dev lo"]}})
    result = fake.run()
    assert fake.modules() == [("rules", "present"), ("routes", "present"), ("persist", "present")]
    rules_args = fake.calls[0][1]
    assert rules_args == {"state": "present", "inbound_ports_include": "*", "inbound_ports_exclude": "22,15090",
                          "outbound_ip_ranges_include": "*", "enable_inbound_ipv6": True,
                          "compact_result": True}
    assert fake.calls[1][1] == {"state": "present", "inbound_tproxy_mark": 1337, "inbound_tproxy_route_table": 133,
                                "manage_tproxy_routes": False, "enable_inbound_ipv6": True, "ipv6": True}
    persist_args = fake.calls[2][1]
    names = [f["name"] for f in persist_args["files"]]
    assert names == ["rules.v4", "rules.v6", "routes.env", "meshcapture-restore.sh"]
    assert persist_args["files"][2]["content"] == routes_env("iptables-nft", WANTED_IPV6)
    assert persist_args["extra_files"] == [{"path": UNIT, "content": UNIT_TEXT, "mode": "0644"}]
    assert (persist_args["path"], persist_args["owner"], persist_args["group"]) == (PERSIST_DIR, "root", "root")
    assert len(fake.records()) == 1 and routing_key() in fake.records()[0]
    assert result["changed"] is True
    assert result["backend"] == "iptables-nft" and result["restore"] == RESTORE
    assert result["routes"]["added"] == ["ip -6 addr: ::6/128 dev lo"]
    assert result["persisted"]["written"] == ["x"]
    assert result["plan"]["routes_wanted"] == WANTED_IPV6


def test_no_op_runs_only_rules():
    record = "%s %s" % (routing_key(), ROUTING_DIGEST)
    fake = Fake(present_args(), host_output(routes_env_text=routes_env("iptables-nft", WANTED_IPV6),
                                            persisted=persisted_lines(), record=record, systemd=True))
    result = fake.run()
    assert fake.modules() == [("rules", "present")]
    assert fake.records() == []
    assert result["changed"] is False
    assert result["routes"] == {"changed": False, "skipped_module": True, "added": [], "removed": []}
    assert result["persisted"] == {
        "changed": False, "path": PERSIST_DIR, "written": [], "removed": [], "systemd_running": True,
        "existing": [PERSIST_DIR + "/rules.v4", PERSIST_DIR + "/rules.v6", PERSIST_DIR + "/routes.env",
                     PERSIST_DIR + "/meshcapture-restore.sh", UNIT]}


def test_no_op_without_persistence_runs_only_rules():
    # No routes.env (capture_persist: false): nothing else to remove, the record decides.
    record = "%s %s" % (routing_key(), ROUTING_DIGEST)
    fake = Fake(present_args(persist=False), host_output(record=record))
    result = fake.run()
    assert fake.modules() == [("rules", "present")]
    assert "persisted" not in result and "persisted" not in fake.commands[0]


@pytest.mark.parametrize("record, persisted, modules", [
    pytest.param("%s %s" % ("0" * 64, ROUTING_DIGEST), None, [("rules", "present"), ("routes", "present")],
                 id="record-of-other-arguments"),
    pytest.param("KEY %s" % ("e" * 64), None, [("rules", "present"), ("routes", "present")],
                 id="routing-changed-since"),
    pytest.param("-", None, [("rules", "present"), ("routes", "present")], id="no-record"),
    pytest.param("KEY " + ROUTING_DIGEST, persisted_lines()[:4] + ["-"],
                 [("rules", "present"), ("persist", "present")], id="unit-file-gone"),
    pytest.param("KEY " + ROUTING_DIGEST, persisted_lines(backend="iptables-legacy"),
                 [("rules", "present"), ("persist", "present")], id="routes-env-differs"),
])
def test_drift_runs_the_module_it_concerns(record, persisted, modules):
    record = record.replace("KEY", routing_key())
    fake = Fake(present_args(), host_output(routes_env_text=routes_env("iptables-nft", WANTED_IPV6),
                                            persisted=persisted or persisted_lines(), record=record))
    fake.run()
    assert fake.modules() == modules


def test_mode_switch_removes_the_earlier_routing_first():
    options = dict(VM_OPTIONS, enable_inbound_ipv6=False)
    fake = Fake(present_args(options=options),
                host_output(routes_env_text=routes_env("iptables-nft", TPROXY_140), persisted=persisted_lines()))
    result = fake.run()
    assert fake.modules() == [("rules", "present"), ("routes", "absent"), ("persist", "present")]
    assert fake.calls[1][1] == {"state": "absent", "inbound_tproxy_mark": 1400, "inbound_tproxy_route_table": 140,
                                "manage_tproxy_routes": True, "enable_inbound_ipv6": False, "ipv6": False}
    assert "routes_removed" in result and "routes" not in result


def test_check_mode_records_nothing():
    fake = Fake(present_args(), host_output(persisted=["-"] * 5), check_mode=True)
    fake.run()
    assert fake.modules() == [("rules", "present"), ("routes", "present"), ("persist", "present")]
    assert fake.records() == []


def test_routes_warning_records_nothing():
    fake = Fake(present_args(), host_output(persisted=["-"] * 5),
                {"meshcapture.sidecar.routes": {"changed": False, "warnings": ["IPv6 is disabled on lo"]}})
    result = fake.run()
    assert fake.records() == []
    assert result["warnings"] == ["IPv6 is disabled on lo"]


@pytest.mark.parametrize("options, cluster_env, message", [
    pytest.param({"inbound_ports_include": "8080,22"}, None, (
        "capture_inbound_ports_include includes port 22 in the inbound capture, and Ansible is connected to this "
        "host on that port (ansible_port): capturing it would cut off this connection and every later one. "
        "Remove port 22 from capture_inbound_ports_include, or set capture_connection_guard to false if the "
        "connection does not go through that port."), id="explicit"),
    pytest.param({}, "ISTIO_INBOUND_PORTS='22'", (
        "ISTIO_INBOUND_PORTS in /e/cluster.env includes port 22 in the inbound capture, and Ansible is connected "
        "to this host on that port (ansible_port): capturing it would cut off this connection and every later "
        "one. Remove port 22 from ISTIO_INBOUND_PORTS in /e/cluster.env, or set capture_connection_guard to false "
        "if the connection does not go through that port."), id="cluster-env"),
])
def test_guard_refuses_before_any_module(options, cluster_env, message):
    fake = Fake(present_args(options=options, cluster_env="/e/cluster.env" if cluster_env else None),
                host_output(cluster_env=cluster_env))
    result = fake.run()
    assert fake.modules() == []
    assert result["failed"] is True and result["msg"] == message


def test_guard_off_lets_the_port_through():
    fake = Fake(present_args(options={"inbound_ports_include": "8080,22"}, connection_guard=False),
                host_output(persisted=["-"] * 5))
    fake.run()
    assert fake.calls[0][1]["inbound_ports_include"] == "8080,22"


def test_missing_cluster_env_fails_before_any_module():
    fake = Fake(present_args(cluster_env="/no/cluster.env"), host_output())
    with pytest.raises(AnsibleActionFail, match="^capture_cluster_env: /no/cluster.env does not exist on the host "
                                                "or cannot be read$"):
        fake.run()
    assert fake.modules() == []


def test_read_failure_is_reported():
    fake = Fake(present_args(), host_output())
    fake.action._low_level_execute_command = lambda cmd, **kw: {"rc": 127, "stdout": "", "stderr": "sh: not found"}
    with pytest.raises(AnsibleActionFail, match=r"^could not read \(no capture_cluster_env\) and /etc/meshcapture/"
                                                r"routes.env on the host \(rc=127\): sh: not found$"):
        fake.run()


@pytest.mark.parametrize("failing, modules, message", [
    pytest.param("meshcapture.sidecar.rules", [("rules", "present")], "bad option", id="rules"),
    pytest.param("meshcapture.sidecar.routes", [("rules", "present"), ("routes", "present")], "routes: bad option",
                 id="routes"),
    pytest.param("meshcapture.sidecar.persist", [("rules", "present"), ("routes", "present"), ("persist", "present")],
                 "persist: bad option", id="persist"),
])
def test_a_failing_module_stops_the_run(failing, modules, message):
    fake = Fake(present_args(), host_output(persisted=["-"] * 5), {failing: {"failed": True, "msg": "bad option"}})
    result = fake.run()
    assert fake.modules() == modules
    assert result["failed"] is True and result["msg"] == message


def test_plan_only_runs_no_module():
    fake = Fake(present_args(plan_only=True), host_output())
    result = fake.run()
    assert fake.modules() == []
    assert result == {"changed": False, "plan": result["plan"]}
    assert "routing" not in fake.commands[0] and "persisted" not in fake.commands[0]


@pytest.mark.parametrize("routes_env_text, removed", [
    pytest.param(None, [{"tproxy": True, "mark": 1337, "table": 133, "ipv6": False}], id="no-record"),
    pytest.param(routes_env("iptables-nft", TPROXY_140),
                 [{"tproxy": True, "mark": 1337, "table": 133, "ipv6": False}, TPROXY_140], id="recorded-routing"),
])
def test_absent_removes_rules_then_every_routing(routes_env_text, removed):
    fake = Fake({"state": "absent", "options": {"backend": "iptables-legacy", "state_dir": "/s", "proxy_port": 1},
                 "cluster_env": None, "persist_dir": PERSIST_DIR}, host_output(routes_env_text=routes_env_text),
                {"meshcapture.sidecar.rules": {"changed": True, "removed": ["x"], "backend": "iptables-legacy"}})
    result = fake.run()
    assert fake.calls[0] == ("meshcapture.sidecar.rules", {"state": "absent", "backend": "iptables-legacy",
                                                           "state_dir": "/s", "compact_result": True})
    assert [args for dummy, args in fake.calls[1:]] == [
        {"state": "absent", "inbound_tproxy_mark": item["mark"], "inbound_tproxy_route_table": item["table"],
         "manage_tproxy_routes": item["tproxy"], "enable_inbound_ipv6": item["ipv6"], "ipv6": True}
        for item in removed]
    assert result["changed"] is True and result["removed"] == ["x"]
    assert len(result["routes_removed"]) == len(removed)


def test_diffs_of_all_modules_are_returned():
    fake = Fake(present_args(), host_output(persisted=["-"] * 5),
                {"meshcapture.sidecar.rules": {"changed": True, "restore": dict(RESTORE), "backend": "iptables-nft",
                                               "diff": {"before": "a", "after": "b"}},
                 "meshcapture.sidecar.persist": {"changed": True, "diff": [{"before": "", "after": "c"}],
                                                 "systemd_running": False}})
    result = fake.run()
    assert result["diff"] == [{"before": "a", "after": "b"}, {"before": "", "after": "c"}]


def test_unknown_option_is_refused():
    fake = Fake(dict(present_args(), bogus=1), host_output())
    with pytest.raises(AnsibleActionFail, match="bogus"):
        fake.run()


def test_documented_options_match_the_argument_spec():
    import yaml
    from ansible_collections.meshcapture.sidecar.plugins.modules import capture as doc
    documented = yaml.safe_load(doc.DOCUMENTATION)["options"]
    assert sorted(documented) == sorted(capture.ARGUMENT_SPEC)
    for name, spec in capture.ARGUMENT_SPEC.items():
        assert documented[name]["type"] == spec["type"], name
        assert documented[name].get("default") == spec.get("default"), name


def test_nftables_backend_persists_the_nft_payload():
    restore = dict(RESTORE, nft="table inet istio-proxy-nat {}\n")
    fake = Fake(present_args(options=dict(VM_OPTIONS, backend="nftables")), host_output(persisted=["-"] * 6),
                {"meshcapture.sidecar.rules": {"changed": True, "restore": restore, "backend": "nftables"}})
    fake.run()
    files = fake.calls[-1][1]["files"]
    assert [f["name"] for f in files] == ["rules.v4", "rules.v6", "rules.nft", "routes.env", "meshcapture-restore.sh"]
    assert files[2]["content"] == restore["nft"]
    assert "MESHCAPTURE_IPTABLES_BACKEND=nftables\n" in files[3]["content"]
    assert fake.commands[0].count("/etc/meshcapture/rules.nft") == 1


def test_unreadable_routing_state_never_matches_a_record():
    # The read prints '-' for the digest when the ip command fails; a record '<key> -' must not skip routes.
    fake = Fake(present_args(persist=False), host_output())
    routing = "#meshcapture-file routing\n%s\n%s\n" % (ROUTING_DIGEST, "-")
    assert fake.stdout.endswith(routing)
    fake.stdout = fake.stdout[:-len(routing)] + "#meshcapture-file routing\n-\n%s -\n" % routing_key()
    fake.run()
    assert fake.modules() == [("rules", "present"), ("routes", "present")]
    assert '[ "$d" != - ]' in fake.records()[0]


# ---------------------------------------------------------------------------
# The conntrack primer: loaded by the read only where no NAT chain exists,
# removed at the end of the task only when the read loaded it
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("primer, removed", [("primed", True), ("-", False), (None, False)],
                         ids=["loaded", "nat-chain-present", "no-section"])
def test_primer_is_removed_only_when_the_read_loaded_it(primer, removed):
    out = host_output(persisted=["-"] * 5) + ("" if primer is None else "#meshcapture-file primer\n%s\n" % primer)
    fake = Fake(present_args(), out)
    fake.run()
    assert capture.PRIMER_SCRIPT in fake.commands[0]
    assert (capture.PRIMER_REMOVE in fake.commands) is removed
    if removed:
        assert fake.commands[-1] == capture.PRIMER_REMOVE


def test_primer_is_removed_when_the_rules_module_fails():
    out = host_output(persisted=["-"] * 5) + "#meshcapture-file primer\nprimed\n"
    fake = Fake(present_args(), out, {"meshcapture.sidecar.rules": {"failed": True, "msg": "boom"}})
    result = fake.run()
    assert result["failed"] and fake.modules() == [("rules", "present")]
    assert fake.commands[-1] == capture.PRIMER_REMOVE


def test_check_mode_neither_loads_nor_removes_the_primer():
    out = host_output(persisted=["-"] * 5) + "#meshcapture-file primer\nprimed\n"
    fake = Fake(present_args(), out, check_mode=True)
    fake.run()
    assert capture.PRIMER_SCRIPT not in fake.commands[0]
    assert capture.PRIMER_REMOVE not in fake.commands


@pytest.mark.parametrize("transport", ["local", "meshcapture.sidecar.netns"])
def test_no_primer_without_a_network_session(transport):
    fake = Fake(present_args(), host_output(persisted=["-"] * 5))
    fake.action._connection.transport = transport
    fake.run()
    assert capture.PRIMER_SCRIPT not in fake.commands[0]
    assert capture.PRIMER_REMOVE not in fake.commands


# ---------------------------------------------------------------------------
# The restore unit: enabled and started by the action where systemd runs,
# only what is not so already; check mode says what it would do
# ---------------------------------------------------------------------------

UNIT_NAME = "meshcapture-capture.service"


def unit_args(**kwargs):
    return present_args(systemd_unit=UNIT_NAME, **kwargs)


def test_check_mode_on_a_fresh_systemd_host_reports_the_unit_and_runs_no_systemctl():
    # The unit file does not exist yet (check mode writes nothing): asking systemd about it would fail.
    fake = Fake(unit_args(), host_output(persisted=["-"] * 5, systemd=True,
                                         host={"systemd": "1", "unit": "/inactive"}),
                {"meshcapture.sidecar.persist": {"changed": True, "written": [PERSIST_DIR + "/rules.v4", UNIT],
                                                 "systemd_running": True}},
                check_mode=True, diff=True)
    result = fake.run()
    assert not result.get("failed"), result
    assert fake.systemctl() == []
    assert result["changed"] is True
    assert result["unit"] == {"changed": True, "name": UNIT_NAME, "actions": ["daemon-reload", "enable", "start"],
                              "enabled": True, "active": True}
    assert result["diff"][-1] == {"before_header": UNIT_NAME + " (systemd)", "after_header": UNIT_NAME + " (systemd)",
                                  "before": "enabled: not-found\nactive: inactive\n",
                                  "after": "enabled: enabled\nactive: active\n"}


@pytest.mark.parametrize("unit_state, written, command", [
    pytest.param("/inactive", [UNIT], "systemctl daemon-reload && systemctl enable %s && systemctl start %s"
                 % (UNIT_NAME, UNIT_NAME), id="fresh-host"),
    pytest.param("disabled/inactive", [], "systemctl enable %s && systemctl start %s" % (UNIT_NAME, UNIT_NAME),
                 id="disabled"),
    pytest.param("enabled/inactive", [], "systemctl start %s" % UNIT_NAME, id="enabled-not-started"),
    pytest.param("enabled/active", [UNIT], "systemctl daemon-reload", id="unit-file-changed"),
    pytest.param("enabled/active", [PERSIST_DIR + "/rules.v4"], None, id="payload-changed"),
    pytest.param("enabled/active", [], None, id="as-it-should-be"),
])
def test_unit_gets_only_what_it_lacks_in_one_command(unit_state, written, command):
    fake = Fake(unit_args(), host_output(persisted=["-"] * 5, systemd=True,
                                         host={"systemd": "1", "unit": unit_state}),
                {"meshcapture.sidecar.persist": {"changed": bool(written), "written": written,
                                                 "systemd_running": True}})
    result = fake.run()
    assert fake.systemctl() == ([command] if command else [])
    assert result["unit"]["changed"] is bool(command)
    assert "reason" not in result["unit"]


def test_no_op_on_a_systemd_host_runs_only_rules_and_no_systemctl():
    record = "%s %s" % (routing_key(), ROUTING_DIGEST)
    fake = Fake(unit_args(), host_output(routes_env_text=routes_env("iptables-nft", WANTED_IPV6),
                                         persisted=persisted_lines(), record=record, systemd=True,
                                         host={"systemd": "1", "unit": "enabled/active"}))
    result = fake.run()
    assert fake.modules() == [("rules", "present")]
    assert fake.systemctl() == []
    assert result["changed"] is False
    assert UNIT_NAME in fake.commands[0] and "is-enabled" in fake.commands[0] and "is-active" in fake.commands[0]


def test_failing_systemctl_fails_the_task():
    fake = Fake(unit_args(), host_output(persisted=["-"] * 5, host={"systemd": "1", "unit": "enabled/inactive"}),
                responses={"systemctl start": {"rc": 1, "stdout": "", "stderr": "Job failed.\n"}})
    result = fake.run()
    assert result["failed"] is True
    assert result["msg"] == "systemctl start %s failed (rc=1): Job failed." % UNIT_NAME


@pytest.mark.parametrize("host, kwargs, reason", [
    pytest.param({"systemd": "0"}, {}, "systemd is not running on this host (no /run/systemd/system)", id="no-systemd"),
    pytest.param({"systemd": "1"}, {"systemd_enable": False}, "capture_systemd_enable is false", id="enable-false"),
])
def test_unit_not_enabled_says_why(host, kwargs, reason):
    fake = Fake(unit_args(**kwargs), host_output(persisted=["-"] * 5, host=host))
    result = fake.run()
    assert fake.systemctl() == []
    assert result["unit"] == {"changed": False, "name": UNIT_NAME, "actions": [], "reason": reason}


# ---------------------------------------------------------------------------
# The connection guard: the port of the SSH session the action runs in
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("session, port, excluded", [
    pytest.param("192.0.2.20 40000 192.0.2.10 2222", None, "22,15090,2222", id="session-only-ssh-config-port"),
    pytest.param("192.0.2.20 40000 192.0.2.10 2222", 2200, "22,15090,2222,2200", id="session-and-ansible-port"),
    pytest.param("192.0.2.20 40000 192.0.2.10 22", 22, "22,15090", id="same-port-once"),
    pytest.param("-", None, "22,15090", id="no-session-22"),
    pytest.param("garbage", 2200, "22,15090,2200", id="unreadable-session-ansible-port"),
])
def test_guard_protects_the_session_port(session, port, excluded):
    options = dict(VM_OPTIONS, enable_inbound_ipv6=False)
    fake = Fake(present_args(options=options, port=port), host_output(persisted=["-"] * 5, session=session))
    fake.run()
    assert fake.calls[0][1]["inbound_ports_exclude"] == excluded
    assert capture.SESSION_SCRIPT in fake.commands[0]


def test_guard_refuses_the_session_port_and_says_where_it_comes_from():
    fake = Fake(present_args(options={"inbound_ports_include": "8080,2222"}, port=None),
                host_output(session="192.0.2.20 40000 192.0.2.10 2222"))
    result = fake.run()
    assert fake.modules() == []
    assert result["msg"] == (
        "capture_inbound_ports_include includes port 2222 in the inbound capture, and Ansible is connected to this "
        "host on that port (the port of its SSH session, SSH_CONNECTION): capturing it would cut off this "
        "connection and every later one. Remove port 2222 from capture_inbound_ports_include, or set "
        "capture_connection_guard to false if the connection does not go through that port.")


def test_connection_plugin_port_is_guarded_when_ansible_port_is_unset():
    fake = Fake(present_args(options={"inbound_ports_include": "*"}, port=None), host_output(persisted=["-"] * 5))
    fake.action._connection.get_option.return_value = 2022
    fake.run()
    assert fake.calls[0][1]["inbound_ports_exclude"] == ["2022"]


@pytest.mark.parametrize("transport", ["local", "meshcapture.sidecar.netns"])
def test_no_session_lookup_without_a_network_session(transport):
    fake = Fake(present_args(options={"inbound_ports_include": "*"}, port=None), host_output(persisted=["-"] * 5))
    fake.action._connection.transport = transport
    fake.run()
    assert capture.SESSION_SCRIPT not in fake.commands[0]
    assert fake.calls[0][1]["inbound_ports_exclude"] == ["22"]


@pytest.mark.parametrize("text, expected", [
    ("192.0.2.20 40000 192.0.2.10 2222", 2222),
    ("2001:db8::20 40000 2001:db8::10 22", 22),
    ("192.0.2.20 40000 192.0.2.10", None),
    ("192.0.2.20 40000 192.0.2.10 ssh", None),
    ("192.0.2.20 40000 192.0.2.10 0", None),
    ("-", None),
    (None, None),
])
def test_session_port(text, expected):
    assert session_port(text) == expected


# ---------------------------------------------------------------------------
# boot_payload: what a boot restores, when the rules module returns it
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("rules_result, expected", [
    pytest.param({"restore": dict(RESTORE), "boot_payload": {"ipv4": "*nat\n# boot\nCOMMIT\n", "ipv6": ""}},
                 ["*nat\n# boot\nCOMMIT\n", ""], id="boot-payload-wins"),
    pytest.param({"restore": dict(RESTORE), "boot_payload": None}, [RESTORE["ipv4"], RESTORE["ipv6"]],
                 id="null-boot-payload-restore"),
    pytest.param({"restore": dict(RESTORE)}, [RESTORE["ipv4"], RESTORE["ipv6"]], id="restore"),
])
def test_persisted_payloads(rules_result, expected):
    fake = Fake(present_args(), host_output(persisted=["-"] * 5),
                {"meshcapture.sidecar.rules": dict(rules_result, changed=True, backend="iptables-nft")})
    fake.run()
    files = fake.calls[-1][1]["files"]
    assert [f["content"] for f in files[:2]] == expected


def test_boot_payload_nft_is_persisted_with_the_nftables_backend():
    boot = {"ipv4": "", "ipv6": "", "nft": "table inet istio-proxy-nat {}\n# boot\n"}
    fake = Fake(present_args(options=dict(VM_OPTIONS, backend="nftables")), host_output(persisted=["-"] * 6),
                {"meshcapture.sidecar.rules": {"changed": True, "restore": dict(RESTORE, nft="x"),
                                               "boot_payload": boot, "backend": "nftables"}})
    fake.run()
    files = fake.calls[-1][1]["files"]
    assert [(f["name"], f["content"]) for f in files[:3]] == [
        ("rules.v4", ""), ("rules.v6", ""), ("rules.nft", boot["nft"])]


# ---------------------------------------------------------------------------
# The Istio version: auto reads it on the host, an explicit one passes through
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("source, text, expected", [
    ("dpkg", "ii |1.26.2", "1.26"),
    ("dpkg", "ii |1:1.28.0-1", "1.28"),
    ("dpkg", "rc |1.26.2", None),
    ("dpkg", "ii |", None),
    ("rpm", "1.24.6", "1.24"),
    ("rpm", "package istio-sidecar is not installed", None),
    ("agent", "client version: 1.26.2", "1.26"),
    ("agent", 'client version: version.BuildInfo{Version:"1.27.1", GitRevision:"0123abc", '
              'GolangVersion:"go1.24.4", BuildStatus:"Clean", GitTag:"1.27.1"}', "1.27"),
    ("agent", "client version: 1.30-dev", "1.30"),
    ("agent", "Error: unknown command", None),
    ("agent", None, None),
])
def test_istio_version_of_each_source(source, text, expected):
    assert istio_version(source, text) == expected


@pytest.mark.parametrize("host, expected", [
    pytest.param({"istio_dpkg": "ii |1.26.2"}, {"version": "1.26", "source": "dpkg"}, id="dpkg"),
    pytest.param({"istio_rpm": "1.24.6"}, {"version": "1.24", "source": "rpm"}, id="rpm"),
    pytest.param({"istio_agent": "client version: 1.29.0"}, {"version": "1.29", "source": "agent"}, id="agent"),
    pytest.param({"istio_dpkg": "rc |1.20.0", "istio_agent": "client version: 1.22.3"},
                 {"version": "1.22", "source": "agent"}, id="dpkg-not-installed-agent"),
    pytest.param({}, {"version": "1.17", "source": "fallback"}, id="nothing-found-fallback"),
])
def test_auto_istio_version_is_passed_to_rules(host, expected):
    fake = Fake(present_args(istio_version="auto"), host_output(persisted=["-"] * 5, host=host))
    result = fake.run()
    assert "dpkg-query -W" in fake.commands[0] and "pilot-agent version" in fake.commands[0]
    assert fake.calls[0][1]["istio_version"] == expected["version"]
    assert result["plan"]["istio_version"] == expected


@pytest.mark.parametrize("value, passed", [("1.28.3", "1.28.3"), ("1.20", "1.20"), (None, None)])
def test_explicit_istio_version_passes_through(value, passed):
    fake = Fake(present_args(istio_version=value), host_output(persisted=["-"] * 5))
    fake.run()
    assert fake.calls[0][1].get("istio_version") == passed
    assert "dpkg-query" not in fake.commands[0]


# ---------------------------------------------------------------------------
# Dependencies: found missing by the first command, installed by the role
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("debian ", "Debian"), ("ubuntu debian", "Debian"), ("rocky rhel centos fedora", "RedHat"),
    ("fedora ", "RedHat"), ("arch ", "arch"), (" ", None), (None, None),
])
def test_os_family(text, expected):
    assert os_family(text) == expected


def test_missing_dependencies_stop_before_any_module():
    fake = Fake(present_args(install_dependencies=True),
                host_output(host={"os": "debian ", "python": "/usr/bin/python3", "missing": "pyroute2 nft"}))
    result = fake.run()
    assert fake.modules() == []
    assert result == {"changed": False, "plan": result["plan"], "missing_dependencies": ["pyroute2", "nft"]}
    assert result["plan"]["dependencies"] == {"missing": ["pyroute2", "nft"], "os_family": "Debian",
                                              "python": "/usr/bin/python3"}


def test_missing_dependencies_after_the_guard():
    fake = Fake(present_args(install_dependencies=True, options={"inbound_ports_include": "22"}),
                host_output(host={"os": "debian ", "python": "-", "missing": "pyroute2"}))
    result = fake.run()
    assert result["failed"] is True and "includes port 22" in result["msg"]


def test_nothing_missing_applies():
    fake = Fake(present_args(install_dependencies=True),
                host_output(persisted=["-"] * 5, host={"os": "debian ", "python": "/usr/bin/python3", "missing": ""}))
    fake.action._task.args["options"] = dict(VM_OPTIONS, backend="iptables-legacy")
    result = fake.run()
    assert fake.modules()[0] == ("rules", "present")
    assert "missing_dependencies" not in result
    assert "iptables-legacy-restore" in fake.commands[0] and "iptables-nft-restore" not in fake.commands[0]


# ---------------------------------------------------------------------------
# systemd-networkd: the drop-in that keeps the TPROXY policy rules
# ---------------------------------------------------------------------------

NETWORKD_DIR = "/etc/systemd/networkd.conf.d"
DROPIN = NETWORKD_DIR + "/meshcapture-capture.conf"
TPROXY = {"tproxy": True, "mark": 1337, "table": 133, "ipv6": False}
TPROXY_OPTIONS = dict(VM_OPTIONS, enable_inbound_ipv6=False, inbound_interception_mode="TPROXY")


def networkd_args(**kwargs):
    return present_args(options=dict(TPROXY_OPTIONS), networkd_conf_dir=NETWORKD_DIR, **kwargs)


def networkd_host(networkd="enabled/active", conf_dir="1"):
    return {"systemd": "1", "networkd": networkd, "networkd_dir": conf_dir}


def test_networkd_dropin_is_persisted_with_tproxy_where_networkd_is_in_use():
    fake = Fake(networkd_args(), host_output(persisted=["-"] * 6, host=networkd_host()))
    result = fake.run()
    persist = fake.calls[-1][1]
    assert persist["extra_files"][-1] == {"path": DROPIN, "mode": "0644",
                                          "content": capture.NETWORKD_DROPIN % (1337, 133)}
    assert "ManageForeignRoutingPolicyRules=no\n" in persist["extra_files"][-1]["content"]
    assert persist["files"][2]["content"] == routes_env("iptables-nft", TPROXY, (DROPIN, False))
    assert "MESHCAPTURE_NETWORKD_DROPIN=%s\nMESHCAPTURE_NETWORKD_DROPIN_DIR_CREATED=false\n" % DROPIN \
        in persist["files"][2]["content"]
    assert not [cmd for cmd in fake.commands if cmd.startswith("mkdir")]
    assert result["changed"] is True


def test_networkd_dropin_directory_is_created_when_missing():
    fake = Fake(networkd_args(), host_output(persisted=["-"] * 6, host=networkd_host(conf_dir="0")))
    fake.run()
    mkdir = [cmd for cmd in fake.commands if cmd.startswith("mkdir")]
    assert mkdir == ["mkdir -p -m 0755 -- " + NETWORKD_DIR]
    assert fake.commands.index(mkdir[0]) > 0
    persist = fake.calls[-1][1]
    assert persist["extra_files"][-1]["path"] == DROPIN
    assert "MESHCAPTURE_NETWORKD_DROPIN_DIR_CREATED=true\n" in persist["files"][2]["content"]


def test_networkd_dropin_in_check_mode_with_the_directory_missing():
    fake = Fake(networkd_args(), host_output(persisted=["-"] * 6, host=networkd_host(conf_dir="0")),
                check_mode=True, diff=True)
    result = fake.run()
    assert not [cmd for cmd in fake.commands if cmd.startswith("mkdir")]
    assert [f["path"] for f in fake.calls[-1][1]["extra_files"]] == [UNIT]
    assert result["changed"] is True
    assert {"before_header": DROPIN, "after_header": DROPIN, "before": "",
            "after": capture.NETWORKD_DROPIN % (1337, 133)} in result["diff"]


@pytest.mark.parametrize("options, host", [
    pytest.param(dict(VM_OPTIONS), networkd_host(), id="redirect"),
    pytest.param(dict(TPROXY_OPTIONS), networkd_host(networkd="disabled/inactive"), id="networkd-not-in-use"),
    pytest.param(dict(TPROXY_OPTIONS), {"systemd": "0", "networkd_dir": "1"}, id="no-systemd"),
])
def test_no_networkd_dropin(options, host):
    fake = Fake(present_args(options=options, networkd_conf_dir=NETWORKD_DIR),
                host_output(persisted=["-"] * 6, host=host))
    fake.run()
    assert [f["path"] for f in fake.calls[-1][1]["extra_files"]] == [UNIT]
    assert "NETWORKD" not in fake.calls[-1][1]["files"][2]["content"]


def test_networkd_dropin_unchanged_runs_no_persist():
    routes = routes_env("iptables-nft", TPROXY, (DROPIN, True))
    record = "%s %s" % (routing_key(TPROXY), ROUTING_DIGEST)
    texts = [RESTORE["ipv4"], RESTORE["ipv6"], routes, SCRIPT, UNIT_TEXT, capture.NETWORKD_DROPIN % (1337, 133)]
    modes = ["644", "644", "644", "755", "644", "644"]
    prints = ["regular file|%s|root|root|%s" % (mode, sha(text)) for mode, text in zip(modes, texts)]
    fake = Fake(networkd_args(), host_output(routes_env_text=routes, persisted=prints, record=record,
                                             host=networkd_host()))
    result = fake.run()
    assert fake.modules() == [("rules", "present")]
    assert result["changed"] is False


@pytest.mark.parametrize("created, rmdir", [(True, True), (False, False)], ids=["dir-created", "dir-was-there"])
def test_networkd_dropin_goes_when_tproxy_goes(created, rmdir):
    routes = routes_env("iptables-nft", TPROXY, (DROPIN, created))
    fake = Fake(present_args(options=dict(VM_OPTIONS, enable_inbound_ipv6=False), networkd_conf_dir=NETWORKD_DIR),
                host_output(routes_env_text=routes, persisted=["-"] * 6, host=networkd_host()),
                responses={"rm -f": {"rc": 0, "stdout": "present\n", "stderr": ""}})
    result = fake.run()
    removal = [cmd for cmd in fake.commands if "rm -f" in cmd]
    assert len(removal) == 1 and ("rmdir -- " + NETWORKD_DIR in removal[0]) is rmdir
    assert result["networkd_removed"] == {"changed": True, "path": DROPIN}


def test_uninstall_removes_the_recorded_networkd_dropin():
    routes = routes_env("iptables-nft", TPROXY, (DROPIN, True))
    fake = Fake({"state": "absent", "options": {}, "cluster_env": None, "persist_dir": PERSIST_DIR},
                host_output(routes_env_text=routes), responses={"rm -f": {"rc": 0, "stdout": "present\n",
                                                                          "stderr": ""}})
    result = fake.run()
    assert [cmd for cmd in fake.commands if "rm -f" in cmd] == [
        "if [ -e %s ]; then rm -f -- %s && echo present; fi; rmdir -- %s 2>/dev/null; true"
        % (DROPIN, DROPIN, NETWORKD_DIR)]
    assert result["networkd_removed"] == {"changed": True, "path": DROPIN}
    assert result["changed"] is True


def test_uninstall_in_check_mode_only_looks_at_the_dropin():
    routes = routes_env("iptables-nft", TPROXY, (DROPIN, True))
    fake = Fake({"state": "absent", "options": {}, "cluster_env": None, "persist_dir": PERSIST_DIR},
                host_output(routes_env_text=routes), check_mode=True,
                responses={"if [ -e": {"rc": 0, "stdout": "present\n", "stderr": ""}})
    result = fake.run()
    assert [cmd for cmd in fake.commands[1:] if DROPIN in cmd] == ["if [ -e %s ]; then echo present; fi; true"
                                                                   % DROPIN]
    assert result["networkd_removed"]["changed"] is True


# ---------------------------------------------------------------------------
# The host section of the read, run for real with /bin/sh
# ---------------------------------------------------------------------------

def test_host_script_on_this_machine(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    agent = fake_bin / "pilot-agent"
    agent.write_text("#!/bin/sh\necho 'client version: 1.26.2'\n")
    agent.chmod(0o755)
    conf_dir = tmp_path / "networkd.conf.d"
    script = host_script(networkd_dir=str(conf_dir), python="/no/such/python", python_candidates=["python3"],
                         commands=["sh", "meshcapture-no-such-command"], istio=True)
    env = dict(os.environ, PATH="%s:%s" % (fake_bin, os.environ["PATH"]))
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, check=True, env=env).stdout
    assert out.splitlines()[0] == "#meshcapture-file host"
    host = parse_host("\n".join(out.splitlines()[1:]))
    assert host["systemd"] in ("0", "1")
    assert host["networkd_dir"] == "0"
    assert host["python"] == "/no/such/python"
    assert host["missing"].split() == ["pyroute2", "meshcapture-no-such-command"]
    if not subprocess.run(["sh", "-c", "command -v dpkg-query || command -v rpm"], capture_output=True,
                          check=False).stdout:
        assert host["istio_agent"] == "client version: 1.26.2"
    conf_dir.mkdir()
    out = subprocess.run(["/bin/sh", "-c", host_script(networkd_dir=str(conf_dir))], capture_output=True, text=True,
                         check=True).stdout
    assert "networkd_dir=1" in out.splitlines()


def test_check_mode_with_missing_dependencies_shows_the_rendered_ruleset():
    # A fresh host that lacks iptables and pyroute2: check mode installs nothing, and the modules that read the
    # host could not run; the rules are rendered (which needs nothing on the host), persist and the unit are
    # looked at as usual.
    fake = Fake(unit_args(install_dependencies=True, options=dict(TPROXY_OPTIONS)),
                host_output(persisted=["-"] * 5, systemd=True,
                            host={"systemd": "1", "unit": "/inactive", "os": "debian ", "python": "/usr/bin/python3",
                                  "missing": "pyroute2 iptables-nft-save"}),
                {"meshcapture.sidecar.rules": {"changed": False, "restore": dict(RESTORE), "backend": "iptables-nft",
                                               "commands": ["iptables -t nat -N ISTIO_INBOUND",
                                                            "iptables -t nat -A PREROUTING -p tcp -j ISTIO_INBOUND"]},
                 "meshcapture.sidecar.persist": {"changed": True, "written": [UNIT], "systemd_running": True}},
                check_mode=True, diff=True)
    result = fake.run()
    assert fake.modules() == [("rules", "rendered"), ("persist", "present")]
    assert not result.get("failed") and result["changed"] is True
    assert result["missing_dependencies"] == ["pyroute2", "iptables-nft-save"]
    assert result["diff"][0] == {
        "before_header": "capture rules (not read: pyroute2, iptables-nft-save missing on the host)",
        "after_header": "capture rules", "before": "",
        "after": "iptables -t nat -N ISTIO_INBOUND\niptables -t nat -A PREROUTING -p tcp -j ISTIO_INBOUND\n"}
    assert result["routes"]["skipped_module"] is True
    assert result["unit"]["actions"] == ["daemon-reload", "enable", "start"]
    assert fake.systemctl() == []


def test_auto_istio_version_the_rules_do_not_have_fails_before_any_module():
    fake = Fake(present_args(istio_version="auto"), host_output(persisted=["-"] * 5,
                                                                host={"istio_agent": "client version: 1.99.0"}))
    with pytest.raises(AnsibleActionFail, match=r"^capture_istio_version: auto found Istio 1\.99 on the host "
                                                r"\(pilot-agent version\), whose capture rules this collection does "
                                                r"not have \(supported: 1\.17, .*, 1\.30\); set capture_istio_version "
                                                r"to the release whose rules to apply$"):
        fake.run()
    assert fake.modules() == []
