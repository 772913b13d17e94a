"""Search an embedding index with an image; prints the hits as JSON.

    python -m simlap_hf.search --index index --image query.png --k 5
    python -m simlap_hf.search --index index --image query.png --k 5 --target_class Sneaker [--query_class Sandal]

Without ``--target_class``: the nearest neighbours by cosine of the pooled backbone features. With it: the items of
that class most similar to the query in the subspace the gate g(query class, target class) opens (scores: the
training loss's gated cosine of the projected embeddings); the query class is ``--query_class`` or the online
head's prediction. The model is the one recorded in the index unless ``--model_name_or_path`` is given.

Output: ``{"image", "mode", "query_class", "target_class", "open_dimensions", "predicted", "hits": [{"source",
"label", "score", "label_id", "split", "row", "index_id"}, ...]}``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from .errors import UsageError, run_command
from .retrieval import Retriever


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, help="embedding index folder (python -m simlap_hf.embed)")
    parser.add_argument("--image", required=True, help="query image file")
    parser.add_argument("--k", type=int, default=5, help="number of hits (default 5)")
    parser.add_argument("--target_class", help="pair-conditioned search: return only items of this class")
    parser.add_argument("--query_class", help="the query's class for the gate (default: the online head's prediction)")
    parser.add_argument("--model_name_or_path", help="model folder (default: the one the index was made with)")
    parser.add_argument(
        "--backend",
        choices=("torch", "faiss"),
        default="torch",
        help="nearest-neighbour search: exact torch in chunks (default) or a faiss flat index",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1")
    parser.add_argument(
        "--allow_other_model",
        action="store_true",
        help="search with --model_name_or_path although the index was built with another model folder",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of input errors (SIMLAP_DEBUG=1)")
    args = parser.parse_args(argv)
    if args.k <= 0:
        parser.error(f"--k must be a positive integer, got {args.k}.")
    if args.query_class is not None and args.target_class is None:
        parser.error("--query_class only matters with --target_class (pair-conditioned search); add --target_class.")
    return args


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:

    args = parse_args(argv)
    path = Path(args.image)
    if path.is_dir():
        raise UsageError(f"--image {args.image!r} is a folder; pass one image file (search takes one query image).")
    if not path.is_file():
        raise UsageError(f"--image {args.image!r} does not exist; pass an image file.")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise UsageError(f"--image {args.image!r} is not an image PIL can read: {error}") from error
    retriever = Retriever(
        args.model_name_or_path,
        args.index,
        device=args.device,
        backend=args.backend,
        allow_other_model=args.allow_other_model,
    )
    result: dict[str, Any] = {"image": str(path)}
    if getattr(retriever.model, "online_head", None) is not None:
        result["predicted"] = retriever.predict(image, k=min(3, len(retriever.model_label_names)))
    if args.target_class is None:
        result.update(mode="nearest", hits=retriever.search(image, k=args.k))
    else:
        result.update(mode="pair", **retriever.pair_search(image, args.target_class, args.k, args.query_class))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: prints the result as JSON; 1 with ``error: ...`` for an input error (see
    :func:`~simlap_hf.errors.run_command`)."""

    def search_and_print(arguments: list[str]) -> None:
        print(json.dumps(run(arguments), indent=2))

    return run_command(search_and_print, argv, keep_debug_flag=True)


if __name__ == "__main__":
    raise SystemExit(main())
