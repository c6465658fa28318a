"""Distillation into one dense student (paper §3.6).

The student sees all the data; for each example its regression target is the velocity of the expert
of that example's cluster, v_target = v_{k(x0)}(x_t, t, c), instead of the noisy eps - x0. Since
each expert already averages eps - x0 over its cluster, the target is the cluster's flow, and the
student learns u_t restricted to where each cluster lives without needing the router. It exports
like an expert (`student/export.json`) and samples as a one-member ensemble.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field

from common.config import RunConfig
from common.keys import export_key
from common.manifests import EnsembleManifest, EnsembleMember, ExportRecord
from common.storage import RunStore
from worker.checkpoint import model_from_refs, save_export
from worker.data import load_partition, mix_seed
from worker.devices import autocast, configure_numerics, resolve_device
from worker.ensemble import Ensemble
from worker.flow import drop_condition, interpolate, sample_t
from worker.models.dit import build_dit
from worker.sampler import routed_velocity
from worker.step import make_optimizer

PREFIX = "student"


class DistillConfig(BaseModel):
    """Student training; None fields fall back to the run's expert settings (config.model/training)."""
    model_config = ConfigDict(extra="forbid")
    duration_nimg: int | None = Field(None, ge=1, description="Images the student sees; None = one expert's images.")
    batch: int | None = Field(None, ge=1, description="Images per step; None = training.global_batch.")
    lr: float | None = Field(None, gt=0)
    log_every_nimg: int = Field(4096, ge=1)
    seed: int = 0


def distill(config: RunConfig, store: RunStore, dc: DistillConfig | None = None,
            log: Callable[[str], None] = lambda s: None, device: str | torch.device = "auto") -> ExportRecord:
    """Train the student against the gathered experts and commit `student/export.json`.

    Every random draw is made on the CPU from (seed, nimg), so the student is the same on any device up
    to kernel numerics; the teacher and the student run on `device` ("auto": CUDA when visible)."""
    dc = dc or DistillConfig()
    tc = config.training
    end, batch, lr = dc.duration_nimg or config.expert_nimg, dc.batch or tc.global_batch, dc.lr or tc.lr
    device = resolve_device(device) if isinstance(device, str) else device
    configure_numerics(tc.tf32, tc.deterministic)
    teacher = Ensemble.load(store, device=device)
    data = load_partition(store, "router/manifest.json", "router")  # every row + its cluster label
    keep = teacher.present[data.cluster]  # rows of missing experts have no teacher: left out
    latents, cluster = data.latents[keep], data.cluster[keep]
    labels = data.labels[keep]
    text = data.text_tokens[keep] if data.text_tokens is not None else None
    torch.manual_seed(dc.seed)
    student = build_dit(config.model, data.latent_shape, data.num_classes, data.text_dim).to(device).train()
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    opt = make_optimizer(student, tc.model_copy(update={"lr": lr}), device)
    null = student.null_class
    nimg, step, t0, losses = 0, 0, time.perf_counter(), []
    while nimg < end:
        g = torch.Generator().manual_seed(mix_seed(dc.seed, 7, nimg))
        idx = torch.randint(len(latents), (batch,), generator=g)
        x0, k = latents[idx], cluster[idx]                                    # [B, C, H, W], [B]
        t = sample_t(batch, tc.timestep_sampling, g)                          # [B]
        x_t = interpolate(x0, torch.randn(x0.shape, generator=g), t)          # [B, C, H, W]
        cond = {"class": labels[idx], "text": None if text is None else text[idx]}.get(config.model.conditioning)
        cond = drop_condition(cond, torch.rand(batch, generator=g) < config.model.label_dropout, null)
        x_t, t, k = x_t.to(device), t.to(device), k.to(device)
        cond = None if cond is None else cond.to(device)
        with torch.no_grad(), autocast(device, tc.precision):  # the target: each example's own cluster expert
            target = routed_velocity(x_t, t, cond, teacher.experts, k).float()
        with autocast(device, tc.precision):
            loss = (student(x_t, t, cond).float() - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(student.parameters(), tc.grad_clip)
        opt.step()
        with torch.no_grad():  # same EMA rule as the experts (warmup for short runs)
            decay = min(tc.ema_decay, (1 + step) / (10 + step)) if tc.ema_warmup else tc.ema_decay
            torch._foreach_lerp_(list(ema.parameters()), list(student.parameters()), 1.0 - decay)
        nimg, step = nimg + batch, step + 1
        losses.append(loss.detach())
        if nimg // dc.log_every_nimg != (nimg - batch) // dc.log_every_nimg or nimg >= end:
            row = {"nimg": nimg, "step": step, "loss": torch.stack(losses).mean().item(),
                   "img_per_s": nimg / (time.perf_counter() - t0)}
            store.append_text(f"{PREFIX}/metrics.jsonl", json.dumps(row) + "\n")
            log(f"student: {nimg}/{end} images, loss {row['loss']:.4f}")
            losses = []
    return save_export(store, PREFIX, "student", "student", nimg, ema, {"loss": row["loss"], "nimg": float(nimg)})


def load_student(store: RunStore, allow_external_models: bool = False,
                 device: str | torch.device = "auto") -> Ensemble | None:
    """The distilled student as a one-member ensemble (no router), or None when not distilled."""
    record = store.read_record(export_key(PREFIX), ExportRecord)
    if record is None:
        return None
    gathered = store.read_record("ensemble.json", EnsembleManifest)
    if gathered is None:
        return None
    member = EnsembleMember(expert=0, weights=record.weights, model_config_file=record.model_config_file,
                            nimg=record.nimg)
    manifest = gathered.model_copy(update={"num_experts": 1, "experts": [member], "missing": [], "router": None})
    model = model_from_refs(store, "student", record.weights, record.model_config_file).requires_grad_(False)
    model = model.to(resolve_device(device) if isinstance(device, str) else device)
    return Ensemble(manifest, [model], None, store, allow_external_models)
