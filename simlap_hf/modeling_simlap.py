"""SimLAP models: pretraining model, image classifier and SimLAP-Fuse, as transformers ``PreTrainedModel``s
around a timm backbone.

Shapes: B images, D backbone features, K projected embedding dimensions, C classes.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from timm.models._manipulate import group_with_matcher
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput, ModelOutput

from .configuration_simlap import GATE_KINDS, GateKind, SimLAPConfig, SimLAPFuseConfig, gate_has_filter
from .distributed import distributed_mean, gather_labels, gather_with_grad, is_distributed
from .losses import (
    arcgrad_logits,
    at_least_float32,
    classification_loss,
    gate_entropy,
    pair_statistics,
    sample_pair_labels,
    simlap_contrastive_terms,
)
from .utils import describe_weights

try:  # transformers >= 5: initialisers that skip tensors already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # transformers 4
    init = nn.init


def create_backbone(config: SimLAPConfig) -> nn.Module:
    """timm backbone returning pooled (B, D) features (``num_classes=0``), never downloading weights."""
    try:
        return timm.create_model(config.backbone, pretrained=False, num_classes=0, **config.timm_kwargs())
    except TypeError as error:
        raise ValueError(
            f"timm could not build backbone {config.backbone!r} with backbone_kwargs={config.timm_kwargs()}: {error}. "
            "Leave out the option it does not take (--stem_type and --output_stride are timm ResNet options; check "
            "--model_kwargs)."
        ) from error


def check_labels(labels: Tensor, num_classes: int, name: str = "labels", synchronize: bool = True) -> None:
    """Raise a ValueError when the (B,) class indices ``labels`` fall outside [0, num_classes).

    ``synchronize=True`` reads the range on the host, which on an accelerator waits for the queued kernels.
    ``synchronize=False`` (training forward passes: the data were checked when loaded) queues a device-side
    assertion instead, with no host synchronisation: on the CPU it fails at once with the same ValueError, on an
    accelerator a bad label fails the run at its next synchronisation with a device-side assertion error.
    Skipped while ``torch.compile`` traces the model."""
    if torch.compiler.is_compiling() or not labels.numel():
        return
    if not synchronize:
        try:
            torch._assert_async(((labels >= 0) & (labels < num_classes)).all(), f"{name} out of range")
            return
        except RuntimeError:  # raised at once where the assertion runs on the host: the full message below
            pass
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(
            f"{name} must lie in [0, {num_classes}) (num_classes={num_classes}); "
            f"got values from {int(labels.min())} to {int(labels.max())}."
        )


# transformers' output switches that these models accept and ignore (they have no attentions or hidden states).
_IGNORED_FORWARD_ARGUMENTS = frozenset({"output_attentions", "output_hidden_states"})


def reject_unknown_arguments(forward: Callable, kwargs: dict) -> None:
    """Raise a TypeError naming the keyword arguments that ``forward`` does not take (``model(x, label=y)`` would
    otherwise return no loss without a word)."""
    unknown = sorted(set(kwargs) - _IGNORED_FORWARD_ARGUMENTS)
    if unknown:
        import inspect

        valid = [name for name in inspect.signature(forward).parameters if name not in ("self", "kwargs")]
        raise TypeError(
            f"{forward.__qualname__}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; it takes "
            f"{', '.join(valid)}."
        )


# The gates g(y1, y2) of the feature filter, by config.gate ('open' has no filter: g = 1). A kind is a function
# (filter, labels (B,), pair_labels (B,)) -> (B, K) gates, or -> ((B, K) gates, scalar regulariser), registered with
# ``register_gate``, which also enters a new kind into the gate registry ``configuration_simlap.GATE_KINDS``. A gate
# with noise draws it only in training mode (``filter.training``): in evaluation mode every gate is deterministic.
GATE_FUNCTIONS: dict[str, Callable[[SimLAPFeatureFilter, Tensor, Tensor], Tensor | tuple[Tensor, Tensor]]] = {}


def register_gate(name: str, kind: GateKind | None = None) -> Callable:
    """Decorator: register a gate function under ``name``; ``kind`` describes a kind new to
    :data:`~simlap_hf.configuration_simlap.GATE_KINDS` (default: a plain filter gate without options)."""
    if kind is not None and name in GATE_KINDS and GATE_KINDS[name] != kind:
        raise ValueError(f"Gate kind {name!r} is already registered as {GATE_KINDS[name]}.")
    GATE_KINDS.setdefault(name, kind or GateKind())

    def register(function: Callable) -> Callable:
        GATE_FUNCTIONS[name] = function
        return function

    return register


def _as_requested(output: ModelOutput, return_dict: bool | None) -> ModelOutput | tuple:
    """``output``, or its tuple form (``None`` fields left out) when ``return_dict`` is False."""
    return output.to_tuple() if return_dict is False else output


def _classifier_output(
    loss: Tensor | None, logits: Tensor, features: Tensor, return_dict: bool | None
) -> ImageClassifierOutput | tuple:
    """The output of the classifiers: ``loss``, (B, C) ``logits`` and the (B, D) backbone features as
    ``pooler_output`` (what ``pipeline("image-feature-extraction")`` reads)."""
    output = ImageClassifierOutput(loss=loss, logits=logits)
    output["pooler_output"] = features
    return _as_requested(output, return_dict)


class SimLAPProjector(nn.Sequential):
    """Linear(D, mlp) -> BatchNorm1d -> ReLU -> Linear(mlp, K, no bias) -> last norm: (B, D) -> (B, K).

    The last norm (``norm``): ``"layernorm"`` LayerNorm(K) (reference), ``"batchnorm"`` BatchNorm1d(K) without affine
    parameters, or ``"none"``.
    """

    def __init__(self, in_dim: int, mlp_dim: int, out_dim: int, norm: str = "layernorm") -> None:
        last: list[nn.Module]
        if norm == "layernorm":
            last = [nn.LayerNorm(out_dim)]
        elif norm == "batchnorm":
            last = [nn.BatchNorm1d(out_dim, affine=False)]
        elif norm == "none":
            last = []
        else:
            raise ValueError(f"projector norm {norm!r} is not valid; choose one of layernorm, batchnorm, none.")
        super().__init__(
            nn.Linear(in_dim, mlp_dim),
            nn.BatchNorm1d(mlp_dim),
            nn.ReLU(inplace=True),
            nn.Linear(mlp_dim, out_dim, bias=False),
            *last,
        )


class SimLAPFeatureFilter(nn.Module):
    """Label-conditioned feature filter: the gate g(y1, y2) in (0, 1)^K of a pair of classes.

    Label embedding ``Embedding(C, E)`` then ReLU -> BatchNorm1d(E) -> Linear(E, H) -> ReLU -> BatchNorm1d(H) ->
    Linear(H, K) -> sigmoid. ``fused``: gate of the mean embedding of y1 and y2; ``product``: product of the two
    single-class gates; ``gumbel`` and ``stochastic``: noisy gates of the mean embedding's logits (see their functions;
    the noise is drawn only in training mode).

    ``gumbel_temperature``, ``gumbel_straight_through`` and ``stochastic_gate_sigma`` are the options of those kinds.
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        hidden_dim: int,
        out_dim: int,
        kind: str,
        gumbel_temperature: float = 1.0,
        gumbel_straight_through: bool = False,
        stochastic_gate_sigma: float = 0.5,
    ) -> None:
        super().__init__()
        if kind not in GATE_FUNCTIONS:
            raise ValueError(
                f"Unknown gate kind {kind!r} for the feature filter; registered: {sorted(GATE_FUNCTIONS)}."
            )
        self.kind = kind
        self.gumbel_temperature, self.gumbel_straight_through = gumbel_temperature, gumbel_straight_through
        self.stochastic_gate_sigma = stochastic_gate_sigma
        self.label_embedding = nn.Embedding(num_classes, embed_dim)
        self.mlp = nn.Sequential(
            nn.ReLU(),
            nn.BatchNorm1d(embed_dim),
            nn.Linear(embed_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(hidden_dim),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, labels: Tensor, pair_labels: Tensor) -> Tensor:
        """(B,), (B,) int64 -> (B, K) gates."""
        return self.gates_and_regularizer(labels, pair_labels)[0]

    def gates_and_regularizer(self, labels: Tensor, pair_labels: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B,), (B,) int64 -> ((B, K) gates, the gate kind's scalar regulariser or None when it has none)."""
        result = GATE_FUNCTIONS[self.kind](self, labels, pair_labels)
        return result if isinstance(result, tuple) else (result, None)


def fused_logits(feature_filter: SimLAPFeatureFilter, labels: Tensor, pair_labels: Tensor) -> Tensor:
    """mlp((E[y1] + E[y2]) / 2): the (B, K) pre-activation of the gates of the mean label embedding."""
    embedding = feature_filter.label_embedding
    return feature_filter.mlp((embedding(labels) + embedding(pair_labels)) / 2)


@register_gate("fused")
def fused_gate(feature_filter: SimLAPFeatureFilter, labels: Tensor, pair_labels: Tensor) -> Tensor:
    """The paper's gate: sigmoid(mlp((E[y1] + E[y2]) / 2)), (B, K)."""
    return torch.sigmoid(fused_logits(feature_filter, labels, pair_labels))


# Keeps log(-log(u)) finite for u = 0 or 1 (the authors' constant).
_GUMBEL_EPS = 1e-20


@register_gate("gumbel")
def gumbel_gate(feature_filter: SimLAPFeatureFilter, labels: Tensor, pair_labels: Tensor) -> Tensor:
    """Gumbel-sigmoid gate of the fused logits l (B, K), tau = ``gumbel_temperature``.

    Training mode: ``sigmoid((l + G) / tau)`` with Gumbel noise ``G = -log(-log(u))``, u ~ U(0, 1) per value (the
    authors' sampler); with ``gumbel_straight_through`` the forward value is rounded to 0/1 while the gradient is the
    soft gate's. Evaluation mode: the same without noise, ``sigmoid(l / tau)`` (rounded when straight-through).
    """
    logits = at_least_float32(fused_logits(feature_filter, labels, pair_labels))
    if feature_filter.training:
        uniform = torch.rand_like(logits)
        logits = logits - torch.log(-torch.log(uniform + _GUMBEL_EPS) + _GUMBEL_EPS)
    soft = torch.sigmoid(logits / feature_filter.gumbel_temperature)
    if not feature_filter.gumbel_straight_through:
        return soft
    return torch.round(soft) - soft.detach() + soft


@register_gate("stochastic")
def stochastic_gate(feature_filter: SimLAPFeatureFilter, labels: Tensor, pair_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Stochastic gate (Yamada et al., "Feature Selection using Stochastic Gates") of the fused mean mu (B, K).

    Training mode: ``clamp(mu + 0.5 + sigma * N(0, 1), 0, 1)``; evaluation mode: ``clamp(mu + 0.5, 0, 1)``. The
    regulariser is the mean over the batch and the K dimensions of ``Phi((mu + 0.5) / sigma)`` (Phi the standard
    Gaussian CDF: the probability that a gate is open), a float32 scalar.
    """
    mean = at_least_float32(fused_logits(feature_filter, labels, pair_labels))
    sigma = feature_filter.stochastic_gate_sigma
    shifted = mean + 0.5
    noisy = shifted + sigma * torch.randn_like(mean) if feature_filter.training else shifted
    regularizer = 0.5 * (1.0 + torch.erf(shifted / (sigma * math.sqrt(2.0))))
    return noisy.clamp(0.0, 1.0), regularizer.mean()


@register_gate("product")
def product_gate(feature_filter: SimLAPFeatureFilter, labels: Tensor, pair_labels: Tensor) -> Tensor:
    """sigmoid(mlp(E[y1])) * sigmoid(mlp(E[y2])), (B, K)."""
    # One pass over both label sets so that BatchNorm sees a single batch of 2B embeddings.
    both = feature_filter.mlp(feature_filter.label_embedding(torch.cat([labels, pair_labels])))
    first, second = torch.sigmoid(both).chunk(2)
    return first * second


class SimLAPPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading conventions shared by the SimLAP models.

    The timm backbone keeps timm's own initialisation: its tensors are marked as initialised before ``post_init``.
    """

    config_class = SimLAPConfig
    base_model_prefix = "simlap"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained`` whose failures name the file or folder and the fix.

        - A local folder without ``config.json`` (and no ``config=``): OSError (transformers would build a default
          configuration and then fail on the shapes of the weights).
        - A path that does not exist: OSError naming it (instead of a complaint about Hub repository ids).
        - A truncated or corrupt safetensors file: OSError naming the file.
        - Weights whose shapes do not fit the configuration, e.g. a classifier saved with 3 classes loaded with
          ``num_labels=5`` or an ``id2label`` of 5 classes, without ``ignore_mismatched_sizes=True``: ValueError
          listing every such tensor with both shapes, and the two ways out.
        """
        source = pretrained_model_name_or_path
        if isinstance(source, (str, os.PathLike)):
            text = os.fspath(source)
            if text.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(text)):
                raise OSError(f"Cannot load {cls.__name__}: {text!r} does not exist.")
            if (
                os.path.isdir(text)
                and kwargs.get("config") is None
                and not os.path.isfile(os.path.join(text, "config.json"))
            ):
                raise OSError(
                    f"Cannot load {cls.__name__} from {text!r}: the folder has no config.json, so the architecture "
                    f"(backbone, sizes, classes) is unknown. Load a folder written by save_pretrained (config.json + "
                    f"model.safetensors), or pass config=... explicitly."
                )
        check_sizes = not kwargs.get("ignore_mismatched_sizes", False)
        wants_info = kwargs.get("output_loading_info", False)
        if check_sizes:  # load leniently, then report the mismatches ourselves (with shapes and file)
            kwargs.update(ignore_mismatched_sizes=True, output_loading_info=True)
        try:
            loaded = super().from_pretrained(source, *model_args, **kwargs)
        except SafetensorError as error:
            raise OSError(
                f"Cannot load {cls.__name__}: the weights file {describe_weights(source)} is truncated or corrupt "
                f"({error}). Save, copy or download it again."
            ) from error
        if not check_sizes:
            return loaded
        model, info = loaded
        mismatched = sorted(info.get("mismatched_keys") or (), key=lambda item: item[0])
        if mismatched:
            shapes = "; ".join(
                f"{name}: {tuple(saved)} in the file, {tuple(wanted)} in the model"
                for name, saved, wanted in mismatched
            )
            raise ValueError(
                f"Cannot load {cls.__name__} from {describe_weights(source)}: the weights do not fit the configuration "
                f"({shapes}). This happens when num_labels/id2label (number of classes) differs from the checkpoint's. "
                f"Pass ignore_mismatched_sizes=True to start these tensors anew (a new head for another label set), "
                f"or load with the checkpoint's own number of classes."
            )
        return (model, info) if wants_info else model

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        """(B, C_in, H, W) normalised images -> (B, D) pooled backbone features (``out.pooler_output``), as CLIP's
        ``get_image_features``: the representation that kNN, the linear probe and feature extraction use."""
        return self.backbone(pixel_values)

    def _mark_initialised(self, module: nn.Module) -> None:
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            tensor._is_hf_initialized = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, (nn.BatchNorm1d, nn.LayerNorm)):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)

    def _build_backbone(self, config: SimLAPConfig) -> nn.Module:
        backbone = create_backbone(config)
        self._mark_initialised(backbone)
        return backbone

    def _backbone_group_matcher(self, head_names: tuple[str, ...]) -> Callable[[str], tuple[float, ...]]:
        """Layer groups of the backbone (timm's ``group_matcher``: stem, each block), then one group for the heads.

        Returns a callable for timm's ``param_groups_layer_decay``; parameter names are this model's.
        """
        backbone_groups = group_with_matcher(
            self.backbone.named_parameters(), self.backbone.group_matcher(coarse=False), reverse=True
        )
        head_group = max(backbone_groups.values()) + 1

        def matcher(name: str) -> tuple[float, ...]:
            if name.startswith("backbone."):
                return (float(backbone_groups[name[len("backbone.") :]]),)
            if name.split(".")[0] in head_names:
                return (float(head_group),)
            raise KeyError(f"parameter {name!r} belongs to no layer group")

        return matcher


@dataclass
class SimLAPModelOutput(ModelOutput):
    """Output of :class:`SimLAPModel`.

    Attributes:
        loss: total loss (contrastive + head cross-entropy + gate penalty), when ``labels`` are given.
        contrastive_loss, head_loss, gate_penalty_loss: its parts.
        pooler_output: (B, D) pooled backbone features (the representation of kNN, probe and feature extraction).
            The first field after the losses, so that without labels ``out[0]`` and
            ``pipeline("image-feature-extraction")`` give the features, not the head's logits.
        logits: (B, C) online-head logits.
        embeddings: (B, K) projected embeddings.
        pair_labels: (B,) partner classes drawn for the batch.
        gate_activation: mean over anchors of the sum of the K gate values.
        gate_regularizer_loss: ``stochastic_gate_lambda`` times the stochastic gate's regulariser (part of ``loss``);
            None for the other gates.
        logit_scale: the learned logit scale s (``learnable_temperature``), else None.
        alpha: the learned alpha (``alpha`` > 0), else None.
        gate_entropy: mean Bernoulli entropy of the gates.
        cos_own, cos_partner, cos_negative: mean gated cosine of own-class, partner-class and negative pairs.
        embedding_std: mean per-dimension std of the L2-normalised embeddings (collapse monitor).
    """

    loss: Tensor | None = None
    contrastive_loss: Tensor | None = None
    head_loss: Tensor | None = None
    gate_penalty_loss: Tensor | None = None
    pooler_output: Tensor | None = None
    logits: Tensor | None = None
    embeddings: Tensor | None = None
    pair_labels: Tensor | None = None
    gate_activation: Tensor | None = None
    gate_entropy: Tensor | None = None
    cos_own: Tensor | None = None
    cos_partner: Tensor | None = None
    cos_negative: Tensor | None = None
    embedding_std: Tensor | None = None
    gate_regularizer_loss: Tensor | None = None
    logit_scale: Tensor | None = None
    alpha: Tensor | None = None


class SimLAPModel(SimLAPPreTrainedModel):
    """SimLAP pretraining model: timm backbone, projector, label-conditioned feature filter and online linear head.

    Example::

        config = SimLAPConfig(backbone="resnet18", backbone_kwargs={"stem_type": "deep", "output_stride": 8},
                              num_classes=10)
        model = SimLAPModel(config)
        out = model(pixel_values, labels=labels)  # out.loss, out.logits (B, C), out.embeddings (B, K)
        gates = model.gate(y1, y2)                # (B, K) in [0, 1]
    """

    _auto_class = "AutoModel"  # saved folders carry this code (remote code, see SimLAPConfig)

    #: Scalar fields of :class:`SimLAPModelOutput` that training logs at every logging step, next to ``loss``. A new
    #: loss term or statistic is logged by setting it on the output in :meth:`forward` and naming it here.
    logged_outputs: tuple[str, ...] = (
        "contrastive_loss",
        "head_loss",
        "gate_penalty_loss",
        "gate_activation",
        "gate_entropy",
        "cos_own",
        "cos_partner",
        "cos_negative",
        "embedding_std",
    )

    def __init__(self, config: SimLAPConfig) -> None:
        super().__init__(config)
        self.backbone = self._build_backbone(config)
        feature_dim = self.backbone.num_features
        self.projector = SimLAPProjector(feature_dim, config.mlp_dim, config.out_dim, config.projector_norm)
        # The open gate has no filter at all: unused parameters would break data-parallel training.
        self.feature_filter = (
            SimLAPFeatureFilter(
                config.num_classes,
                config.filter_embed_dim,
                config.filter_hidden_dim,
                config.out_dim,
                config.gate,
                gumbel_temperature=config.gumbel_temperature,
                gumbel_straight_through=config.gumbel_straight_through,
                stochastic_gate_sigma=config.stochastic_gate_sigma,
            )
            if gate_has_filter(config.gate)
            else None
        )
        self.online_head = nn.Linear(feature_dim, config.num_classes)
        # The authors' later form: a learnable logit scale s = exp(scale_logit) and a learnable alpha, each only when
        # enabled (the reference model has neither parameter, so its weights files are unchanged).
        logged = list(type(self).logged_outputs)
        if config.learnable_temperature:
            self.scale_logit = nn.Parameter(torch.tensor(math.log(1.0 / config.temperature)))
            logged.append("logit_scale")
        else:
            self.register_parameter("scale_logit", None)
        if config.alpha:
            self.alpha = nn.Parameter(torch.tensor(float(config.alpha)))
            logged.append("alpha")
        else:
            self.register_parameter("alpha", None)
        if GATE_KINDS[config.gate].regularizer_weight is not None:
            logged.append("gate_regularizer_loss")
        self.logged_outputs = tuple(logged)
        self.post_init()

    @property
    def feature_dim(self) -> int:
        """Backbone width D."""
        return self.backbone.num_features

    def gate(self, labels: Tensor, pair_labels: Tensor) -> Tensor:
        """Gate vectors g(y1, y2) of pairs of classes: (B,), (B,) int64 -> (B, K) in [0, 1] (ones for ``open``)."""
        check_labels(labels, self.config.num_classes)
        check_labels(pair_labels, self.config.num_classes, "pair_labels")
        return self._gates(labels, pair_labels)

    def _gates(self, labels: Tensor, pair_labels: Tensor) -> Tensor:
        """:meth:`gate` without the range checks (for labels already checked)."""
        if self.feature_filter is None:
            return torch.ones(labels.shape[0], self.config.out_dim, device=labels.device)
        return self.feature_filter(labels, pair_labels)

    def forward(
        self,
        pixel_values: Tensor,
        labels: Tensor | None = None,
        pair_labels: Tensor | None = None,
        gather_keys: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SimLAPModelOutput | tuple:
        """Encode (B, C_in, H, W) images; with ``labels`` (B,) also compute the SimLAP loss and its statistics.

        Args:
            pixel_values: (B, C_in, H, W) normalised images.
            labels: (B,) int64 classes; enables the loss.
            pair_labels: (B,) partner classes; drawn with ``config.pair_mode`` when omitted.
            gather_keys: use the embeddings of every process as keys (default: when training distributed).
        """
        reject_unknown_arguments(SimLAPModel.forward, kwargs)
        features = self.backbone(pixel_values)  # (B, D)
        embeddings = self.projector(features)  # (B, K)
        logits = self.online_head(features.detach() if self.config.detach_head else features)  # (B, C)
        output = SimLAPModelOutput(logits=logits, embeddings=embeddings, pooler_output=features)
        if labels is not None:
            self._add_loss(output, labels, pair_labels, gather_keys)
        return _as_requested(output, return_dict)

    def _add_loss(
        self, output: SimLAPModelOutput, labels: Tensor, pair_labels: Tensor | None, gather_keys: bool | None
    ) -> None:
        config = self.config
        # Sampled partners are in range by construction; in training no check waits for the device.
        check_labels(labels, config.num_classes, synchronize=not self.training)
        if pair_labels is None:
            pair_labels = sample_pair_labels(labels, config.pair_mode, config.num_classes)
        else:
            check_labels(pair_labels, config.num_classes, "pair_labels", synchronize=not self.training)
        regularizer = None
        if self.feature_filter is None:
            gates = self._gates(labels, pair_labels)  # (B, K) ones
        else:
            gates, regularizer = self.feature_filter.gates_and_regularizer(labels, pair_labels)  # (B, K), scalar
        embeddings = output.embeddings
        if gather_keys is None:
            gather_keys = self.training and is_distributed()
        keys, key_labels, offset = embeddings, labels, 0
        if gather_keys:
            keys, key_labels = gather_with_grad(embeddings), gather_labels(labels)
            offset = torch.distributed.get_rank() * embeddings.shape[0]
        logit_scale = self.scale_logit.exp() if self.scale_logit is not None else None
        terms = simlap_contrastive_terms(
            embeddings,
            labels,
            pair_labels,
            gates,
            config.temperature,
            keys,
            key_labels,
            form=config.loss_form,
            logit_scale=logit_scale,
            alpha=self.alpha,
            positive_normalization=config.positive_normalization,
        )
        contrastive = distributed_mean(terms.loss_sum, terms.num_positives, gathered=gather_keys)
        head_loss = classification_loss(output.logits, labels)  # the online head: no label smoothing
        entropy = gate_entropy(gates)
        penalty = config.gate_penalty * entropy
        output.loss = contrastive + head_loss + penalty
        if regularizer is not None:
            weight_field = GATE_KINDS[config.gate].regularizer_weight
            weight = getattr(config, weight_field) if weight_field is not None else 1.0
            output.gate_regularizer_loss = weight * regularizer
            output.loss = output.loss + output.gate_regularizer_loss
        if logit_scale is not None:
            output.logit_scale = logit_scale.detach()
        if self.alpha is not None:
            output.alpha = self.alpha.detach()
        output.contrastive_loss = contrastive
        output.head_loss = head_loss
        output.gate_penalty_loss = penalty
        output.pair_labels = pair_labels
        output.gate_activation = gates.detach().float().sum(dim=1).mean()
        output.gate_entropy = entropy.detach()
        for name, value in pair_statistics(terms, labels, key_labels, embeddings, offset).items():
            setattr(output, name, value)


class SimLAPForImageClassification(SimLAPPreTrainedModel):
    """The SimLAP backbone with a linear classifier, for fine-tuning.

    ``from_pretrained`` on a :class:`SimLAPModel` checkpoint takes over the backbone and starts a new classifier
    (pass ``num_labels``/``id2label`` for another label set); the projector, filter and online head are dropped.
    """

    _auto_class = "AutoModelForImageClassification"  # saved folders carry this code (remote code, see SimLAPConfig)

    _keys_to_ignore_on_load_unexpected = [
        r"^projector\.",
        r"^feature_filter\.",
        r"^online_head\.",
        r"^scale_logit$",
        r"^alpha$",
    ]

    def __init__(self, config: SimLAPConfig) -> None:
        super().__init__(config)
        self.backbone = self._build_backbone(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(self.backbone.num_features, config.num_labels)
        self.post_init()

    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[float, ...]]:
        """timm-style layer groups for layer-wise lr decay: the backbone's (stem, each block), then the head."""
        return self._backbone_group_matcher(("classifier", "dropout"))

    def forward(
        self, pixel_values: Tensor, labels: Tensor | None = None, return_dict: bool | None = None, **kwargs
    ) -> ImageClassifierOutput | tuple:
        """(B, C_in, H, W) -> logits (B, C). ``labels``: (B,) class indices, or (B, C) soft targets (mixup)."""
        reject_unknown_arguments(SimLAPForImageClassification.forward, kwargs)
        features = self.backbone(pixel_values)  # (B, D)
        logits = self.classifier(self.dropout(features))  # (B, C)
        loss = classification_loss(logits, labels) if labels is not None else None
        return _classifier_output(loss, logits, features, return_dict)


class CosineClassifier(nn.Module):
    """Cosine against C unit-norm class weights (weight norm with the magnitude frozen at 1): (B, E) -> (B, C)."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        nn.init.normal_(self.weight, std=0.02)

    def unit_weight(self) -> Tensor:
        """(C, E) class directions of unit norm."""
        return F.normalize(self.weight, dim=1)

    def forward(self, features: Tensor) -> Tensor:
        cosine = F.normalize(features.float(), dim=1) @ self.unit_weight().float().T
        return cosine.clamp(-1.0, 1.0)


class SimLAPFuseForImageClassification(SimLAPPreTrainedModel):
    """SimLAP-Fuse: supervised training with a margin (ArcGrad) head, regularised by a SimLAP term.

    Margin head: Linear(D, m*E, no bias) -> ReLU -> BatchNorm1d -> Linear(m*E, E, no bias) ->
    BatchNorm1d(affine=False) -> cosine against the C unit-norm class weights. Training logits are
    ``s * (pi - arccos(cos))``, evaluation logits the plain cosine. The SimLAP term gates the backbone features with
    ``1[w_y1 * w_y2 > 0]`` (dimensions where the two class weights agree in sign, no gradient), positives being the
    samples of class y1 or y2; it needs E == D.
    """

    _auto_class = "AutoModelForImageClassification"  # saved folders carry this code (remote code, see SimLAPConfig)

    config_class = SimLAPFuseConfig

    def __init__(self, config: SimLAPFuseConfig) -> None:
        super().__init__(config)
        self.backbone = self._build_backbone(config)
        feature_dim = self.backbone.num_features
        if config.head_dim is None:
            config.head_dim = feature_dim
        if feature_dim != config.head_dim:
            raise ValueError(
                f"SimLAP-Fuse gates backbone features with the class weights, so the backbone width must equal "
                f"head_dim: backbone {config.backbone!r} has {feature_dim} features but head_dim={config.head_dim}. "
                f"Set head_dim={feature_dim}."
            )
        hidden = config.head_hidden_mult * config.head_dim
        self.margin_head = nn.Sequential(
            nn.Linear(feature_dim, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(hidden),
            nn.Linear(hidden, config.head_dim, bias=False),
            nn.BatchNorm1d(config.head_dim, affine=False),
        )
        self.classifier = CosineClassifier(config.head_dim, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, CosineClassifier):
            init.normal_(module.weight, std=0.02)

    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[float, ...]]:
        """timm-style layer groups: the backbone's, then the margin head and classifier."""
        return self._backbone_group_matcher(("margin_head", "classifier"))

    def class_gate(self, labels: Tensor, pair_labels: Tensor) -> Tensor:
        """(B,), (B,) -> (B, D) float gates ``1[w_y1 * w_y2 > 0]`` from the class weights, without gradient."""
        with torch.no_grad():
            weight = self.classifier.weight
            return (weight[labels] * weight[pair_labels] > 0).float()

    def forward(
        self,
        pixel_values: Tensor,
        labels: Tensor | None = None,
        soft_labels: Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        """(B, C_in, H, W) -> logits (B, C): ArcGrad logits in training, cosines in evaluation.

        Args:
            labels: (B,) classes: enable the loss (ArcGrad cross-entropy + SimLAP term).
            soft_labels: (B, C) optional soft targets (mixup/label smoothing) for the cross-entropy part.
        """
        reject_unknown_arguments(SimLAPFuseForImageClassification.forward, kwargs)
        features = self.backbone(pixel_values)  # (B, D)
        cosine = self.classifier(self.margin_head(features))  # (B, C)
        logits = arcgrad_logits(cosine, self.config.arc_scale) if self.training else cosine
        loss = None
        if labels is not None:
            check_labels(labels, self.config.num_labels, synchronize=not self.training)
            targets = soft_labels if soft_labels is not None else labels
            loss = classification_loss(logits, targets, self.config.label_smoothing)
            if self.config.simlap_weight > 0:
                loss = loss + self.config.simlap_weight * self.simlap_term(features, labels)
        return _classifier_output(loss, logits, features, return_dict)

    def simlap_term(self, features: Tensor, labels: Tensor) -> Tensor:
        """Mean over ``iter_num`` pair draws of the pair-positive SimLAP loss on (B, D) backbone features."""
        config = self.config
        gather = self.training and is_distributed()
        keys = gather_with_grad(features) if gather else features
        key_labels = gather_labels(labels) if gather else labels
        total = features.new_zeros((), dtype=torch.float32)
        for _ in range(config.iter_num):
            pair_labels = sample_pair_labels(labels, config.pair_mode, config.num_labels)
            gates = self.class_gate(labels, pair_labels)
            terms = simlap_contrastive_terms(
                features, labels, pair_labels, gates, config.temperature, keys, key_labels, positives="pair"
            )
            total = total + distributed_mean(terms.loss_sum, terms.num_positives, gathered=gather)
        return total / config.iter_num


class SimLAPFuseModel(SimLAPPreTrainedModel):
    """The backbone of a SimLAP-Fuse checkpoint: ``AutoModel`` of a Fuse configuration, for feature extraction.

    ``forward`` returns ``pooler_output`` (B, D), the backbone features (also ``out[0]``); the margin head and class
    weights of the checkpoint are not loaded (use :class:`SimLAPFuseForImageClassification` to classify).
    """

    config_class = SimLAPFuseConfig
    _keys_to_ignore_on_load_unexpected = [r"^margin_head\.", r"^classifier\."]

    def __init__(self, config: SimLAPFuseConfig) -> None:
        super().__init__(config)
        self.backbone = self._build_backbone(config)
        self.post_init()

    def forward(self, pixel_values: Tensor, return_dict: bool | None = None, **kwargs) -> ModelOutput | tuple:
        """(B, C_in, H, W) -> ``pooler_output`` (B, D)."""
        reject_unknown_arguments(SimLAPFuseModel.forward, kwargs)
        return _as_requested(BaseModelOutputWithPooling(pooler_output=self.backbone(pixel_values)), return_dict)
