"""Small expert/router partitions written through the real manifest schemas (for training tests)."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load, save

from common.manifests import ExpertManifest, RouterManifest, ShardRef
from common.storage import RunStore


def load_numpy(data: bytes) -> dict[str, np.ndarray]:
    """A safetensors payload as numpy arrays; bf16 (the default latent dtype, which numpy lacks) as float32."""
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in load(data).items()}


def _shard(store: RunStore, key: str, tensors: dict[str, torch.Tensor]) -> ShardRef:
    ref = store.put_payload(key, save({k: v.contiguous() for k, v in tensors.items()}))
    return ShardRef(**ref.model_dump(), rows=next(iter(tensors.values())).shape[0])


def write_expert_partition(store: RunStore, k: int, latents: torch.Tensor, labels: torch.Tensor,
                           num_experts: int, num_classes: int | None, shard_rows: int = 64) -> ExpertManifest:
    shards = []
    for i, start in enumerate(range(0, latents.shape[0], shard_rows)):
        sl = slice(start, start + shard_rows)
        shards.append(_shard(store, f"experts/{k:02d}/data/{i:05d}.safetensors",
                             {"latents": latents[sl].float(), "labels": labels[sl].long(),
                              "index": torch.arange(latents.shape[0])[sl]}))
    manifest = ExpertManifest(expert=k, num_experts=num_experts, rows=latents.shape[0],
                              latent_shape=list(latents.shape[1:]), num_classes=num_classes, shards=shards)
    store.commit(f"experts/{k:02d}/manifest.json", manifest)
    return manifest


def write_router_partition(store: RunStore, latents: torch.Tensor, labels: torch.Tensor, cluster: torch.Tensor,
                           num_experts: int, shard_rows: int = 4096) -> RouterManifest:
    shards, assignments = [], []
    for i, start in enumerate(range(0, latents.shape[0], shard_rows)):
        sl = slice(start, start + shard_rows)
        shards.append(_shard(store, f"data/shards/{i:05d}.safetensors",
                             {"latents": latents[sl].float(), "labels": labels[sl].long(),
                              "index": torch.arange(latents.shape[0])[sl]}))
        assignments.append(_shard(store, f"clusters/assignments/{i:05d}.safetensors", {"cluster": cluster[sl].long()}))
    manifest = RouterManifest(num_experts=num_experts, rows=latents.shape[0], latent_shape=list(latents.shape[1:]),
                              shards=shards, assignments=assignments)
    store.commit("router/manifest.json", manifest)
    return manifest


def digits_like(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n 8x8x1 images in [-1, 1] with 10 classes: scikit-learn's real digits (bundled, offline)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    idx = np.random.default_rng(seed).permutation(len(d.target))[:n]
    x = torch.from_numpy(d.images[idx] / 8.0 - 1.0).float().unsqueeze(1)   # [n, 1, 8, 8]
    return x, torch.from_numpy(d.target[idx]).long()


def gmm(n: int, means: np.ndarray, std: float, weights: np.ndarray, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n draws of an isotropic Gaussian mixture in D = 4 dims, shaped [n, 1, 2, 2]; returns (x, component)."""
    rng = np.random.default_rng(seed)
    comp = rng.choice(len(weights), size=n, p=weights)
    x = means[comp] + std * rng.standard_normal((n, means.shape[1]))
    return torch.from_numpy(x).float().view(n, 1, 2, 2), torch.from_numpy(comp).long()


def partition_indices(store: RunStore, manifest: ExpertManifest) -> set[int]:
    """The listing positions (`index`) of every row a partition's shards hold."""
    out: set[int] = set()
    for ref in manifest.shards:
        out.update(load(store.get_payload(ref))["index"].tolist())
    return out
