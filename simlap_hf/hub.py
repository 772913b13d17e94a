"""Hugging Face Hub uploads, shared by the three training scripts and ``python -m simlap_hf.push``.

Everything goes through ``huggingface_hub`` (``HfApi.create_repo``, ``HfApi.upload_folder``) and honours
``HF_ENDPOINT`` (read when a call is made), ``HF_TOKEN`` (or the token saved by ``hf auth login``) and
``HF_HUB_OFFLINE``. The scripts always save locally first: a failed upload loses nothing and its error names the
command that pushes the folder later (``python -m simlap_hf.push``). The model card is built by
:mod:`simlap_hf.model_card` (:func:`build_model_card`, re-exported here).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import get_token

from .model_card import build_model_card

__all__ = [
    "HubPushError",
    "build_model_card",
    "create_hub_repo",
    "hub_api",
    "hub_offline",
    "push_checkpoint",
    "push_later_hint",
    "push_output_dir",
]

logger = logging.getLogger("simlap_hf")


class HubPushError(RuntimeError):
    """A Hub operation failed; the local output folder is intact."""


# Never uploaded: partial files of atomic writes, incomplete checkpoints, caches.
IGNORE_PATTERNS = ["*.tmp", ".tmp*", "**/.tmp*", "**/.tmp*/**", "__pycache__/*", "**/__pycache__/*"]
CHECKPOINT_PATTERNS = ["checkpoints/*", "checkpoints/**"]


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, now or when huggingface_hub was imported."""
    return (
        bool(getattr(constants, "HF_HUB_OFFLINE", False))
        or _env_true("HF_HUB_OFFLINE")
        or _env_true("TRANSFORMERS_OFFLINE")
    )


def hub_api(token: str | None = None) -> HfApi:
    """``HfApi`` on ``HF_ENDPOINT`` as set now (huggingface_hub itself reads it once, at import)."""
    endpoint = os.environ.get("HF_ENDPOINT")
    return HfApi(endpoint=endpoint.rstrip("/") if endpoint else None, token=token)


def push_later_hint(output_dir: str | os.PathLike, repo_id: str | None) -> str:
    """The command that uploads a saved output folder."""
    return f"python -m simlap_hf.push {output_dir} --hub_model_id {repo_id or 'USER/NAME'}"


def _describe_http_error(error: BaseException) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        return (
            f"the Hub rejected the token (401 Unauthorized): {error}. Check --hub_token or HF_TOKEN (or run "
            "`hf auth login`); the token needs write access."
        )
    if status == 403:
        return (
            f"the token may not write to this namespace (403 Forbidden): {error}. Use a token with write access "
            "or a --hub_model_id in your own namespace."
        )
    if status == 404:
        return f"not found (404): {error}. Check --hub_model_id (it should look like your-name/model-name)."
    return f"{type(error).__name__}: {error}"


def _check_can_reach_hub(option: str) -> None:
    if hub_offline():
        raise HubPushError(
            f"{option} was given but HF_HUB_OFFLINE is set: the Hub cannot be reached. Unset HF_HUB_OFFLINE or drop "
            f"{option}; a saved output folder can be pushed later with: python -m simlap_hf.push OUTPUT_DIR "
            "--hub_model_id USER/NAME"
        )


def create_hub_repo(repo_id: str | None, token: str | None, private: bool) -> str:
    """Create (or reuse) the Hub model repository at the start of a run, so that a bad token or id fails before
    training. Honours ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE``. Returns the full repository id.

    Raises:
        ValueError: no ``repo_id``.
        HubPushError: offline mode, no token, or the Hub refused (the message says why and what to do).
    """
    if not repo_id:
        raise ValueError("--push_to_hub needs --hub_model_id (for example your-name/simlap-resnet18-cifar10).")
    _check_can_reach_hub("--push_to_hub")
    if not (token or get_token()):
        raise HubPushError(
            "--push_to_hub needs a Hugging Face token with write access: pass --hub_token, set HF_TOKEN, or run "
            "`hf auth login`."
        )
    try:
        url = hub_api(token).create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except HfHubHTTPError as error:
        raise HubPushError(f"Could not create Hub repository {repo_id!r}: {_describe_http_error(error)}") from error
    except Exception as error:  # network errors (connection refused, DNS, timeouts) of the HTTP client
        raise HubPushError(
            f"Could not create Hub repository {repo_id!r}: {type(error).__name__}: {error}. Is the Hub "
            f"({os.environ.get('HF_ENDPOINT') or constants.ENDPOINT}) reachable?"
        ) from error
    logger.info("Hub repository ready: %s", url)
    return url.repo_id


def push_output_dir(
    output_dir: str | os.PathLike,
    repo_id: str,
    token: str | None,
    message: str,
    include_checkpoints: bool = False,
) -> str:
    """Upload a saved output folder (model, code, card, results, logs) in one commit; ``checkpoints/`` only with
    ``include_checkpoints``. Returns the commit URL.

    Raises HubPushError with the command to retry; nothing local is touched."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise HubPushError(f"{str(output_dir)!r} is not a folder: nothing to push.")
    _check_can_reach_hub("Pushing to the Hub")
    ignore = list(IGNORE_PATTERNS) + ([] if include_checkpoints else CHECKPOINT_PATTERNS)
    try:
        info = hub_api(token).upload_folder(
            repo_id=repo_id,
            folder_path=str(output_dir),
            commit_message=message,
            ignore_patterns=ignore,
            repo_type="model",
        )
    except Exception as error:
        reason = (
            _describe_http_error(error) if isinstance(error, HfHubHTTPError) else f"{type(error).__name__}: {error}"
        )
        raise HubPushError(
            f"Uploading {str(output_dir)!r} to {repo_id!r} failed: {reason}. The folder is saved locally; push it "
            f"later with: {push_later_hint(output_dir, repo_id)}"
            + (" --include_checkpoints" if include_checkpoints else "")
        ) from error
    return str(getattr(info, "commit_url", info))


def push_checkpoint(path: str | os.PathLike, repo_id: str, token: str | None, raise_errors: bool = False) -> str | None:
    """Upload one checkpoint folder into ``checkpoints/<name>/`` of the repository (the ``on_checkpoint`` hook of
    ``fit`` with ``--push_checkpoints``). Returns the commit URL.

    A failed upload only logs a warning (training goes on, the checkpoint stays on disk) unless ``raise_errors``.
    """
    path = Path(path)
    try:
        _check_can_reach_hub("--push_checkpoints")
        info = hub_api(token).upload_folder(
            repo_id=repo_id,
            folder_path=str(path),
            path_in_repo=f"checkpoints/{path.name}",
            commit_message=f"Checkpoint {path.name}",
            ignore_patterns=list(IGNORE_PATTERNS),
            repo_type="model",
        )
    except Exception as error:
        reason = (
            _describe_http_error(error) if isinstance(error, HfHubHTTPError) else f"{type(error).__name__}: {error}"
        )
        message = (
            f"Uploading checkpoint {str(path)!r} to {repo_id!r} failed: {reason}. It is kept locally; push the run "
            f"with its checkpoints later with: {push_later_hint(path.parent.parent, repo_id)} --include_checkpoints"
        )
        if raise_errors:
            raise HubPushError(message) from error
        logger.warning(message)
        return None
    url = str(getattr(info, "commit_url", info))
    logger.info("Pushed checkpoint %s: %s", path.name, url)
    return url
