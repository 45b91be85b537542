"""The benchmark networks, built from a ModelConfig and the shape of the data's images.

Every model takes images shaped (N, C, H, W), as ``launch.data`` produces them, and returns
class logits; the MLPs flatten their input. Layers carry readable names (``fc1.weight``,
``stage2.0.conv1.weight``) because gradient memory and sparsity masks are keyed by them.
"""
from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_comm.schema import ConfigError, require

# The large setting: wide_mlp with these on MNIST (784 inputs, 10 classes) has 28,980,010
# parameters, more than ResNet-50's 25.6M, the model DGC reports its largest savings on.
LARGE_WIDE_MLP_WIDTH = 5000
LARGE_WIDE_MLP_DEPTH = 2


@dataclasses.dataclass
class ModelConfig:
    """Which network to train; ``width`` and ``depth`` shape ``wide_mlp`` only.

    The defaults give a 20.0M-parameter wide_mlp on MNIST; width 5000 (LARGE_WIDE_MLP_WIDTH)
    gives 29.0M.
    """

    name: Literal["lenet300", "lenet5", "resnet20", "wide_mlp", "vit"] = "lenet300"
    width: int = 4096
    depth: int = 2
    heads: int = 4  # vit: attention heads (width must divide by it)
    patch: int = 4  # vit: side of the square patches (the image side must divide by it)
    mlp_ratio: float = 2.0  # vit: hidden width of each block's MLP over ``width``

    def check(self) -> None:
        require(self.width >= 1, "width", f"must be >= 1, got {self.width}")
        require(self.depth >= 1, "depth", f"must be >= 1, got {self.depth}")
        require(self.heads >= 1, "heads", f"must be >= 1, got {self.heads}")
        require(self.patch >= 1, "patch", f"must be >= 1, got {self.patch}")
        require(self.mlp_ratio > 0, "mlp_ratio", f"must be > 0, got {self.mlp_ratio}")
        if self.name == "vit":
            require(int(self.width * self.mlp_ratio) >= 1, "mlp_ratio",
                    f"must leave each block's MLP a unit (model.width x mlp_ratio >= 1), "
                    f"got {self.mlp_ratio}")
            require(self.width % self.heads == 0, "heads",
                    f"must divide model.width = {self.width}, got {self.heads}")


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements, trainable or not (BatchNorm's affine ones included)."""
    return sum(p.numel() for p in model.parameters())


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The network ``cfg`` names, for images of ``input_shape`` = (C, H, W) and ``num_classes``.

    Raises ValueError when the network cannot take that input (ConfigError, naming the
    key, where the config could change it).
    """
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"model {cfg.name}: input_shape must be (channels, height, width), "
                         f"got {input_shape}")
    if num_classes < 1:
        raise ValueError(f"model {cfg.name}: num_classes must be >= 1, got {num_classes}")
    if cfg.name == "lenet300":
        return MLP(math.prod(input_shape), [300, 100], num_classes)
    if cfg.name == "wide_mlp":
        return MLP(math.prod(input_shape), [cfg.width] * cfg.depth, num_classes)
    if cfg.name == "vit":
        channels, height, width = input_shape
        if height % cfg.patch or width % cfg.patch:
            raise ConfigError("model.patch", f"must divide the image size {height}x{width}, "
                                         f"got {cfg.patch}")
        return ViT(input_shape, num_classes, cfg.width, cfg.depth, cfg.heads, cfg.patch,
                   cfg.mlp_ratio)
    if cfg.name == "lenet5":
        if input_shape != (1, 28, 28):
            raise ConfigError("model.name", f"lenet5 takes 28x28 single-channel images "
                                            f"(1, 28, 28), the data are {input_shape}")
        return LeNet5(num_classes)
    return ResNet20(input_shape[0], num_classes)


class MLP(nn.Sequential):
    """Flatten, then fully connected layers with ReLU between them.

    ``MLP(784, [300, 100], 10)`` is LeNet-300-100 (LeCun et al. 1998), 266,610 parameters.
    """

    def __init__(self, in_features: int, hidden: list[int], num_classes: int):
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        for i, width in enumerate(hidden, start=1):
            layers[f"fc{i}"] = nn.Linear(in_features, width)
            layers[f"relu{i}"] = nn.ReLU()
            in_features = width
        layers[f"fc{len(hidden) + 1}"] = nn.Linear(in_features, num_classes)
        super().__init__(layers)


class LeNet5(nn.Sequential):
    """LeNet-5 as in Caffe's MNIST example, the model DNS and Deep Compression prune.

    conv 20@5x5, max-pool 2, conv 50@5x5, max-pool 2, fc 500, ReLU, fc 10: 431,080
    parameters. As in Caffe's ``lenet_train_test.prototxt``, the only nonlinearity is the
    ReLU after fc1; the convolutions feed their pooling layers directly.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__(OrderedDict(
            conv1=nn.Conv2d(1, 20, kernel_size=5),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(20, 50, kernel_size=5),
            pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(50 * 4 * 4, 500),
            relu1=nn.ReLU(),
            fc2=nn.Linear(500, num_classes),
        ))


class ResNet20(nn.Module):
    """ResNet-20 for CIFAR-10 (He et al. 2016, section 4.2): 269,722 parameters.

    A 3x3 conv of 16 channels, then three stages of three basic blocks with 16, 32 and 64
    channels (the second and third halve the resolution), global average pooling and a
    linear classifier. Shortcuts are the paper's option A for CIFAR: identity, and where the
    shape changes, strided subsampling with zero-padded extra channels, so they add no
    parameters. Convolutions use He initialisation, as in the paper.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, blocks_per_stage: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.stage1 = _stage(16, 16, blocks_per_stage, stride=1)
        self.stage2 = _stage(16, 32, blocks_per_stage, stride=2)
        self.stage3 = _stage(32, 64, blocks_per_stage, stride=2)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_channels, out_channels, stride),
                         *(BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BatchNorm layers and a shortcut, with ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride, self.extra_channels = stride, out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._shortcut(x))

    def _shortcut(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.extra_channels > 0:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x


class ViT(nn.Module):
    """A small vision transformer (Dosovitskiy et al., ICLR 2021): non-overlapping patches
    embedded by a strided convolution, a learned class token and position embeddings, then
    ``depth`` pre-norm blocks (LayerNorm, multi-head self-attention, residual; LayerNorm,
    GELU MLP, residual), a final LayerNorm and a linear head on the class token.

    On MNIST with patch 4 (49 patches), width 64, depth 4, 4 heads it has about 140k
    parameters, and its LayerNorm scales, biases and embeddings are the 1-D tensors that DGC
    sends dense.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int,
                 depth: int, heads: int, patch: int, mlp_ratio: float = 2.0):
        super().__init__()
        channels, height, side = input_shape
        tokens = (height // patch) * (side // patch)
        self.patch_embed = nn.Conv2d(channels, width, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        self.blocks = nn.Sequential(*(Block(width, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(width, hidden), act=nn.GELU(),
                                             fc2=nn.Linear(hidden, width)))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))
