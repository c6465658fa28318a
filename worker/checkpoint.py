"""Checkpoints and exports through the run store's commit protocol (docs/design.md §4, §5). No pickles.

Resumable state  <prefix>/checkpoints/<nimg:012d>-<token>/{model,ema,optimizer,state}.safetensors,
                 committed by <prefix>/checkpoints/<nimg:012d>.json (CheckpointRecord) written last.
Export           <prefix>/export/<token>/{config.json, diffusion_pytorch_model.safetensors},
                 committed by <prefix>/export.json (ExportRecord) written last.
A file set whose record never got written (a killed process, a torn write) is never loaded. A committed
checkpoint that fails verification on load is recorded as `<prefix>/checkpoints/<nimg:012d>.bad` and
skipped: the job resumes from the newest good one, and pruning always keeps the newest good one.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common.keys import export_key
from common.manifests import CheckpointRecord, ExportRecord, FileRef, ManifestError
from common.storage import IntegrityError, RunStore

log = logging.getLogger(__name__)
_RECORD = re.compile(r"/checkpoints/(\d{12})\.json$")
WEIGHTS_NAME, CONFIG_NAME = "diffusion_pytorch_model.safetensors", "config.json"
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.safetensors")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sd = opt.state_dict()
    tensors = {f"state.{i}.{name}": v.detach().cpu().contiguous() for i, s in sd["state"].items() for name, v in s.items()}
    return tensors, {"param_groups": json.dumps(sd["param_groups"])}


def _load_optimizer(opt: torch.optim.Optimizer, data: bytes, where: str) -> None:
    """Restore the optimizer's state (moments, step counts) only. The construction options of the
    optimizer built by this process (fused/foreach, lr, betas, weight_decay) stay: a checkpoint written
    on CPU (foreach) resumes on GPU with fused AdamW, and a changed config takes effect."""
    header_len = int.from_bytes(data[:8], "little")  # safetensors: u64 header size, then JSON header
    saved = json.loads(json.loads(data[8:8 + header_len])["__metadata__"]["param_groups"])
    current = opt.state_dict()["param_groups"]
    if [len(g["params"]) for g in saved] != [len(g["params"]) for g in current]:
        raise ValueError(f"{where}: optimizer has parameter groups of sizes {[len(g['params']) for g in saved]}, "
                         f"the model being resumed {[len(g['params']) for g in current]}")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in st_load(data).items():
        _, i, name = key.split(".", 2)
        state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": current})


def checkpoint_records(store: RunStore, prefix: str) -> list[str]:
    """Keys of committed checkpoint records, oldest first."""
    return [k for k in store.list(f"{prefix}/checkpoints") if _RECORD.search("/" + k)]


def save_checkpoint(store: RunStore, prefix: str, job: str, nimg: int, step: int, model: nn.Module, ema: nn.Module,
                    opt: torch.optim.Optimizer, keep: int, metrics: dict[str, float] | None = None) -> CheckpointRecord:
    folder = f"{prefix}/checkpoints/{nimg:012d}-{uuid.uuid4().hex[:8]}"
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    state = {"nimg": torch.tensor([nimg]), "step": torch.tensor([step]), "rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["rng.cuda"] = torch.cuda.get_rng_state()
    cpu = lambda m: {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}  # noqa: E731
    files = [store.put_payload(f"{folder}/model.safetensors", st_save(cpu(model))),
             store.put_payload(f"{folder}/ema.safetensors", st_save(cpu(ema))),
             store.put_payload(f"{folder}/optimizer.safetensors", st_save(opt_tensors, metadata=opt_meta)),
             store.put_payload(f"{folder}/state.safetensors", st_save(state))]
    record = CheckpointRecord(job=job, nimg=nimg, step=step, files=files, created_at=_now(), metrics=metrics or {})
    key = f"{prefix}/checkpoints/{nimg:012d}.json"
    store.delete(_bad_key(key))  # this record replaces one recorded as bad at the same nimg
    store.commit(key, record)
    _prune(store, prefix, keep)
    return record


def _bad_key(record_key: str) -> str:
    return record_key[:-len(".json")] + ".bad"


def mark_bad(store: RunStore, record_key: str, reason: str) -> None:
    """Record that a committed checkpoint failed to load; it is skipped from now on (kept as evidence)."""
    log.warning("%s: checkpoint unusable (%s); falling back to the previous one", record_key, reason)
    store.write_bytes(_bad_key(record_key), json.dumps({"reason": reason, "at": _now()}).encode())


def _read_ok(store: RunStore, key: str) -> CheckpointRecord | None:
    """The record at `key`, or None when it is unreadable (torn, altered) or marked bad."""
    if store.exists(_bad_key(key)):
        return None
    try:
        return store.read_record(key, CheckpointRecord)
    except ManifestError as exc:
        mark_bad(store, key, str(exc))
        return None


def _prune(store: RunStore, prefix: str, keep: int) -> None:
    """Keep the newest `keep` records and, always, the newest good one; delete a record before its
    files, and drop folders no record lists (a torn checkpoint of a killed earlier attempt)."""
    records = checkpoint_records(store, prefix)
    good = [key for key in records if _read_ok(store, key) is not None]
    kept = set(records[-keep:]) | set(good[-1:])
    for key in records:
        if key in kept:
            continue
        rec = _read_ok(store, key)
        store.delete(key)
        store.delete(_bad_key(key))
        for folder in {f.path.rsplit("/", 1)[0] for f in rec.files} if rec else ():
            store.delete(folder)
    live = set()  # files of every kept record, a bad one's included (evidence until it rolls out)
    for key in kept:
        try:
            live |= {f.path.rsplit("/", 1)[0] for f in store.read_record(key, CheckpointRecord).files}
        except ManifestError:
            pass
    for key in store.list(f"{prefix}/checkpoints"):
        folder = key.rsplit("/", 1)[0]
        if key.endswith(".safetensors") and folder not in live:
            store.delete(folder)


def latest_checkpoint(store: RunStore, prefix: str) -> CheckpointRecord | None:
    """The newest committed checkpoint not recorded as bad."""
    for key in reversed(checkpoint_records(store, prefix)):
        record = _read_ok(store, key)
        if record is not None:
            return record
    return None


def load_checkpoint(store: RunStore, record: CheckpointRecord, model: nn.Module, ema: nn.Module,
                    opt: torch.optim.Optimizer) -> tuple[int, int]:
    """Restore model, EMA and optimizer in place (checksums verified); returns (nimg, step).
    Every file is read and verified before anything changes, so a damaged checkpoint leaves the
    modules as they were."""
    files = {Path(f.path).name: f for f in record.files}
    data = {name: store.get_payload(files[name]) for name in CHECKPOINT_FILES}
    model_sd, ema_sd, state = (st_load(data[n]) for n in ("model.safetensors", "ema.safetensors", "state.safetensors"))
    model.load_state_dict(model_sd)
    ema.load_state_dict(ema_sd)
    _load_optimizer(opt, data["optimizer.safetensors"], files["optimizer.safetensors"].path)
    torch.set_rng_state(state["rng.cpu"])
    if "rng.cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng.cuda"])
    return int(state["nimg"][0]), int(state["step"][0])


def resume_latest_good(store: RunStore, prefix: str, model: nn.Module, ema: nn.Module,
                       opt: torch.optim.Optimizer) -> tuple[CheckpointRecord, int, int] | None:
    """Load the newest checkpoint that verifies; a damaged one is recorded (`<nimg>.bad`) and skipped.
    Returns (record, nimg, step), or None when no good checkpoint exists (train from scratch)."""
    for key in reversed(checkpoint_records(store, prefix)):
        record = _read_ok(store, key)
        if record is None:
            continue
        try:
            nimg, step = load_checkpoint(store, record, model, ema, opt)
        except (IntegrityError, FileNotFoundError, KeyError, SafetensorError) as exc:
            mark_bad(store, key, f"{type(exc).__name__}: {exc}")
            continue
        return record, nimg, step
    return None


def save_export(store: RunStore, prefix: str, job: str, kind: str, nimg: int, ema: nn.Module,
                metrics: dict[str, float] | None = None) -> ExportRecord:
    """EMA weights + config through `save_pretrained` (safetensors), committed by export.json."""
    folder = f"{prefix}/export/{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        ema.save_pretrained(tmp, safe_serialization=True)
        weights = store.put_payload(f"{folder}/{WEIGHTS_NAME}", (Path(tmp) / WEIGHTS_NAME).read_bytes())
        config = store.put_payload(f"{folder}/{CONFIG_NAME}", (Path(tmp) / CONFIG_NAME).read_bytes())
    record = ExportRecord(job=job, kind=kind, nimg=nimg, weights=weights, model_config_file=config,
                          final_metrics=metrics or {})
    store.commit(export_key(prefix), record)
    return record


def model_from_refs(store: RunStore, kind: str, weights: FileRef, config: FileRef) -> nn.Module:
    """Verified local copies of an export's files, loaded through the real `from_pretrained` path."""
    from worker.models.dit import DiT
    from worker.models.router import Router
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(store.local_copy(weights), Path(tmp) / WEIGHTS_NAME)
        shutil.copyfile(store.local_copy(config), Path(tmp) / CONFIG_NAME)
        cls = Router if kind == "router" else DiT
        return cls.from_pretrained(tmp, low_cpu_mem_usage=False).eval()


def start_from_export(store: RunStore, key: str, model: nn.Module, ema: nn.Module) -> ExportRecord:
    """Load the committed export at `key` into `model` and `ema` (a continuation stage's start). The
    weights fit any token grid: positions are computed per grid, never stored (worker/models/dit.py)."""
    record = store.read_record(key, ExportRecord)
    if record is None:
        raise FileNotFoundError(f"{key}: no committed export to continue from")
    state = st_load(store.get_payload(record.weights))
    model.load_state_dict(state)
    ema.load_state_dict(state)
    return record


def load_export(store: RunStore, prefix: str) -> tuple[nn.Module, ExportRecord]:
    record = store.read_record(export_key(prefix), ExportRecord)
    if record is None:
        raise FileNotFoundError(f"{prefix}/export.json: no committed export (training not finished)")
    return model_from_refs(store, record.kind, record.weights, record.model_config_file), record
