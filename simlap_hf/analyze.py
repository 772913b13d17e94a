"""Compare learned representations, as numbers and pictures: ``python -m simlap_hf.analyze``.

    python -m simlap_hf.analyze --model_name_or_path outputs/simlap outputs/supcon --dataset_name cifar10 \\
        --output_dir reports/cifar10 --transfer_dataset_name cifar100 --labels SimLAP SupCon
    python -m simlap_hf.analyze --model_name_or_path outputs/simlap --timm_model resnet18 \\
        --train_dir data/train --validation_dir data/val --input_size 32 --output_dir reports/mine

For every model (local SimLAP / transformers folders given with ``--model_name_or_path``, and timm architectures
given with ``--timm_model NAME`` -- randomly initialised -- or ``--timm_model NAME=WEIGHTS`` with a local weights file
or folder; nothing is ever downloaded) it measures, on the validation split of the data set:

* kNN top-1 and linear-probe top-1 of the backbone features (``pooler_output``), with the training images, under the
  evaluation transform, as the memory bank / probe training set;
* collapse of the embeddings (``embeddings`` of a SimLAPModel, ``pooler_output`` of anything else): singular value
  spectrum, effective rank, number of dimensions holding 99% of the variance;
* with ``--transfer_dataset_name`` (or ``--transfer_train_dir``): kNN and linear probe on another data set;
* for SimLAP models: the gates of every class pair, the class-relationship matrices, most / least related classes.

The output folder receives ``report.json``, ``report.md``, ``singular_values.png`` (all models overlaid) and, per
SimLAP model with a feature filter, ``gate_heatmap_<model>.png``, ``gate_histogram_<model>.png`` and
``gates_<model>.npz`` (the class-pair matrices as arrays, and the C x C x K gates when not too large).

The data flags are those of :class:`simlap_hf.data.DataArguments` (``--dataset_name``, ``--train_dir``,
``--max_train_samples``, ``--max_eval_samples``, ``--input_size``, ...). Without ``--input_size`` the input size is the
``image_size`` of the first SimLAP model given (else 32). A YAML file of options may come first, as for the training
scripts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .analysis import (
    DEFAULT_NEAR_BINARY_MARGIN,
    analyze_model,
    embedding_map,
    extract_representations,
    plot_embedding_map,
    plot_gate_heatmap,
    plot_gate_histogram,
    plot_singular_values,
    probe_features,
    render_markdown,
    to_jsonable,
)
from .analysis.loading import EvalData, LoadedModel, describe_data, load_pretrained_model, load_timm_model
from .analysis.report import save_gate_arrays, unique_slug
from .data import DataArguments, resolve_mean_std
from .errors import UsageError, check_writable_folder, run_command
from .evaluation import DEFAULT_KNN_K, DEFAULT_KNN_TEMPERATURE
from .evaluation.features import DEFAULT_EVAL_BATCH_SIZE
from .relations import DEFAULT_THRESHOLD
from .training import parse_args

logger = logging.getLogger("simlap_hf.analyze")

# Fewest points a t-SNE/UMAP map is drawn for (embedding_map refuses fewer).
MIN_MAP_POINTS = 5

#: Above this many classes the C x C matrices go only to the .npz files, not into report.json.
MAX_CLASSES_IN_JSON = 100
#: The full C x C x K gate tensor is saved (float16) when it has at most this many values.
MAX_SAVED_GATE_VALUES = 2**24


@dataclass
class AnalyzeArguments:
    """Models to compare, the transfer data set, and the analysis settings."""

    model_name_or_path: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Local folders of saved models (SimLAPModel, SimLAP classifiers, transformers vision models)."
        },
    )
    timm_model: list[str] = field(
        default_factory=list,
        metadata={
            "help": "timm architectures to compare, randomly initialised (NAME) or with local weights "
            "(NAME=FILE_OR_FOLDER: .safetensors / .pth / .bin); never downloaded."
        },
    )
    timm_kwargs: str | None = field(
        default=None, metadata={"help": "Extra timm.create_model kwargs for --timm_model, as JSON."}
    )
    labels: list[str] = field(
        default_factory=list,
        metadata={"help": "Names of the models in the report and legends: one per model, --model_name_or_path first."},
    )
    output_dir: str = field(default="analysis", metadata={"help": "Folder for report.json, report.md and figures."})
    transfer_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Second data set for kNN / linear-probe transfer (same forms as --dataset_name)."},
    )
    transfer_dataset_config_name: str | None = field(default=None, metadata={"help": "Hub config of the transfer set."})
    transfer_train_dir: str | None = field(default=None, metadata={"help": "Imagefolder tree of the transfer set."})
    transfer_validation_dir: str | None = field(
        default=None, metadata={"help": "Imagefolder tree of the transfer set's validation split."}
    )
    knn_k: int = field(default=DEFAULT_KNN_K, metadata={"help": "Neighbours of the kNN classifier."})
    knn_temperature: float = field(
        default=DEFAULT_KNN_TEMPERATURE, metadata={"help": "Temperature of the cosine-weighted kNN vote."}
    )
    no_linear_probe: bool = field(default=False, metadata={"help": "Skip the (slower) linear probe."})
    gate_threshold: float = field(
        default=DEFAULT_THRESHOLD, metadata={"help": "Gate values >= this are open dimensions."}
    )
    near_binary_margin: float = field(
        default=DEFAULT_NEAR_BINARY_MARGIN,
        metadata={"help": "Gate values within this distance of 0 or 1 count as near-binary."},
    )
    top_k_pairs: int = field(default=5, metadata={"help": "Number of most / least related class pairs listed."})
    map_samples: int = field(
        default=2000,
        metadata={"help": "Validation images in the 2-D embedding map (embedding_map_<model>.png; 0: no map)."},
    )
    map_method: str = field(
        default="auto",
        metadata={"help": "2-D map: tsne (scikit-learn), umap (umap-learn) or auto (umap if installed)."},
    )
    batch_size: int = field(default=DEFAULT_EVAL_BATCH_SIZE, metadata={"help": "Images per forward pass."})
    seed: int = field(default=42, metadata={"help": "Seed of the data subsampling / split and of the probe."})
    device: str | None = field(
        default=None, metadata={"help": "Torch device (default: cuda when available, else cpu)."}
    )

    def __post_init__(self) -> None:
        if self.knn_k < 1:
            raise ValueError(f"--knn_k must be >= 1, got {self.knn_k}.")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}.")
        if self.map_samples < 0:
            raise ValueError(f"--map_samples must be >= 0 (0: no map), got {self.map_samples}.")
        if self.map_method not in ("auto", "tsne", "umap"):
            raise ValueError(f"--map_method must be auto, tsne or umap, got {self.map_method!r}.")
        if not 0.0 < self.gate_threshold < 1.0:
            raise ValueError(f"--gate_threshold must lie in (0, 1), got {self.gate_threshold}.")
        if not 0.0 <= self.near_binary_margin < 0.5:
            raise ValueError(f"--near_binary_margin must lie in [0, 0.5), got {self.near_binary_margin}.")


def _transfer_arguments(args: AnalyzeArguments, data_args: Any) -> Any | None:
    """The data arguments of the transfer data set: the main set's preprocessing with the transfer set's source."""
    if not (args.transfer_dataset_name or args.transfer_train_dir):
        return None

    # The models expect the normalisation they were trained with: keep the main data set's statistics.
    mean, std = resolve_mean_std(data_args)
    source = {
        "dataset_name": args.transfer_dataset_name,
        "dataset_config_name": args.transfer_dataset_config_name,
        "train_dir": args.transfer_train_dir,
        "validation_dir": args.transfer_validation_dir,
    }
    return dataclasses.replace(
        data_args, **source, image_column_name=None, label_column_name=None, mean=list(mean), std=list(std)
    )


def _embedding_map_figure(
    model: nn.Module,
    loader: Any,
    names: Sequence[str],
    model_name: str,
    path: Path,
    samples: int,
    method: str,
    seed: int,
    source: str,
) -> tuple[str, str] | None:
    """The 2-D map (t-SNE / UMAP) of at most ``samples`` validation embeddings, coloured by class; None (with a
    warning) when the split is too small for one."""
    features, embeddings, labels = extract_representations(model, loader, show_progress=False)
    use_embeddings = source == "embeddings" and embeddings is not None
    vectors = embeddings if use_embeddings else features
    if len(vectors) > samples:
        keep = torch.from_numpy(np.random.default_rng(seed).permutation(len(vectors))[:samples])
        vectors, labels = vectors[keep], labels[keep]
    if len(vectors) < MIN_MAP_POINTS:
        logger.warning(
            "%s: no embedding map (t-SNE/UMAP need at least %d validation images, the split has %d); the rest of the "
            "report is written.",
            model_name,
            MIN_MAP_POINTS,
            len(vectors),
        )
        return None
    points, used = embedding_map(vectors, method, seed)
    what = "projected embeddings" if use_embeddings else "backbone features"
    title = f"{model_name}: {'t-SNE' if used == 'tsne' else 'UMAP'} of {len(vectors)} validation {what}"
    plot_embedding_map(points, labels.tolist(), names, path, title=title)
    return path.name, used


def _input_size_given(argv: Sequence[str]) -> bool:
    return any(item == "--input_size" or item.startswith("--input_size=") for item in argv)


def _timm_kwargs(args: AnalyzeArguments) -> dict[str, Any]:
    """Check that there is something to analyse and one label per model; the parsed ``--timm_kwargs``."""
    if not args.model_name_or_path and not args.timm_model:
        raise ValueError("Nothing to analyse: give --model_name_or_path DIR [DIR ...] and/or --timm_model NAME.")
    count = len(args.model_name_or_path) + len(args.timm_model)
    if args.labels and len(args.labels) != count:
        raise ValueError(
            f"--labels has {len(args.labels)} names for {count} models (--model_name_or_path first, then "
            f"--timm_model); give one name per model."
        )
    timm_kwargs = json.loads(args.timm_kwargs) if args.timm_kwargs else {}
    if not isinstance(timm_kwargs, dict):
        raise ValueError(f"--timm_kwargs must be a JSON object, got {args.timm_kwargs!r}.")
    return timm_kwargs


def _load_models(
    args: AnalyzeArguments, data_args: Any, timm_kwargs: dict[str, Any], input_size_given: bool
) -> tuple[list[LoadedModel], Any]:
    """The models to compare, named by ``--labels``, and the data arguments (input size from the first model's
    config when ``--input_size`` was not given)."""
    # Load the saved models first (cheap) so that their image size can set the default input size.
    loaded = [load_pretrained_model(path) for path in args.model_name_or_path]
    loaded += [load_timm_model(spec, timm_kwargs) for spec in args.timm_model]
    if not input_size_given:
        sizes = [entry.image_size for entry in loaded if entry.image_size]
        if sizes and sizes[0] != data_args.input_size:
            logger.info("Input size %d from the first model's config (no --input_size given).", sizes[0])
            data_args = dataclasses.replace(data_args, input_size=int(sizes[0]))
    for entry, label in zip(loaded, args.labels or [None] * len(loaded), strict=True):
        entry.name = label or entry.name
    return loaded, data_args


def _transfer_result(model: nn.Module, transfer: EvalData, num_channels: int, args: AnalyzeArguments) -> dict:
    """kNN and linear-probe top-1 of the backbone features on the transfer data set."""
    transfer_train, transfer_validation = transfer.loaders(num_channels)
    train_features, _, train_labels = extract_representations(model, transfer_train)
    query_features, _, query_labels = extract_representations(model, transfer_validation)
    return {
        "dataset": transfer.description,
        **probe_features(
            train_features,
            train_labels,
            query_features,
            query_labels,
            len(transfer.label_names),
            knn_k=args.knn_k,
            knn_temperature=args.knn_temperature,
            run_linear_probe=not args.no_linear_probe,
            seed=args.seed,
        ),
    }


def _gate_figures(model: nn.Module, name: str, gates: dict[str, Any], output_dir: Path, slug: str) -> dict[str, str]:
    """Heatmap, histogram and ``.npz`` arrays of a model's gates (file names); drops the C x C matrices from the
    report when there are more than :data:`MAX_CLASSES_IN_JSON` classes."""
    count = gates["num_classes"]
    figures = {
        "gate_heatmap": plot_gate_heatmap(
            gates,
            output_dir / f"gate_heatmap_{slug}.png",
            title=f"{name}: class relationships from the {gates['gate']} gate (K = {gates['dim']})",
        ).name,
        "gate_histogram": plot_gate_histogram(
            gates,
            output_dir / f"gate_histogram_{slug}.png",
            title=f"{name}: gate values of all {count}\u00d7{count} class pairs",
        ).name,
        "gate_arrays": save_gate_arrays(model, gates, output_dir / f"gates_{slug}.npz", MAX_SAVED_GATE_VALUES).name,
    }
    if count > MAX_CLASSES_IN_JSON:
        gates.pop("matrices")
        gates.pop("single_class_gates")
    return figures


def _analyse_model(
    entry: LoadedModel,
    model: nn.Module,
    data: EvalData,
    transfer: EvalData | None,
    args: AnalyzeArguments,
    output_dir: Path,
    taken: set[str],
) -> dict[str, Any]:
    """The report entry of one model (on its device already), writing its figures into ``output_dir``."""
    train_loader, validation_loader = data.loaders(entry.num_channels)
    result = analyze_model(
        model,
        train_loader,
        validation_loader,
        data.label_names,
        knn_k=args.knn_k,
        knn_temperature=args.knn_temperature,
        run_linear_probe=not args.no_linear_probe,
        gate_threshold=args.gate_threshold,
        near_binary_margin=args.near_binary_margin,
        top_k_pairs=args.top_k_pairs,
    )
    result = {"name": entry.name, "source": entry.source, "kind": entry.kind, **result}
    result["slug"] = slug = unique_slug(entry.name, taken)
    result["figures"] = {}
    if transfer is not None:
        result["transfer"] = _transfer_result(model, transfer, entry.num_channels, args)
    embedding_map_figure = None
    if args.map_samples:
        embedding_map_figure = _embedding_map_figure(
            model,
            validation_loader,
            data.label_names,
            entry.name,
            output_dir / f"embedding_map_{slug}.png",
            args.map_samples,
            args.map_method,
            args.seed,
            result.get("embedding_source", "embeddings"),
        )
    if embedding_map_figure is not None:
        result["figures"]["embedding_map"], result["embedding_map_method"] = embedding_map_figure
    gates = result.get("gates")
    if gates and gates["has_filter"]:
        result["figures"].update(_gate_figures(model, entry.name, gates, output_dir, slug))
    elif gates:
        logger.info("%s: %s", entry.name, gates["note"])
    return result


def _write_report(
    models: list[dict[str, Any]],
    data: EvalData,
    transfer: EvalData | None,
    args: AnalyzeArguments,
    device: torch.device,
    output_dir: Path,
) -> dict[str, Any]:
    """The spectrum figure of every model, ``report.json`` and ``report.md``; returns the report."""
    spectrum = plot_singular_values(
        {model["name"]: model["collapse"]["singular_values"] for model in models},
        output_dir / "singular_values.png",
        dims={model["name"]: model["collapse"]["dim"] for model in models},
        title=f"Singular value spectrum of the embeddings on {data.description} (validation split)",
    )
    report = {
        "dataset": data.summary(),
        "transfer_dataset": transfer.summary() if transfer else None,
        "settings": {
            "knn_k": args.knn_k,
            "knn_temperature": args.knn_temperature,
            "linear_probe": not args.no_linear_probe,
            "gate_threshold": args.gate_threshold,
            "near_binary_margin": args.near_binary_margin,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "device": str(device),
        },
        "models": models,
        "figures": {"singular_values": spectrum.name},
    }
    report = to_jsonable(report)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / "report.md").write_text(render_markdown(report))
    logger.info("Wrote the analysis to %s", output_dir)
    return report


def run_analysis(args: AnalyzeArguments, data_args: Any, input_size_given: bool = True) -> dict[str, Any]:
    """Analyse every model of ``args`` on the data of ``data_args``; write the report and figures; return the report."""
    from tqdm.auto import tqdm

    if not isinstance(data_args, DataArguments):
        raise TypeError("data_args must be a simlap_hf.data.DataArguments")
    timm_kwargs = _timm_kwargs(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    output_dir = Path(args.output_dir)
    check_writable_folder(output_dir, "--output_dir")
    if args.map_samples and getattr(args, "map_method", "auto") == "umap" and importlib.util.find_spec("umap") is None:
        raise UsageError("--map_method umap needs umap-learn: pip install umap-learn, or pass --map_method tsne.")
    output_dir.mkdir(parents=True, exist_ok=True)
    loaded, data_args = _load_models(args, data_args, timm_kwargs, input_size_given)

    data = EvalData(data_args, args.batch_size, args.seed, describe_data(data_args))
    transfer_args = _transfer_arguments(args, data_args)
    transfer = (
        EvalData(transfer_args, args.batch_size, args.seed, describe_data(transfer_args)) if transfer_args else None
    )
    taken: set[str] = set()
    models: list[dict[str, Any]] = []
    for entry in tqdm(loaded, desc="Analysing models", disable=len(loaded) < 2):
        logger.info("Analysing %s", entry.name)
        model = entry.model.to(device).eval()
        models.append(_analyse_model(entry, model, data, transfer, args, output_dir, taken))
        entry.model = None  # free the weights before the next model
        del model
    return _write_report(models, data, transfer, args, device, output_dir)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default: the command line), run the analysis, and return the report."""

    argv = list(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, data_args = parse_args((AnalyzeArguments, DataArguments), argv)
    return run_analysis(args, data_args, input_size_given=_input_size_given(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: 0 when the report is written; 1 with ``error: ...`` for an input error (see
    :func:`~simlap_hf.errors.run_command`)."""
    return run_command(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
