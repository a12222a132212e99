"""The encoders the benchmarks time: random weights, nothing downloaded.

``build_encoder(name, dim)`` returns the model (train mode; callers choose) and its input shape:

* ``mlp``: 784-256-256-``dim`` on flattened 1x28x28 inputs;
* ``cnn``: two 3x3 convolutions (16 and 32 channels, ReLU, max-pool) and a Linear head on
  1x28x28 inputs;
* ``resnet18`` / ``resnet50``: torchvision, ``fc`` of width ``dim``, 3x32x32 inputs;
* ``vit_tiny``: a ViT-Tiny-sized torchvision ``VisionTransformer`` (patch 4, 12 layers, 3 heads,
  width 192, MLP 768) on 3x32x32 inputs;
* ``vit_small``: a small 2-layer ViT (patch 4, 4 heads, width 64, MLP 128).

torchvision zero-initialises a ViT head; it is re-initialised here so embeddings differ.
"""

from __future__ import annotations

import torch
from torch import nn

ENCODERS = ("mlp", "cnn", "resnet18", "resnet50", "vit_tiny", "vit_small")
VIT_SIZES = {  # layers, heads, width, MLP width
    "vit_tiny": (12, 3, 192, 768),
    "vit_small": (2, 4, 64, 128),
}


def build_encoder(name: str, dim: int = 128) -> tuple[nn.Module, tuple[int, ...]]:
    """Model ``name`` with a ``dim``-wide output, seeded with 0, and its input shape."""
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, dim),
        )
        return model, (1, 28, 28)
    if name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, dim),
        )
        return model, (1, 28, 28)
    if name in ("resnet18", "resnet50"):
        import torchvision

        return getattr(torchvision.models, name)(num_classes=dim), (3, 32, 32)
    if name in VIT_SIZES:
        from torchvision.models import VisionTransformer

        layers, heads, width, mlp = VIT_SIZES[name]
        model = VisionTransformer(
            image_size=32,
            patch_size=4,
            num_layers=layers,
            num_heads=heads,
            hidden_dim=width,
            mlp_dim=mlp,
            num_classes=dim,
        )
        model.heads.head.reset_parameters()
        return model, (3, 32, 32)
    raise ValueError(f"unknown encoder {name!r}; choose from {ENCODERS}")


def random_labelled_images(
    shape: tuple[int, ...], n_images: int, n_classes: int = 10, seed: int = 1
) -> tuple[torch.Tensor, torch.utils.data.TensorDataset, torch.Generator]:
    """``n_images`` standard-normal inputs of ``shape`` with balanced, shuffled labels of
    ``n_classes`` classes: the inputs, the ``(x, y)`` dataset the all-layer fit benchmarks
    time, and the generator (for further draws, e.g. the stock floor's regression targets)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_images, *shape, generator=gen)
    y = (torch.arange(n_images) % n_classes)[torch.randperm(n_images, generator=gen)]
    return x, torch.utils.data.TensorDataset(x, y), gen
