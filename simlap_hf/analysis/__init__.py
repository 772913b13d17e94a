"""Analysis of learned representations: the class-pair gates of SimLAP, collapse, kNN / linear-probe quality, figures.

The paper's three claims, checkable on a user's own models:

* **gates reveal which classes share features**: :func:`gate_matrix` computes the gate vector g(y1, y2) of every
  class pair (C x C x K); :func:`analyze_gates` turns it into C x C class-relationship matrices (mean gate activation
  of a pair, fraction of its open dimensions, Jaccard overlap of the open dimensions of the two classes), the most
  and least related class pairs by name, and gate entropy statistics;
* **resistance to dimensional collapse**: the singular value spectrum and effective rank of the embeddings
  (:func:`simlap_hf.evaluation.collapse_report`);
* **transferability**: kNN and linear-probe top-1 of frozen backbone features (:func:`probe_features`).

:func:`analyze_model` bundles all of it for one model and two dataloaders (the training script calls it after
training); :func:`summary_markdown` renders its result as a short model-card section. The figures
(:func:`plot_singular_values`, :func:`plot_gate_heatmap`, :func:`plot_gate_histogram`) are drawn with matplotlib's
object-oriented API on an Agg canvas, so they never touch the user's pyplot state or need a display. The models the
``python -m simlap_hf.analyze`` command compares are loaded by :mod:`simlap_hf.analysis.loading`.

Modules: ``gates`` (class-pair gates), ``representations`` (features, probes, :func:`analyze_model`), ``figures``,
``report`` (markdown and JSON), ``loading`` (models to compare).

Shapes: C classes, K gate / embedding dimensions, D backbone features, N samples.
"""

from ..relations import DEFAULT_THRESHOLD, gate_kind
from .figures import (
    embedding_map,
    plot_embedding_map,
    plot_gate_heatmap,
    plot_gate_histogram,
    plot_singular_values,
)
from .gates import DEFAULT_NEAR_BINARY_MARGIN, OPEN_GATE_NOTE, analyze_gates, gate_matrix
from .report import render_markdown, summary_markdown, to_jsonable
from .representations import analyze_model, extract_representations, probe_features

__all__ = [
    "DEFAULT_THRESHOLD",
    "DEFAULT_NEAR_BINARY_MARGIN",
    "OPEN_GATE_NOTE",
    "gate_kind",
    "gate_matrix",
    "analyze_gates",
    "extract_representations",
    "probe_features",
    "analyze_model",
    "summary_markdown",
    "render_markdown",
    "plot_singular_values",
    "plot_gate_heatmap",
    "plot_gate_histogram",
    "embedding_map",
    "plot_embedding_map",
    "to_jsonable",
]
