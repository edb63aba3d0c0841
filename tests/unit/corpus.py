"""Conformance corpora (Istio goldens of every release) as parametrize-ready cases.

Each corpus folder under fixtures/ is a copy of one conformance corpus: a
cases.yaml (`profile` with the release and the compare rule, `base`, `cases`)
and one <case>.golden per case.  The compare rules are those the cases.yaml
headers spell out:

- commands: `commands` joined with "\\n" == the golden, both stripped
  (istio-1.17 without a profile: exact).
- commands-without-save: the golden minus the lines `iptables-save` /
  `ip6tables-save`, stripped, == `commands` joined.
- restore-without-save: the golden minus those lines, stripped, == the lines
  of `restore.ipv4` followed by those of `restore.ipv6`, joined.
- nft-listing: needs nft and network namespaces (not a unit test).
"""

import os

import yaml

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SHARED_ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "conformance"))
SHARED = os.path.join(SHARED_ROOT, "istio-1.17")
SAVE_LINES = ("iptables-save", "ip6tables-save")


class Case(object):
    """One golden case: the module options and how to compare a rendering with the golden."""

    def __init__(self, corpus, name, options, golden, compare, backend=None, release=None):
        self.corpus = corpus
        self.release = release
        self.name = name
        self.options = options
        self.golden = golden
        self.compare = compare
        self.backend = backend

    @property
    def id(self):
        if self.release:
            return "%s@%s/%s" % (self.corpus, self.release, self.name)
        return "%s/%s" % (self.corpus, self.name)

    def expected(self):
        """The text a rendering must produce, per the compare rule."""
        if self.compare == "exact":
            return self.golden
        if self.compare == "commands":
            return self.golden.strip()
        if self.compare in ("commands-without-save", "restore-without-save"):
            return "\n".join(line for line in self.golden.splitlines() if line not in SAVE_LINES).strip()
        raise ValueError("no text compare for %s" % self.compare)

    def actual(self, rendered):
        """The text of a rendering (dict with commands and restore) to compare with expected()."""
        if self.compare == "exact":
            return "\n".join(rendered["commands"])
        if self.compare in ("commands", "commands-without-save"):
            return "\n".join(rendered["commands"]).strip()
        if self.compare == "restore-without-save":
            lines = rendered["restore"]["ipv4"].splitlines() + rendered["restore"]["ipv6"].splitlines()
            return "\n".join(lines).strip()
        raise ValueError("no text compare for %s" % self.compare)


def load_corpus(directory):
    """[Case] of a corpus directory."""
    with open(os.path.join(directory, "cases.yaml")) as f:
        corpus = yaml.safe_load(f)
    profile = corpus.get("profile") or {}
    compare = profile.get("compare", "exact")
    label = os.path.basename(directory)
    cases = []
    for name, overrides in corpus["cases"].items():
        options = dict(corpus["base"])
        options.update(overrides or {})
        if profile.get("istio_version"):
            options["istio_version"] = profile["istio_version"]
        with open(os.path.join(directory, name + ".golden")) as f:
            golden = f.read()
        cases.append(Case(label, name, options, golden, compare, profile.get("backend")))
    return cases


def corpus_dirs():
    """Every vendored corpus folder, oldest release first."""
    return [os.path.join(FIXTURES, name) for name in sorted(os.listdir(FIXTURES), key=_release_key)
            if os.path.isfile(os.path.join(FIXTURES, name, "cases.yaml"))]


def _release_key(name):
    parts = name.replace("istio-", "").replace("nft-", "").split("-", 1)
    major, minor = parts[0].split(".")
    return (int(major), int(minor), name)


def golden_cases(kind="iptables", every_release=False):
    """Every case of the iptables corpora (kind 'iptables') or of the nftables ones ('nft').

    every_release: also each case with every other release the corpus covers
    (its profile's `releases`), as istio_version.
    """
    out = []
    for directory in corpus_dirs():
        with open(os.path.join(directory, "cases.yaml")) as f:
            releases = (yaml.safe_load(f).get("profile") or {}).get("releases") or []
        for case in load_corpus(directory):
            if (case.compare == "nft-listing") != (kind == "nft"):
                continue
            out.append(case)
            if every_release:
                for release in releases:
                    if release != case.options.get("istio_version"):
                        out.append(Case(case.corpus, case.name, dict(case.options, istio_version=release),
                                        case.golden, case.compare, case.backend, release))
    return out


def load_cases(directory):
    """[(case name, options, expected command lines)] of a 1.17 corpus directory."""
    return [(c.name, c.options, c.golden.splitlines()) for c in load_corpus(directory)]


def all_cases():
    """The Istio 1.17 cases (no istio_version: the module's default release), as (id, options, lines)."""
    out = []
    for directory in corpus_dirs():
        for case in load_corpus(directory):
            if "istio_version" not in case.options and case.compare == "exact":
                out.append((case.id, case.options, case.golden.splitlines()))
    return out
