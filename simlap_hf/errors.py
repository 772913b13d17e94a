"""User errors and the command-line runner shared by every entry point (the training scripts, ``analyze``,
``embed``, ``search``, ``demo``, ``export``, ``push``).

A mistake in what the user passed (a flag, a YAML key, a file, a folder, a Hub id) raises :class:`UsageError`, whose
message names the value and the fix. :func:`run_command` prints such an error as one line, ``error: <message>``, and
returns 1; any other exception is a bug and keeps its traceback. ``--debug`` (or ``SIMLAP_DEBUG=1``) shows the
traceback of user errors too.

This module imports nothing heavy, so any part of the package can raise :class:`UsageError`; the model-folder files
(copied into saved models) do not import it.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

DEBUG_FLAG = "--debug"
DEBUG_ENVIRONMENT = "SIMLAP_DEBUG"


class UsageError(ValueError):
    """A mistake in the user's input: the message names the flag, file or value and says how to fix it.

    A ValueError, so callers that catch ValueError (and older code) keep working."""


class CommandStopped(Exception):
    """A command that stopped on request (Ctrl-C, SIGTERM) after saving what it could; ``exit_code`` is returned
    without a traceback, the message was already printed."""

    exit_code: int = 128 + int(signal.SIGINT)


# Modules whose own ValueError/OSError/FloatingPointError are checks of the user's input (their messages name the
# value and the fix): the package and the training scripts. The module, not the file path, identifies them, so the
# answer is the same for an editable install, a wheel in site-packages, and any working directory.
_OWN_MODULE_PREFIXES = ("simlap_hf.", "train_pretrain", "train_finetune", "train_fuse")
CHECK_ERROR_TYPES = (ValueError, OSError, FloatingPointError)


def _raised_by_own_code(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback runs code of the package or of a script (``__main__``)."""
    traceback = error.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    module = traceback.tb_frame.f_globals.get("__name__", "")
    return module == "__main__" or module.startswith(_OWN_MODULE_PREFIXES)


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's mistake, printed as one line: a :class:`UsageError`, or a ValueError, OSError
    or FloatingPointError raised by the package's own checks (not inside a library: those are bugs or unexpected
    failures and keep their traceback)."""
    if isinstance(error, UsageError):
        return True
    return isinstance(error, CHECK_ERROR_TYPES) and _raised_by_own_code(error)


def debug_requested(argv: Sequence[str]) -> bool:
    """``--debug`` among the arguments, or ``SIMLAP_DEBUG`` set to 1/true/yes."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENVIRONMENT, "").lower() in ("1", "true", "yes")


def one_line(error: BaseException) -> str:
    """The error's message on one line (newlines and runs of spaces collapsed)."""
    return " ".join(str(error).split()) or type(error).__name__


def run_command(
    run: Callable[[list[str]], Any],
    argv: Sequence[str] | None = None,
    interrupted_message: str = "Interrupted.",
    keep_debug_flag: bool = False,
) -> int:
    """Run ``run(argv)`` as a command line and return its exit code.

    0 when it returns; :attr:`CommandStopped.exit_code` (no traceback) when it stopped on request; 130 after Ctrl-C,
    printing ``interrupted_message``; 1 after a user error (:func:`is_user_error`), printed as ``error: <message>``
    unless ``--debug``/``SIMLAP_DEBUG=1`` asks for the traceback; any other exception propagates with its traceback.
    ``--debug`` is removed from ``argv`` unless ``keep_debug_flag`` (parsers that declare it). Use as
    ``raise SystemExit(run_command(run))``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    if not keep_debug_flag:
        argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        run(argv)
    except CommandStopped as stop:
        return stop.exit_code
    except KeyboardInterrupt:
        print(interrupted_message, file=sys.stderr)
        return 128 + int(signal.SIGINT)
    except Exception as error:
        if debug or not is_user_error(error):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    return 0


def raise_usage_error(message: str) -> None:
    """An ``argparse`` parser's ``error``: a flag the parser cannot read is a one-line :class:`UsageError`, not a usage
    text and exit code 2. Set as ``parser.error = raise_usage_error``."""
    raise UsageError(f"{message[:1].upper()}{message[1:]}. Run with --help for the list of options.")


def check_writable_folder(path: str | os.PathLike, flag: str) -> None:
    """Raise :class:`UsageError` unless the folder ``path`` (given with ``flag``) exists or can be created and can be
    written to: checked by writing a temporary file into the nearest existing folder, before any work is done."""
    import tempfile
    from pathlib import Path

    folder = Path(path).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {os.fspath(path)!r} cannot be created: {str(existing)!r} is a file. Choose a folder.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UsageError(
            f"{flag} {os.fspath(path)!r} cannot be written ({reason}: {str(existing)!r}); choose a folder you can "
            "write to."
        ) from None
