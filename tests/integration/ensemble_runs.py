"""Build small run stores for the ensemble tests through the real schemas and the real training loop.

`gmm_run` writes what prepare + cluster commit (run.json, data/dataset.json with extra.gmm, shards,
clusters/clusters.json, experts/<k>/manifest.json, router/manifest.json) for a known Gaussian
mixture whose clusters are its components; `random_exports` commits randomly initialised expert and
router exports through `save_export`; `train_all` trains them with `worker.train.train`.
"""

from __future__ import annotations

from datetime import datetime, timezone

import torch
from safetensors.torch import save as st_save

from common.config import RunConfig
from common.manifests import ClusterManifest, DatasetManifest, ExpertManifest, RouterManifest, RunRecord, ShardRef
from common.presets import digits, gmm
from common.storage import RunStore
from worker.checkpoint import save_export
from worker.models.dit import build_dit
from worker.models.router import build_router


def _shard(store: RunStore, key: str, tensors: dict[str, torch.Tensor]) -> ShardRef:
    data = st_save({k: v.contiguous() for k, v in tensors.items()})
    ref = store.put_payload(key, data)
    return ShardRef(path=ref.path, sha256=ref.sha256, size=ref.size, rows=next(iter(tensors.values())).shape[0])


def write_run(store: RunStore, config: RunConfig, latents: torch.Tensor, labels: torch.Tensor, cluster: torch.Tensor,
              num_classes: int | None, extra: dict) -> None:
    K = config.clustering.num_experts
    now = datetime.now(timezone.utc).isoformat()
    store.commit("run.json", RunRecord(name=config.name, config=config.model_dump(mode="json"),
                                       config_fingerprint=config.fingerprint(), code_version="test", created_at=now))
    n = latents.shape[0]
    shard = _shard(store, "data/shards/000000.safetensors",
                   {"latents": latents, "labels": labels, "features": latents.flatten(1).clone(), "index": torch.arange(n)})
    store.commit("data/dataset.json", DatasetManifest(
        source=config.data.source, discovered=n, used=n, quarantined=0, latent_shape=list(latents.shape[1:]),
        feature_dim=latents[0].numel(), num_classes=num_classes, shards=[shard], extra=extra))
    assign = _shard(store, "clusters/assign-000000.safetensors", {"cluster": cluster})
    centroids = store.put_payload("clusters/centroids.safetensors", st_save(
        {"coarse": torch.stack([latents[cluster == k].flatten(1).mean(0) for k in range(K)])}))
    sizes = torch.bincount(cluster, minlength=K).tolist()
    store.commit("clusters/clusters.json", ClusterManifest(method="test", metric="euclidean", num_experts=K, num_fine=K,
                                                          sizes=sizes, centroids=centroids, assignments=[assign]))
    for k in range(K):
        rows = cluster == k
        part = _shard(store, f"experts/{k:02d}/data/000000.safetensors",
                      {"latents": latents[rows], "labels": labels[rows], "index": torch.arange(n)[rows]})
        counts = {int(c): int(v) for c, v in zip(*labels[rows].unique(return_counts=True))}
        store.commit(f"experts/{k:02d}/manifest.json", ExpertManifest(
            expert=k, num_experts=K, rows=int(rows.sum()), latent_shape=list(latents.shape[1:]),
            num_classes=num_classes, shards=[part], class_counts=counts if num_classes else {}))
    store.commit("router/manifest.json", RouterManifest(num_experts=K, rows=n, latent_shape=list(latents.shape[1:]),
                                                        num_classes=num_classes, shards=[shard], assignments=[assign]))


def gmm_config(run_uri: str, K: int = 4, nimg: int = 16_000, router_nimg: int = 16_000) -> RunConfig:
    c = gmm().model_dump(mode="json")
    c["run_uri"] = run_uri
    c["clustering"]["num_experts"] = K
    c["training"].update(duration_nimg=nimg, global_batch=64 * K, log_every_nimg=4096)
    c["router"]["training"].update(duration_nimg=router_nimg, log_every_nimg=4096)
    c["eval"].update(num_samples=1024)
    c["sampling"].update(steps=24)
    return RunConfig.model_validate(c)


def gmm_run(store: RunStore, config: RunConfig, n: int = 4096, seed: int = 0) -> dict:
    """A 4-component mixture in the 1x2x2 latent space; clusters are the components."""
    K = config.clustering.num_experts
    g = torch.Generator().manual_seed(seed)
    std = 0.3
    means = config.data.gmm_separation * std * torch.eye(4)[:K] - config.data.gmm_separation * std / K
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1][:K])
    weights = weights / weights.sum()
    comp = torch.multinomial(weights, n, replacement=True, generator=g)
    x = means[comp] + std * torch.randn(n, 4, generator=g)
    extra = {"gmm": {"weights": weights.tolist(), "means": means.tolist(), "stds": [std] * K}}
    write_run(store, config, x.view(n, 1, 2, 2), comp, comp, None, extra)
    return extra["gmm"]


def digits_config(run_uri: str, K: int = 2) -> RunConfig:
    c = digits().model_dump(mode="json")
    c["run_uri"] = run_uri
    c["clustering"]["num_experts"] = K
    c["training"]["global_batch"] = 64 * K
    c["eval"].update(num_samples=40, strategies=["top1", "full", "oracle"])
    c["sampling"].update(steps=4)
    return RunConfig.model_validate(c)


def digits_run(store: RunStore, config: RunConfig) -> None:
    """The bundled digits, clustered by a trivial rule (class parity), no training."""
    from worker.evalmath import digits_data

    x, y = digits_data()
    write_run(store, config, x, y, y % config.clustering.num_experts, 10, {})


def random_exports(store: RunStore, config: RunConfig, skip: tuple[int, ...] = ()) -> None:
    """Randomly initialised (but non-zero output) experts + router, committed like trained ones."""
    ds = store.read_record("data/dataset.json", DatasetManifest)
    torch.manual_seed(0)
    for k in range(config.clustering.num_experts):
        if k in skip:
            continue
        model = build_dit(config.model, ds.latent_shape, ds.num_classes, None)
        torch.nn.init.normal_(model.final.linear.weight, std=0.1)  # zero-init output would hide routing bugs
        save_export(store, f"experts/{k:02d}", f"expert-{k:02d}", "expert", 0, model)
    router = build_router(config.router.model, ds.latent_shape, config.clustering.num_experts, ds.num_classes, None)
    torch.nn.init.normal_(router.head.weight, std=0.5)
    save_export(store, "router", "router", "router", 0, router)


def train_all(store: RunStore, config: RunConfig) -> None:
    """The real training loop on every expert and the router, in this process (no Ray needed)."""
    from common.config import IslandConfig
    from worker.train import expert_job, job_store, router_job, train

    island = IslandConfig(name="local")
    jobs = [expert_job(config, k, island) for k in range(config.clustering.num_experts)] + [router_job(config, island)]
    for job in jobs:
        train(job, job_store(store, job))


def gathered_digits(url: str, K: int = 2) -> tuple[RunConfig, RunStore]:
    """A digits run store with random exports, gathered: what `Ensemble.load` and `ddm sample` read."""
    from worker.gather import gather

    config = digits_config(url, K=K)
    store = RunStore(url)
    digits_run(store, config)
    random_exports(store, config)
    gather(config, store)
    return config, store
