"""How a run ends: stopping cleanly on SIGINT/SIGTERM, and the command-line entry point that turns the outcome into
an exit code (input errors as one line, bugs with their traceback).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("simlap_hf")


class StopRequested:
    """SIGINT/SIGTERM handler: asks the loop to checkpoint at the next step boundary and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None  # the first signal received
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequested:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        logger.warning("Received signal %d: saving a checkpoint at the next step, then stopping.", signum)

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class TrainingInterrupted(Exception):
    """Raised after a checkpoint was saved because of SIGINT/SIGTERM.

    ``signum`` is the signal that asked for the stop (SIGTERM when it reached another process of the run);
    ``exit_code`` is what a command line returns for it: 128 + signum, i.e. 130 for SIGINT and 143 for SIGTERM, the
    codes a shell reports for a process ended by that signal.
    """

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = int(signum) if signum is not None else int(signal.SIGTERM)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def run_main(run: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Command-line entry point around a script's ``run(argv)``: returns the process exit code.

    0 when the run finished. After SIGINT/SIGTERM, :func:`fit` has saved a checkpoint and printed how to resume;
    this returns :attr:`TrainingInterrupted.exit_code` (130 for SIGINT, 143 for SIGTERM) without a traceback. A
    second Ctrl-C (stop at once, no new checkpoint) or one before training started also returns 130, with a message
    saying that a resume continues from the last complete checkpoint. An input error (see :func:`is_input_error`:
    bad flags, YAML, data, model files, checkpoints) prints one line, ``error: <message>``, and returns 1 without a
    traceback, unless ``--debug`` or ``SIMLAP_DEBUG=1``; every other error (a bug) propagates with its traceback. Use
    as ``raise SystemExit(run_main(run, argv))``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SIMLAP_DEBUG", "").lower() in ("1", "true", "yes")
    try:
        run(argv)
    except TrainingInterrupted as stop:
        return stop.exit_code
    except Exception as error:
        if debug or not is_input_error(error):
            raise
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "Interrupted before a checkpoint could be saved; a resume (the same command plus "
            "--resume_from_checkpoint latest) continues from the last complete checkpoint, if any.",
            file=sys.stderr,
        )
        return 128 + int(signal.SIGINT)
    return 0


# Where the package's own checks raise (simlap_hf/, and the folder that holds it and the scripts): an error raised by
# code in these folders is a message written for the user.
_OWN_CODE = (str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2]))
INPUT_ERROR_TYPES = (ValueError, OSError, FloatingPointError)


def is_input_error(error: BaseException) -> bool:
    """Whether ``error`` is one of the package's checks of user input (flags, YAML, data, model files, checkpoints,
    disk), not a bug: a ValueError, OSError or FloatingPointError raised by the package's own code (the scripts and
    ``simlap_hf``), whose messages name the value and the fix. The same types raised inside a library are bugs or
    unexpected failures and keep their traceback."""
    if not isinstance(error, INPUT_ERROR_TYPES):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    raised_in = str(Path(frames[-1].filename).resolve())
    return raised_in.startswith(_OWN_CODE) and "site-packages" not in raised_in
