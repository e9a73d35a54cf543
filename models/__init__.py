"""Models for few-shot learning: plain ``nn.Module``s that the algorithms run functionally on parameter dicts."""

from metatrain.models.base import FewShotModel, ModelConfigError
from metatrain.models.conv4 import Conv4
from metatrain.models.layers import EpisodeBatchNorm2d, MaxPool2x2, max_pool2x2
from metatrain.models.learned_optimizer import (
    CoordinateLSTM,
    MetaLSTMCell,
    PackedOptimizerStep,
    ParamLayout,
    preprocess,
)
from metatrain.models.mann import MANN, SequenceLSTM, SequenceModel
from metatrain.models.memory_module import KeyEncoder, Memory
from metatrain.models.mlp import SinusoidMLP

__all__ = ["MANN", "Conv4", "CoordinateLSTM", "EpisodeBatchNorm2d", "FewShotModel", "KeyEncoder", "MaxPool2x2",
           "Memory", "MetaLSTMCell", "ModelConfigError", "PackedOptimizerStep", "ParamLayout", "SequenceLSTM",
           "SequenceModel", "SinusoidMLP", "max_pool2x2", "preprocess"]
