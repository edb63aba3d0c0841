"""Shared pytest fixtures: hermetic network namespaces (see tests/netns.py).

Tests that need namespaces are marked ``pytest.mark.netns``; they (and every
test using these fixtures) are skipped with the reason when this machine
cannot create namespaces (not root, no iproute2).
"""

import pytest

import netns  # tests/ is on sys.path (pytest.ini: pythonpath)

NETNS_UNAVAILABLE = netns.unavailable_reason()


def pytest_collection_modifyitems(items):
    if NETNS_UNAVAILABLE:
        skip = pytest.mark.skip(reason=NETNS_UNAVAILABLE)
        for item in items:
            if item.get_closest_marker("netns"):
                item.add_marker(skip)


@pytest.fixture
def topology():
    """A netns.Topology whose namespaces are all deleted at teardown."""
    if NETNS_UNAVAILABLE:
        pytest.skip(NETNS_UNAVAILABLE)
    with netns.Topology() as topo:
        yield topo


@pytest.fixture
def netns_factory(topology):
    """``make(tag="ns") -> netns.Netns``; deleted at teardown, also on failure."""
    return topology.netns


@pytest.fixture
def host_and_peer(topology):
    """(host, peer) namespaces joined by veth (see Topology.host_and_peer)."""
    return topology.host_and_peer()
