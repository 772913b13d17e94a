"""Reports of the representation analysis: markdown sections for model cards and the analysis command's
``report.md``, the conversion of results to plain JSON types, and the files beside a report (gate arrays, names)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from .gates import OPEN_GATE_NOTE, gate_matrix


def _percent(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}%"


def _number(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pair_text(pair: Mapping[str, Any]) -> str:
    first, second = pair["classes"]
    return f"**{first} / {second}** ({pair.get('relatedness', pair['mean_activation']):.3f})"


def _model_markdown(report: Mapping[str, Any]) -> str:
    collapse = report.get("collapse") or {}
    validation = report.get("validation") or {}
    source = report.get("embedding_source", "embeddings")
    dim = collapse.get("dim")
    rows = [
        ("kNN top-1 (k={}, validation)".format(validation.get("knn_k", "?")), _percent(validation.get("knn_top1"))),
        ("Linear-probe top-1 (validation)", _percent(validation.get("linear_probe_top1"))),
        (f"Effective rank of `{source}`", f"{_number(collapse.get('effective_rank'))} of {dim}"),
        (
            "Dimensions for {:.0%} of the variance".format(collapse.get("variance_fraction", 0.99)),
            f"{collapse.get('dims_for_variance', 'n/a')} of {dim}",
        ),
    ]
    transfer = report.get("transfer")
    if transfer:
        name = transfer.get("dataset", "transfer data set")
        rows.append((f"Transfer kNN top-1 ({name})", _percent(transfer.get("knn_top1"))))
        rows.append((f"Transfer linear-probe top-1 ({name})", _percent(transfer.get("linear_probe_top1"))))
    gates = report.get("gates")
    if gates and gates.get("has_filter"):
        stats = gates["stats"]
        rows.append(("Mean gate entropy", f"{stats['mean_entropy_bits']:.3f} bits"))
        rows.append(("Near-binary gates", f"{100 * stats['near_binary_fraction']:.1f}%"))
    lines = ["| measure | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]
    if gates and gates.get("has_filter"):
        if gates.get("most_related"):
            measure = (gates.get("relation_measure") or {}).get("description", "mean gate activation")
            lines += [
                "",
                f"Most related class pairs (by {measure}): "
                + ", ".join(_pair_text(pair) for pair in gates["most_related"])
                + ".",
            ]
            lines += [
                "",
                "Least related class pairs: " + ", ".join(_pair_text(pair) for pair in gates["least_related"]) + ".",
            ]
    elif gates:
        lines += ["", f"Gates: {gates.get('note', OPEN_GATE_NOTE)}."]
    return "\n".join(lines)


def summary_markdown(report: Mapping[str, Any], *, heading: str | None = None) -> str:
    """A short markdown section for a model card from an :func:`analyze_model` result (or from a report of the
    ``python -m simlap_hf.analyze`` command, with one sub-section per model).

    It lists kNN / linear-probe top-1, the effective rank and the number of dimensions for 99% of the variance of the
    embeddings, and, for SimLAP models, gate statistics and the most / least related class pairs by name.
    Without ``heading`` the text starts with the table (as ``extra_sections`` of the model card wants it); pass e.g.
    ``heading="## Representation analysis"`` for a self-contained section.
    """
    if "models" in report:
        parts = [
            f"### {model.get('name', f'model {i + 1}')}\n\n{_model_markdown(model)}"
            for i, model in enumerate(report["models"])
        ]
        body = "\n\n".join(parts)
    else:
        body = _model_markdown(report)
    return f"{heading}\n\n{body}\n" if heading else body + "\n"


def _cell(value: Any, suffix: str = "%") -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}{suffix}" if isinstance(value, float) else str(value)


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: data, a comparison table of every model, the figures and one section per model."""
    data = report["dataset"]
    lines = ["# Representation analysis", ""]
    lines.append(
        f"Data set: **{data['name']}**, {data['num_classes']} classes ({', '.join(data['label_names'][:20])}"
        f"{', ...' if data['num_classes'] > 20 else ''}); {data['num_train']} training images (evaluation transform, "
        f"kNN memory bank and probe training set) and {data['num_validation']} validation images, "
        f"{data['input_size']}x{data['input_size']} pixels."
    )
    transfer = report.get("transfer_dataset")
    if transfer:
        lines.append(
            f"Transfer data set: **{transfer['name']}**, {transfer['num_classes']} classes, {transfer['num_train']} / "
            f"{transfer['num_validation']} images."
        )
    settings = report["settings"]
    lines += [
        "",
        f"kNN: k = {settings['knn_k']}, cosine-weighted (temperature {settings['knn_temperature']}) on backbone "
        f"features (`pooler_output`). Linear probe: logistic regression on standardised backbone features. Collapse: "
        f"singular values of the embeddings (`embeddings` of SimLAP models, `pooler_output` otherwise).",
        "",
        "## Comparison",
        "",
    ]
    header = ["model", "kNN top-1", "linear probe top-1", "effective rank", "dims for 99% variance"]
    if transfer:
        header += ["transfer kNN top-1", "transfer probe top-1"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in report["models"]:
        validation, collapse = model["validation"], model["collapse"]
        row = [
            model["name"],
            _cell(validation["knn_top1"]),
            _cell(validation["linear_probe_top1"]),
            f"{collapse['effective_rank']:.1f} / {collapse['dim']}",
            f"{collapse['dims_for_variance']} / {collapse['dim']}",
        ]
        if transfer:
            row += [_cell(model["transfer"]["knn_top1"]), _cell(model["transfer"]["linear_probe_top1"])]
        lines.append("| " + " | ".join(row) + " |")
    figures = report["figures"]
    lines += ["", f"![Singular value spectrum of the embeddings]({figures['singular_values']})", ""]
    for model in report["models"]:
        lines += [f"## {model['name']}", "", f"Source: `{model['source']}` ({model['model_class']}).", ""]
        lines.append(summary_markdown(model).rstrip())
        for warning in model.get("warnings", []):
            lines += ["", f"Warning: {warning}."]
        for key, caption in (
            ("embedding_map", "2-D map of the embeddings"),
            ("gate_heatmap", "Class-pair gate heatmap"),
            ("gate_histogram", "Gate histogram"),
        ):
            if key in model.get("figures", {}):
                lines += ["", f"![{caption} of {model['name']}]({model['figures'][key]})"]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def to_jsonable(value: Any) -> Any:
    """Recursively convert tensors, numpy values and paths to plain JSON types; NaN and infinities become ``None``."""
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def unique_slug(name: str, taken: set[str]) -> str:
    """A file-name-safe form of ``name`` not yet in ``taken`` (``_2``, ``_3``, ... appended), added to it."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "model"
    slug, index = base, 2
    while slug in taken:
        slug, index = f"{base}_{index}", index + 1
    taken.add(slug)
    return slug


def save_gate_arrays(model: nn.Module, gates: dict[str, Any], path: Path, max_pair_gates: int) -> Path:
    """Write the C x C matrices, the (C, K) single-class gates and the class names of an :func:`analyze_gates`
    result to a compressed ``.npz``, with the (C, C, K) gates of every pair (float16) when they are at most
    ``max_pair_gates`` values."""
    arrays = {key: np.asarray(value, dtype=np.float32) for key, value in gates["matrices"].items()}
    arrays["single_class_gates"] = np.asarray(gates["single_class_gates"], dtype=np.float32)
    arrays["label_names"] = np.asarray(gates["label_names"])
    count, dim = gates["num_classes"], gates["dim"]
    if count * count * dim <= max_pair_gates:
        arrays["pair_gates"] = gate_matrix(model).numpy().astype(np.float16)  # (C, C, K)
    np.savez_compressed(path, **arrays)
    return path
