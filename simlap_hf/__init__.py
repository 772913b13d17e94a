"""SimLAP-HF: learning visual representations from arbitrary class pairs (SimLAP, arXiv:2410.18200) with
transformers models, timm backbones and accelerate training.

Importing the package registers the models with the transformers auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_simlap import SimLAPConfig, SimLAPFuseConfig
from .losses import sample_pair_labels, simlap_loss
from .modeling_simlap import (
    SimLAPForImageClassification,
    SimLAPFuseForImageClassification,
    SimLAPModel,
    SimLAPModelOutput,
)

__version__ = "0.1.0"

AutoConfig.register(SimLAPConfig.model_type, SimLAPConfig, exist_ok=True)
AutoConfig.register(SimLAPFuseConfig.model_type, SimLAPFuseConfig, exist_ok=True)
AutoModel.register(SimLAPConfig, SimLAPModel, exist_ok=True)
AutoModelForImageClassification.register(SimLAPConfig, SimLAPForImageClassification, exist_ok=True)
AutoModelForImageClassification.register(SimLAPFuseConfig, SimLAPFuseForImageClassification, exist_ok=True)

__all__ = [
    "SimLAPConfig",
    "SimLAPFuseConfig",
    "SimLAPModel",
    "SimLAPModelOutput",
    "SimLAPForImageClassification",
    "SimLAPFuseForImageClassification",
    "simlap_loss",
    "sample_pair_labels",
]
