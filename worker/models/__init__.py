"""The ResNet family, written as flat chains of ZeRO-3 units (stem, residual blocks, head)."""

from worker.models.registry import MODEL_NAMES, build_model, units
from worker.models.resnet import ResNet

__all__ = ["MODEL_NAMES", "ResNet", "build_model", "units"]
