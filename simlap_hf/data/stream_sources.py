"""Streamed sources of ``--streaming`` (resolved by :func:`~simlap_hf.data.sources.resolve_stream_sources`): local
WebDataset-style tar shards, an image folder or a Hub data set, opened with ``datasets.load_dataset(...,
streaming=True)`` and mapped to the standard columns without reading them.

A standard stream yields ``{"image": {"bytes", "path"}, "label": int}`` rows (images still encoded); the small
evaluation splits are collected from streams into in-memory :class:`datasets.Dataset` objects.
"""

from __future__ import annotations

import glob
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets

from .arguments import TRAIN_SPLIT, DataArguments
from .labels import stream_label_names
from .registry import NamedDatasetSpec
from .sources import StreamSource, resolve_train_stream

__all__ = [
    "StandardStream",
    "collect_split",
    "expand_shard_patterns",
    "hub_validation_split",
    "open_stream",
    "open_train_stream",
]

_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_LABEL_COLUMNS = ("label", "labels", "cls")


def expand_shard_patterns(patterns: Sequence[str]) -> list[str]:
    """Paths of the shards named by ``patterns``: brace ranges (``train-{0000..0003}.tar``, zero padding kept) and
    globs (``shards/*.tar``), each pattern's files sorted. FileNotFoundError when a pattern names no file."""
    files: list[str] = []
    for pattern in patterns:
        expanded = [pattern]
        while any(_BRACE_RANGE.search(p) for p in expanded):
            expanded = [variant for p in expanded for variant in _expand_first_range(p)]
        for candidate in expanded:
            matches = sorted(glob.glob(candidate))
            if not matches:
                raise FileNotFoundError(f"No shard file matches {candidate!r} (from the pattern {pattern!r}).")
            files.extend(matches)
    return files


def _expand_first_range(pattern: str) -> list[str]:
    """``a{08..10}b`` -> ``[a08b, a09b, a10b]``: the first brace range only, with the width of its first bound."""
    match = _BRACE_RANGE.search(pattern)
    if match is None:
        return [pattern]
    first, last = match.group(1), match.group(2)
    numbers = range(int(first), int(last) + 1)
    return [f"{pattern[: match.start()]}{n:0{len(first)}d}{pattern[match.end() :]}" for n in numbers]


@dataclass
class StandardStream:
    """A stream in standard form and what its source says about it.

    Attributes:
        rows: yields ``{"image": {"bytes", "path"}, "label": int}``.
        label_names: the class names when the source names them (a ClassLabel column), else None.
        num_examples: the number of rows when the source knows it (a Hub split's metadata), else None.
    """

    rows: datasets.IterableDataset
    label_names: list[str] | None
    num_examples: int | None


class _ToStandardRow:
    """Row mapper of :func:`_standardize`: the image value as it is, the label as an int (``json`` labels read from
    their ``"label"`` key)."""

    def __init__(self, image_column: str, label_column: str) -> None:
        self.image_column, self.label_column = image_column, label_column

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        label = row[self.label_column]
        if isinstance(label, dict):
            label = label["label"]
        return {"image": row[self.image_column], "label": int(label)}


def _pick_columns(
    features: datasets.Features, wanted: tuple[str | None, str | None], description: str
) -> tuple[str, str]:
    """(image column, label column) of a stream: the ``wanted`` ones when given, else the first Image column and the
    first of label / labels / cls / json."""
    image = wanted[0] or next((k for k, v in features.items() if isinstance(v, datasets.Image)), None)
    candidates = [wanted[1]] if wanted[1] else [*_LABEL_COLUMNS, "json"]
    label = next((name for name in candidates if name in features), None)
    if image is None or image not in features or label is None:
        raise ValueError(
            f"{description} has the columns {list(features)}; --streaming needs an image column (found: {image}) "
            f"and a label column (found: {label}). Name them with --image_column_name / --label_column_name."
        )
    return image, label


def _standardize(
    stream: datasets.IterableDataset, args: DataArguments, description: str, spec: NamedDatasetSpec | None = None
) -> StandardStream:
    """Map a raw stream to the standard columns (images left encoded) and read its class names and size; the column
    flags win over the named data set's (``spec``) columns."""
    if stream.features is None:
        raise ValueError(f"{description} does not describe its columns; --streaming cannot read it.")
    wanted = (args.image_column_name, args.label_column_name)
    if spec is not None:
        wanted = (wanted[0] or spec.image_column, wanted[1] or spec.label_column)
    image, label = _pick_columns(stream.features, wanted, description)
    feature = stream.features[label]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    splits = stream.info.splits or {}
    split = splits.get(TRAIN_SPLIT) if stream.split is None else splits.get(str(stream.split))
    num_examples = split.num_examples if split is not None and split.num_examples else None
    stream = stream.cast_column(image, datasets.Image(decode=False))
    rows = stream.map(_ToStandardRow(image, label), remove_columns=list(stream.features))
    return StandardStream(rows=rows, label_names=names, num_examples=num_examples)


def open_stream(source: StreamSource, args: DataArguments, split: str) -> StandardStream:
    """The split ``split`` of a resolved stream source as a standard stream."""
    if source.kind == "webdataset":
        shards = expand_shard_patterns(source.files)
        stream = datasets.load_dataset("webdataset", data_files={split: shards}, split=split, streaming=True)
        return _standardize(stream, args, source.description)
    if source.kind == "imagefolder":
        stream = datasets.load_dataset("imagefolder", data_dir=source.location, split=TRAIN_SPLIT, streaming=True)
        return _standardize(stream, args, source.description)
    stream = datasets.load_dataset(source.location, source.config, split=split, streaming=True)
    return _standardize(stream, args, f"{source.description} ({split})", source.spec)


def hub_validation_split(source: StreamSource) -> str:
    """The Hub data set's split used for validation: ``validation``, else ``test``."""
    builder = datasets.load_dataset_builder(source.location, source.config)
    return next((s for s in ("validation", "test") if s in (builder.info.splits or {})), "validation")


def open_train_stream(args: DataArguments) -> StandardStream:
    """The training split of ``--train_files``, ``--train_dir`` or the Hub data set ``--dataset_name``."""
    return open_stream(resolve_train_stream(args), args, TRAIN_SPLIT)


def collect_split(stream: StandardStream, limit: int | None, label_names: list[str] | None) -> datasets.Dataset:
    """The first ``limit`` rows of ``stream`` (all when None) in memory, as a standard-form :class:`datasets.Dataset`
    with ``image`` (encoded images) and ``label`` (ClassLabel of ``label_names``; when None, see
    :func:`~simlap_hf.data.labels.stream_label_names`)."""
    rows = list(itertools.islice(iter(stream.rows), limit))
    labels = [row["label"] for row in rows]
    label_names = stream_label_names(label_names, labels)
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=label_names))
    return datasets.Dataset.from_dict({"image": [row["image"] for row in rows], "label": labels}, features=features)
