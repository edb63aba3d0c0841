"""Everything derived from the option table (plugins/module_utils/capture_options.py) agrees with it."""

import importlib.util
import os

import pytest
import yaml

from ansible_collections.meshcapture.sidecar.plugins.doc_fragments.capture import ModuleDocFragment
from ansible_collections.meshcapture.sidecar.plugins.module_utils import capture_config, capture_options
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_options import OPTIONS
from ansible_collections.meshcapture.sidecar.plugins.modules import rules

REPO = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _sync_script():
    spec = importlib.util.spec_from_file_location("sync_options", os.path.join(REPO, "scripts", "sync_options.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SYNC = _sync_script()


def _load(path):
    with open(os.path.join(REPO, path)) as f:
        return yaml.safe_load(f)


def test_names_are_unique():
    names = [o.name for o in OPTIONS]
    assert len(names) == len(set(names))


def test_argument_spec_is_the_table():
    assert rules.ARGUMENT_SPEC == capture_options.argument_spec()
    assert sorted(rules.ARGUMENT_SPEC) == sorted(o.name for o in OPTIONS)
    for option in OPTIONS:
        spec = rules.ARGUMENT_SPEC[option.name]
        assert spec["type"] == option.type
        assert spec.get("default") == option.default
        assert spec.get("choices") == option.choices
        assert spec.get("elements") == option.elements


def test_core_defaults_are_the_table():
    assert capture_config.DEFAULTS == dict((o.name, o.default) for o in OPTIONS if o.core)


def test_every_core_option_is_validated():
    """from_params sets an attribute for each core option and to_dict returns it."""
    cfg = capture_config.CaptureConfig.from_params({})
    assert sorted(cfg.to_dict()) == sorted(o.name for o in OPTIONS if o.core)


@pytest.mark.parametrize("option", OPTIONS, ids=[o.name for o in OPTIONS])
def test_module_documentation_is_the_table(option):
    """DOCUMENTATION is a literal (ansible-test validate-modules); it must say what the table says."""
    documented = yaml.safe_load(rules.DOCUMENTATION)["options"]
    documented.update(yaml.safe_load(ModuleDocFragment.DOCUMENTATION)["options"])
    assert documented[option.name] == option.documentation()


def test_module_documents_no_other_option():
    documented = set(yaml.safe_load(rules.DOCUMENTATION)["options"])
    documented |= set(yaml.safe_load(ModuleDocFragment.DOCUMENTATION)["options"])
    assert documented == set(o.name for o in OPTIONS)


def test_generated_files_are_current():
    """scripts/sync_options.py --check: the generated blocks match the table."""
    assert SYNC.main(["--check"]) == 0, "run python scripts/sync_options.py"


def test_role_argument_specs_are_the_table():
    specs = _load("roles/capture/meta/argument_specs.yml")["argument_specs"]["main"]["options"]
    wanted = SYNC.role_options()
    assert dict((name, specs[name]) for name in wanted) == wanted
    assert set("capture_" + o.name for o in OPTIONS if o.role) <= set(specs)
    # The role sets compact_result itself; its capture_state is the role's own (present/absent).
    assert "capture_compact_result" not in specs


def test_role_defaults_are_the_table():
    defaults = _load("roles/capture/defaults/main.yml")
    for option in OPTIONS:
        if option.role:
            assert defaults["capture_" + option.name] == option.role_default
    assert defaults["capture_istio_version"] == "auto"
    assert defaults["capture_host_ipv4_loopback_cidr"] is None
    assert defaults["capture_nft_layout"] is None


def test_release_bounds_are_supported_releases():
    from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_releases import SUPPORTED
    for option in OPTIONS:
        for bound in (option.first, option.last):
            assert bound is None or bound in SUPPORTED
