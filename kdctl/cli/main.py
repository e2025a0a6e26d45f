"""The ``kdctl`` command: one Typer app, one file per command group, errors mapped to one line."""

from __future__ import annotations

import errno
import os
import re
import signal
import threading

import typer
from rich.text import Text
from typer.core import TyperGroup

try:  # Typer ≥ 0.20 vendors Click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import NoArgsIsHelpError, UsageError

from kdctl import faults
from kdctl.cli._common import err_console, print_json, stdout_reserved
from kdctl.errors import LINK_LOOP, first_line


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI job cancelled, ``docker stop``, ``kill``) or SIGHUP (the terminal or SSH session closed):
    unwound like Ctrl-C, so a run's temp files and lock are cleaned up and it says so, instead of dying silently
    mid-write. Exit code 128 + the signal's number, as the shell reports a process the signal ended."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__()
        self.exit_code = 128 + int(signum)


# The signals that came during this command are remembered (kdctl.faults): a native library can turn the
# KeyboardInterrupt raised in the Python it calls into its own error; the run was still interrupted, and says so.


def _raise_terminated(signum, frame):
    faults.record_signal(signum)
    raise Terminated(signum)


def _raise_interrupted(signum, frame):
    faults.record_signal(signum)
    raise KeyboardInterrupt


def _on_termination_signals() -> None:
    """SIGTERM and SIGHUP end a run through :class:`Terminated`, Ctrl-C through KeyboardInterrupt as Python's own
    handler does, each remembered; a SIGHUP or SIGINT the caller ignores (``nohup``, a background job) stays
    ignored."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _raise_terminated)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _raise_interrupted)


def _as_interruption(e: Exception) -> KeyboardInterrupt | None:
    """The interruption an error stands for when a signal came first (a library turned the KeyboardInterrupt into
    its own error); None for an error of its own, and for kdctl's and Click's exits, which are the command's."""
    signum = faults.signalled()
    if signum is None or isinstance(e, (typer.Exit, typer.Abort, typer.TyperException, UsageError)):
        return None
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _printable(text: str) -> str:
    """Control characters written as escapes (``\\n``, ``\\x1b``): a file name or value holding a newline or a
    terminal escape sequence, quoted in an error, keeps the error on one line and cannot restyle the terminal."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)


def _fail(ctx, word: str, text: str, code: int):
    """``Error: text`` (or ``Interrupted (text)``) on stderr, on one line; with --json also a document on stdout
    (JSON escapes the text itself)."""
    message = text if word == "Error:" else f"{word} ({text})"
    text = _printable(text)
    err_console.print(Text.assemble(("Error:", "red"), f" {text}") if word == "Error:" else
                      Text.assemble((word, "red"), f" ({text})"), highlight=False, soft_wrap=True)
    if ctx.meta.get("kdctl_json"):  # a script reading --json gets a document, not an empty stdout
        print_json({"ok": False, "error": message, "exit_code": code})
    raise typer.Exit(code)


def _usage_error(e: UsageError, root=None):
    """A usage error (missing argument, unknown option, a value of the wrong type) as one line that names the
    command and where its help is, instead of Click's boxed usage block; no-arguments help is left to Click.
    An error without a context (an option given last, without its value) names the command the arguments reach
    from ``root``, the kdctl group's context."""
    ctx = e.ctx
    if isinstance(e, NoArgsIsHelpError) or (ctx is None and root is None):
        raise e
    path = ctx.command_path if ctx is not None else _command_path(root)
    text = " ".join(e.format_message().split()) + _set_hint(e)
    _fail((ctx or root).find_root(), "Error:", f"{path}: {text} (see '{path} --help')", e.exit_code)


def _set_hint(e: UsageError) -> str:
    """``kdctl train r.yaml epochs=5``, Ultralytics' way of changing a setting: the --set options that do it, for a
    command that takes --set (the extra arguments are those Click's message lists)."""
    import re

    ctx = e.ctx
    found = re.fullmatch(r"Got unexpected extra arguments?(?:\(s\))? \((.*)\)", e.format_message().strip(), re.S)
    if ctx is None or found is None or not any(p.name == "set_" for p in ctx.command.params):
        return ""
    from kdctl.recipe.loader import set_suggestion

    hint = set_suggestion(found.group(1).split())
    return f"; a recipe field is changed with {hint}" if hint else ""


def _command_path(root) -> str:
    """``kdctl bundle verify`` for the arguments ``bundle verify ...`` given to the kdctl group."""
    path, cmd = [root.command_path], root.command
    for word in root.meta.get("kdctl_args", []):
        sub = cmd.get_command(root, word) if hasattr(cmd, "get_command") else None
        if sub is None:
            break
        path.append(word)
        cmd = sub
    return " ".join(path)


_MACHINE_ERRNOS = {  # what to do about each
    errno.ENOSPC: "free some space, or give an --out on another disk",
    errno.EDQUOT: "free some of your quota, or give an --out on another disk",
    errno.EROFS: "give an --out on a writable file system",
    errno.EFBIG: "a file-size limit (ulimit -f) or the file system caps file size; give an --out elsewhere",
}


def _link_loop(path) -> str:
    return f"{path or ''}: {LINK_LOOP}"


def _internal(e: Exception, fail) -> None:
    """A bug, not the user's input: one line, the traceback on request."""
    if os.environ.get("KDCTL_DEBUG"):
        raise e
    fail("Error:", f"internal error: {first_line(e)} (set KDCTL_DEBUG=1 for the traceback)", 1)


class KdctlGroup(TyperGroup):
    """Turns kdctl's user errors (and file-system errors) into ``Error: ...`` and an exit code, no traceback."""

    def parse_args(self, ctx, args):
        root = ctx.find_root().meta
        root["kdctl_json"] = "--json" in args  # errors then also go to stdout, as JSON
        root["kdctl_quiet"] = "--quiet" in args or "-q" in args
        root["kdctl_args"] = list(args)
        try:
            return super().parse_args(ctx, args)
        except UsageError as e:
            _usage_error(e, ctx)

    def invoke(self, ctx):
        from kdctl.errors import KdctlError

        def fail(word: str, text: str, code: int):
            _fail(ctx, word, text, code)

        faults.clear_signals()
        if threading.current_thread() is threading.main_thread():
            _on_termination_signals()
        try:
            meta = ctx.find_root().meta
            try:
                with stdout_reserved(bool(meta.get("kdctl_json")), bool(meta.get("kdctl_quiet"))):
                    return super().invoke(ctx)
            except Exception as e:
                interruption = _as_interruption(e)
                if interruption is None:
                    raise
                raise interruption from e
        except KdctlError as e:
            fail("Error:", str(e), e.exit_code)
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            fail("Error:", f"{e.filename or ''}: {e.strerror or e}", 2)
        except FileExistsError as e:
            fail("Error:", f"{e.filename or ''}: exists and is in the way", 2)
        except KeyboardInterrupt as e:
            how = "Terminated" if isinstance(e, Terminated) else "Interrupted"
            again = "the same command" + ("" if "--resume" in ctx.meta.get("kdctl_args", []) else " with --resume")
            hint = (f"; {again} continues from the last saved epoch"
                    if ctx.invoked_subcommand in ("train", "distill") else "")
            fail(how, f"nothing half-written was published{hint}", e.exit_code if isinstance(e, Terminated) else 130)
        except UsageError as e:
            _usage_error(e, ctx.find_root())
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except BrokenPipeError:  # the reader went away (`kdctl list losses | head -1`): Click's main stops quietly
            raise
        except OSError as e:
            if e.errno == errno.ELOOP:  # open() or stat() through links that point on to each other
                fail("Error:", _link_loop(e.filename), 2)
            if e.errno == errno.ENAMETOOLONG:  # Path.exists() raises it too, wherever a path is first looked at
                name = str(e.filename or "")
                fail("Error:", f"{name if len(name) <= 80 else name[:79] + '…'}: {e.strerror}: a file or folder "
                               "name is at most 255 bytes here; give a shorter path", 2)
            if e.errno not in _MACHINE_ERRNOS:
                _internal(e, fail)
            # a full disk or a read-only file system: the machine's, not kdctl's; libraries (the ONNX writer)
            # often leave the file name out
            where = f"{e.filename}: " if e.filename else ""
            fail("Error:", f"{where}{e.strerror or e} while writing; nothing half-written was published "
                           f"({_MACHINE_ERRNOS[e.errno]})", 2)
        except RuntimeError as e:  # pathlib's resolve() (Python 3.11/3.12) on links that point on to each other
            loop = re.fullmatch(r"Symlink loop from '(.*)'", str(e))
            if loop is None:
                _internal(e, fail)
            fail("Error:", _link_loop(loop.group(1)), 2)
        except Exception as e:  # a bug, not the user's input: one line, the traceback on request
            _internal(e, fail)
        finally:  # kdctl as a library after a command (a test, a notebook) starts with none remembered
            faults.clear_signals()


app = typer.Typer(
    cls=KdctlGroup, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    help="Distill a large detector into a small one, export it for an edge target, profile it there and gate "
         "it in CI.\n\nExample: [bold]kdctl distill recipes/quickstart.yaml[/bold] then "
         "[bold]kdctl export runs/distill/quickstart --target cpu[/bold]",
)


def _register() -> None:
    from kdctl.cli import bundle, cache, data, evaluate, export, gate, listing, profile, recipe, report, train

    app.add_typer(recipe.app, name="recipe")
    app.add_typer(data.app, name="data")
    app.add_typer(bundle.app, name="bundle")
    app.add_typer(listing.app, name="list")
    app.add_typer(cache.app, name="cache")
    app.command("train")(train.train)
    app.command("distill")(train.distill)
    app.command("eval")(evaluate.evaluate)
    app.command("export")(export.export)
    app.command("profile")(profile.profile)
    app.command("gate")(gate.gate)
    app.command("report")(report.report)


def _one_line_paragraphs(text: str) -> str:
    """A docstring's paragraphs each on one line. Typer's rich markup mode keeps single line breaks, so a paragraph
    wrapped at the source's width was printed broken mid-sentence in --help (Rich wraps each line on its own)."""
    import inspect

    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split("\n"))
                       for p in inspect.cleandoc(text).split("\n\n"))


def _unwrap_help(typer_app: typer.Typer) -> None:
    for info in typer_app.registered_commands:
        text = info.help or (info.callback.__doc__ if info.callback else None)
        if text:
            info.help = _one_line_paragraphs(text)
    for group in typer_app.registered_groups:
        for info in (group, group.typer_instance.info):
            if isinstance(info.help, str):
                info.help = _one_line_paragraphs(info.help)
        _unwrap_help(group.typer_instance)


_register()
_unwrap_help(app)


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context,
          version: bool = typer.Option(False, "--version", help="Print the kdctl version and exit.")) -> None:
    if version:
        from kdctl import __version__

        typer.echo(__version__)
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


def main() -> None:
    app(prog_name="kdctl")  # also under ``python -m kdctl.cli.main`` (DDP workers, tests): messages name `kdctl`


if __name__ == "__main__":
    main()
