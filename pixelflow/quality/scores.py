"""FID, sFID, Inception Score, precision and recall of generated images against a reference batch.

Definitions as the ADM evaluation suite (Dhariwal & Nichol) reports them, on pytorch-fid's port of the
Inception graph: FID on the 2048 pool features, sFID on 2023 spatial features, IS over the 1008-way
softmax in 10 splits, precision and recall as Kynkaenniemi et al. (k = 3 nearest-neighbour balls in the
pool-feature space). Values are comparable with pytorch-fid, not bit-equal to the TF suite (its resize
differs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pixelflow.errors import ConfigError
from pixelflow.quality.inception import FIDInception, load_inception


@dataclass
class Features:
    pool: np.ndarray  # (N, 2048) float64
    spatial: np.ndarray  # (N, 2023)
    logits: np.ndarray  # (N, 1008)


@dataclass
class Statistics:
    mu: np.ndarray
    sigma: np.ndarray

    @staticmethod
    def of(features: np.ndarray) -> Statistics:
        return Statistics(features.mean(0), np.cov(features, rowvar=False))


@torch.no_grad()
def inception_features(model: FIDInception, images: np.ndarray, batch: int = 50) -> Features:
    """Features of `images` (N, H, W, 3 uint8, as the ADM npz holds them)."""
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(images), batch):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch])).permute(0, 3, 1, 2)
        parts.append([t.double().cpu().numpy() for t in model(chunk.to(device))])
    return Features(*(np.concatenate(column) for column in zip(*parts)))


def symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues of rounding
    clipped to 0)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2).

    tr (S_a S_b)^1/2 is taken as tr (S_a^1/2 S_b S_a^1/2)^1/2 (the same eigenvalues, but symmetric), which
    stays exact when the covariances are singular (fewer samples than dimensions)."""
    root = symmetric_sqrt(a.sigma)
    inner = np.linalg.eigvalsh(root @ b.sigma @ root)
    trace_root = np.sqrt(np.clip(inner, 0, None)).sum()
    difference = a.mu - b.mu
    return float(difference @ difference + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_root)


def inception_score(logits: np.ndarray, splits: int = 10) -> float:
    """exp E[KL(p(y|x) || p(y))], averaged over `splits` parts (fewer when there are fewer images)."""
    logits = logits - logits.max(1, keepdims=True)
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    values = []
    for part in np.array_split(probabilities, min(splits, len(probabilities))):
        marginal = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))).sum(1)
        values.append(np.exp(kl.mean()))
    return float(np.mean(values))


def kth_neighbour_radii(features: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point."""
    radii = []
    for start in range(0, len(features), chunk):
        distances = torch.cdist(features[start : start + chunk], features)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # k + 1: the point itself is at distance 0
    return torch.cat(radii)


def coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, chunk: int = 1024) -> float:
    """Share of `queries` inside at least one ball (manifold point, its radius)."""
    inside = []
    for start in range(0, len(queries), chunk):
        distances = torch.cdist(queries[start : start + chunk], manifold)
        inside.append((distances <= radii[None]).any(1))
    return float(torch.cat(inside).float().mean())


def precision_recall(reference: np.ndarray, generated: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Precision: share of generated samples on the reference manifold; recall: share of reference samples
    on the generated one (each manifold the union of k-th-neighbour balls)."""
    real, fake = torch.from_numpy(reference), torch.from_numpy(generated)
    k = min(k, len(real) - 1, len(fake) - 1)
    if k < 1:
        raise ConfigError("precision/recall: need at least 2 generated and 2 reference images")
    precision = coverage(real, kth_neighbour_radii(real, k), fake)
    recall = coverage(fake, kth_neighbour_radii(fake, k), real)
    return precision, recall


@dataclass
class Reference:
    """A reference batch: its images' features, or only the statistics an ADM reference npz carries."""

    pool: Statistics
    spatial: Statistics | None
    pool_features: np.ndarray | None


STATISTICS = {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)}


def read_reference(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a reference npz, checked before any sampling: `arr_0` (N x H x W x 3 uint8 images, N >= 2),
    or finite statistics `mu` (2048), `sigma` (2048 x 2048) and optionally `mu_s` (2023), `sigma_s`
    (2023 x 2023) for sFID, as the ADM reference batches carry."""
    if not Path(path).is_file():
        raise ConfigError(f"--reference {path}: no such file")
    try:
        with np.load(path) as saved:
            arrays = {key: saved[key] for key in saved.files if key == "arr_0" or key in STATISTICS}
    except Exception as exc:
        raise ConfigError(f"--reference {path}: not an .npz ({exc})") from None
    if "arr_0" in arrays:
        images = arrays["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) < 2:
            raise ConfigError(f"--reference {path}: arr_0 is {images.dtype} {images.shape}, not N x H x W x 3 uint8")
        return {"arr_0": images}
    if "mu" not in arrays or "sigma" not in arrays:
        raise ConfigError(f"--reference {path}: holds neither arr_0 (images) nor mu and sigma (statistics)")
    if ("mu_s" in arrays) != ("sigma_s" in arrays):
        raise ConfigError(f"--reference {path}: has one of mu_s and sigma_s without the other")
    for key, array in arrays.items():
        if array.shape != STATISTICS[key]:
            raise ConfigError(f"--reference {path}: {key} is {array.shape}, not {STATISTICS[key]}")
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise ConfigError(f"--reference {path}: {key} holds values that are not finite numbers")
    return arrays


def load_reference(arrays: dict[str, np.ndarray], model: FIDInception) -> Reference:
    """A checked reference (read_reference): its images' features, or its statistics."""
    if "arr_0" in arrays:
        features = inception_features(model, arrays["arr_0"])
        return Reference(Statistics.of(features.pool), Statistics.of(features.spatial), features.pool)
    spatial = Statistics(arrays["mu_s"], arrays["sigma_s"]) if "mu_s" in arrays else None
    return Reference(Statistics(arrays["mu"], arrays["sigma"]), spatial, None)


def scores_against(images: np.ndarray, reference: dict[str, np.ndarray], model: FIDInception) -> dict:
    """fid, sfid, inception_score, precision, recall (the last two only against a reference of images;
    sfid only when the reference has spatial statistics)."""
    if len(images) < 2:
        raise ConfigError(f"FID needs at least 2 generated images, not {len(images)}")
    batch = load_reference(reference, model)
    features = inception_features(model, images)
    scores = {
        "fid": frechet_distance(Statistics.of(features.pool), batch.pool),
        "inception_score": inception_score(features.logits),
    }
    if batch.spatial is not None:
        scores["sfid"] = frechet_distance(Statistics.of(features.spatial), batch.spatial)
    if batch.pool_features is not None:
        scores["precision"], scores["recall"] = precision_recall(batch.pool_features, features.pool)
    return scores


def inception_scores(
    images: np.ndarray, reference_path: str | Path, weights: str | Path, device: torch.device | str = "cpu"
) -> dict:
    """scores_against a reference file with the Inception weights at `weights`."""
    return scores_against(images, read_reference(reference_path), load_inception(weights, device))
