"""Figures of the representation analysis, drawn with matplotlib's object-oriented API on an Agg canvas (they never
touch the user's pyplot state or need a display): singular value spectra, class-pair gate heatmaps and histograms,
2-D maps of the embeddings."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", facecolor="white")
    return path


def plot_singular_values(
    spectra: Mapping[str, Sequence[float]],
    path: str | Path,
    dims: Mapping[str, int] | None = None,
    variance_fraction: float = 0.99,
    title: str = "Singular value spectrum of the embeddings",
) -> Path:
    """Overlay the singular value spectra of several models (log scale) with their cumulative explained variance.

    Args:
        spectra: model name -> singular values (descending) of its centred embeddings (e.g. the ``singular_values``
            of :func:`~simlap_hf.evaluation.collapse_report`).
        path: PNG file to write.
        dims: model name -> embedding dimension, shown in the legend (default: the number of singular values).
        variance_fraction: the level marked on the cumulative-variance panel.
        title: the figure title.

    Left panel: ``s_i / s_1`` on a log axis against the component index (a collapsed representation drops off a cliff
    early; values below 1e-7 s_1 are numerically zero and not drawn). Right panel: cumulative share of the variance
    against the number of components, with the count reaching ``variance_fraction`` marked. One legend below both
    panels gives each model's effective rank and that count.
    """
    dims = dict(dims or {})
    figure = _new_figure(13.0, 5.8)
    left, right = figure.subplots(1, 2)
    handles = []
    lowest = 1.0
    for index, (name, values) in enumerate(spectra.items()):
        s = np.asarray(values, dtype=np.float64)
        line, smallest = _plot_spectrum(
            left, right, s, name, f"C{index % 10}", int(dims.get(name, s.size)), variance_fraction
        )
        handles.append(line)
        lowest = min(lowest, smallest)
    _style_spectrum_axes(left, right, lowest, variance_fraction)
    figure.legend(handles=handles, loc="outside lower center", ncol=1, fontsize=10, frameon=False)
    figure.suptitle(title, fontsize=14, fontweight="bold")
    return _save(figure, path)


def _plot_spectrum(
    left: Any, right: Any, s: np.ndarray, name: str, colour: str, dim: int, variance_fraction: float
) -> tuple[Any, float]:
    """Draw one model's descending singular values ``s``: the normalised spectrum on ``left``, the cumulative
    variance with the count reaching ``variance_fraction`` on ``right``. Returns (legend line, smallest value
    drawn on the left; 1 when none)."""
    if s.size == 0 or not s[0] > 0:
        (line,) = left.plot(
            [], [], color=colour, linewidth=2.5, label=f"{name}: no variance (complete collapse), {dim} dims"
        )
        return line, 1.0
    p = s / s.sum()
    p = p[p > 0]
    erank = math.exp(float(-(p * np.log(p)).sum()))
    relative = s / s[0]
    shown = relative >= 1e-7
    ranks = np.arange(1, s.size + 1)
    cumulative = np.cumsum(s**2) / np.sum(s**2)
    reach = int(np.searchsorted(cumulative, variance_fraction - 1e-12) + 1)
    (line,) = left.plot(
        ranks[shown],
        relative[shown],
        color=colour,
        linewidth=2.5,
        label=f"{name}: effective rank {erank:.1f} of {dim} dims, {reach} dims for "
        f"{variance_fraction:.0%} of the variance",
    )
    right.plot(ranks, cumulative, color=colour, linewidth=2.5)
    right.plot([reach], [cumulative[reach - 1]], "o", color=colour, markersize=8, markeredgecolor="white")
    return line, float(relative[shown].min())


def _style_spectrum_axes(left: Any, right: Any, lowest: float, variance_fraction: float) -> None:
    """Scales, limits, labels and grids of the two spectrum panels."""
    left.set_yscale("log")
    left.set_ylim(bottom=max(lowest / 2, 1e-7))
    left.set_xlabel("component index i (largest first)", fontsize=11)
    left.set_ylabel("normalised singular value  s_i / s_1  (log scale)", fontsize=11)
    left.set_title("Spectrum: a flatter curve = less dimensional collapse", fontsize=12)
    left.grid(True, which="both", alpha=0.3)
    right.axhline(variance_fraction, color="gray", linestyle="--", linewidth=1)
    right.text(
        0.02,
        variance_fraction - 0.015,
        f"{variance_fraction:.0%} of the variance",
        transform=right.get_yaxis_transform(),
        ha="left",
        va="top",
        fontsize=9.5,
        color="dimgray",
    )
    right.set_xscale("log")
    right.set_ylim(0, 1.02)
    right.set_xlabel("number of principal components (log scale)", fontsize=11)
    right.set_ylabel("cumulative share of the variance", fontsize=11)
    right.set_title(f"Components needed for {variance_fraction:.0%} of the variance (dots)", fontsize=12)
    right.grid(True, which="both", alpha=0.3)


def _tick_step(count: int, most: int = 36) -> int:
    return max(1, math.ceil(count / most))


def _heatmap_panel(
    figure,
    axes,
    matrix: np.ndarray,
    names: Sequence[str],
    title: str,
    colorbar_label: str,
    vmin: float,
    vmax: float,
    cmap: str,
) -> None:
    count = len(names)
    image = axes.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    step = _tick_step(count)
    ticks = np.arange(0, count, step)
    font = 11 if count <= 12 else 9 if count <= 30 else 7.5
    axes.set_xticks(
        ticks,
        [names[i] for i in ticks],
        rotation=45 if count > 4 else 0,
        ha="right" if count > 4 else "center",
        fontsize=font,
    )
    axes.set_yticks(ticks, [names[i] for i in ticks], fontsize=font)
    axes.set_xlabel("class y2", fontsize=11)
    axes.set_ylabel("class y1", fontsize=11)
    axes.set_title(title, fontsize=12)
    bar = figure.colorbar(image, ax=axes, shrink=0.85)
    bar.set_label(colorbar_label, fontsize=10)
    if count <= 15:
        middle = (vmin + vmax) / 2
        for i in range(count):
            for j in range(count):
                value = matrix[i, j]
                colour = "white" if value < middle else "black"
                axes.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    color=colour,
                    fontsize=11 if count <= 6 else 9 if count <= 10 else 7,
                )


def plot_gate_heatmap(gates: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Class-pair heatmaps of an :func:`analyze_gates` result: the mean gate activation of g(y1, y2) and the Jaccard
    overlap of the open dimensions of the two classes, with class names on both axes and annotated colorbars."""
    if not gates.get("has_filter"):
        raise ValueError("The open gate has no feature filter: there is no class-pair heatmap to draw.")
    names = list(gates["label_names"])
    count = len(names)
    activation = np.asarray(gates["matrices"]["mean_activation"])
    jaccard = np.asarray(gates["matrices"]["jaccard"])
    side = float(np.clip(0.42 * count + 3.0, 5.5, 12.0))
    figure = _new_figure(2 * side + 1.5, side)
    left, right = figure.subplots(1, 2)
    low, high = float(activation.min()), float(activation.max())
    if high - low < 1e-6:
        low, high = low - 0.05, high + 0.05
    _heatmap_panel(
        figure,
        left,
        activation,
        names,
        "Mean gate activation of the pair",
        "mean over the K dims of g(y1, y2)  (0 = closed, 1 = open)",
        low,
        high,
        "viridis",
    )
    _heatmap_panel(
        figure,
        right,
        jaccard,
        names,
        f"Shared open dimensions (Jaccard, g >= {gates['threshold']:g})",
        "|open(y1) ∩ open(y2)| / |open(y1) ∪ open(y2)|",
        0.0,
        1.0,
        "magma",
    )
    figure.suptitle(
        title or f"Class relationships from the {gates['gate']} gate (K = {gates['dim']})",
        fontsize=14,
        fontweight="bold",
    )
    return _save(figure, path)


def plot_gate_histogram(gates: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Histogram of the gate values of an :func:`analyze_gates` result: same-class pairs g(y, y) and different-class
    pairs g(y1, y2) separately (share of values, log scale), with the open threshold and near-binary zones marked."""
    if not gates.get("has_filter"):
        raise ValueError("The open gate has no feature filter: every gate value is 1, there is no histogram to draw.")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    histogram = gates["histogram"]
    edges = np.asarray(histogram["bin_edges"])
    figure = _new_figure(9.5, 6.0)
    axes = figure.subplots()
    margin = gates["near_binary_margin"]
    axes.axvspan(0.0, margin, color="0.85", zorder=0, label=f"near-binary zones (within {margin:g} of 0 or 1)")
    axes.axvspan(1.0 - margin, 1.0, color="0.85", zorder=0)
    series = (
        ("different-class pairs g(y1, y2), y1 \u2260 y2", histogram["cross_class_counts"], "C0", True),
        ("same-class pairs g(y, y)", histogram["same_class_counts"], "C3", False),
    )
    for label, counts, colour, filled in series:
        counts = np.asarray(counts, dtype=np.float64)
        if counts.sum() == 0:
            continue
        share = counts / counts.sum()
        if filled:
            axes.stairs(share, edges, fill=True, color=colour, alpha=0.45, label=label, zorder=2)
        else:
            axes.stairs(share, edges, color=colour, linewidth=2.2, label=label, zorder=3)
    axes.axvline(
        gates["threshold"],
        color="black",
        linestyle="--",
        linewidth=1.2,
        zorder=4,
        label=f"open threshold g = {gates['threshold']:g}",
    )
    axes.set_yscale("log")
    percent = FuncFormatter(lambda value, _: f"{100 * value:.3g}%")
    axes.yaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(percent)
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.set_xlim(0.0, 1.0)
    axes.set_xlabel("gate value g  (0 = dimension switched off, 1 = switched on)", fontsize=11)
    axes.set_ylabel("share of gate values (log scale)", fontsize=11)
    axes.grid(True, axis="y", which="both", alpha=0.3)
    axes.legend(fontsize=9.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    stats = gates["stats"]
    axes.set_title(
        f"mean entropy {stats['mean_entropy_bits']:.3f} bits  \u2022  "
        f"near-binary {100 * stats['near_binary_fraction']:.1f}%"
        f"  \u2022  open dims per pair {stats['mean_open_dims']:.1f} of {gates['dim']}",
        fontsize=10.5,
    )
    figure.suptitle(
        title
        or f"Gate values of all {gates['num_classes']}\u00d7{gates['num_classes']} class pairs ({gates['gate']} gate)",
        fontsize=13,
        fontweight="bold",
    )
    return _save(figure, path)


def embedding_map(vectors: Tensor, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D map of (N, d) vectors for plotting: t-SNE of scikit-learn on the cosine geometry (L2-normalised
    vectors), or UMAP when ``method="umap"`` (or ``"auto"`` and ``umap-learn`` is installed). Returns the (N, 2)
    points and the method used."""
    if method not in ("auto", "tsne", "umap"):
        raise ValueError(f"--map_method must be auto, tsne or umap, got {method!r}.")
    data = torch.nn.functional.normalize(vectors.double(), dim=1).numpy()
    if len(data) < 5:
        raise ValueError(f"an embedding map needs at least 5 points, got {len(data)}.")
    if method in ("auto", "umap"):
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            if method == "umap":
                raise ImportError("--map_method umap needs umap-learn: pip install umap-learn (or use tsne).") from None
        else:
            reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed)
            return np.asarray(reducer.fit_transform(data)), "umap"
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, (len(data) - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, metric="cosine")
    return tsne.fit_transform(data), "tsne"


def plot_embedding_map(
    points: np.ndarray,
    labels: Sequence[int],
    names: Sequence[str],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Scatter plot of a 2-D embedding map coloured by class, with the class names in a legend (up to 20 classes)
    and written at each class's median point."""
    import matplotlib

    points = np.asarray(points)
    labels = np.asarray(labels)
    classes = sorted(set(labels.tolist()))
    colormap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20" if len(names) <= 20 else "turbo"]
    figure = _new_figure(8.0, 7.0)
    axes = figure.add_subplot(1, 1, 1)
    for c in classes:
        colour = colormap(c % 20 if len(names) <= 20 else c / max(len(names) - 1, 1))
        member = labels == c
        name = names[c] if 0 <= c < len(names) else str(c)
        axes.scatter(points[member, 0], points[member, 1], s=6, color=colour, alpha=0.7, label=name, linewidths=0)
        if len(classes) <= 50:
            x, y = np.median(points[member], axis=0)
            axes.annotate(
                name,
                (x, y),
                fontsize=8,
                ha="center",
                va="center",
                weight="bold",
                bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.7, "linewidth": 0},
            )
    if len(classes) <= 20:
        axes.legend(markerscale=3, fontsize=8, loc="best", frameon=True)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(title or "2-D map of the embeddings", fontsize=10)
    return _save(figure, path)
