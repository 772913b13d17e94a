#!/usr/bin/env python
"""Reproduce the paper's comparison (SimLAP vs supervised contrastive learning vs cross-entropy) on real data.

The paper's table is on CIFAR-10 (SimLAP 90.86, SupCon 89.9, SupCon fed arbitrary pairs 25.3). CIFAR-10 cannot be
downloaded here; Fashion-MNIST (Debian package ``dataset-fashion-mnist``) and scikit-learn's digits can. Every
variant is trained with one backbone and one CPU budget (a YAML file in ``benchmarks/configs/``), then evaluated on
the full 10,000-image Fashion-MNIST test set (online-head, kNN and linear-probe top-1, effective rank of the
embeddings) and transferred to digits (kNN and linear probe on frozen backbone features). The same network, not
trained, is evaluated too (``untrained``): the floor every trained variant should rise above.

    python benchmarks/reproduce.py benchmarks/configs/reproduce_fmnist_cpu_8ep.yaml --output_dir outputs/reproduce_8ep

Every variant is trained by running its training script (``train_pretrain.py`` or ``train_finetune.py``) in a
child process with the budget's flags, as a user would. Several processes can share the work (``--seeds`` /
``--variants``, ``--threads 1`` each) in one output folder; a final call without them gathers every finished run.

Finished variants are skipped when the command is run again (a killed reproduction continues where it stopped).
Writes ``results.json``, ``results.md`` and ``results.png`` into the output folder.

``--variants`` takes variant names or group names: ``paper`` (the default: the rows of the paper's comparison) and
``ablation`` (the authors' later formulation, erow/FastSSL, in full and one change at a time against the reference
form, with cross-entropy for comparison):

    python benchmarks/reproduce.py benchmarks/configs/reproduce_fmnist_cpu_8ep.yaml --variants ablation \
        --output_dir outputs/ablation_8ep

Models with a feature filter trained on Fashion-MNIST also get the precision of their gate relations against the
garment groups (``benchmarks/relations_fmnist.py``). Nothing here needs the ``datasets`` library when the data sets
are array sources (Fashion-MNIST's IDX files, scikit-learn's digits).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relations_fmnist import GROUPS as GARMENT_GROUPS  # noqa: E402

from simlap_hf import SimLAPForImageClassification, SimLAPModel  # noqa: E402
from simlap_hf.data import DataArguments  # noqa: E402
from simlap_hf.data.pipeline import prepare_data  # noqa: E402
from simlap_hf.evaluation import (  # noqa: E402
    effective_rank,
    extract_features,
    knn_accuracy,
    linear_probe,
    singular_values,
)
from simlap_hf.training import (  # noqa: E402
    FINETUNE_ARGUMENTS,
    PRETRAIN_ARGUMENTS,
    build_pretrain_config,
    parse_args,
)

# The authors' later formulation (erow/FastSSL model/simlap.py): gated dot product, learnable temperature, alpha 0.5
# and the per-anchor mean, with the fused gate and the LayerNorm projector (this package's default too).
FASTSSL_FORM = [
    "--loss_form",
    "dot",
    "--learnable_temperature",
    "true",
    "--alpha",
    "0.5",
    "--positive_normalization",
    "anchor",
]

# name: (script, flags). The rows of the paper's comparison, then the ablation of the authors' later formulation.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "simlap_fused_arbitrary": ("pretrain", ["--gate", "fused", "--pair_mode", "arbitrary"]),
    "simlap_fused_identical": ("pretrain", ["--gate", "fused", "--pair_mode", "identical"]),
    "simlap_fused_distinct": ("pretrain", ["--gate", "fused", "--pair_mode", "distinct"]),
    "supcon_open_identical": ("pretrain", ["--gate", "open", "--pair_mode", "identical"]),
    "supcon_open_arbitrary": ("pretrain", ["--gate", "open", "--pair_mode", "arbitrary"]),
    "cross_entropy": ("finetune", ["--from_scratch", "--mixup", "0", "--cutmix", "0", "--smoothing", "0"]),
    # Not trained: the floor every trained variant should rise above (features of a freshly initialised backbone).
    "untrained": ("none", []),
    "fastssl_full_arbitrary": ("pretrain", [*FASTSSL_FORM, "--pair_mode", "arbitrary"]),
    "fastssl_full_distinct": ("pretrain", [*FASTSSL_FORM, "--pair_mode", "distinct"]),
    "ablate_gated_dot": ("pretrain", ["--loss_form", "dot"]),
    "ablate_learnable_temperature": ("pretrain", ["--learnable_temperature", "true"]),
    "ablate_alpha": ("pretrain", ["--alpha", "0.5"]),
    "ablate_anchor_normalization": ("pretrain", ["--positive_normalization", "anchor"]),
    "ablate_gumbel_gate": ("pretrain", ["--gate", "gumbel"]),
    "ablate_stochastic_gate": ("pretrain", ["--gate", "stochastic"]),
    "ablate_batchnorm_projector": ("pretrain", ["--projector_norm", "batchnorm"]),
}
LABELS = {
    "simlap_fused_arbitrary": "SimLAP, fused gate, arbitrary pairs",
    "simlap_fused_identical": "SimLAP, fused gate, identical pairs",
    "simlap_fused_distinct": "SimLAP, fused gate, distinct pairs",
    "supcon_open_identical": "open gate, identical pairs (SupCon)",
    "supcon_open_arbitrary": "open gate, arbitrary pairs",
    "cross_entropy": "supervised cross-entropy",
    "untrained": "untrained network (reference floor)",
    "fastssl_full_arbitrary": "authors' later form, arbitrary pairs",
    "fastssl_full_distinct": "authors' later form, distinct pairs",
    "ablate_gated_dot": "reference + gated dot product",
    "ablate_learnable_temperature": "reference + learnable temperature",
    "ablate_alpha": "reference + alpha 0.5",
    "ablate_anchor_normalization": "reference + per-anchor mean",
    "ablate_gumbel_gate": "reference + Gumbel gate",
    "ablate_stochastic_gate": "reference + stochastic gate",
    "ablate_batchnorm_projector": "reference + BatchNorm projector",
}
# Named sets of variants for --variants: the paper's comparison (the default) and the ablation of the later form.
VARIANT_GROUPS: dict[str, list[str]] = {
    "paper": [
        "simlap_fused_arbitrary",
        "simlap_fused_identical",
        "simlap_fused_distinct",
        "supcon_open_identical",
        "supcon_open_arbitrary",
        "cross_entropy",
        "untrained",
    ],
    "ablation": [
        "simlap_fused_arbitrary",
        "fastssl_full_arbitrary",
        "fastssl_full_distinct",
        "ablate_gated_dot",
        "ablate_learnable_temperature",
        "ablate_alpha",
        "ablate_anchor_normalization",
        "ablate_gumbel_gate",
        "ablate_stochastic_gate",
        "ablate_batchnorm_projector",
        "cross_entropy",
    ],
}
METRICS = (
    "online_top1",
    "knn_top1",
    "probe_top1",
    "effective_rank",
    "transfer_knn_top1",
    "transfer_probe_top1",
    "relations_p5",
    "relations_p10",
)
COLUMNS = {
    "online_top1": "online head",
    "knn_top1": "kNN",
    "probe_top1": "linear probe",
    "effective_rank": "effective rank",
    "transfer_knn_top1": "digits kNN",
    "transfer_probe_top1": "digits probe",
    "relations_p5": "relations P@5",
    "relations_p10": "relations P@10",
}
# The training script of each kind of variant, and the dataclasses its command line is parsed into.
SCRIPTS = {"pretrain": ROOT / "train_pretrain.py", "finetune": ROOT / "train_finetune.py"}
ARGUMENTS = {"pretrain": PRETRAIN_ARGUMENTS, "finetune": FINETUNE_ARGUMENTS}


def budget_flags(budget: dict[str, Any], script: str) -> list[str]:
    """Flags shared by every variant, from the budget file (the model flags of pretraining are renamed)."""
    flags = []
    for key, value in budget["train"].items():
        if script == "finetune" and key in ("out_dim", "mlp_dim", "temperature", "gate", "pair_mode"):
            continue
        values = value if isinstance(value, list) else [value]
        flags += [f"--{key}", *[str(v) for v in values]]
    return flags


def eval_loader(dataset_name: str, split_limit: dict[str, int | None], budget: dict[str, Any], seed: int):
    """Sequential loaders (eval transform) of a data set's train and validation splits, and its class names.

    Built as training builds them (:func:`simlap_hf.data.prepare_data`), so an array source (Fashion-MNIST's
    IDX files, digits) needs no ``datasets`` library."""
    train_cfg = budget["train"]
    data_args = DataArguments(
        dataset_name=dataset_name,
        input_size=train_cfg["input_size"],
        mean=train_cfg.get("mean"),
        std=train_cfg.get("std"),
        max_train_samples=split_limit.get("train"),
        max_eval_samples=split_limit.get("validation"),
        dataloader_num_workers=train_cfg.get("dataloader_num_workers"),
    )
    # The training loader it also builds is not used: batches of one image (its ra copies) fit any split.
    data = prepare_data(data_args, train_cfg["num_channels"], data_args.ra, 256, seed)
    return data.train_eval, data.validation, list(data.label_names)


def relation_precisions(model: torch.nn.Module) -> dict[str, float]:
    """Precision@5 and @10 of the default gate relation measure against the Fashion-MNIST garment groups, for a
    model with a feature filter whose classes are the Fashion-MNIST classes; empty otherwise."""
    from simlap_hf.relations import ClassRelations, precision_at_k

    if getattr(model, "feature_filter", None) is None:
        return {}
    relations = ClassRelations.from_model(model)
    index = {name: i for i, name in enumerate(relations.names)}
    if not all(name in index for group in GARMENT_GROUPS for name in group):
        return {}
    groups = [[index[name] for name in group] for group in GARMENT_GROUPS]
    return {f"relations_p{k}": precision_at_k(relations.relatedness, groups, k) for k in (5, 10)}


def evaluate_model(model: torch.nn.Module, loaders: dict[str, Any], seed: int) -> dict[str, Any]:
    """Online head, kNN, linear probe, effective rank on Fashion-MNIST; kNN and probe transfer to digits. Features
    are extracted on the GPU when there is one."""
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    results: dict[str, Any] = {}
    source_train, source_test, label_names = loaders["source"]
    train_out = extract_features(model, source_train, output_key="pooler_output", show_progress=False)
    test_out = extract_features(model, source_test, output_key="pooler_output", show_progress=False)
    embeddings = test_out[0]
    if isinstance(model, SimLAPModel):  # projector and online head are applied to the pooled features
        with torch.no_grad():
            embeddings = model.projector(test_out[0])
            logits = model.online_head(test_out[0])
        results["online_top1"] = 100.0 * float((logits.argmax(1) == test_out[1]).float().mean())
    results["knn_top1"] = knn_accuracy(*train_out, *test_out, len(label_names))
    results["probe_top1"] = linear_probe(*train_out, *test_out, seed=seed)["top1"]
    results["effective_rank"] = effective_rank(embeddings)
    results["spectrum"] = singular_values(embeddings).tolist()
    transfer_train, transfer_test, transfer_names = loaders["transfer"]
    transfer_train_out = extract_features(model, transfer_train, show_progress=False)
    transfer_test_out = extract_features(model, transfer_test, show_progress=False)
    results["transfer_knn_top1"] = knn_accuracy(*transfer_train_out, *transfer_test_out, len(transfer_names))
    results["transfer_probe_top1"] = linear_probe(*transfer_train_out, *transfer_test_out, seed=seed)["top1"]
    results.update(relation_precisions(model))
    return results


def untrained_model(flags: list[str], seed: int, label_names: list[str]) -> SimLAPModel:
    """The pretraining model the budget's flags describe, freshly initialised with ``seed`` and not trained."""
    model_args, data_args, _ = parse_args(PRETRAIN_ARGUMENTS, flags)
    torch.manual_seed(seed)
    return SimLAPModel(build_pretrain_config(model_args, data_args, label_names))


def run_training_script(script: str, flags: list[str]) -> None:
    """Train with ``train_<script>.py FLAGS`` in a child process that uses as many torch threads as this one."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    subprocess.run([sys.executable, str(SCRIPTS[script]), *flags], check=True, env=env)


def run_variant(name: str, seed: int, budget: dict[str, Any], output_dir: Path, loaders: dict[str, Any]):
    """Train one variant with one seed (or reuse a finished run) and evaluate it."""
    run_dir = output_dir / f"{name}_seed{seed}"
    result_file = run_dir / "reproduce_metrics.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    script, variant_flags = VARIANTS[name]
    flags = [*budget_flags(budget, script), *variant_flags, "--seed", str(seed), "--output_dir", str(run_dir)]
    if any(run_dir.glob("checkpoints/checkpoint-*")):
        flags += ["--resume_from_checkpoint", "latest"]
    else:
        flags += ["--overwrite_output_dir"]
    start = time.perf_counter()
    if script == "none":
        run_dir.mkdir(parents=True, exist_ok=True)
        model = untrained_model(flags, seed, loaders["source"][2])
    else:
        run_training_script(script, flags)
        model_class = SimLAPModel if script == "pretrain" else SimLAPForImageClassification
        model = model_class.from_pretrained(run_dir)
    train_seconds = time.perf_counter() - start
    metrics = evaluate_model(model, loaders, seed)
    metrics.update(variant=name, seed=seed, wall_seconds=round(train_seconds, 1))
    result_file.write_text(json.dumps(metrics))
    return metrics


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation over seeds of every metric, per variant."""
    summary: dict[str, dict[str, Any]] = {}
    for name in VARIANTS:
        rows = [r for r in runs if r["variant"] == name]
        if not rows:
            continue
        entry: dict[str, Any] = {"label": LABELS[name], "seeds": [r["seed"] for r in rows]}
        for metric in METRICS:
            values = [r[metric] for r in rows if metric in r]
            if values:
                entry[metric] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                }
        entry["spectrum"] = rows[0]["spectrum"]
        summary[name] = entry
    return summary


def markdown_table(summary: dict[str, dict[str, Any]]) -> str:
    """The results table; the relation precision columns only when a variant has them."""
    metrics = [m for m in METRICS if not m.startswith("relations_") or any(m in e for e in summary.values())]
    header = "| variant | " + " | ".join(COLUMNS[m] for m in metrics) + " |\n|---|" + "---|" * len(metrics)
    lines = [header]
    for entry in summary.values():
        cells = []
        for metric in metrics:
            value = entry.get(metric)
            if value is None:
                cells.append("-")
            elif metric == "effective_rank":
                cells.append(f"{value['mean']:.1f} ± {value['std']:.1f}")
            else:
                cells.append(f"{value['mean']:.2f} ± {value['std']:.2f}")
        lines.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, Any]], path: Path) -> None:
    """Accuracy bars with their spread, and the embedding spectra overlaid (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(summary)
    metrics = [
        ("knn_top1", "kNN"),
        ("probe_top1", "linear probe"),
        ("transfer_knn_top1", "digits kNN"),
        ("transfer_probe_top1", "digits probe"),
    ]
    figure, (bars, spectra) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [3, 2]})
    # One colour per variant, also beyond the 10 of the default cycle.
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
    colours = {name: palette[index % len(palette)] for index, name in enumerate(names)}
    width = 0.8 / len(names)
    lowest = 100.0
    positions = np.arange(len(metrics))
    for index, name in enumerate(names):
        means = [summary[name].get(m, {}).get("mean", np.nan) for m, _ in metrics]
        errors = [summary[name].get(m, {}).get("std", 0.0) for m, _ in metrics]
        bars.bar(
            positions + index * width,
            means,
            width,
            yerr=errors,
            capsize=3,
            label=summary[name]["label"],
            color=colours[name],
        )
        lowest = min([lowest, *(mean for mean in means if np.isfinite(mean))])
    bars.set_xticks(positions + width * (len(names) - 1) / 2, [label for _, label in metrics])
    bars.set_ylabel("top-1 accuracy (%)")
    # From 10 points below the lowest bar: differences of a point between variants stay visible.
    bars.set_ylim(max(0.0, 10 * np.floor(lowest / 10) - 10), 100)
    bars.set_title("Fashion-MNIST test and transfer to digits (mean ± std over seeds)")
    bars.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3)
    for name in names:
        spectrum = np.asarray(summary[name]["spectrum"])
        spectra.semilogy(
            np.arange(1, len(spectrum) + 1), spectrum / spectrum[0], label=summary[name]["label"], color=colours[name]
        )
    spectra.set_xlabel("singular value index")
    spectra.set_ylabel("singular value / largest (log)")
    # LayerNorm centres each embedding, so the last singular value is ~0: show the informative range only.
    spectra.set_ylim(1e-4, 1.5)
    spectra.set_title("Embedding spectra on the test set")
    spectra.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def apply_overrides(budget: dict[str, Any], overrides: list[str]) -> None:
    """Set ``KEY=VALUE`` items (values read as YAML) in the budget's training values, or ``evaluation.KEY=VALUE`` in
    its evaluation values; unknown keys are refused."""
    for item in overrides:
        key, separator, value = item.partition("=")
        section, _, name = key.rpartition(".")
        values = budget.get(section or "train")
        if not separator or not isinstance(values, dict) or name not in values:
            raise ValueError(
                f"--override {item!r}: expected KEY=VALUE with KEY one of the budget's training keys ("
                + ", ".join(budget["train"])
                + ") or evaluation.KEY ("
                + ", ".join(f"evaluation.{k}" for k in budget.get("evaluation", {}))
                + ")"
            )
        values[name] = yaml.safe_load(value)


def expand_variants(names: list[str]) -> list[str]:
    """Variant names with every group name replaced by its variants, in order, each once."""
    expanded: list[str] = []
    for name in names:
        for variant in VARIANT_GROUPS.get(name, [name]):
            if variant not in expanded:
                expanded.append(variant)
    return expanded


def parse_options(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The command line and the budget it names, with its ``--override`` values applied."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("budget", help="budget YAML file (benchmarks/configs/reproduce_*.yaml)")
    parser.add_argument("--output_dir", default="outputs/reproduce")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=[*VARIANT_GROUPS, *VARIANTS],
        default=["paper"],
        metavar="NAME",
        help=f"variants or groups of variants to run (default: paper). Groups: {', '.join(VARIANT_GROUPS)}; "
        f"variants: {', '.join(VARIANTS)}",
    )
    parser.add_argument("--seeds", nargs="+", type=int, help="override the budget's seeds")
    parser.add_argument(
        "--workers",
        type=int,
        help="data loader worker processes of every training run and of the evaluation (default: the scripts' own, "
        "0 without a GPU); e.g. 1 when several reproduce.py processes share a GPU machine's cores",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="override the budget's torch threads (e.g. 1 per process when "
        "several reproduce.py processes share the cores, each with its own --variants)",
    )
    parser.add_argument(
        "--override",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="change training values of the budget, e.g. --override num_train_epochs=3 eval_every=3, or "
        "evaluation values, e.g. evaluation.transfer_dataset_name=cifar100 "
        "(values are read as YAML; repeated --override flags add up, the last value of a key wins)",
    )
    options = parser.parse_args(argv)
    options.variants = expand_variants(options.variants)
    budget = yaml.safe_load(Path(options.budget).read_text())
    try:
        apply_overrides(budget, options.override)
    except ValueError as error:
        parser.error(str(error))
    if options.workers is not None:
        budget["train"]["dataloader_num_workers"] = options.workers
    return options, budget


def write_report(output_dir: Path, report: dict[str, Any]) -> None:
    """``results.json``, ``results.md`` (the table, also printed) and ``results.png``."""
    (output_dir / "results.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(report["summary"])
    (output_dir / "results.md").write_text(table + "\n")
    plot(report["summary"], output_dir / "results.png")
    print(table)


def main(argv: list[str] | None = None) -> None:
    options, budget = parse_options(argv)
    seeds = options.seeds or budget["seeds"]
    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(options.threads or budget.get("threads", torch.get_num_threads()))
    source_limits = {"train": budget["train"].get("max_train_samples"), "validation": None}
    loaders = {
        "source": eval_loader(budget["train"]["dataset_name"], source_limits, budget, 0),
        "transfer": eval_loader(budget["evaluation"]["transfer_dataset_name"], {}, budget, 0),
    }
    start = time.perf_counter()
    runs = []
    for seed in seeds:
        for name in options.variants:
            print(f"=== {name} seed {seed} ===", flush=True)
            runs.append(run_variant(name, seed, budget, output_dir, loaders))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "spectrum"}), flush=True)
    report = {
        "command": "python benchmarks/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "budget": budget,
        "date": date.today().isoformat(),
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        + (f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU"),
        "total_wall_seconds": round(time.perf_counter() - start, 1),
        # Finished runs are reused, so the training time of every run is summed separately.
        "training_wall_seconds_of_all_runs": round(sum(r["wall_seconds"] for r in runs), 1),
        "summary": summarise(runs),
        "runs": runs,
    }
    write_report(output_dir, report)


if __name__ == "__main__":
    main()
