"""Configuration of SimLAP models (SimLAP pretraining, classification and SimLAP-Fuse)."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig

from .losses import DEFAULT_TEMPERATURE, LOSS_FORMS, PAIR_MODES, POSITIVE_NORMALIZATIONS


@dataclass(frozen=True)
class GateKind:
    """What the package knows about a value of ``SimLAPConfig.gate`` besides its function (``modeling_simlap``).

    Attributes:
        has_filter: whether the kind learns a feature filter g(y1, y2); without one (``open``: g = 1) the gates
            carry no class relations and the model has no filter parameters.
        option_fields: the ``SimLAPConfig`` fields that only this kind reads (listed on the model card).
        regularizer_weight: the ``SimLAPConfig`` field weighting the regulariser the kind's function returns, or
            None for a kind without one.
        description: one line for the documentation of ``--gate``.
    """

    has_filter: bool = True
    option_fields: tuple[str, ...] = ()
    regularizer_weight: str | None = None
    description: str = ""


#: The gate registry: every accepted ``SimLAPConfig.gate``. ``modeling_simlap.register_gate`` adds a new kind together
#: with its gate function; the built-in kinds are declared here so that a configuration loads without the model code.
GATE_KINDS: dict[str, GateKind] = {
    "fused": GateKind(description="gate of the mean label embedding (the reference)"),
    "product": GateKind(description="product of the two single-class gates"),
    "open": GateKind(has_filter=False, description="no filter, g = 1 (supervised contrastive learning)"),
    "gumbel": GateKind(
        option_fields=("gumbel_temperature", "gumbel_straight_through"),
        description="Gumbel-sigmoid sample of the fused gate's logits in training",
    ),
    "stochastic": GateKind(
        option_fields=("stochastic_gate_sigma", "stochastic_gate_lambda"),
        regularizer_weight="stochastic_gate_lambda",
        description="hard sigmoid of the fused mean plus Gaussian noise in training",
    ),
}


#: The gate of a new model: the paper's.
DEFAULT_GATE = "fused"


def gate_has_filter(kind: str | None) -> bool:
    """Whether ``kind`` is a registered gate kind with a learned feature filter (False for ``open`` and None)."""
    return kind in GATE_KINDS and GATE_KINDS[kind].has_filter


PROJECTOR_NORMS = ("layernorm", "batchnorm", "none")


def _check_choice(field: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"SimLAPConfig.{field}={value!r} is not valid; choose one of {', '.join(valid)}.")


def _check_positive(field: str, value: float, strict: bool = True) -> None:
    if value is None or (value <= 0 if strict else value < 0):
        bound = "> 0" if strict else ">= 0"
        raise ValueError(f"SimLAPConfig.{field}={value!r} is not valid; it must be {bound}.")


def check_timm_model_name(name: str, field: str = "backbone") -> None:
    """Raise a ValueError naming close matches when ``name`` is not a timm architecture."""
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models() for the valid names."
    raise ValueError(f"SimLAPConfig.{field}={name!r} is not a timm model name.{hint}")


class SimLAPConfig(PretrainedConfig):
    r"""Configuration of :class:`SimLAPModel` and :class:`SimLAPForImageClassification`.

    One object fully describes the model: the timm backbone, the projector, the label-conditioned feature filter
    (gate), the online linear head, and the loss hyper-parameters.

    Args:
        backbone: timm architecture name (created with ``num_classes=0`` so that it returns pooled features).
        backbone_kwargs: extra keyword arguments for ``timm.create_model`` (for example ``stem_type``,
            ``output_stride``, ``in_chans``, ``drop_path_rate``).
        num_classes: number of classes C (the same as ``num_labels``; ``id2label`` names them).
        out_dim: projection size K.
        mlp_dim: hidden size of the projector.
        filter_embed_dim: size of the label embedding of the feature filter.
        filter_hidden_dim: hidden size of the feature filter.
        gate: a kind of the gate registry :data:`GATE_KINDS`; built in: ``"fused"`` (gate of the mean label embedding,
            the default), ``"product"`` (product of the two single-class gates),
            ``"open"`` (no filter: supervised contrastive learning), ``"gumbel"`` (Gumbel-sigmoid sample of the fused
            gate's logits in training) or ``"stochastic"`` (stochastic gates: hard sigmoid of the fused mean plus
            Gaussian noise in training). In evaluation mode every gate is deterministic (no noise).
        pair_mode: how the partner class y2 is drawn for each anchor: ``"arbitrary"`` (labels of a random permutation
            of the batch), ``"identical"`` (y2 = y1) or ``"distinct"`` (a random different class).
        temperature: softmax temperature of the gated cosine logits.
        gate_penalty: weight of the mean Bernoulli entropy of the gates (pushes gates towards 0/1).
        detach_head: train the online linear head on detached backbone features (a pure probe) when True.
        image_size: input resolution the model was trained at (used by image processors and model cards).
        num_channels: number of input channels (passed to timm as ``in_chans``).
        classifier_dropout: dropout before the linear classifier of :class:`SimLAPForImageClassification`.

    Options of the authors' later formulation (erow/FastSSL ``model/simlap.py``); the defaults are the reference form:
        loss_form: ``"cosine"`` (reference: cosine of the gated, renormalised embeddings) or ``"dot"``
            (``<z_b * g_b * g_b, z_n>`` of the unit-normalised embeddings, no renormalisation after gating).
        learnable_temperature: learn the logit scale ``s = exp(scale_logit)``, ``scale_logit`` a parameter
            initialised to ``log(1 / temperature)``; False: ``s = 1 / temperature`` fixed.
        alpha: initial value of a learnable ``alpha``: ``alpha * s * <z_b, z_n>`` (plain cosine of the ungated
            embeddings) is subtracted from the logits; 0 turns the term (and the parameter) off.
        positive_normalization: ``"batch"`` (reference: one mean over all positive pairs of the batch) or
            ``"anchor"`` (each anchor's InfoNCE terms divided by its positive count + 1e-6, then the mean over
            anchors).
        gumbel_temperature: temperature tau of the ``gumbel`` gate ``sigmoid((logits + Gumbel noise) / tau)``.
        gumbel_straight_through: the ``gumbel`` gate's forward value is rounded to 0/1 with the soft gate's gradient.
        stochastic_gate_sigma: standard deviation of the ``stochastic`` gate's noise.
        stochastic_gate_lambda: weight of its regulariser, the mean Gaussian CDF of ``(mean + 0.5) / sigma`` (the
            expected share of open gates), added to the loss.
        projector_norm: last layer of the projector: ``"layernorm"`` (reference), ``"batchnorm"`` (BatchNorm1d
            without affine parameters) or ``"none"``.
    """

    model_type = "simlap"
    # save_pretrained copies this file (and the modeling code) next to the weights and writes auto_map, so that
    # AutoConfig/AutoModel load the folder with trust_remote_code=True where simlap_hf is not installed.
    _auto_class = "AutoConfig"

    # Declared fields (transformers 5 treats configs as dataclasses; declaring ``temperature`` here also tells it that
    # this is a loss temperature, not a text-generation parameter).
    backbone: str = "resnet18"
    backbone_kwargs: dict | None = None
    out_dim: int = 256
    mlp_dim: int = 2048
    filter_embed_dim: int = 512
    filter_hidden_dim: int = 1024
    gate: str = DEFAULT_GATE
    pair_mode: str = "arbitrary"
    temperature: float = DEFAULT_TEMPERATURE
    gate_penalty: float = 0.0
    detach_head: bool = True
    image_size: int = 32
    num_channels: int = 3
    classifier_dropout: float = 0.0
    loss_form: str = "cosine"
    learnable_temperature: bool = False
    alpha: float = 0.0
    positive_normalization: str = "batch"
    gumbel_temperature: float = 1.0
    gumbel_straight_through: bool = False
    stochastic_gate_sigma: float = 0.5
    stochastic_gate_lambda: float = 1e-6
    projector_norm: str = "layernorm"

    def __init__(
        self,
        backbone: str = "resnet18",
        backbone_kwargs: dict[str, Any] | None = None,
        num_classes: int | None = None,
        out_dim: int = 256,
        mlp_dim: int = 2048,
        filter_embed_dim: int = 512,
        filter_hidden_dim: int = 1024,
        gate: str = DEFAULT_GATE,
        pair_mode: str = "arbitrary",
        temperature: float = DEFAULT_TEMPERATURE,
        gate_penalty: float = 0.0,
        detach_head: bool = True,
        image_size: int = 32,
        num_channels: int = 3,
        classifier_dropout: float = 0.0,
        loss_form: str = "cosine",
        learnable_temperature: bool = False,
        alpha: float = 0.0,
        positive_normalization: str = "batch",
        gumbel_temperature: float = 1.0,
        gumbel_straight_through: bool = False,
        stochastic_gate_sigma: float = 0.5,
        stochastic_gate_lambda: float = 1e-6,
        projector_norm: str = "layernorm",
        **kwargs: Any,
    ) -> None:
        if num_classes is not None and "id2label" not in kwargs and "num_labels" not in kwargs:
            kwargs["num_labels"] = num_classes
        super().__init__(**kwargs)
        self.backbone, self.backbone_kwargs = backbone, dict(backbone_kwargs or {})
        self.out_dim, self.mlp_dim = out_dim, mlp_dim
        self.filter_embed_dim, self.filter_hidden_dim = filter_embed_dim, filter_hidden_dim
        self.gate, self.pair_mode, self.temperature = gate, pair_mode, temperature
        self.gate_penalty, self.detach_head = gate_penalty, detach_head
        self.image_size, self.num_channels, self.classifier_dropout = image_size, num_channels, classifier_dropout
        self.loss_form, self.learnable_temperature, self.alpha = loss_form, learnable_temperature, alpha
        self.positive_normalization, self.projector_norm = positive_normalization, projector_norm
        self.gumbel_temperature, self.gumbel_straight_through = gumbel_temperature, gumbel_straight_through
        self.stochastic_gate_sigma, self.stochastic_gate_lambda = stochastic_gate_sigma, stochastic_gate_lambda
        self.validate()
        if num_classes is not None and self.num_labels != num_classes:
            raise ValueError(
                f"SimLAPConfig.num_classes={num_classes} disagrees with the {self.num_labels} names in id2label."
            )

    @property
    def num_classes(self) -> int:
        """Number of classes C (alias of ``num_labels``)."""
        return self.num_labels

    @num_classes.setter
    def num_classes(self, value: int) -> None:
        self.num_labels = value

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model`` (``in_chans`` from ``num_channels`` unless given)."""
        kwargs = dict(self.backbone_kwargs)
        kwargs.setdefault("in_chans", self.num_channels)
        return kwargs

    def validate(self) -> None:
        """Check every field; raise a ValueError naming the field and the valid values."""
        _check_choice("gate", self.gate, tuple(GATE_KINDS))
        _check_choice("pair_mode", self.pair_mode, PAIR_MODES)
        _check_positive("temperature", self.temperature)
        _check_positive("gate_penalty", self.gate_penalty, strict=False)
        _check_choice("loss_form", self.loss_form, LOSS_FORMS)
        _check_choice("positive_normalization", self.positive_normalization, POSITIVE_NORMALIZATIONS)
        _check_choice("projector_norm", self.projector_norm, PROJECTOR_NORMS)
        for field in ("learnable_temperature", "gumbel_straight_through"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(
                    f"SimLAPConfig.{field}={getattr(self, field)!r} is not valid; it must be True or False."
                )
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"SimLAPConfig.alpha={self.alpha!r} is not valid; it must be a number >= 0 (0: off).")
        _check_positive("gumbel_temperature", self.gumbel_temperature)
        _check_positive("stochastic_gate_sigma", self.stochastic_gate_sigma)
        _check_positive("stochastic_gate_lambda", self.stochastic_gate_lambda, strict=False)
        for field in ("out_dim", "mlp_dim", "filter_embed_dim", "filter_hidden_dim", "image_size", "num_channels"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SimLAPConfig.{field}={value!r} is not valid; it must be a positive integer.")
        if self.num_labels is None or self.num_labels < 1:
            raise ValueError(f"SimLAPConfig.num_classes={self.num_labels!r} is not valid; it must be >= 1.")
        if not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(f"SimLAPConfig.classifier_dropout={self.classifier_dropout!r} must be in [0, 1).")
        check_timm_model_name(self.backbone)


class SimLAPFuseConfig(SimLAPConfig):
    r"""Configuration of :class:`SimLAPFuseForImageClassification` (SimLAP-Fuse, supervised training regularised by
    the SimLAP term).

    Args (on top of :class:`SimLAPConfig`; projector and feature filter fields are unused):
        The options of the authors' later form (``loss_form`` ... ``projector_norm``) are SimLAPModel options;
        SimLAP-Fuse ignores them.

        head_dim: width of the margin head's output, compared by cosine to the class weights. The SimLAP term gates
            backbone features with the class-weight signs, so it needs ``head_dim`` equal to the backbone width D;
            ``None`` (default) takes D when the model is built.
        head_hidden_mult: the margin head's hidden width is ``head_hidden_mult * head_dim``.
        arc_scale: scale s of the ArcGrad logits ``s * (pi - arccos(cos))``.
        iter_num: number of pair draws averaged in the SimLAP term.
        simlap_weight: weight of the SimLAP term in the loss.
        label_smoothing: label smoothing s of the ArcGrad cross-entropy of class indices (targets (1 - s) * onehot +
            s / C, see ``losses.classification_loss``); soft targets (mixup) carry their own.
    """

    model_type = "simlap_fuse"

    head_dim: int | None = None
    head_hidden_mult: int = 4
    arc_scale: float = 10.0
    iter_num: int = 1
    simlap_weight: float = 1.0
    label_smoothing: float = 0.0

    def __init__(
        self,
        head_dim: int | None = None,
        head_hidden_mult: int = 4,
        arc_scale: float = 10.0,
        iter_num: int = 1,
        simlap_weight: float = 1.0,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.head_dim, self.head_hidden_mult, self.arc_scale = head_dim, head_hidden_mult, arc_scale
        self.iter_num, self.simlap_weight, self.label_smoothing = iter_num, simlap_weight, label_smoothing
        super().__init__(**kwargs)

    def validate(self) -> None:
        super().validate()
        _check_positive("arc_scale", self.arc_scale)
        _check_positive("simlap_weight", self.simlap_weight, strict=False)
        for field in ("head_dim", "head_hidden_mult", "iter_num"):
            value = getattr(self, field)
            if field == "head_dim" and value is None:
                continue
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SimLAPFuseConfig.{field}={value!r} is not valid; it must be a positive integer.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"SimLAPFuseConfig.label_smoothing={self.label_smoothing!r} must be in [0, 1).")
