"""Conformance corpora (istio-1.17 goldens) as parametrize-ready cases."""

import os

import yaml

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SHARED = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared",
                                       "conformance", "istio-1.17"))


def load_cases(directory):
    """[(case name, options, expected command lines)] of a corpus directory."""
    with open(os.path.join(directory, "cases.yaml")) as f:
        corpus = yaml.safe_load(f)
    cases = []
    for name, overrides in corpus["cases"].items():
        options = dict(corpus["base"])
        options.update(overrides or {})
        with open(os.path.join(directory, name + ".golden")) as f:
            expected = f.read().splitlines()
        cases.append((name, options, expected))
    return cases


def corpus_dirs():
    """The vendored corpora: the shared 20 cases, plus extra istio 1.17 cases when present."""
    dirs = [os.path.join(FIXTURES, "istio-1.17")]
    extra = os.path.join(FIXTURES, "istio-1.17-extra")
    if os.path.isdir(extra):
        dirs.append(extra)
    return dirs


def all_cases():
    out = []
    for directory in corpus_dirs():
        label = os.path.basename(directory)
        out.extend(("%s/%s" % (label, name), options, expected) for name, options, expected in load_cases(directory))
    return out
