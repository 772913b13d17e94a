"""SimLAP-HF: learning visual representations from arbitrary class pairs (SimLAP, arXiv:2410.18200) with
transformers models, timm backbones and accelerate training.

Importing the package registers the models with the transformers auto classes.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

from .configuration_simlap import SimLAPConfig, SimLAPFuseConfig
from .image_processing_simlap import SimLAPImageProcessor
from .losses import sample_pair_labels, simlap_loss
from .modeling_simlap import (
    SimLAPForImageClassification,
    SimLAPFuseForImageClassification,
    SimLAPFuseModel,
    SimLAPModel,
    SimLAPModelOutput,
)

__version__ = "0.1.0"

AutoConfig.register(SimLAPConfig.model_type, SimLAPConfig, exist_ok=True)
AutoConfig.register(SimLAPFuseConfig.model_type, SimLAPFuseConfig, exist_ok=True)
AutoModel.register(SimLAPConfig, SimLAPModel, exist_ok=True)
AutoModelForImageClassification.register(SimLAPConfig, SimLAPForImageClassification, exist_ok=True)
AutoModelForImageClassification.register(SimLAPFuseConfig, SimLAPFuseForImageClassification, exist_ok=True)
# Feature extraction of a Fuse checkpoint (pipeline("image-feature-extraction")): its backbone.
AutoModel.register(SimLAPFuseConfig, SimLAPFuseModel, exist_ok=True)
for _config_class in (SimLAPConfig, SimLAPFuseConfig):
    try:  # transformers >= 5
        AutoImageProcessor.register(
            _config_class,
            image_processor_classes=dict.fromkeys(("pil", "torchvision"), SimLAPImageProcessor),
            exist_ok=True,
        )
    except TypeError:  # transformers 4
        AutoImageProcessor.register(_config_class, slow_image_processor_class=SimLAPImageProcessor, exist_ok=True)

__all__ = [
    "SimLAPConfig",
    "SimLAPFuseConfig",
    "SimLAPModel",
    "SimLAPModelOutput",
    "SimLAPForImageClassification",
    "SimLAPFuseForImageClassification",
    "SimLAPFuseModel",
    "SimLAPImageProcessor",
    "simlap_loss",
    "sample_pair_labels",
]
