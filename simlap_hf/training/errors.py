"""How a run ends: stopping cleanly on SIGINT/SIGTERM, and the command-line entry point that turns the outcome into
an exit code (input errors as one line, bugs with their traceback).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import CHECK_ERROR_TYPES, CommandStopped, is_user_error, run_command

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


class TrainingInterrupted(CommandStopped):
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
    saying that a resume continues from the last complete checkpoint. A user error (see
    :func:`~simlap_hf.errors.is_user_error`: bad flags, YAML, data, model files, checkpoints) prints one line,
    ``error: <message>``, and returns 1 without a traceback, unless ``--debug`` or ``SIMLAP_DEBUG=1``; every other
    error (a bug) propagates with its traceback. Use as ``raise SystemExit(run_main(run, argv))``.
    """
    return run_command(
        run,
        argv,
        interrupted_message="Interrupted before a checkpoint could be saved; a resume (the same command plus "
        "--resume_from_checkpoint latest) continues from the last complete checkpoint, if any.",
        keep_debug_flag=True,  # a flag of TrainingArguments
    )


#: The exception types of the package's own checks (UsageError is a ValueError); defined in simlap_hf.errors.
INPUT_ERROR_TYPES = CHECK_ERROR_TYPES
#: Whether an exception is the user's mistake (printed as one line); see :func:`simlap_hf.errors.is_user_error`.
is_input_error = is_user_error
