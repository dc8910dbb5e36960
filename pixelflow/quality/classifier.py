"""A small CNN that names the class of a synthetic-shapes image: the demo's quality number.

FID needs thousands of samples and Inception weights; on the 16-class shapes set, whether a sample shows
the class it was asked for is a sharper and cheaper check. `pixelflow-data train-classifier` trains it;
`pixelflow eval --classifier` reports the accuracy of generated samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pixelflow.errors import ConfigError


class ShapeClassifier(nn.Module):
    """Three conv blocks and a linear head over images resized to `resolution`."""

    def __init__(self, num_classes: int, resolution: int = 32, width: int = 32) -> None:
        super().__init__()
        self.num_classes, self.resolution, self.width = num_classes, resolution, width
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) of any size -> logits (N, num_classes)."""
        x = images.float() / 127.5 - 1
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return self.head(self.features(x))


def save_classifier(classifier: ShapeClassifier, path: str | Path) -> None:
    settings = {"num_classes": classifier.num_classes, "resolution": classifier.resolution, "width": classifier.width}
    torch.save({"settings": settings, "state_dict": classifier.state_dict()}, path)


def load_classifier(path: str | Path) -> ShapeClassifier:
    """The classifier saved at `path` (weights only), in eval mode; one clear error when it is not one."""
    if not Path(path).is_file():
        raise ConfigError(f"--classifier {path}: no such file (pixelflow-data train-classifier writes one)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        classifier = ShapeClassifier(**saved["settings"])
        classifier.load_state_dict(saved["state_dict"])
    except Exception as exc:  # any unpickling or shape error means the same thing to the user
        raise ConfigError(f"--classifier {path}: not a classifier written by train-classifier ({exc})") from None
    return classifier.eval()


@torch.no_grad()
def class_accuracy(classifier: ShapeClassifier, images: np.ndarray, labels: np.ndarray, batch: int = 256) -> float:
    """Share of `images` (N, H, W, 3 uint8, as in the ADM npz) the classifier names as `labels`."""
    if labels.max(initial=0) >= classifier.num_classes:
        raise ConfigError(f"labels up to {labels.max()} but the classifier knows {classifier.num_classes} classes")
    correct = 0
    for start in range(0, len(images), batch):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch])).permute(0, 3, 1, 2)
        predicted = classifier(chunk).argmax(-1).numpy()
        correct += int((predicted == labels[start : start + batch]).sum())
    return correct / max(1, len(images))
