"""Execution-environment support: meta/execution-environment.yml, bindep.txt
and meta/ee-requirements.txt parse, and name every command the plugins
execute and every third-party Python module they import; galaxy.yml ships
them.

The commands are found in the code (every literal get_bin_path("name") and
the iptables binaries capture_apply.binary_names() gives for each backend,
plus unshare); the package that provides each command comes from the role's
own lists (roles/capture/vars/Debian.yml, RedHat.yml), so the role and the
EE cannot disagree.
"""

import ast
import fnmatch
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_apply import binary_names

REPO = Path(__file__).resolve().parents[2]
PLUGINS = REPO / "plugins"
EE_META = REPO / "meta" / "execution-environment.yml"

# Commands run that no literal get_bin_path()/which()/require() call names:
# unshare (the rules engine's scratch namespace), ip (the netns connection,
# from its option's default).
DYNAMIC_COMMANDS = {"unshare", "ip"}
# The legacy iptables tools on rpm systems come from iptables-legacy, which
# RHEL 9 and CentOS Stream 9 do not carry; an EE there uses iptables-nft (the
# backend 'auto' picks unless legacy tables already hold rules).
RPM_EXCEPTIONS = {"iptables-legacy-save", "iptables-legacy-restore", "ip6tables-legacy-save",
                  "ip6tables-legacy-restore"}


def python_files():
    return sorted(PLUGINS.rglob("*.py"))


def ee_meta():
    with open(EE_META) as f:
        return yaml.safe_load(f)


def parse_bindep(path):
    """{package: [profile, ...]} from a bindep file (one package per line,
    optional [profiles]; # comments)."""
    packages = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9.+_-]*)(?:\s+\[([^\]]*)\])?", line)
        assert match, "%s:%d: not a bindep line: %r" % (path.name, number, line)
        packages[match.group(1)] = (match.group(2) or "").split()
    return packages


def provided_on(packages, platform):
    """The packages installed on a platform ('dpkg', 'rpm', 'fedora')."""
    selected = set()
    for name, profiles in packages.items():
        wanted = [p for p in profiles if not p.startswith("!")]
        if not wanted or "platform:%s" % platform in wanted or (
                platform == "fedora" and "platform:rpm" in wanted):
            selected.add(name)
    return selected


def commands_executed():
    names = set(DYNAMIC_COMMANDS)
    for path in python_files():
        text = path.read_text()
        names.update(re.findall(r"\b(?:get_bin_path|which)\(\s*[\"']([^\"']+)[\"']", text))
        for listed in re.findall(r"\brequire\(\s*\[([^\]]*)\]", text):
            names.update(re.findall(r"[\"']([^\"']+)[\"']", listed))
    for backend in ("iptables-nft", "iptables-legacy"):
        for tools in binary_names(backend).values():
            names.update(tools)
    return names


def third_party_imports():
    stdlib = set(sys.stdlib_module_names)
    found = {}
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in stdlib and top not in ("ansible", "ansible_collections", "__future__"):
                    found.setdefault(top, set()).add(path.relative_to(REPO).as_posix())
    return found


def role_packages(family):
    with open(REPO / "roles" / "capture" / "vars" / ("%s.yml" % family)) as f:
        return yaml.safe_load(f)["__capture_package_of"]


def test_collection_metadata_names_the_files():
    meta = ee_meta()
    assert meta["version"] == 1
    assert set(meta["dependencies"]) == {"python", "system"}
    for path in meta["dependencies"].values():
        assert (REPO / path).is_file(), path


def test_python_requirements_name_every_third_party_import():
    lines = (REPO / ee_meta()["dependencies"]["python"]).read_text().splitlines()
    required = {re.split(r"[<>=!~;\[ ]", line.strip())[0].lower() for line in lines
                if line.strip() and not line.lstrip().startswith("#")}
    imports = third_party_imports()
    assert "pyroute2" in imports  # the routes module
    missing = {name: where for name, where in imports.items() if name.lower() not in required}
    assert not missing, "imported but not in %s: %s" % (ee_meta()["dependencies"]["python"], missing)


@pytest.mark.parametrize("platform, family", [("dpkg", "Debian"), ("rpm", "RedHat"), ("fedora", "RedHat")])
def test_bindep_provides_every_command_executed(platform, family):
    packages = provided_on(parse_bindep(REPO / ee_meta()["dependencies"]["system"]), platform)
    package_of = role_packages(family)
    commands = commands_executed()
    assert {"nft", "unshare", "ip", "iptables-nft-restore", "ip6tables-legacy-save"} <= commands
    missing = {}
    for command in sorted(commands):
        if platform != "dpkg" and command in RPM_EXCEPTIONS:
            continue
        assert command in package_of, "roles/capture/vars/%s.yml does not say which package has %s" % (family, command)
        if package_of[command] not in packages:
            missing[command] = package_of[command]
    assert not missing, "bindep.txt lacks, for platform:%s: %s" % (platform, missing)


def test_bindep_has_pyroute2_for_the_system_python_where_the_distribution_has_it():
    packages = parse_bindep(REPO / "bindep.txt")
    assert "python3-pyroute2" in provided_on(packages, "dpkg")
    assert "python3-pyroute2" in provided_on(packages, "fedora")
    assert "python3-pyroute2" not in provided_on(packages, "rpm")


def test_galaxy_build_ships_the_files():
    with open(REPO / "galaxy.yml") as f:
        ignore = yaml.safe_load(f).get("build_ignore") or []
    meta = ee_meta()
    for path in ["meta/execution-environment.yml"] + list(meta["dependencies"].values()):
        for pattern in ignore:
            assert not fnmatch.fnmatch(path, pattern) and not path.startswith(pattern.rstrip("/") + "/"), (
                "galaxy.yml build_ignore %r excludes %s" % (pattern, path))
    assert os.path.isfile(REPO / "bindep.txt")
