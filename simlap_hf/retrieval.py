"""Search an embedding index (written by :mod:`simlap_hf.embed`) with a SimLAP model.

Two kinds of search:

- **Nearest neighbours** (:meth:`EmbeddingIndex.search`): cosine similarity of the pooled backbone features (the
  representation of kNN and the linear probe), over every stored image.
- **Pair-conditioned search** (:meth:`EmbeddingIndex.pair_search`): the items of class B most similar to a query of
  class A *in the subspace that the gate g(A, B) opens*. The score is the loss's gated cosine
  ``cos(g * z_q, g * z_n)`` on the projected embeddings (:func:`simlap_hf.losses.gated_cosine`): what the model was
  trained to make high for a class-A anchor and its class-B positives. Only items of class B are candidates.

Search is exact, in chunks of ``chunk_size`` rows with torch (memory: one shard and one chunk of scores), keeping a
running top-k. With ``faiss`` installed (``pip install simlap-hf[faiss]``), ``backend="faiss"`` runs the nearest
neighbour search in a flat inner-product index of the normalised features (exact, the same hits); the
pair-conditioned search reweights every candidate with a gate that depends on the query's pair, so it stays torch.

    from simlap_hf.retrieval import Retriever
    retriever = Retriever("outputs/simlap", "index")
    retriever.search(image, k=5)                          # [{"source", "label", "score", ...}, ...]
    retriever.pair_search(image, target_class="Sneaker")  # query class predicted by the online head
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import Tensor

from .configuration_simlap import GATE_KINDS
from .data import DataArguments, load_image_dataset
from .embed import encode_batch, load_processor
from .errors import UsageError
from .losses import gated_cosine
from .relations import DEFAULT_THRESHOLD
from .saved_model import load_saved_model

INDEX_FILE = "index.json"
COLUMNS = ("features", "embeddings")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _merge_topk(best: tuple[Tensor, Tensor] | None, scores: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Running top-k over chunks: (Q, k') scores and global row ids."""
    if best is not None:
        scores, ids = torch.cat([best[0], scores], dim=1), torch.cat([best[1], ids], dim=1)
    top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    return top.values, torch.gather(ids, 1, top.indices)


class EmbeddingIndex:
    """An embedding index folder: ``index.json`` and parquet shards of ``features`` (D), ``embeddings`` (K),
    ``label``, ``source``, ``split`` and ``row``.

    Args:
        path: the folder written by ``python -m simlap_hf.embed``.
        cache: keep the shards' vectors in memory after the first search (for repeated queries); with False every
            search reads the shards again and memory holds one shard at a time.
        device: where scores are computed.
    """

    def __init__(self, path: str | os.PathLike, cache: bool = True, device: str | torch.device = "cpu") -> None:
        self.path = Path(path)
        info_file = self.path / INDEX_FILE
        if not info_file.is_file():
            raise FileNotFoundError(
                f"--index {str(path)!r} is not an embedding index (no {INDEX_FILE}); create one with "
                f"`python -m simlap_hf.embed --model_name_or_path MODEL --output_dir {path} ...`."
            )
        self.info: dict[str, Any] = json.loads(info_file.read_text())
        self.cache = cache
        self.device = torch.device(device)
        self._vectors: dict[tuple[int, str], Tensor] = {}
        self._labels: dict[int, Tensor] = {}
        self._faiss: dict[str, Any] = {}
        self._data = None  # the data set the index was made from, loaded by image() when needed
        offsets = np.cumsum([0] + [shard["rows"] for shard in self.info["shards"]])
        self._offsets = offsets

    # -- description -------------------------------------------------------------------------------------------
    @property
    def label_names(self) -> list[str]:
        return list(self.info["label_names"])

    @property
    def num_rows(self) -> int:
        return int(self.info["num_rows"])

    @property
    def has_embeddings(self) -> bool:
        return bool(self.info.get("has_embeddings"))

    def __len__(self) -> int:
        return self.num_rows

    def label_id(self, name: str, flag: str = "--target_class") -> int:
        """Index of a class name (clear error naming the known classes)."""
        names = self.label_names
        if name in names:
            return names.index(name)
        raise ValueError(f"{flag} {name!r} is not a class of the index; its classes are: {', '.join(names)}.")

    # -- reading -----------------------------------------------------------------------------------------------
    def _shard_file(self, shard: int) -> Path:
        path = self.path / self.info["shards"][shard]["file"]
        if not path.is_file():
            raise UsageError(
                f"Shard {str(path)!r} of the index {str(self.path)!r} is missing (listed in its {INDEX_FILE}); the "
                "index is incomplete. Build it again with python -m simlap_hf.embed ... --overwrite_output_dir."
            )
        return path

    def vectors(self, shard: int, column: str = "features") -> Tensor:
        """(rows, dim) float32 vectors of one shard."""
        if column not in COLUMNS:
            raise ValueError(f"column must be one of {COLUMNS}, got {column!r}.")
        if column == "embeddings" and not self.has_embeddings:
            raise ValueError(
                f"The index {str(self.path)!r} has no projected embeddings: it was made with a "
                f"{self.info.get('model_class')}, not a pretrained SimLAPModel (projector and gates)."
            )
        key = (shard, column)
        if key in self._vectors:
            return self._vectors[key]
        array = pq.read_table(self._shard_file(shard), columns=[column]).column(column).combine_chunks()
        dim = array.type.list_size
        values = array.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        tensor = torch.from_numpy(np.array(values, dtype=np.float32)).to(self.device)  # a writable copy
        if self.cache:
            self._vectors[key] = tensor
        return tensor

    def unit_vectors(self, shard: int, column: str = "features") -> Tensor:
        """(rows, dim) L2-normalised vectors of one shard (cached like :meth:`vectors`)."""
        key = (shard, column + ":unit")
        if key in self._vectors:
            return self._vectors[key]
        unit = F.normalize(self.vectors(shard, column), dim=1)
        if self.cache:
            self._vectors[key] = unit
            del self._vectors[(shard, column)]  # the search needs only the normalised copy
        return unit

    def labels(self, shard: int) -> Tensor:
        """(rows,) int64 class indices of one shard."""
        if shard in self._labels:
            return self._labels[shard]
        values = pq.read_table(self._shard_file(shard), columns=["label"]).column("label").to_numpy()
        tensor = torch.from_numpy(values.astype(np.int64)).to(self.device)
        if self.cache:
            self._labels[shard] = tensor
        return tensor

    def all_vectors(self, column: str = "features") -> Tensor:
        """(N, dim) every stored vector (in memory at once: for small indexes, tests and faiss)."""
        return torch.cat([self.vectors(shard, column) for shard in range(len(self.info["shards"]))])

    def all_labels(self) -> Tensor:
        return torch.cat([self.labels(shard) for shard in range(len(self.info["shards"]))])

    def rows(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        """Stored metadata of global row ids: ``source``, ``label`` (name), ``label_id``, ``split``, ``row``."""
        result: list[dict[str, Any]] = []
        tables: dict[int, Any] = {}
        for global_id in ids:
            global_id = int(global_id)
            if not 0 <= global_id < self.num_rows:
                raise IndexError(f"row {global_id} is outside the index (0..{self.num_rows - 1}).")
            shard = int(np.searchsorted(self._offsets, global_id, side="right") - 1)
            if shard not in tables:
                tables[shard] = pq.read_table(self._shard_file(shard), columns=["label", "source", "split", "row"])
            table = tables[shard]
            local = global_id - int(self._offsets[shard])
            label = int(table.column("label")[local].as_py())
            result.append(
                {
                    "source": table.column("source")[local].as_py(),
                    "label": self.label_names[label] if 0 <= label < len(self.label_names) else str(label),
                    "label_id": label,
                    "split": table.column("split")[local].as_py(),
                    "row": int(table.column("row")[local].as_py()),
                    "index_id": global_id,
                }
            )
        return result

    def image(self, index_id: int):
        """The PIL image of a stored row: its file, or the row of the data set the index was made from (reloaded
        with the data flags recorded in ``index.json``)."""
        from PIL import Image

        row = self.rows([index_id])[0]
        if os.path.isfile(row["source"]):
            return Image.open(row["source"])
        source = self.info.get("data_source")
        if not source:
            raise ValueError(
                f"The index does not record its data, so row {index_id} ({row['source']}) cannot be shown."
            )
        if self._data is None:
            known = {f.name for f in fields(DataArguments)}
            values = {key: value for key, value in source["data_args"].items() if key in known}
            self._data = load_image_dataset(DataArguments(**values), seed=source["seed"])
        return self._data[row["split"]][row["row"]]["image"]

    # -- search ------------------------------------------------------------------------------------------------
    def search(
        self,
        queries: Tensor,
        k: int = 5,
        column: str = "features",
        chunk_size: int = 65_536,
        backend: str = "torch",
    ) -> tuple[Tensor, Tensor]:
        """Cosine nearest neighbours of (Q, dim) or (dim,) queries: (Q, k) scores (descending) and global row ids."""
        queries = self._as_queries(queries)
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}.")
        k = min(k, self.num_rows)
        if backend == "faiss":
            return self._faiss_search(queries, k, column)
        if backend != "torch":
            raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}.")
        queries = F.normalize(queries.float(), dim=1).to(self.device)
        best = None
        for shard in range(len(self.info["shards"])):
            vectors = self.unit_vectors(shard, column)
            for start in range(0, vectors.shape[0], chunk_size):
                chunk = vectors[start : start + chunk_size]
                scores = queries @ chunk.T  # (Q, n) cosines
                ids = torch.arange(start, start + chunk.shape[0], device=self.device) + int(self._offsets[shard])
                best = _merge_topk(best, scores, ids.expand_as(scores), k)
        return best[0].cpu(), best[1].cpu()

    def pair_search(
        self,
        query_embedding: Tensor,
        gate: Tensor,
        target_label: int,
        k: int = 5,
        chunk_size: int = 65_536,
    ) -> tuple[Tensor, Tensor]:
        """Items of class ``target_label`` ranked by the gated cosine ``cos(g * z_q, g * z_n)`` of the projected
        embeddings: (1, k') scores and global row ids (k' = min(k, items of that class))."""
        query = self._as_queries(query_embedding).float().to(self.device)
        if query.shape[0] != 1:
            raise ValueError("pair_search takes one query embedding.")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}.")
        gate = gate.reshape(1, -1).float().to(self.device)
        if gate.shape[1] != query.shape[1]:
            raise ValueError(f"the gate has {gate.shape[1]} dimensions but the embeddings {query.shape[1]}.")
        best = None
        for shard in range(len(self.info["shards"])):
            keep = (self.labels(shard) == target_label).nonzero().flatten()
            if keep.numel() == 0:
                continue
            vectors = self.vectors(shard, "embeddings")
            for start in range(0, keep.numel(), chunk_size):
                rows = keep[start : start + chunk_size]
                scores = gated_cosine(query, vectors[rows], gate)  # (1, n), the loss's gated cosine
                best = _merge_topk(best, scores, (rows + int(self._offsets[shard])).unsqueeze(0), k)
        if best is None:
            name = self.label_names[target_label] if 0 <= target_label < len(self.label_names) else target_label
            raise ValueError(f"The index holds no item of class {name!r}.")
        return best[0].cpu(), best[1].cpu()

    def _as_queries(self, queries: Tensor) -> Tensor:
        queries = torch.as_tensor(queries)
        return queries.unsqueeze(0) if queries.dim() == 1 else queries

    def _faiss_search(self, queries: Tensor, k: int, column: str) -> tuple[Tensor, Tensor]:
        try:
            import faiss
        except ImportError as error:
            raise ImportError(
                "backend='faiss' needs faiss: pip install 'simlap-hf[faiss]' (or faiss-cpu), or use --backend torch."
            ) from error
        if column not in self._faiss:
            index = None
            for shard in range(len(self.info["shards"])):  # added shard by shard
                vectors = self.unit_vectors(shard, column).cpu().numpy()
                if index is None:
                    index = faiss.IndexFlatIP(vectors.shape[1])
                index.add(np.ascontiguousarray(vectors, dtype=np.float32))
            self._faiss[column] = index
        normalised = F.normalize(queries.float(), dim=1).cpu().numpy()
        scores, ids = self._faiss[column].search(np.ascontiguousarray(normalised, dtype=np.float32), k)
        return torch.from_numpy(scores), torch.from_numpy(ids.astype(np.int64))


def _same_model_folder(given: str | os.PathLike, recorded: str) -> bool:
    """Whether the model ``given`` is the folder (or Hub id) an index recorded."""
    if os.path.exists(given) and os.path.exists(recorded):
        return os.path.samefile(given, recorded)
    return os.path.abspath(given) == os.path.abspath(recorded) or str(given) == recorded


class Retriever:
    """A SimLAP model, its image processor and an embedding index: search with images and class names.

    Args:
        model_name_or_path: the model folder (default: the one recorded in the index).
        index: an :class:`EmbeddingIndex` or its folder.
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | None,
        index: EmbeddingIndex | str | os.PathLike,
        device: str | torch.device = "cpu",
        backend: str = "torch",
        allow_other_model: bool = False,
    ) -> None:
        self.index = index if isinstance(index, EmbeddingIndex) else EmbeddingIndex(index, device=device)
        recorded = self.index.info.get("model_name_or_path")
        if model_name_or_path is not None and recorded and not allow_other_model:
            if not _same_model_folder(model_name_or_path, recorded):
                raise UsageError(
                    f"--model_name_or_path {str(model_name_or_path)!r} is not the model the index "
                    f"{str(self.index.path)!r} was built with ({recorded!r}): its scores against that index would "
                    "mean nothing. Leave --model_name_or_path out to use the index's model, build an index with this "
                    "model (python -m simlap_hf.embed), or pass --allow_other_model if it is the same model saved "
                    "elsewhere."
                )
        model_path = model_name_or_path or recorded
        self.model_dir = str(model_path)
        self.model = load_saved_model(model_path, device=device)
        self.processor = load_processor(model_path)
        if self.processor is None:
            raise ValueError(
                f"--model_name_or_path {str(model_path)!r} has no SimLAP preprocessor_config.json; save one with "
                f"simlap_hf.data.save_image_processor (models trained by this version have one)."
            )
        self.device = torch.device(device)
        self.backend = backend
        self.model_label_names = [self.model.config.id2label[i] for i in range(len(self.model.config.id2label))]

    def _check_dimension(self, query: Tensor, column: str) -> None:
        """The model's ``column`` vectors must have the index's size (another model's index differs)."""
        expected = self.index.info.get({"features": "feature_dim", "embeddings": "embedding_dim"}.get(column, ""))
        if expected is not None and query.shape[-1] != int(expected):
            raise UsageError(
                f"The model {self.model_dir!r} gives {column} of size {query.shape[-1]}, the index "
                f"{str(self.index.path)!r} holds {column} of size {expected}: it was built with another model. Use "
                "the index's model (leave --model_name_or_path out) or build an index with this model."
            )

    @property
    def can_pair_search(self) -> bool:
        return getattr(self.model, "feature_filter", None) is not None and self.index.has_embeddings

    @torch.no_grad()
    def encode(self, image: Any) -> dict[str, Tensor]:
        """One image (PIL or array) -> ``features`` (D,), and ``embeddings`` (K,) and ``probabilities`` (C,) for a
        pretrained model."""
        pixel_values = self.processor(image)["pixel_values"].to(self.device)
        encoded = encode_batch(self.model, pixel_values)
        out = {"features": encoded["features"][0].cpu()}
        if "embeddings" in encoded:
            out["embeddings"] = encoded["embeddings"][0].cpu()
            out["probabilities"] = encoded["logits"][0].softmax(-1).cpu()
        return out

    def predict(self, image: Any, k: int = 5) -> list[dict[str, Any]]:
        """The online head's top-k classes ``{"label", "score"}`` (pretrained models)."""
        encoded = self.encode(image)
        if "probabilities" not in encoded:
            raise ValueError("predict needs a pretrained SimLAP model (with its online head).")
        top = torch.topk(encoded["probabilities"], min(k, encoded["probabilities"].numel()))
        return [{"label": self.model_label_names[int(i)], "score": float(s)} for s, i in zip(top.values, top.indices)]

    def search(self, image: Any, k: int = 5, column: str = "features") -> list[dict[str, Any]]:
        """Nearest neighbours by cosine of the features: ``[{"source", "label", "score", ...}]``, best first."""
        query = self.encode(image)[column]
        self._check_dimension(query, column)
        scores, ids = self.index.search(query, k, column=column, backend=self.backend)
        return self._hits(scores[0], ids[0])

    def pair_search(
        self,
        image: Any,
        target_class: str,
        k: int = 5,
        query_class: str | None = None,
    ) -> dict[str, Any]:
        """The items of ``target_class`` closest to the image in the subspace the gate g(query class, target class)
        opens. The query class is ``query_class`` or the online head's prediction. Returns ``{"query_class",
        "target_class", "open_dimensions", "hits": [...]}``; scores are the gated cosine of the training loss."""
        if getattr(self.model, "feature_filter", None) is None:
            raise ValueError(
                "Pair-conditioned search needs a pretrained SimLAP model with a feature filter (gate "
                + ", ".join(repr(name) for name, kind in GATE_KINDS.items() if kind.has_filter)
                + f"); {str(self.index.info.get('model_name_or_path'))!r} is a {type(self.model).__name__}"
                + (f" with the {self.model.config.gate} gate" if hasattr(self.model, "projector") else "")
                + ". Use plain search (no --target_class)."
            )
        if not self.index.has_embeddings:
            raise ValueError("The index has no projected embeddings: re-embed it with the pretrained SimLAP model.")
        encoded = self.encode(image)
        self._check_dimension(encoded["embeddings"], "embeddings")
        if query_class is None:
            query_class = self.model_label_names[int(encoded["probabilities"].argmax())]
        a = self._model_class(query_class, "--query_class")
        b = self._model_class(target_class, "--target_class")
        target_label = self.index.label_id(target_class)
        with torch.no_grad():
            gate = self.model.gate(torch.tensor([a], device=self.device), torch.tensor([b], device=self.device))[0]
        scores, ids = self.index.pair_search(encoded["embeddings"], gate.cpu(), target_label, k)
        return {
            "query_class": query_class,
            "target_class": target_class,
            "open_dimensions": int((gate >= DEFAULT_THRESHOLD).sum()),
            "hits": self._hits(scores[0], ids[0]),
        }

    def _model_class(self, name: str, flag: str) -> int:
        if name in self.model_label_names:
            return self.model_label_names.index(name)
        raise ValueError(
            f"{flag} {name!r} is not a class of the model; its classes are: {', '.join(self.model_label_names)}."
        )

    def _hits(self, scores: Tensor, ids: Tensor) -> list[dict[str, Any]]:
        rows = self.index.rows(ids.tolist())
        for row, score in zip(rows, scores.tolist()):
            row["score"] = float(score)
        return rows
