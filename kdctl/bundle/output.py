"""Where a stage may write its bundle: one writer per ``--out``, nothing replaced that kdctl did not write.

:func:`claim_output` is taken at the start of a stage, before any work, and held until the bundle is published:

- ``--out`` must not be, contain, or sit inside an input bundle, and no folder above it may be a file;
- an existing ``--out`` is replaced only with ``overwrite=True`` and only when it is a kdctl bundle holding
  nothing but the files its manifest lists; a user's folder or file is refused and left untouched;
- a lock file beside ``--out`` (``.NAME.lock``, ``flock``) makes a second writer fail at once;
- temporary siblings a killed run left (``.NAME.partial-*``, ``.NAME.tmp-*``) are removed, and a bundle that an
  interrupted ``--overwrite`` had moved aside (``.NAME.old-*``) is put back when nothing replaced it;
- publishing re-checks ``--out`` and refuses if anything appeared or changed there while the stage ran.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import os
import shutil
import stat
from pathlib import Path
from typing import Callable, Iterable

from kdctl import faults
from kdctl.errors import BundleError, not_utf8

_held: dict[Path, "OutputClaim"] = {}
_reserved: dict[Path, "OutputLock"] = {}  # default run folders chosen (and locked) by next_run_dir, not claimed yet


class LockHeld(BundleError):
    """Another kdctl process holds ``--out``'s lock."""


def absolute(p: str | Path) -> Path:
    """The path kdctl locks and compares: absolute and normalised (``..`` folded), symlinks not resolved."""
    return Path(os.path.abspath(Path(p).expanduser()))


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def bundle_state(out: Path) -> tuple[str, str | None]:
    """``("absent", None)``, ``("bundle", id)`` for a kdctl bundle holding only its listed files, or
    ``("foreign", why)`` for anything else."""
    from kdctl.bundle.store import MANIFEST, SEAL, _walk, load_bundle

    if not os.path.lexists(out):
        return "absent", None
    if out.is_symlink():
        return "foreign", "is a symlink"
    if not out.is_dir():
        return "foreign", "is a file, not a kdctl bundle"
    try:
        b = load_bundle(out)
    except BundleError:
        return "foreign", f"is a folder without a kdctl {MANIFEST}"
    known = set(b.manifest["files"]) | {MANIFEST, SEAL} | set(b.manifest.get("device_built") or [])
    for rel, st in _walk(out):
        if stat.S_ISDIR(st.st_mode):
            continue
        if rel not in known:
            return "foreign", f"holds '{rel}', which kdctl did not write"
    return "bundle", b.id


def _check_place(p: Path, flag: str, inputs: list[Path], tail: str) -> None:
    """Where ``p`` may be written: no folder above it is a file, and it lies in no bundle, an input or another
    (writing there would add files its manifest does not list)."""
    from kdctl.bundle.store import MANIFEST

    for anc in p.parents:
        if os.path.lexists(anc) and not anc.is_dir():
            raise BundleError(f"{flag} {p}: '{anc}' is a file, not a directory")
    for inp in inputs:
        if _within(p, inp):  # an input is a bundle, or the checkpoint file of eval/export MODEL.pt
            what = "input file" if inp.is_file() else "input bundle"
            raise BundleError(f"{flag} {p}: is {'the' if p == inp else 'inside the'} {what} {inp}; {tail}")
    for anc in p.parents:
        if (anc / MANIFEST).is_file():
            raise BundleError(f"{flag} {p}: lies inside the kdctl bundle {anc}; {tail}")


def check_out_path(out: str | Path, *, overwrite: bool, inputs: Iterable[str | Path] = (),
                   flag: str = "--out") -> tuple[str, str | None]:
    """Refuse an unsafe output path with a one-line error; returns :func:`bundle_state` of ``out``."""
    out = absolute(out)
    if (escaped := not_utf8(out)) is not None:  # the ONNX, OpenVINO and TensorRT writers fail on such a name
        raise BundleError(f"{flag} {escaped}: has bytes that are not UTF-8 text; the model writers take UTF-8 "
                          "paths only; choose another --out")
    _check_name_length(out, flag, len(".") + len(".partial-") + 8)  # the bundle is built in .NAME.partial-XXXXXXXX
    inputs = [absolute(i) for i in inputs]
    _check_place(out, flag, inputs, "choose another --out")
    for inp in inputs:
        if _within(inp, out):
            raise BundleError(f"{flag} {out}: contains the input bundle {inp}; choose another --out")
    state, detail = bundle_state(out)
    if state == "foreign":
        raise BundleError(f"{flag} {out}: {detail}; refusing to replace it (--overwrite replaces only kdctl "
                          "bundles); choose another --out")
    if state == "bundle" and not overwrite:
        raise BundleError(f"{flag} {out}: already exists; choose another --out or pass --overwrite")
    return state, detail


def _check_name_length(p: Path, flag: str, extra: int) -> None:
    """A name too long for the hidden sibling kdctl writes first (``extra`` bytes longer) failed only when the
    stage published, its training or export done; refused before any work instead."""
    d = p.parent
    while not d.is_dir() and d != d.parent:
        d = d.parent
    try:
        limit = os.pathconf(d, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(p.name))
    if size + extra > limit:
        shown = p.name if len(p.name) <= 40 else p.name[:39] + "…"
        raise BundleError(f"{flag} {p.parent / shown}: a name of {size} bytes; kdctl writes it first as a hidden "
                          f"sibling {extra} bytes longer, and a name is at most {limit} bytes here: give one of at "
                          f"most {limit - extra}")


def being_written(out: Path) -> bool:
    """True while a kdctl process holds ``out``'s lock (a stage writing there now). A shared lock is tried and let go
    at once: it fails only against a writer's exclusive one."""
    import fcntl

    try:
        fd = os.open(OutputLock(out).path, os.O_RDONLY)
    except OSError:  # no lock file: nobody has written there, or the last writer released it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class OutputLock:
    """An exclusive, non-blocking ``flock`` on ``.NAME.lock`` beside ``out``; the file is removed on release."""

    def __init__(self, out: Path):
        self.path = out.parent / f".{out.name}.lock"
        self.fd: int | None = None
        self.created: list[Path] = []  # folders made for the lock, deepest first; removed again if left empty

    def acquire(self, wait: bool = False) -> None:
        """Take the lock; another holder is an error, or with ``wait`` is waited for."""
        import fcntl

        lost_races = 0
        while True:
            d = self.path.parent
            while not d.exists():
                if d not in self.created:
                    self.created.append(d)
                d = d.parent
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                if isinstance(e, FileNotFoundError) and not self.path.parent.is_dir() and lost_races < 50:
                    lost_races += 1
                    continue  # another run's release removed the folder we just found there: again
                # a folder that takes no new files or folders (/proc, /sys, a read-only mount): it never will
                where = self.path.parent if self.path.parent.is_dir() else d
                raise BundleError(f"{where}: cannot create files there ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                raise LockHeld(f"{self.path.parent / self.path.name[1:-5]}: another kdctl process is writing "
                               f"there (lock {self.path.name}); wait for it or choose another --out") from None
            try:  # the holder before us may have unlinked the file after we opened it: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None
        for d in self.created:  # a run that failed before publishing leaves no empty runs/<stage>/ behind
            try:
                d.rmdir()
            except OSError:  # not empty (a published bundle, another run's files): kept, and its parents too
                break
        self.created = []


def reserve(out: Path) -> bool:
    """Lock a default run folder as it is chosen, until the stage claims it (:class:`OutputClaim` takes the lock
    over): two runs started at the same instant picked the same name, and the second stopped on the first one's
    lock. False when another process holds it. A reservation this process never claims (its stage stopped before
    claiming) is released by the next :func:`release_reservations` or at exit."""
    import atexit

    out = absolute(out)
    lock = OutputLock(out)
    try:
        lock.acquire()
    except LockHeld:
        return False
    atexit.unregister(release_reservations)  # registered once, however many runs this process chooses folders for
    atexit.register(release_reservations)
    _reserved[out] = lock
    return True


def release_reservations() -> None:
    """Let go of every default run folder this process reserved and no stage claimed."""
    while _reserved:
        _reserved.popitem()[1].release()


def _rename_noreplace(src: Path, dst: Path) -> None:
    """``rename`` that fails instead of replacing ``dst`` (``renameat2(RENAME_NOREPLACE)`` on Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), str(src))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


class OutputClaim:
    """The right to publish a bundle at ``out`` (see the module docstring). Re-entrant within a process."""

    def __init__(self, out: str | Path, *, overwrite: bool, inputs: Iterable[str | Path] = ()):
        self.out = absolute(out)
        self.overwrite = overwrite
        self.inputs = [absolute(p) for p in inputs]
        self.lock = OutputLock(self.out)
        self.depth = 0
        self.expected: str | None = None
        self.since: _dt.datetime | None = None  # when the stage claimed it: its manifest's duration counts from here

    def __enter__(self) -> "OutputClaim":
        held = _held.get(self.out)
        if held is not None:  # a stage claimed early; its writer claims again
            check_out_path(held.out, overwrite=held.overwrite or self.overwrite, inputs=self.inputs)
            held.depth += 1
            return held
        check_out_path(self.out, overwrite=self.overwrite, inputs=self.inputs)
        reserved = _reserved.pop(self.out, None)
        if reserved is not None:  # a default run folder, locked when next_run_dir chose it
            self.lock = reserved
        else:
            self.lock.acquire()
        try:
            self._clean_stale()
            state, detail = check_out_path(self.out, overwrite=self.overwrite, inputs=self.inputs)
        except BaseException:
            self.lock.release()
            raise
        self.expected = detail if state == "bundle" else None
        self.depth, self.since = 1, _dt.datetime.now(_dt.timezone.utc)
        _held[self.out] = self
        return self

    def __exit__(self, *exc) -> bool:
        self.depth -= 1
        if self.depth == 0:
            _held.pop(self.out, None)
            self.lock.release()
        return False

    def temp_sibling(self, kind: str) -> Path:
        from kdctl.bundle.store import temp_sibling

        return temp_sibling(self.out, kind)

    def _clean_stale(self) -> None:
        from kdctl.bundle.store import stale_pattern

        pat = stale_pattern(self.out, ("partial", "tmp", "old"))
        if not self.out.parent.is_dir():
            return
        for p in sorted(self.out.parent.iterdir()):
            m = pat.match(p.name)
            if not m or p.is_symlink():
                continue
            if m.group(1) == "old" and not os.path.lexists(self.out) and bundle_state(p)[0] == "bundle":
                os.rename(p, self.out)  # an interrupted --overwrite: the previous bundle comes back
            elif p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def publish(self, tmp: Path) -> None:
        """Rename the finished ``tmp`` directory to ``out``, replacing only the bundle seen at claim time."""
        state, detail = bundle_state(self.out)
        now = detail if state == "bundle" else (None if state == "absent" else f"foreign:{detail}")
        if now != self.expected:
            raise BundleError(f"--out {self.out}: changed while this run was going ({detail or 'removed'}); "
                              "left it untouched and published nothing")
        faults.point("publish:before-rename")
        if self.expected is None:
            try:
                _rename_noreplace(tmp, self.out)
            except FileExistsError:
                raise BundleError(f"--out {self.out}: appeared while this run was going; left it untouched "
                                  "and published nothing") from None
            return
        old = self.temp_sibling("old")
        os.rename(self.out, old)  # a crash from here on keeps the old bundle (restored by the next run)
        faults.point("publish:old-moved-aside")
        try:
            _rename_noreplace(tmp, self.out)
        except BaseException:
            if not os.path.lexists(self.out):
                os.rename(old, self.out)
            raise
        shutil.rmtree(old, ignore_errors=True)


def claim_output(out: str | Path, *, overwrite: bool, inputs: Iterable[str | Path] = ()) -> OutputClaim:
    """``with claim_output(out, overwrite=..., inputs=[src.path]):`` around a stage's work."""
    return OutputClaim(out, overwrite=overwrite, inputs=inputs)


def check_output_file(path: str | Path, *, flag: str, inputs: Iterable[str | Path] = (),
                      ours: Callable[[bytes], bool] | None = None, what: str = "a file kdctl wrote") -> Path:
    """An extra output file (``--junit``, ``--summary``): its folder must be a folder, it must not be a folder
    itself, nor lie inside an input bundle. Checked before any work, so a bad path fails before publishing.
    ``ours``: whether a file's first kilobytes are ``what`` kdctl writes there; a non-empty file that is not is the
    user's and is never replaced (``--summary README.md`` would have been), as ``--overwrite`` replaces only
    bundles."""
    p = absolute(path)
    if p.is_dir():
        raise BundleError(f"{flag} {p}: is a directory; give a file path")
    if p.is_symlink():
        raise BundleError(f"{flag} {p}: is a symlink; give a regular file path")
    if p.exists() and not p.is_file():  # written by temp file + rename, which would replace a device node or pipe
        raise BundleError(f"{flag} {p}: is not a regular file (a device, pipe or socket); give a file path")
    if ours is not None and p.is_file() and p.stat().st_size:
        with open(p, "rb") as f:
            head = f.read(1024)
        if not ours(head):
            raise BundleError(f"{flag} {p}: exists and is not {what}; refusing to replace it (remove it, or give "
                              "another path)")
    _check_name_length(p, flag, len(".") + len(".tmp-") + 8)  # written as .NAME.tmp-XXXXXXXX, then renamed
    _check_place(p, flag, [absolute(i) for i in inputs], "it would change that bundle")
    _check_writable(p, flag)
    return p


def _check_writable(p: Path, flag: str) -> None:
    """Create and remove an empty hidden file in the nearest existing folder of ``p``: a folder that takes no new
    files (/proc, a read-only mount) fails here, before the stage publishes a bundle, not after."""
    from kdctl.bundle.store import temp_sibling

    d = p.parent
    while not d.exists():
        d = d.parent
    probe = temp_sibling(d / p.name)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except OSError as e:
        raise BundleError(f"{flag} {p}: cannot create files in {d} ({e.strerror})") from None
    os.unlink(probe)
