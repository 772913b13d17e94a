"""Embed a data set or an image folder with a trained SimLAP model into a ``datasets`` folder (an embedding index).

    python -m simlap_hf.embed --model_name_or_path outputs/digits --dataset_name digits --output_dir index
    python -m simlap_hf.embed --model_name_or_path outputs/simlap --train_dir photos/ --output_dir index

Every image is preprocessed with the model's evaluation transform (its saved ``preprocessor_config.json``) and
stored with

- ``features`` (D floats): the pooled backbone features (``pooler_output``, what kNN and the probe use);
- ``embeddings`` (K floats): the projected embeddings, for a pretrained SimLAP model (the space of its gates);
- ``label`` (int, the data set's class index; class names in ``index.json``), ``source`` (the image file, or
  ``<split>/<row>`` for images stored inside a data set), ``split`` and ``row``.

The rows are written as parquet shards of ``--shard_size`` rows (``data/shard-00000.parquet``, ...), one shard at a
time, so memory holds one shard whatever the size of the data. ``index.json`` records the model, the class names,
the sizes and the shard files. Load the rows with ``datasets.load_dataset("parquet", data_dir=f"{index}/data")``;
search them with :mod:`simlap_hf.search` / :mod:`simlap_hf.retrieval`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from .data import DataArguments, create_eval_dataloader, get_label_names, load_image_dataset, with_image_transforms
from .errors import UsageError, check_writable_folder, raise_usage_error, run_command
from .evaluation.features import DEFAULT_EVAL_BATCH_SIZE
from .image_processing_simlap import SimLAPImageProcessor
from .saved_model import load_saved_model

logger = logging.getLogger("simlap_hf.embed")

INDEX_FILE = "index.json"
SHARD_FOLDER = "data"
SPLITS = ("train", "validation", "all")


@dataclass
class EmbedArguments:
    """What to embed with which model, and where to write the index."""

    model_name_or_path: str = field(metadata={"help": "A saved SimLAP model folder (pretrained, fine-tuned or Fuse)."})
    output_dir: str = field(metadata={"help": "Folder of the embedding index (parquet shards + index.json)."})
    split: str = field(
        default="all",
        metadata={"help": "Which split of the loaded data to embed: train, validation or all (both, in that order)."},
    )
    batch_size: int = field(default=DEFAULT_EVAL_BATCH_SIZE, metadata={"help": "Images per forward pass."})
    shard_size: int = field(default=50_000, metadata={"help": "Rows per parquet shard (memory holds one shard)."})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available, else cpu), cpu, cuda, cuda:1."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing index in output_dir."})
    seed: int = field(default=42, metadata={"help": "Seed of the validation carve-out and --max_*_samples."})

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}.")
        for flag in ("batch_size", "shard_size"):
            if getattr(self, flag) <= 0:
                raise ValueError(f"--{flag} must be a positive integer, got {getattr(self, flag)}.")


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else as torch reads it (clear error when unavailable)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available on this machine; use --device cpu (or auto).")
    return resolved


def load_processor(path: str | os.PathLike):
    """The model folder's :class:`~simlap_hf.SimLAPImageProcessor` (``preprocessor_config.json``), or None."""
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        return None
    values = json.loads(file.read_text())
    if values.get("image_processor_type") != SimLAPImageProcessor.__name__:
        return None
    return SimLAPImageProcessor.from_pretrained(path)


def data_args_for_model(data_args: Any, model_dir: str | os.PathLike, model: torch.nn.Module) -> Any:
    """Preprocess like the model's evaluation: input size, crop, interpolation, mean and std come from its saved
    image processor (older folders without one: the input size from its config, the rest from the flags)."""
    processor = load_processor(model_dir)
    if processor is not None:
        data_args.input_size = processor.size
        data_args.crop_pct = processor.crop_pct
        data_args.interpolation = processor.interpolation
        data_args.mean = list(processor.image_mean)
        data_args.std = list(processor.image_std)
    elif getattr(model.config, "image_size", None):
        logger.warning(
            "%s has no preprocessor_config.json: input size %s from its config, crop, interpolation and "
            "normalisation from the flags.",
            model_dir,
            model.config.image_size,
        )
        data_args.input_size = int(model.config.image_size)
    return data_args


def _sources(dataset: datasets.Dataset, split: str, start: int) -> list[str]:
    """Where each row's image comes from: its file when it is one on disk, else ``<split>/<row>``."""
    raw = dataset.cast_column("image", datasets.Image(decode=False))["image"]
    sources = []
    for offset, value in enumerate(raw):
        path = value.get("path") if isinstance(value, dict) else None
        sources.append(path if path and os.path.isfile(path) else f"{split}/{start + offset}")
    return sources


def _fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """(n, d) float32 rows as an Arrow column of fixed-size lists of d floats."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


@torch.no_grad()
def encode_batch(model: torch.nn.Module, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """``features`` (B, D) for any SimLAP model; ``embeddings`` (B, K) and online-head ``logits`` (B, C) for a
    pretrained one."""
    features = model.get_image_features(pixel_values)
    out = {"features": features.float()}
    projector = getattr(model, "projector", None)
    if projector is not None:
        out["embeddings"] = projector(features).float()
        out["logits"] = model.online_head(features).float()
    return out


def _embed_rows(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    data_args: Any,
    num_channels: int,
    batch_size: int,
    device: torch.device,
    num_workers: int,
) -> Iterator[dict[str, np.ndarray]]:
    # No augmented_split: every row gets the evaluation transform.
    view = with_image_transforms(datasets.DatasetDict(embed=dataset), data_args, num_channels)["embed"]
    for batch in create_eval_dataloader(view, batch_size, num_workers):
        encoded = encode_batch(model, batch["pixel_values"].to(device, non_blocking=True))
        yield {name: value.cpu().numpy() for name, value in encoded.items()} | {"label": batch["labels"].numpy()}


def write_index(
    model: torch.nn.Module,
    splits: dict[str, datasets.Dataset],
    label_names: Sequence[str],
    data_args: Any,
    output_dir: str | os.PathLike,
    *,
    model_name_or_path: str,
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
    shard_size: int = 50_000,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    description: str = "",
    show_progress: bool = True,
    data_source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Embed ``splits`` (name -> data set with ``image`` and ``label`` columns) into ``output_dir``; returns the
    index description written to ``index.json``."""
    output_dir = Path(output_dir)
    shard_dir = output_dir / SHARD_FOLDER
    shard_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    num_channels = int(getattr(model.config, "num_channels", 3))
    total = sum(len(ds) for ds in splits.values())
    progress = tqdm(total=total, desc="embed", unit="img", disable=not show_progress)
    shards: list[dict[str, Any]] = []
    dims: dict[str, int] = {}
    start_time = time.perf_counter()
    for split, dataset in splits.items():
        for start in range(0, len(dataset), shard_size):
            part = dataset.select(range(start, min(start + shard_size, len(dataset))))
            rows = _embed_rows(model, part, data_args, num_channels, batch_size, device, num_workers)
            arrays = _gather_columns(rows, progress)
            dims = {name: int(arrays[name].shape[1]) for name in ("features", "embeddings") if name in arrays}
            name = f"shard-{len(shards):05d}.parquet"
            pq.write_table(_shard_table(arrays, part, split, start), shard_dir / name)
            shards.append({"file": f"{SHARD_FOLDER}/{name}", "rows": len(part), "split": split})
    progress.close()
    seconds = time.perf_counter() - start_time
    config = model.config
    info = {
        "format": "simlap-embedding-index/1",
        "model_name_or_path": os.path.abspath(model_name_or_path),
        "model_class": type(model).__name__,
        "data": description,
        "label_names": list(label_names),
        "model_label_names": [config.id2label[i] for i in range(len(config.id2label))],
        "num_rows": total,
        "feature_dim": dims.get("features"),
        "embedding_dim": dims.get("embeddings"),
        "has_embeddings": "embeddings" in dims,
        "shards": shards,
        "images_per_second": round(total / seconds, 1) if seconds > 0 else None,
        # How to load the data again (images of hits stored inside a data set: EmbeddingIndex.image).
        "data_source": data_source,
    }
    (output_dir / INDEX_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _gather_columns(rows: Iterator[dict[str, np.ndarray]], progress: tqdm) -> dict[str, np.ndarray]:
    """Concatenate the batches of one shard into one array per column (``features`` (n, D), ``embeddings``
    (n, K), ``logits`` (n, C), ``label`` (n,)), advancing ``progress`` by each batch's rows."""
    columns: dict[str, list[np.ndarray]] = {}
    for batch in rows:
        for name, value in batch.items():
            columns.setdefault(name, []).append(value)
        progress.update(len(batch["label"]))
    return {name: np.concatenate(values) for name, values in columns.items()}


def _shard_table(arrays: dict[str, np.ndarray], part: datasets.Dataset, split: str, start: int) -> pa.Table:
    """The parquet table of one shard: vectors, label, image source, split and row of every image."""
    return pa.table(
        {
            **{name: _fixed_list(arrays[name]) for name in ("features", "embeddings") if name in arrays},
            "label": pa.array(arrays["label"].astype(np.int64)),
            "source": pa.array(_sources(part, split, start), pa.string()),
            "split": pa.array([split] * len(part), pa.string()),
            "row": pa.array(np.arange(start, start + len(part), dtype=np.int64)),
        }
    )


def _data_source(data_args: Any, seed: int) -> dict[str, Any]:
    """The data flags that reproduce the embedded splits (local paths made absolute)."""
    from dataclasses import asdict

    values = asdict(data_args)
    for key in ("train_dir", "validation_dir"):
        if values.get(key):
            values[key] = os.path.abspath(values[key])
    name = values.get("dataset_name")
    if name and os.path.exists(name):
        values["dataset_name"] = os.path.abspath(name)
    return {"data_args": values, "seed": seed}


def _check_output(output_dir: Path, overwrite: bool) -> bool:
    """Check ``--output_dir`` before anything is loaded; returns whether an existing index will be replaced (it is
    replaced only once the new one is complete, see :func:`_put_in_place`)."""
    check_writable_folder(output_dir, "--output_dir")
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {str(output_dir)!r} is a file; choose a folder.")
    if not (output_dir.exists() and any(output_dir.iterdir())):
        return False
    if not overwrite:
        raise UsageError(
            f"--output_dir {str(output_dir)!r} exists and is not empty; pass --overwrite_output_dir to replace "
            f"it, or choose another folder."
        )
    if not (output_dir / INDEX_FILE).is_file() and not (output_dir / SHARD_FOLDER).is_dir():
        raise UsageError(
            f"--output_dir {str(output_dir)!r} holds files that are not an embedding index; refusing to delete "
            f"them even with --overwrite_output_dir. Choose another folder."
        )
    return True


def _put_in_place(new_index: Path, output_dir: Path) -> None:
    """Replace the index in ``output_dir`` by the complete ``new_index``: the old one is renamed away, the new one
    renamed in, then the old one deleted (a failure before that leaves the old index as it was)."""
    old_index = output_dir.with_name(f".{output_dir.name}.replaced-index")
    shutil.rmtree(old_index, ignore_errors=True)
    os.replace(output_dir, old_index)
    os.replace(new_index, output_dir)
    shutil.rmtree(old_index, ignore_errors=True)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the flags, embed, write the index; returns the contents of ``index.json``."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((EmbedArguments, DataArguments))
    parser.error = raise_usage_error  # type: ignore[method-assign]
    embed_args, data_args = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None)
    device = resolve_device(embed_args.device)
    output_dir = Path(embed_args.output_dir)
    replace = _check_output(output_dir, embed_args.overwrite_output_dir)
    model = load_saved_model(embed_args.model_name_or_path, device=device)
    data_args = data_args_for_model(data_args, embed_args.model_name_or_path, model)
    data = load_image_dataset(data_args, seed=embed_args.seed)
    names = ("train", "validation") if embed_args.split == "all" else (embed_args.split,)
    description = data_args.train_dir or data_args.dataset_name or ""
    # An existing index is replaced only once the new one is complete: written next to it, then swapped in.
    target = output_dir.with_name(f".{output_dir.name}.new-index") if replace else output_dir
    try:
        if replace:
            shutil.rmtree(target, ignore_errors=True)  # left by an earlier attempt that did not finish
        target.mkdir(parents=True, exist_ok=True)
        info = write_index(
            model,
            {name: data[name] for name in names},
            get_label_names(data),
            data_args,
            target,
            model_name_or_path=embed_args.model_name_or_path,
            batch_size=embed_args.batch_size,
            shard_size=embed_args.shard_size,
            device=device,
            num_workers=data_args.loader_workers(),
            description=description,
            data_source=_data_source(data_args, embed_args.seed),
        )
        if replace:
            _put_in_place(target, output_dir)
    finally:
        if replace:
            shutil.rmtree(target, ignore_errors=True)
    logger.info("Embedded %d images into %s (%s images/s).", info["num_rows"], output_dir, info["images_per_second"])
    return info


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: prints the index's size as JSON; 1 with ``error: ...`` for an input error (see
    :func:`~simlap_hf.errors.run_command`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def embed_and_print(arguments: list[str]) -> None:
        info = run(arguments)
        print(json.dumps({key: info[key] for key in ("num_rows", "feature_dim", "embedding_dim", "images_per_second")}))

    return run_command(embed_and_print, argv)


if __name__ == "__main__":
    raise SystemExit(main())
