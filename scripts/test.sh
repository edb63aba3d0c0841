#!/usr/bin/env bash
# The whole test suite (CI runs it through .ci/run). Sets everything up on a
# fresh machine first, then runs, in order: ansible-test sanity, ansible-lint,
# every molecule scenario, the compatibility matrix (reduced; scripts/matrix.sh
# --full for all of it), pytest (unit + real-kernel integration tests), and
# the real-VM scenario.
# Every stage runs even when an earlier one failed; the exit status is
# non-zero when any failed. Arguments go to pytest and skip the other
# stages, e.g.:  bash scripts/test.sh tests/unit -k golden
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
. scripts/env.sh

failed=()
stage() {
    local name="$1"
    shift
    printf '\n=== %s\n' "$name"
    local start=$SECONDS
    if "$@"; then
        printf '=== %s: ok (%ss)\n' "$name" "$((SECONDS - start))"
    else
        printf '=== %s: FAILED (%ss)\n' "$name" "$((SECONDS - start))"
        failed+=("$name")
    fi
}

sanity() {
    # ansible-test needs the collection at a real .../ansible_collections/NS/NAME
    # path, outside this git checkout (inside it, ansible-test would list the
    # checkout's files instead): test a copy of the tracked and new files.
    local root
    root="$(mktemp -d "${TMPDIR:-/tmp}/meshcapture-sanity.XXXXXX")"
    local tree="$root/ansible_collections/meshcapture/sidecar"
    mkdir -p "$tree"
    git ls-files -co --exclude-standard -z | tar -cf - --null -T - | tar -xf - -C "$tree"
    # ansible-test fetches get-pip.py from a host this machine cannot reach;
    # give it an offline stand-in (ensurepip, then pip install from PyPI).
    local getpip="${HOME:-/root}/.ansible/test/cache/get_pip_24_2.py"
    if [ ! -s "$getpip" ]; then
        mkdir -p "$(dirname "$getpip")"
        cp "$REPO/scripts/get_pip_offline.py" "$getpip"
    fi
    local status=0
    (cd "$tree" && ansible-test sanity --python "$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
        --requirements --color no) || status=$?
    rm -rf "$root"
    return "$status"
}

if [ "$#" -eq 0 ]; then
    stage "ansible-test sanity" sanity
    stage "ansible-lint (production profile)" ansible-lint --offline
    # molecule/vm boots a real VM: the VM stage below covers it (and more).
    stage "molecule test --all" molecule test --all --exclude vm
    stage "compatibility matrix (reduced)" bash scripts/matrix.sh
fi
stage "pytest" python -m pytest "$@"

# Real VMs (tests/integration/test_vm.py): Debian images built once with
# debootstrap and cached outside the repository, booted by qemu (KVM when it
# works, else TCG) on a tap device inside a namespace the tests create.
# MESHCAPTURE_VM_RELEASES=bookworm,trixie adds Debian 13; CI runs Debian 12.
vm_stage() {
    bash scripts/vm/setup-host.sh || return 1
    local release
    for release in $(printf '%s' "${MESHCAPTURE_VM_RELEASES:-bookworm}" | tr ',' ' '); do
        bash scripts/vm/build-image.sh "$release" >/dev/null || return 1
    done
    MESHCAPTURE_VM_TESTS=1 python -m pytest tests/integration/test_vm.py -p no:cacheprovider
}
if [ "$#" -eq 0 ]; then
    stage "real VMs (Debian ${MESHCAPTURE_VM_RELEASES:-bookworm})" vm_stage
fi

printf '\n'
if [ "${#failed[@]}" -gt 0 ]; then
    printf 'FAILED stages: %s\n' "${failed[*]}"
    exit 1
fi
printf 'all stages passed\n'
