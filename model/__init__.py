"""The network, its spectrogram front end, audio, the weights format and the runtime (training: model.training)."""

from model.features import FeatureConfig, LogMelSpectrogram
from model.resnet import (
    ARCHITECTURES,
    BasicBlock,
    Bottleneck,
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet101,
    ResNet152,
    build,
)
from model.runtime import EmbeddingModel, Inference, load
from model.weights import Manifest, WeightsError, save

__all__ = [
    "ARCHITECTURES",
    "BasicBlock",
    "Bottleneck",
    "EmbeddingModel",
    "FeatureConfig",
    "Inference",
    "LogMelSpectrogram",
    "Manifest",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "ResNet152",
    "WeightsError",
    "build",
    "load",
    "save",
]
