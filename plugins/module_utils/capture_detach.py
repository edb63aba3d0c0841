# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)
"""Run the write phase of a converge in a detached process.

The restores of one run (IPv4, IPv6, the rollback when one fails, the
removal of emptied tables) run in a child of the module that has left the
module's session (setsid) and holds no file of the module's output open.
Killing the module, its process group or its session (a task timeout, an
interrupted play) does not interrupt them: the child finishes the whole
sequence, and the lock it inherited stays held until it is done.  The
module waits for the child and gets its outcome back through a pipe.

An intent journal (state_dir/apply-<netns id>.json) is written before the
sequence starts and removed when it ends; a run that finds it (with the
lock held, so no apply runs) knows the previous apply was cut short (the
child itself was killed, or the machine went down) and reports it.

Pure Python, no Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import signal
import time

from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_config import ApplyError, CaptureError
from ansible_collections.meshcapture.sidecar.plugins.module_utils.capture_store import remove_quietly, write_atomic


def journal_path(state_dir, netns_id):
    return os.path.join(state_dir, "apply-%s.json" % netns_id)


def read_journal(path):
    """The journal of an apply that did not finish, or None."""
    try:
        with open(path) as f:
            return json.load(f)
    except (IOError, OSError, ValueError):
        return None


def remove_journal(path):
    remove_quietly(path)


def _encode_error(err):
    warnings = getattr(err, "warnings", None)
    if isinstance(err, ApplyError):
        return dict(kind="apply", msg=err.msg, cmd=err.cmd, rc=err.rc, stderr=err.stderr, warnings=warnings)
    if isinstance(err, CaptureError):
        return dict(kind="capture", msg=str(err), warnings=warnings)
    return dict(kind="crash", msg="%s: %s" % (type(err).__name__, err))


def _decode_error(data):
    if data["kind"] == "apply":
        err = ApplyError(data["msg"], cmd=data.get("cmd"), rc=data.get("rc"), stderr=data.get("stderr"))
    elif data["kind"] == "capture":
        err = CaptureError(data["msg"])
    else:
        err = ApplyError("the apply process failed: %s" % data["msg"])
    err.warnings = data.get("warnings")
    return err


def run_detached(fn, journal=None, intent=None):
    """fn() -> JSON-able value, run in a detached child; returns its value
    or raises the ApplyError / CaptureError it raised.

    journal: path of the intent journal (intent, a dict, is written there
    first and the file removed when fn returns or raises).
    """
    if journal:
        try:
            write_atomic(journal, json.dumps(dict(intent or {}, started=time.time())))
        except (IOError, OSError) as err:
            # err names the path: "<journal>: cannot write: <reason>".
            raise CaptureError("%s (the apply journal; nothing was changed)" % err)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(rfd)
            os.setsid()
            # A stop of the whole service or container (SIGTERM to every process, SIGKILL only after a
            # grace period) or a Ctrl-C does not cut the apply short: it and the restores it runs (an
            # ignored signal stays ignored across exec) finish, which takes seconds at most.
            for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_IGN)
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            try:
                out = dict(ok=fn())
            except BaseException as err:  # pylint: disable=broad-except  # reported to the parent
                out = dict(error=_encode_error(err))
            if journal:
                remove_journal(journal)
            data = json.dumps(out).encode("utf-8")
            try:
                while data:
                    data = data[os.write(wfd, data):]
            except OSError:
                pass  # the module is gone: nobody to tell
        except BaseException:  # pylint: disable=broad-except
            code = 1
        finally:
            os._exit(code)  # pylint: disable=protected-access
    os.close(wfd)
    chunks = []
    while True:
        chunk = os.read(rfd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(rfd)
    os.waitpid(pid, 0)
    try:
        out = json.loads(b"".join(chunks).decode("utf-8"))
    except ValueError:
        raise ApplyError("the apply process (pid %d) ended without a result: the tables may hold a partly "
                         "applied capture; the next run converges it" % pid)
    if "error" in out:
        raise _decode_error(out["error"])
    return out["ok"]
