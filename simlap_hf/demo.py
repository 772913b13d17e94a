"""A web demo of a SimLAP model and an embedding index (Gradio).

    python -m simlap_hf.embed --model_name_or_path outputs/simlap --dataset_name fashion_mnist --output_dir index
    python -m simlap_hf.demo --index index [--model_name_or_path outputs/simlap] [--port 7860]

Upload (or pick) an image and see the online head's predicted classes, its nearest neighbours in the index (cosine
of the backbone features), the pair-conditioned neighbours in a class you choose (the items of that class closest
to the image in the subspace the gate g(query class, chosen class) opens, scored by the training loss's gated
cosine), and the heatmap of the class relations read from the gates.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UsageError, run_command
from .relations import HEATMAP_FILE, ClassRelations
from .retrieval import Retriever

PREDICTED = "(predicted by the model)"


def _hit_rows(hits: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """Table rows (rank, class, score, source) of search hits."""
    return [[i + 1, hit["label"], round(hit["score"], 4), hit["source"]] for i, hit in enumerate(hits)]


def _gallery(retriever, hits: Sequence[dict[str, Any]]) -> list[tuple[Any, str]]:
    """(image, caption) of each hit whose image the index can show."""
    items = []
    for hit in hits:
        try:
            image = retriever.index.image(hit["index_id"]).convert("RGB")
        except (ValueError, OSError, KeyError, IndexError):
            continue  # the index cannot show this row's image: the table still lists it
        items.append((image, f"{hit['label']} ({hit['score']:.3f})"))
    return items


def relations_heatmap(retriever, folder: Path) -> str | None:
    """The class-relation heatmap of the model: its saved ``class_relations.png``, else drawn from its gates."""
    model_dir = Path(retriever.model_dir)
    if (model_dir / HEATMAP_FILE).is_file():
        return str(model_dir / HEATMAP_FILE)
    if getattr(retriever.model, "feature_filter", None) is None:
        return None
    return str(ClassRelations.from_model(retriever.model).plot(folder / HEATMAP_FILE))


def _search_outputs(
    retriever, has_head: bool, image: Any, target_class: str | None, query_class: str | None, count: int
) -> list[Any]:
    """What the demo shows for one query: predicted classes, nearest neighbours (gallery, table), and the
    pair-conditioned note, gallery and table (empty, with the reason, when there is no pair search)."""
    predicted = {hit["label"]: hit["score"] for hit in retriever.predict(image, k=5)} if has_head else {}
    nearest = retriever.search(image, k=count)
    outputs = [predicted, _gallery(retriever, nearest), _hit_rows(nearest)]
    if target_class and retriever.can_pair_search:
        chosen = None if query_class in (None, "", PREDICTED) else query_class
        paired = retriever.pair_search(image, target_class, k=count, query_class=chosen)
        note = (
            f"Items of **{paired['target_class']}** closest to the image in the "
            f"{paired['open_dimensions']} dimensions that g({paired['query_class']}, "
            f"{paired['target_class']}) opens (gated cosine of the training loss)."
        )
        outputs += [note, _gallery(retriever, paired["hits"]), _hit_rows(paired["hits"])]
    else:
        why = (
            "Choose a class for pair-conditioned search."
            if retriever.can_pair_search
            else (
                "Pair-conditioned search needs a pretrained SimLAP model with a feature filter and an index with "
                "its projected embeddings."
            )
        )
        outputs += [why, [], []]
    return outputs


def build_demo(retriever, k: int = 5, examples: Sequence[str] = ()):
    """The Gradio Blocks app around a :class:`~simlap_hf.retrieval.Retriever`."""
    import tempfile

    import gradio as gr

    class_names = retriever.index.label_names
    heatmap = relations_heatmap(retriever, Path(tempfile.mkdtemp(prefix="simlap_demo_")))
    has_head = getattr(retriever.model, "online_head", None) is not None

    def run(image, target_class, query_class, count):
        if image is None:
            raise gr.Error("Upload or pick an image first.")
        return _search_outputs(retriever, has_head, image, target_class, query_class, int(count))

    headers = ["rank", "class", "score", "source"]
    with gr.Blocks(title="SimLAP search") as demo:
        gr.Markdown(
            "# SimLAP: search by image and by class pair\n"
            f"Model `{retriever.model_dir}` ({type(retriever.model).__name__}); index of "
            f"{retriever.index.num_rows:,} images, {len(class_names)} classes."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", label="Query image", elem_id="query-image")
                target = gr.Dropdown(
                    choices=[""] + list(class_names),
                    value="",
                    label="Pair-conditioned: class to search",
                    elem_id="target-class",
                )
                query = gr.Dropdown(
                    choices=[PREDICTED] + list(retriever.model_label_names),
                    value=PREDICTED,
                    label="Query class (for the gate)",
                    elem_id="query-class",
                )
                count = gr.Slider(1, 20, value=k, step=1, label="Hits")
                button = gr.Button("Search", variant="primary", elem_id="search-button")
                if examples:
                    gr.Examples(examples=[[path] for path in examples], inputs=[image])
            with gr.Column(scale=2):
                predicted = gr.Label(
                    num_top_classes=5, label="Predicted classes (online head)", elem_id="predicted", visible=has_head
                )
                gr.Markdown("### Nearest neighbours (cosine of the backbone features)")
                nearest_gallery = gr.Gallery(label="Nearest neighbours", columns=5, height=200, elem_id="nearest")
                nearest_table = gr.Dataframe(headers=headers, label="Nearest neighbours", elem_id="nearest-table")
                pair_note = gr.Markdown("Choose a class for pair-conditioned search.", elem_id="pair-note")
                pair_gallery = gr.Gallery(label="Pair-conditioned neighbours", columns=5, height=200, elem_id="paired")
                pair_table = gr.Dataframe(headers=headers, label="Pair-conditioned neighbours", elem_id="paired-table")
        if heatmap:
            gr.Markdown("### Class relations read from the gates")
            gr.Image(value=heatmap, label="Class relatedness", elem_id="relations-heatmap", interactive=False)
        button.click(
            run,
            inputs=[image, target, query, count],
            outputs=[predicted, nearest_gallery, nearest_table, pair_note, pair_gallery, pair_table],
        )
    return demo


def example_images(retriever, per_class: int = 1, limit: int = 10) -> list[str]:
    """A few index images that are files on disk (one per class), for the example picker."""
    import pyarrow.parquet as pq

    found: dict[str, str] = {}
    for shard in retriever.index.info["shards"]:
        table = pq.read_table(retriever.index.path / shard["file"], columns=["label", "source"]).to_pylist()
        for row in table:
            if len(found) >= limit:
                return list(found.values())
            if row["label"] not in found and os.path.isfile(row["source"]):
                found[row["label"]] = row["source"]
    return list(found.values())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, help="embedding index folder (python -m simlap_hf.embed)")
    parser.add_argument("--model_name_or_path", help="model folder (default: the one the index was made with)")
    parser.add_argument("--k", type=int, default=5, help="hits shown at first (1-20)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for other machines)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public share link (needs network)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of input errors (SIMLAP_DEBUG=1)")
    args = parser.parse_args(argv)
    if not 1 <= args.k <= 20:
        parser.error(f"--k must be between 1 and 20, got {args.k}.")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: serves the demo until stopped; 1 with ``error: ...`` for an input error (see
    :func:`~simlap_hf.errors.run_command`)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    def serve(arguments: list[str]) -> None:
        args = parse_args(arguments)
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise UsageError("the demo needs Gradio: pip install 'simlap-hf[demo]' (or gradio).") from None

        retriever = Retriever(args.model_name_or_path, args.index, device=args.device)
        demo = build_demo(retriever, k=args.k, examples=example_images(retriever))
        demo.launch(server_name=args.host, server_port=args.port, share=args.share)

    return run_command(serve, argv, keep_debug_flag=True)


if __name__ == "__main__":
    raise SystemExit(main())
