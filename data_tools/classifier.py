"""Train the synthetic-shapes classifier that `pixelflow eval --classifier` uses to score demo samples.

Training images come straight from the synthetic generator (fresh seeds, not the demo's shards) through
the trainer's own decode (JPEG, 1.125 x resize, random crop and flip), so the classifier sees what a
model trained on the demo data should draw, plus pixel noise of random strength, so that a sample's grain
does not decide its class. A held-out set from another seed measures it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data_tools.synthetic import NUM_CLASSES, encoded_sample
from pixelflow.data.decode import decode_crop
from pixelflow.quality.classifier import ShapeClassifier, class_accuracy, save_classifier


@dataclass
class ClassifierReport:
    path: str
    steps: int
    train_images: int
    held_out_accuracy: float


def render(count: int, resolution: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images N x H x W x 3 uint8, labels) drawn and decoded as the demo's training data is."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for index in range(count):
        label = index % NUM_CLASSES
        images.append(
            decode_crop(encoded_sample(label, 80, rng), resolution, rng, expand_ratio=1.125).transpose(1, 2, 0)
        )
        labels.append(label)
    return np.stack(images), np.asarray(labels)


NOISE = 25.0  # grey levels: pixel noise of random strength, so unfinished edges and grain do not hide the shape


def train_classifier(
    out: str, resolution: int = 32, steps: int = 1500, batch: int = 64, count: int = 4096, seed: int = 0
) -> ClassifierReport:
    torch.manual_seed(seed)
    images, labels = render(count, resolution, seed + 1)
    held_images, held_labels = render(1024, resolution, seed + 2)
    classifier = ShapeClassifier(NUM_CLASSES, resolution)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=1e-4)
    order = np.random.default_rng(seed).permutation
    pixels, targets = torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels)
    for _ in range(steps):
        chosen = torch.from_numpy(order(count)[:batch])
        clean = pixels[chosen].float()  # fewer than batch when count is smaller
        noisy = clean + torch.randn(len(clean), 1, 1, 1) * NOISE * torch.randn_like(clean)
        loss = F.cross_entropy(classifier(noisy.clamp(0, 255)), targets[chosen])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    classifier.eval()
    save_classifier(classifier, out)
    return ClassifierReport(out, steps, count, class_accuracy(classifier, held_images, held_labels))
