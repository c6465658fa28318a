"""Gather stage: collect every expert's export, the router's export and the centroids into
`ensemble.json`, verifying each payload's sha256 first and committing the manifest last."""

from __future__ import annotations

from datetime import datetime, timezone

from common.config import RunConfig
from common.errors import DDMError
from common.keys import ROUTER, expert_prefix, export_key
from common.manifests import (
    ClusterManifest,
    DatasetManifest,
    EnsembleManifest,
    EnsembleMember,
    ExpertManifest,
    ExportRecord,
    FileRef,
    StageResult,
)
from common.storage import RunStore


class GatherError(DDMError, RuntimeError):
    """An export is missing or corrupt; the message names the key."""


def _member(store: RunStore, prefix: str, expert: int, root: str = "") -> tuple[EnsembleMember, list[FileRef]] | None:
    """The committed export under `root + prefix`; its payload paths (relative to `root`) become the run's."""
    record = store.read_record(export_key(root + prefix), ExportRecord)
    if record is None:
        return None
    weights, config = (ref.model_copy(update={"path": root + ref.path}) for ref in (record.weights, record.model_config_file))
    for ref in (weights, config):
        store.get_payload(ref)  # raises IntegrityError naming the file if it was altered or truncated
    member = EnsembleMember(expert=expert, weights=weights, model_config_file=config, nimg=record.nimg)
    return member, [weights, config]


def _bucket_factor(dataset: DatasetManifest) -> dict[str, int]:
    """With aspect-ratio buckets the run's latent shape is a bucket's, not the image_size square's, so the
    pixels per latent cell are recorded from the bucket summary ({} without buckets: read off the square)."""
    buckets = dataset.extra.get("buckets")
    if not buckets:
        return {}
    return {"pixel_factor": buckets[0]["bucket"][0] // buckets[0]["latent_shape"][2]}


def gather(config: RunConfig, store: RunStore, allow_partial: bool = False, missing: list[int] = (),
           root: str = "") -> StageResult:
    """Verify and collect the exports into `ensemble.json` (committed last).

    `root` is the folder of the stage whose exports and data the ensemble uses: "" for the base stage,
    "hires/" after a high-resolution continuation (its data gives the latent shape).
    `missing` names experts known to have failed for good; with `allow_partial` those (and any
    expert without a committed export) are recorded as missing, and the sampler renormalises the
    router over the experts present. Without it a missing expert is an error.
    """
    K = config.clustering.num_experts
    store.delete("ensemble.json")  # the previous ensemble is stale from here on: nobody may load it
    dataset = store.read_record(f"{root}data/dataset.json", DatasetManifest)
    if dataset is None:
        raise GatherError(f"{store.url}/{root}data/dataset.json: not committed (run the prepare stage first)")
    clusters = store.read_record("clusters/clusters.json", ClusterManifest)

    members: list[EnsembleMember] = []
    outputs: list[FileRef] = []
    absent: list[int] = []
    for k in range(K):
        found = None if k in set(missing) else _member(store, expert_prefix(k), k, root)
        if found is None:
            absent.append(k)
            continue
        member, refs = found
        part = store.read_record(f"{root}{expert_prefix(k)}/manifest.json", ExpertManifest)
        if part is not None:  # the oracle strategy's prior p(k) and p(k | class)
            member = member.model_copy(update={"rows": part.rows, "class_counts": dict(part.class_counts)})
        members.append(member)
        outputs += refs
    if absent and not allow_partial:
        raise GatherError(f"experts {absent}: no committed export under {root}experts/<k>/export.json "
                          f"(set islands.allow_partial=true to gather the others)")
    if not members:
        raise GatherError("no expert has a committed export; nothing to gather")

    router = None
    if K > 1:
        found = _member(store, ROUTER, -1, root)
        if found is None:
            raise GatherError(f"{store.url}/{root}router/export.json: not committed (the router has not finished)")
        router, refs = found
        outputs += refs
    if clusters is not None:
        store.get_payload(clusters.centroids)
        outputs.append(clusters.centroids)

    manifest = EnsembleManifest(
        num_experts=K, experts=members, missing=absent, router=router,
        centroids=clusters.centroids if clusters else None, latent_shape=dataset.latent_shape,
        num_classes=dataset.num_classes,
        latents={"encoder": config.latents.encoder, "model": config.latents.model,
                 "subfolder": config.latents.subfolder, "scale": dict(dataset.latent_scale),
                 "source": dataset.source, "channels": config.data.channels, **_bucket_factor(dataset)},
        created_at=datetime.now(timezone.utc).isoformat())
    store.commit("ensemble.json", manifest)  # last: its presence means every listed payload is verified
    return StageResult(counts={"experts": len(members), "missing": len(absent)}, outputs=outputs,
                       details={"missing": absent, "nimg": {m.expert: m.nimg for m in members}})
