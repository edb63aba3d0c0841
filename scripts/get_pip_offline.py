"""Offline stand-in for get-pip.py, used by `ansible-test sanity --requirements`.

ansible-test bootstraps pip in its virtual environments with a get-pip.py it
downloads from a host this machine cannot reach; scripts/test.sh puts this
file in ansible-test's cache instead. It installs pip with ensurepip, then
runs `pip install` with the arguments ansible-test gave (minus get-pip's own
options), so the packages still come from the configured package index.
"""

import subprocess
import sys

GET_PIP_ONLY = ("--no-setuptools", "--no-wheel")

subprocess.check_call([sys.executable, "-m", "ensurepip", "--default-pip"])
args = [a for a in sys.argv[1:] if a not in GET_PIP_ONLY]
subprocess.check_call([sys.executable, "-m", "pip", "install"] + args)
