"""Push a saved output folder of the training scripts to the Hugging Face Hub.

    python -m simlap_hf.push OUTPUT_DIR --hub_model_id USER/NAME [--hub_token T] [--private] [--include_checkpoints]

Creates the model repository if needed and uploads the model, its code, the model card, the results and the logs in
one commit (``checkpoints/`` too with ``--include_checkpoints``). Honours ``HF_ENDPOINT``, ``HF_TOKEN`` and
``HF_HUB_OFFLINE``. This is what to run after a training run whose upload failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import UsageError, raise_usage_error, run_command
from .hub import HubPushError, create_hub_repo, push_output_dir

logger = logging.getLogger("simlap_hf")

# Files that make a folder worth pushing (any one of them).
MODEL_FILES = ("config.json", "model.safetensors", "README.md")


def push(
    output_dir: str | Path,
    hub_model_id: str,
    hub_token: str | None = None,
    private: bool = False,
    include_checkpoints: bool = False,
    commit_message: str = "Upload SimLAP model",
) -> str:
    """Create the repository (if needed) and upload ``output_dir``. Returns the commit URL.

    Raises:
        FileNotFoundError: ``output_dir`` is not a saved output folder.
        ValueError / HubPushError: bad id, no token, offline mode, or the Hub refused (the message says why).
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is not a folder.")
    if not any((folder / name).is_file() for name in MODEL_FILES):
        raise FileNotFoundError(
            f"{str(folder)!r} holds none of {', '.join(MODEL_FILES)}: it is not a saved model folder of the training "
            "scripts."
        )
    if include_checkpoints and not (folder / "checkpoints").is_dir():
        logger.warning("--include_checkpoints: %s has no checkpoints/ folder.", folder)
    repo_id = create_hub_repo(hub_model_id, hub_token, private)
    return push_output_dir(folder, repo_id, hub_token, commit_message, include_checkpoints=include_checkpoints)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simlap_hf.push",
        description="Upload a saved SimLAP-HF output folder (model, code, card, results) to the Hugging Face Hub.",
    )
    parser.add_argument("output_dir", help="Output folder of train_pretrain.py, train_finetune.py or train_fuse.py.")
    parser.add_argument("--hub_model_id", required=True, help="Hub repository id (user/name).")
    parser.add_argument("--hub_token", default=None, help="Hub token (default: HF_TOKEN or the saved login).")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--include_checkpoints", action="store_true", help="Also upload checkpoints/.")
    parser.add_argument("--commit_message", default="Upload SimLAP model", help="Commit message.")
    parser.add_argument("--debug", action="store_true", help="Show the traceback of input errors (SIMLAP_DEBUG=1).")
    parser.error = raise_usage_error  # type: ignore[method-assign]

    def push_folder(arguments: list[str]) -> None:
        args = vars(parser.parse_args(arguments))
        args.pop("debug")
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            print(f"pushed: {push(**args)}")  # the flags are named as push()'s parameters
        except HubPushError as error:  # the Hub refused (token, permissions, network): what to do is in the message
            raise UsageError(str(error)) from error

    return run_command(push_folder, argv, keep_debug_flag=True)


if __name__ == "__main__":
    sys.exit(main())
