"""Named fault points for the kill tests: with ``KDCTL_FAULT=NAME`` (or ``NAME@N`` for the N-th time it is
reached) the process SIGKILLs itself there, exactly as a power cut or the OOM killer would stop it;
``NAME[@N]:TERM``, ``:INT`` or ``:HUP`` sends that signal instead (a cancelled CI job, Ctrl-C, a closed terminal).
Also the record of the signals the running command received (:func:`signalled`)."""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}

# The signals that came during the running command (kdctl's CLI records SIGINT, SIGTERM and SIGHUP). A native
# library that runs Python code (OpenVINO's PyTorch frontend, ONNX Runtime, NNCF) can catch the KeyboardInterrupt
# raised there and raise its own error instead (OpenVINO: "RuntimeError: Check 'false' failed ...
# KeyboardInterrupt"); code that catches a library's errors and carries on asks :func:`signalled` first, so such
# an error is not taken for the library's own failure.
_signalled: list[int] = []


def record_signal(signum: int) -> None:
    _signalled.append(int(signum))


def signalled() -> int | None:
    """The last signal that came during this command, or None."""
    return _signalled[-1] if _signalled else None


def clear_signals() -> None:
    _signalled.clear()


def point(name: str) -> None:
    want = os.environ.get("KDCTL_FAULT")
    if not want:
        return
    sig = ""
    if want.endswith((":TERM", ":INT", ":HUP")):  # names hold ':' themselves (train:started)
        want, _, sig = want.rpartition(":")
    target, _, nth = want.partition("@")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))
