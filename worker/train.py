"""One training loop for experts and the router (edm2 style: progress, resume cursor and seed source are
all `nimg`, the number of images seen). Experts minimise the flow-matching loss on their own cluster
(paper eq. 6); the router minimises cross-entropy on cluster labels of noised samples (Algorithm 1).

Every random draw of a step comes from a generator seeded by (seed, nimg) and is made for the whole
effective batch, then sliced per worker and micro-batch, so a run resumed from any committed
checkpoint is bit-identical on CPU, and W workers reproduce one worker up to float summation order.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.config import IslandConfig, ModelConfig, RunConfig, TrainingConfig
from common.keys import ROUTER, expert_prefix, export_key, job_label, job_name, manifest_key
from common.manifests import ExpertManifest, ExportRecord, RouterManifest
from common.storage import RunStore, ScopedStore, open_store
from worker.checkpoint import load_export, resume_latest_good, save_checkpoint, save_export, start_from_export
from worker.data import PartitionStream, mix_seed, open_partition, worker_positions
from worker.devices import autocast, check_training_device, configure_numerics, training_device
from worker.flow import cfg_velocity, drop_condition, flow_matching_loss, sample, sample_t
from worker.metrics import TensorBoardLog, matmul_tflops, report_progress, tensorboard_prefix
from worker.microbatch import agree, choose_micro_batch
from worker.models.dit import build_dit
from worker.models.router import build_router, calibration_metrics, router_loss
from worker.step import StepParts, make_optimizer, train_step, wrap_for_training

__all__ = ["TrainJob", "expert_job", "router_job", "train", "load_export", "job_store", "objective", "step_draws"]
log = logging.getLogger(__name__)


class TrainJob(BaseModel):
    """Everything one training job needs; built on the driver, sent to the island as JSON."""
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    name: str = Field(..., description="e.g. expert-03 or router")
    kind: Literal["expert", "router", "student"]
    prefix: str = Field(..., description="Output prefix in the run store, e.g. experts/03 or router.")
    manifest_key: str
    model: ModelConfig
    training: TrainingConfig
    batch: int = Field(..., ge=1, description="Effective images per optimizer step (all workers, all micro-batches).")
    micro_batch: int = Field(..., ge=1, description="Images per worker per forward pass; accumulation fills the gap.")
    auto_micro_batch: bool = Field(False, description="On CUDA, lower micro_batch to the largest divisor that fits (a probe).")
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    seed: int = 0
    island: str = "local"
    num_experts: int = Field(1, ge=1)
    stage: Literal["train", "hires"] = Field("train", description="The stage the job belongs to (names it in dashboards).")
    init_key: str | None = Field(None, description=(
        "A committed export record under the job's prefix to start from when no checkpoint exists: the base "
        "stage's weights, for the high-resolution stage."))
    duration_tokens: int | None = Field(None, ge=1, description=(
        "training.budget_unit = tokens: train to the first step at which this many tokens were seen (a pure "
        "function of the data order); None = training.duration_nimg images."))

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainJob:
        if self.batch % (self.micro_batch * self.num_workers):
            raise ValueError(f"job {self.name}: batch {self.batch} is not a multiple of micro_batch "
                             f"{self.micro_batch} x {self.num_workers} workers")
        return self


def token_budget(config: RunConfig, training: TrainingConfig, model: ModelConfig, nimg: int) -> int | None:
    """budget_unit = tokens: `nimg` images' tokens at the data.image_size square; None for an image budget."""
    from worker.budget import latent_shape, tokens

    return nimg * tokens(latent_shape(config), model.patch_size) if training.budget_unit == "tokens" else None


def expert_job(config: RunConfig, k: int, island: IslandConfig) -> TrainJob:
    batch = config.expert_batch
    return TrainJob(name=job_name(k), kind="expert", prefix=expert_prefix(k),
                    manifest_key=manifest_key(expert_prefix(k)), model=config.model,
                    training=config.training.model_copy(update={"duration_nimg": config.expert_nimg}),
                    duration_tokens=token_budget(config, config.training, config.model, config.expert_nimg),
                    batch=batch, micro_batch=island.micro_batch(batch), auto_micro_batch=island.per_worker_batch == "auto",
                    num_workers=island.num_workers, use_gpu=island.use_gpu, seed=mix_seed(config.seed, 100 + k),
                    island=island.name, num_experts=config.clustering.num_experts)


def router_job(config: RunConfig, island: IslandConfig) -> TrainJob:
    batch = config.router.training.global_batch
    return TrainJob(name=ROUTER, kind="router", prefix=ROUTER, manifest_key=manifest_key(ROUTER),
                    model=config.router.model,
                    training=config.router.training.model_copy(update={"duration_nimg": config.router_nimg}), batch=batch,
                    duration_tokens=token_budget(config, config.router.training, config.router.model, config.router_nimg),
                    micro_batch=island.micro_batch(batch), auto_micro_batch=island.per_worker_batch == "auto",
                    num_workers=island.num_workers, use_gpu=island.use_gpu, seed=mix_seed(config.seed, 99),
                    island=island.name, num_experts=config.clustering.num_experts)


def job_store(store: RunStore, job: TrainJob) -> ScopedStore:
    """The job's view (docs/design.md §5): write under its prefix, read its manifest and listed shards only."""
    cls = RouterManifest if job.kind == "router" else ExpertManifest
    manifest = store.read_record(job.manifest_key, cls)
    refs = (manifest.shards + list(getattr(manifest, "assignments", []))) if manifest else []
    return store.scoped([job.prefix, tensorboard_prefix(job.name)],
                        read_only=[job.manifest_key] + sorted({r.path for r in refs}))


def _build(job: TrainJob, data: PartitionStream) -> torch.nn.Module:
    if job.kind == "router":
        return build_router(job.model, data.latent_shape, data.num_experts, data.num_classes, data.text_dim)
    return build_dit(job.model, data.latent_shape, data.num_classes, data.text_dim)


def objective(job: TrainJob, model, null_class: int | None, batch: dict, t, eps, drop) -> tuple[torch.Tensor, dict | None]:
    """Per-example loss [n] of one micro-batch (and the router's calibration stats)."""
    cond = {"class": batch["labels"], "text": batch.get("text")}.get(job.model.conditioning)
    cond = drop_condition(cond, drop, null_class)
    if job.kind == "router":
        return router_loss(model, batch["x0"], eps, t, batch["cluster"], cond)
    return flow_matching_loss(model, batch["x0"], eps, t, cond), None


def step_draws(job: TrainJob, shape: list[int], gen: torch.Generator, device: torch.device):
    """Every random draw of one step, for the whole effective batch: t [B], eps [B, C, H, W], label drop [B]."""
    t = sample_t(job.batch, job.training.timestep_sampling, gen, device)
    eps = torch.randn([job.batch, *shape], generator=gen, device=device)
    drop = torch.rand(job.batch, generator=gen, device=device) < job.model.label_dropout
    return t, eps, drop


def _micro_batch_loss(job: TrainJob, null: int | None, mb: int, batch: dict, t, eps, drop, fwd, m: int):
    """`objective` on micro-batch m of this worker's rows of a step."""
    sl = slice(m * mb, (m + 1) * mb)
    return objective(job, fwd, null, {k: v[sl] for k, v in batch.items()}, t[sl], eps[sl], drop[sl])


def _crossed(nimg: int, batch: int, every: int | None) -> bool:
    return bool(every) and nimg // every != (nimg - batch) // every


def _micro_batch(job: TrainJob, model: torch.nn.Module, data: PartitionStream, device: torch.device, world: int) -> int:
    """job.micro_batch, or with auto_micro_batch on CUDA the largest that a forward + backward probe fits."""
    if not job.auto_micro_batch:
        return job.micro_batch

    shape = data.largest_latent_shape()  # with aspect-ratio buckets: the bucket with the most tokens

    def probe(mb: int) -> None:  # constant inputs: the memory of a real micro-batch, no random draws used
        batch = {"x0": torch.zeros(mb, *shape, device=device),
                 "labels": torch.zeros(mb, dtype=torch.long, device=device),
                 "cluster": torch.zeros(mb, dtype=torch.long, device=device),
                 "text": None if data.text_dim is None else torch.zeros(mb, data.text_length(), data.text_dim, device=device)}
        with autocast(device, job.training.precision):
            loss, _ = objective(job, model, model.config.num_classes, batch, torch.full((mb,), 0.5, device=device),
                                 torch.ones_like(batch["x0"]), torch.zeros(mb, dtype=torch.bool, device=device))
        loss.sum().backward()
        model.zero_grad(set_to_none=True)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    reserve = param_bytes * (2 + (world > 1))  # AdamW moments (allocated at the first step) + DDP buckets
    share = job.batch // world
    return agree(choose_micro_batch(share, job.micro_batch, device, probe, reserve, f"{job.name}@{job.island}"), device)


def train(job: TrainJob, store: RunStore, on_progress: Callable[[dict], None] | None = None,
          device: torch.device | None = None,
          on_report: Callable[[dict, str | None], None] | None = None) -> ExportRecord:
    """Train `job` to duration_nimg, resuming from its latest committed checkpoint; returns the export.

    `on_progress(row)` runs on rank 0 at each log point. `on_report(row, checkpoint_key)` runs on every
    rank at each log or checkpoint point (row and key are rank 0's; {} and None elsewhere), for
    collective reporting such as `ray.train.report`.
    """
    tc = job.training
    end = tc.duration_nimg if tc.duration_nimg is not None else tc.total_nimg  # expert_job/router_job resolve it
    data = open_partition(store, job.manifest_key, job.kind, tc.data_window_rows)  # streamed, bounded memory
    counter = None  # built only when needed: with buckets it reads a shard header
    if job.duration_tokens is not None:  # budget_unit = tokens: equal FLOPs whatever the job's buckets
        counter = data.token_counter(job.batch, job.seed, job.model.patch_size)
        end = counter[1](job.duration_tokens)
    done = store.read_record(export_key(job.prefix), ExportRecord)
    if done is not None and done.nimg >= end:
        return done
    tokens_at = (counter or data.token_counter(job.batch, job.seed, job.model.patch_size))[0]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if world != job.num_workers:
        raise ValueError(f"job {job.name}: num_workers = {job.num_workers} but the process group has {world}")
    if device is None:
        device = training_device(job.use_gpu, job.island, job.name)  # use_gpu without CUDA is an error
    check_training_device(device, job.use_gpu, job.island, job.name)
    configure_numerics(tc.tf32, tc.deterministic)
    torch.manual_seed(job.seed)  # identical initial weights on every worker
    model = _build(job, data).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = make_optimizer(model, tc, device)
    nimg, step, resumed = 0, 0, resume_latest_good(store, job.prefix, model, ema, opt)  # skips damaged ones
    if resumed is not None:
        _, nimg, step = resumed
        log.info("%s: resumed from %d images (step %d)", job.name, nimg, step)
    elif job.init_key is not None:  # a continuation: the weights it continues from, a fresh optimizer
        start_from_export(store, job.init_key, model, ema)
        log.info("%s: starting from the export %s", job.name, job.init_key)
    mb = _micro_batch(job, model, data, device, world)
    parts = StepParts(model, ema, opt, *wrap_for_training(model, device, tc, world), device, tc, world)
    pos = worker_positions(job.batch, mb, rank, world).to(device)
    accum, null = job.batch // (mb * world), model.config.num_classes
    with contextlib.closing(_Meter(job, model, device, rank, nimg, tokens_at(nimg))) as meter:  # closes its TB writer
        for batch in data.stream(nimg, _round_up(end, job.batch), job.batch, pos.cpu(), device, job.seed):
            gen = torch.Generator(device).manual_seed(mix_seed(job.seed, 2, nimg))
            shape = list(batch["x0"].shape[1:])  # the step's grid: with aspect-ratio buckets, its bucket's
            t, eps, drop = (d[pos] for d in step_draws(job, shape, gen, device))  # this worker's rows [n, ...]
            micro = functools.partial(_micro_batch_loss, job, null, mb, batch, t, eps, drop)
            lr = tc.lr * min(1.0, (nimg + job.batch) / tc.warmup_nimg) if tc.warmup_nimg else tc.lr
            train_step(parts, micro, accum, job.batch // world, lr, step, meter.add)
            meter.count((shape[1], shape[2]))
            nimg, step = nimg + job.batch, step + 1
            logged = _crossed(nimg, job.batch, tc.log_every_nimg) or nimg >= end
            row = meter.log(store, nimg, step, end, on_progress) if logged else {}
            ckpt_key = None
            if (checkpointed := _crossed(nimg, job.batch, tc.checkpoint_every_nimg) or nimg >= end) and rank == 0:
                save_checkpoint(store, job.prefix, job.name, nimg, step, model, ema, opt, tc.keep_checkpoints, meter.last)
                ckpt_key = f"{job.prefix}/checkpoints/{nimg:012d}.json"
            if on_report is not None and (logged or checkpointed):
                on_report(row, ckpt_key)
            if rank == 0 and job.kind != "router" and (_crossed(nimg, job.batch, tc.sample_every_nimg) or nimg >= end):
                _sample_grid(store, job, ema, nimg, device)
    if rank == 0:
        save_export(store, job.prefix, job.name, job.kind, nimg, ema, meter.last)
    if world > 1:
        dist.barrier()  # every rank returns the export that rank 0 committed
    return store.read_record(export_key(job.prefix), ExportRecord)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


class _Meter:
    """Losses and router stats since the last log; img/s, step time and MFU over the log interval."""

    def __init__(self, job: TrainJob, model, device: torch.device, rank: int, nimg: int, tokens: int) -> None:
        self.job, self.device, self.rank, self.last = job, device, rank, {}
        self.model, self.flops = model, 0.0  # training FLOPs since the last log: forward + backward ~ 3x forward
        self._per_image: dict[tuple[int, int], float] = {}
        self.peak = matmul_tflops(device, seconds=0.2) * job.num_workers if rank == 0 else 0.0
        self.tensorboard: TensorBoardLog | None = None  # rank 0's, opened at its first log
        self.start, self.nimg0 = time.perf_counter(), nimg
        self.tokens, self.patch = tokens, model.config.patch_size  # tokens seen: images x each step's grid
        self.resumed_from = nimg or None  # logged once: a resume (after a crash or a preemption) shows in the log
        self.losses: list[torch.Tensor] = []
        self.stats: list[dict] = []

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def count(self, grid: tuple[int, int]) -> None:
        """One step of job.batch images at latent grid (H, W): with aspect-ratio buckets grids differ per step."""
        if grid not in self._per_image:
            self._per_image[grid] = 3 * self.model.flops_per_image(grid)
        self.flops += self._per_image[grid] * self.job.batch
        self.tokens += self.job.batch * (grid[0] // self.patch) * (grid[1] // self.patch)

    def add(self, loss: torch.Tensor, stats: dict | None) -> None:
        self.losses.append(loss)
        if stats:
            self.stats.append(stats)

    def log(self, store: RunStore, nimg: int, step: int, end: int, on_progress) -> dict:
        if self.rank != 0:
            self.losses, self.stats, self.flops = [], [], 0.0
            return {}
        loss = torch.cat(self.losses).float().mean().item()  # the only host sync of the interval
        elapsed = time.perf_counter() - self.start
        img_s = (nimg - self.nimg0) / max(elapsed, 1e-9)
        steps = max(1, (nimg - self.nimg0) // self.job.batch)
        row = {"nimg": nimg, "tokens": self.tokens, "step": step, "loss": loss, "img_per_s": img_s, "step_time_s": elapsed / steps,
               "mfu": self.flops / max(elapsed, 1e-9) / (self.peak * 1e12) if self.peak else 0.0,
               "eta_s": max(0, end - nimg) / max(img_s, 1e-9), "duration_nimg": end, "time": time.time()}
        if self.stats:
            row.update(calibration_metrics(*(torch.cat([s[k] for s in self.stats]).float().cpu()
                                             for k in ("t", "correct", "conf"))))
        if self.resumed_from is not None:
            row["resumed_from_nimg"], self.resumed_from = self.resumed_from, None
        store.append_text(f"{self.job.prefix}/metrics.jsonl", json.dumps(row) + "\n")
        report_progress(job_label(self.job.name, self.job.stage), self.job.island, row)
        self.tensorboard = self.tensorboard or TensorBoardLog(store, tensorboard_prefix(self.job.name))
        self.tensorboard.add(row, nimg)
        if on_progress is not None:
            on_progress(row)
        self.last = {k: float(v) for k, v in row.items() if k != "time"}
        self.losses, self.stats, self.start, self.nimg0, self.flops = [], [], time.perf_counter(), nimg, 0.0
        return row


@torch.no_grad()
def _sample_grid(store: RunStore, job: TrainJob, ema, nimg: int, device: torch.device, n: int = 16) -> None:
    """EMA samples (Euler, 16 steps, fixed noise) as a PNG grid: classes cycle along the grid."""
    from PIL import Image
    cfg = ema.config
    gen = torch.Generator(device).manual_seed(mix_seed(job.seed, 3))
    noise = torch.randn([n, cfg.in_channels, *cfg.input_size], generator=gen, device=device)
    cond = torch.arange(n, device=device) % cfg.num_classes if cfg.conditioning == "class" else None
    x = sample(lambda x, t: cfg_velocity(ema, x, t, cond, None, 1.0), noise, steps=16)  # [n, C, H, W]
    img = ((x[:, :3] if x.shape[1] >= 3 else x[:, :1]).clamp(-1, 1) + 1) * 127.5          # [n, c, H, W]
    side = int(n**0.5)
    grid = img.view(side, side, img.shape[1], *img.shape[2:]).permute(0, 3, 1, 4, 2)       # [r, H, c, W, ch]
    grid = grid.reshape(side * img.shape[2], side * img.shape[3], img.shape[1]).byte().cpu().numpy()
    pil = Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid)
    pil = pil.resize((pil.width * max(1, 64 // cfg.input_size[1]), pil.height * max(1, 64 // cfg.input_size[0])),
                     Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    store.write_bytes(f"{job.prefix}/samples/{nimg:012d}.png", buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    """`python -m worker.train --job JOB.json --store URL`: one job in this process (its scoped view)."""
    parser = argparse.ArgumentParser(prog="python -m worker.train")
    parser.add_argument("--job", required=True, help="TrainJob as a JSON file")
    parser.add_argument("--store", required=True, help="run store URL")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    job = TrainJob.model_validate_json(open(args.job).read())
    record = train(job, job_store(open_store(args.store), job))
    print(json.dumps({"job": job.name, "nimg": record.nimg, "weights": record.weights.path}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
