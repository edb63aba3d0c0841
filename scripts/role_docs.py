"""Write docs/role-variables.md from the role's meta/argument_specs.yml.

Run:  python scripts/role_docs.py           (rewrites the page)
      python scripts/role_docs.py --check   (exit 1 when the page is stale)
"""

import os
import re
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = os.path.join(REPO, "roles", "capture", "meta", "argument_specs.yml")
DEFAULTS = os.path.join(REPO, "roles", "capture", "defaults", "main.yml")
PAGE = os.path.join(REPO, "docs", "role-variables.md")

HEADER = """\
# Variables of the role meshcapture.sidecar.capture

Generated from `roles/capture/meta/argument_specs.yml` by
`python scripts/role_docs.py`; edit the specs, not this page.

Variables named after an option of `meshcapture.sidecar.rules` default to
null: the value from `capture_cluster_env` if the file has one, otherwise the
module's default. A value you set wins.

| variable | type | default | description |
|---|---|---|---|
"""


def _plain(text):
    """Ansible doc markup (C(x), V(x), O(x), E(x), M(x), P(x#y)) as Markdown."""
    text = re.sub(r"\b[CVOEP]\(([^)]*)\)", r"`\1`", text)
    text = re.sub(r"\bM\(([^)]*)\)", r"`\1`", text)
    return text.replace("|", "\\|").replace("\n", " ")


def render():
    with open(SPECS) as f:
        options = yaml.safe_load(f)["argument_specs"]["main"]["options"]
    with open(DEFAULTS) as f:
        defaults = yaml.safe_load(f) or {}
    rows = []
    for name, spec in options.items():
        description = spec.get("description", "")
        if isinstance(description, list):
            description = " ".join(description)
        kind = spec.get("type", "str")
        if kind == "list":
            kind = "list of %s" % spec.get("elements", "str")
        default = defaults.get(name, spec.get("default"))
        shown = "null" if default is None else default
        rows.append("| `%s` | %s | `%s` | %s |" % (name, kind, shown, _plain(description)))
    return HEADER + "\n".join(rows) + "\n"


def main(argv):
    page = render()
    if "--check" in argv:
        with open(PAGE) as f:
            return 0 if f.read() == page else 1
    with open(PAGE, "w") as f:
        f.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
