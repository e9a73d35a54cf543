"""Models for few-shot learning: plain ``nn.Module``s that the algorithms run functionally on parameter dicts."""

from models.base import FewShotModel, ModelConfigError
from models.conv4 import Conv4
from models.layers import EpisodeBatchNorm2d, MaxPool2x2, max_pool2x2
from models.mlp import SinusoidMLP

__all__ = ["Conv4", "EpisodeBatchNorm2d", "FewShotModel", "MaxPool2x2", "ModelConfigError", "SinusoidMLP",
           "max_pool2x2"]
