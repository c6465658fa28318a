"""Offline evaluation of a gathered run (`ddm eval`): the paper's claims checked at our scale.

- every run: the inference strategies of paper Table 1 side by side, with measured GFLOPs per sample
  (torch's FLOP counter around a real sampling call, router included), plus the distilled student;
  every metric is the mean and 95% interval over several sampling seeds (eval.seeds);
- the router's top-1 accuracy and calibration (ECE) per t-bucket, t >= 0.95 included, on noised
  held-out rows (data/holdout/), as sampling uses it (with the class prior where it applies);
- builtin:gmm: router posterior vs the closed-form p(k | x_t, t) and ensemble velocity vs the exact
  marginal velocity, per t (worker/evalmath.py), and sample quality vs fresh draws of the true mixture;
- builtin:digits: class accuracy under a digit classifier trained on the run's training rows and a
  Fréchet distance in its feature space, both against the held-out split, with the real-vs-real
  reference (real training rows against the same held-out rows, same sample size);
- other images: FID against the held-out split, only with local Inception-v3 weights given by the caller
  (`ddm eval --inception PATH` or DDM_INCEPTION_WEIGHTS), loaded as a tensors-only state dict; never
  downloaded, never named by the run.
Results go to `eval/results.json` and `eval/results.md` in the run store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch.utils.flop_counter import FlopCounterMode

from common.config import STRATEGIES, RunConfig, SamplingConfig
from common.errors import DDMError, UsageError
from common.keys import HIRES_ROOT
from common.manifests import ClusterManifest, DatasetManifest, FileRef, Record, RunRecord, ShardRef
from common.storage import RunStore, sha256_bytes
from worker.ensemble import Ensemble
from worker.evalmath import (
    GMM,
    DigitClassifier,
    frechet_distance,
    inception_features,
    mean_interval,
    mmd_rbf,
    mode_coverage,
    reference_frechet,
    sliced_wasserstein,
    train_digit_classifier,
)
from worker.evaltable import to_markdown
from worker.flow import interpolate
from worker.models.router import T_BUCKETS, expected_calibration_error

INCEPTION_ENV = "DDM_INCEPTION_WEIGHTS"
FLOP_BATCH = 8  # samples per FLOP count: the count is exact per sample, a small batch suffices
FLOP_STEPS = 4
REFERENCE_DRAWS = 20  # real-vs-real draws behind the Fréchet reference
ROUTER_ROWS = 1024    # noised held-out rows per t-bucket in the router metrics


class EvalError(DDMError, RuntimeError):
    """Evaluation cannot run; one line naming the missing record or bad argument."""


class ClassifierRecord(Record):
    """eval/digit_classifier.json: the cached digit classifier (weights + its held-out accuracy), trained
    on the run's training rows; `data_sha` names the prepared data it belongs to."""
    weights: FileRef
    heldout_accuracy: float
    seed: int
    data_sha: str = ""


def run_config(store: RunStore) -> RunConfig:
    record = store.read_record("run.json", RunRecord)
    if record is None:
        raise EvalError(f"{store.url}/run.json: not found (not a DDM run store)")
    return RunConfig.model_validate(record.config)


def gflops_per_sample(ensemble: Ensemble, sampling: SamplingConfig, seed: int) -> float:
    """Measured forward FLOPs of one sampling trajectory per sample (router included).

    The counter's per-op overhead is large on CPU, so it runs a trajectory of at most FLOP_STEPS
    steps and scales by the number of velocity evaluations (Euler: steps, Heun: 2 steps - 1); for
    adaptive strategies (threshold, nucleus) this samples the expert count along a shorter path.
    """
    steps = sampling.steps
    counted = min(steps, FLOP_STEPS)
    evals = (lambda s: 2 * s - 1) if sampling.solver == "heun" else (lambda s: s)
    with FlopCounterMode(display=False) as counter:
        ensemble.sample(FLOP_BATCH, sampling, steps=counted, seed=seed)
    return counter.get_total_flops() / FLOP_BATCH / 1e9 * evals(steps) / evals(counted)


# ---- the held-out split --------------------------------------------------------------------------------
@dataclass
class Split:
    """Rows of the prepared dataset: latents [N, C, H, W], labels [N], global row index [N]."""
    latents: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return len(self.index)


def _load_rows(store: RunStore, refs: list[ShardRef], ds: DatasetManifest | None = None) -> Split:
    """Rows of the given shards; with `ds`, only the training rows (held-out ones dropped)."""
    from worker.partition import training_mask

    buckets = sorted({tuple(r.bucket) for r in refs if r.bucket is not None})
    if len(buckets) > 1:  # rows of several shapes cannot be one tensor
        raise UsageError(f"the dataset holds {len(buckets)} aspect-ratio buckets (data.buckets): these rows must be "
                         f"loaded one bucket at a time (worker/eval_buckets.py)")
    parts = []
    for ref in refs:
        t = load_file(str(store.local_copy(ref)))
        keep = torch.from_numpy(training_mask(ds, t["index"].numpy())) if ds is not None else slice(None)
        parts.append((t["latents"][keep].float(), t["labels"][keep].long(), t["index"][keep].long()))
    return Split(*(torch.cat(p) for p in zip(*parts)))


def heldout_split(store: RunStore, ds: DatasetManifest) -> Split | None:
    """data/holdout/: the rows no expert, router or k-means fit saw; None when the run has none."""
    refs = [ShardRef(**r) for r in (ds.extra.get("holdout") or {}).get("shards", [])]
    return _load_rows(store, refs) if refs else None


def training_split(store: RunStore, ds: DatasetManifest) -> Split:
    return _load_rows(store, ds.shards, ds)


def split_reference(store: RunStore, ds: DatasetManifest) -> tuple[Split, Split, list[str]]:
    """(training rows, evaluation target, notes): the target is the held-out split when there is one."""
    train, held = training_split(store, ds), heldout_split(store, ds)
    if held is not None:
        return train, held, []
    return train, train, ["no held-out split (prepared with data.holdout_fraction = 0): metrics are measured "
                          "against the TRAINING rows, which cannot separate memorisation from generalisation"]


def _data_sha(ds: DatasetManifest) -> str:
    return sha256_bytes(json.dumps([[s.sha256 for s in ds.shards], ds.extra.get("holdout", {}).get("fraction"),
                                    ds.extra.get("holdout", {}).get("seed")]).encode())


# ---- digits ----------------------------------------------------------------------------------------
def digit_classifier(store: RunStore, ds: DatasetManifest, train: Split, target: Split,
                     seed: int = 0) -> tuple[DigitClassifier, float]:
    """Train once on the run's training rows, measure on the target (held-out) rows, cache in the store."""
    model, data_sha = DigitClassifier(), _data_sha(ds)
    record = store.read_record("eval/digit_classifier.json", ClassifierRecord)
    if record is not None and record.data_sha == data_sha and record.seed == seed:
        model.load_state_dict(st_load(store.get_payload(record.weights)))
        return model.eval().requires_grad_(False), record.heldout_accuracy
    model, accuracy = train_digit_classifier(seed, data=(train.latents, train.labels, target.latents, target.labels))
    data = st_save({k: v.contiguous() for k, v in model.state_dict().items()})
    ref = store.put_payload(f"eval/digit_classifier/{sha256_bytes(data)[:16]}.safetensors", data)
    store.commit("eval/digit_classifier.json", ClassifierRecord(weights=ref, heldout_accuracy=accuracy, seed=seed,
                                                                data_sha=data_sha))
    return model, accuracy


class DigitsJudge:
    """Class accuracy under a digit classifier and a Fréchet distance in its feature space, both against
    the held-out split; the reference is what real rows score against it at the same sample size."""

    def __init__(self, store: RunStore, ds: DatasetManifest, decode: Callable, n: int, seed: int) -> None:
        train, target, self.notes = split_reference(store, ds)
        self.classifier, accuracy = digit_classifier(store, ds, train, target, seed)
        pixels = lambda latents: decode(latents) * 2 - 1                      # noqa: E731 - pixels in [-1, 1]
        self.pixels = pixels
        self.target_feats = self._feats(pixels(target.latents))
        noise = torch.randn((n, *target.latents.shape[1:]), generator=torch.Generator().manual_seed(seed + 3))
        self.reference = {
            "against": (f"held-out split, {len(target)} rows no expert or router trained on" if not self.notes
                        else f"training rows ({len(target)})"),
            "classifier_accuracy_on_target": round(accuracy, 4), "chance_class_acc": 0.1,
            "fd_real_vs_target": reference_frechet(self._feats(pixels(train.latents)), self.target_feats, n,
                                                   REFERENCE_DRAWS, seed),
            "fd_noise_vs_target": round(frechet_distance(self._feats(pixels(noise)), self.target_feats), 3)}

    def _feats(self, x: torch.Tensor) -> np.ndarray:
        return self.classifier.features(x).double().numpy()

    def __call__(self, latents: torch.Tensor, model: Ensemble, classes: torch.Tensor | None) -> dict[str, float]:
        x = self.pixels(latents)
        out = {"fd": frechet_distance(self._feats(x), self.target_feats)}
        if classes is not None:
            out["class_acc"] = float((self.classifier(x).argmax(-1) == classes.cpu()).float().mean())
        return out


# ---- router on held-out rows -------------------------------------------------------------------------
def router_calibration(store: RunStore, ensemble: Ensemble, target: Split, seed: int,
                       rows: int = ROUTER_ROWS) -> dict[str, Any] | None:
    """Router top-1 accuracy and ECE per t-bucket on noised held-out rows, against their k-means cluster.

    Reported as sampling uses the router: an unconditional router alone, p(k | x_t, t), and with the
    cluster class prior p(c | k) added (class-conditional sampling with an unconditional router); a
    class-conditional router, p(k | x_t, t, c), as it is."""
    clusters = store.read_record("clusters/clusters.json", ClusterManifest)
    if ensemble.router is None or clusters is None:
        return None
    assigned = torch.cat([load_file(str(store.local_copy(a)))["cluster"] for a in clusters.assignments]).long()
    reps = -(-rows // len(target))
    x0, k = target.latents.repeat(reps, 1, 1, 1)[:rows], assigned[target.index].repeat(reps)[:rows]
    labels = target.labels.repeat(reps)[:rows]
    router, present, dev = ensemble.router, ensemble.present.cpu(), ensemble.device
    labels_dev = labels.to(dev)
    conditional = router.config.conditioning == "class"
    has_classes = ensemble.num_classes is not None and bool((labels >= 0).all())
    variants: dict[str, Callable] = {}
    if conditional and has_classes:
        variants["router p(k | x_t, t, c)"] = lambda x, t: router(x, t, labels_dev)
    elif not conditional:
        variants["router p(k | x_t, t)"] = lambda x, t: router(x, t, None)
        prior = ensemble.class_log_prior(labels_dev) if has_classes else None
        if prior is not None:
            variants["router + class prior p(c | k)"] = lambda x, t: router(x, t, None) + prior
    g = torch.Generator().manual_seed(seed + 5)
    out: dict[str, Any] = {"t_buckets": [f"{lo:.2f}-{hi:.2f}" for lo, hi in zip(T_BUCKETS[:-1], T_BUCKETS[1:])],
                           "rows": rows, "variants": {v: {"accuracy": [], "ece": []} for v in variants}}
    for lo, hi in zip(T_BUCKETS[:-1], T_BUCKETS[1:]):
        t = lo + (hi - lo) * torch.rand(rows, generator=g)
        xt = interpolate(x0, torch.randn(x0.shape, generator=g), t)
        for name, fn in variants.items():
            with torch.no_grad():
                p = fn(xt.to(dev), t.to(dev)).float().cpu().masked_fill(~present, float("-inf")).softmax(-1)
            conf, pred = p.max(-1)
            correct = (pred == k).float()
            out["variants"][name]["accuracy"].append(round(correct.mean().item(), 4))
            out["variants"][name]["ece"].append(round(expected_calibration_error(correct, conf), 4))
    return out


# ---- gmm -------------------------------------------------------------------------------------------
class GMMJudge:
    def __init__(self, store: RunStore, dataset: DatasetManifest, seed: int, n: int = 1024) -> None:
        if "gmm" not in dataset.extra:
            raise EvalError("data/dataset.json: builtin:gmm without extra.gmm (weights, means, stds)")
        self.gmm = GMM.from_extra(dataset.extra)
        self.latent_shape = dataset.latent_shape
        self.real, _ = self.gmm.sample(4096, torch.Generator().manual_seed(seed + 1))
        self.cluster_of_component = self._component_to_cluster(store)
        other, _ = self.gmm.sample(n, torch.Generator().manual_seed(seed + 4))
        # The true mixture is the held-out reference here: fresh draws no model trained on.
        self.reference = {"against": "4,096 fresh draws of the true mixture",
                          "true_mean_loglik": round(float(self.gmm.log_prob(self.real).mean()), 4),
                          "sliced_w2_real_vs_real": round(sliced_wasserstein(other, self.real), 4),
                          "mmd2_real_vs_real": round(mmd_rbf(other[:2048], self.real[:2048]), 5)}
        self.notes: list[str] = []

    def _component_to_cluster(self, store: RunStore) -> torch.Tensor:
        """Each mixture component -> the cluster holding most of its rows (clusters ~ components)."""
        from worker.data import load_partition

        data = load_partition(store, "router/manifest.json", "router")
        comp = self.gmm.posterior(data.latents.flatten(1), torch.zeros(data.rows)).argmax(-1)
        K = int(data.cluster.max()) + 1
        return torch.stack([torch.bincount(data.cluster[comp == c], minlength=K).argmax()
                            for c in range(len(self.gmm.weights))])

    def __call__(self, latents: torch.Tensor, model: Ensemble, classes: torch.Tensor | None) -> dict[str, float]:
        x = latents.flatten(1).double().cpu()                                 # flattened latent coordinates
        return {"sliced_w2": sliced_wasserstein(x, self.real), "mmd2": mmd_rbf(x[:2048], self.real[:2048]),
                "mean_loglik": float(self.gmm.log_prob(x).mean()), "mode_coverage": mode_coverage(x, self.gmm)[0]}

    def field_errors(self, ensemble: Ensemble, t_grid: list[float], seed: int, n: int = 2048) -> dict[str, list]:
        """Per t: router posterior error (total variation, top-1 agreement) and velocity errors."""
        g = torch.Generator().manual_seed(seed + 2)
        K = ensemble.manifest.num_experts
        rows: dict[str, list] = {"t": [], "router_tv": [], "router_top1_agree": [], "velocity_rel_err_full": [],
                                 "velocity_rel_err_top1": []}
        for t in t_grid:
            x0, _ = self.gmm.sample(n, g)
            xt = (1 - t) * x0 + t * torch.randn(x0.shape, generator=g, dtype=torch.float64)
            tt = torch.full((n,), float(t))
            p_comp = self.gmm.posterior(xt, tt)                               # [n, components]
            p_true = torch.zeros(n, K, dtype=torch.float64).index_add_(1, self.cluster_of_component, p_comp)
            x_in, t_in = xt.float().view(n, *self.latent_shape).to(ensemble.device), tt.to(ensemble.device)
            p_router = ensemble.router_posterior(x_in, t_in).double().cpu()
            u = self.gmm.velocity(xt, tt)                                     # exact marginal velocity, eq. 7
            rows["t"].append(t)
            rows["router_tv"].append(round(float(0.5 * (p_router - p_true).abs().sum(1).mean()), 4))
            rows["router_top1_agree"].append(round(float((p_router.argmax(1) == p_true.argmax(1)).double().mean()), 4))
            for strategy in ("full", "top1"):
                v = ensemble.velocity(x_in, t_in, strategy=strategy).flatten(1).double().cpu()
                rel = ((v - u) ** 2).sum(1).mean() / (u**2).sum(1).mean()
                rows[f"velocity_rel_err_{strategy}"].append(round(float(rel), 4))
        return rows


# ---- FID -------------------------------------------------------------------------------------------
class FIDJudge:
    def __init__(self, model: torch.nn.Module, store: RunStore, ds: DatasetManifest, decode: Callable, n: int) -> None:
        _, target, self.notes = split_reference(store, ds)
        self.model = model
        self.real = inception_features(model, decode(target.latents[:max(n, 2048)]))
        self.reference = {"against": f"{len(self.real)} rows of the " + ("training rows" if self.notes else "held-out split")}

    def __call__(self, latents: torch.Tensor, model: Ensemble, classes: torch.Tensor | None) -> dict[str, float]:
        return {"fid": frechet_distance(self.real, inception_features(self.model, model.decode(latents)))}


def fid_weights(path: str | None) -> str | None:
    """The FID weights the caller names: the argument, else DDM_INCEPTION_WEIGHTS; never the run's config."""
    path = path or os.environ.get(INCEPTION_ENV) or None
    if path is not None and not Path(path).is_file():
        raise EvalError(f"inception = {path!r}: no such file")
    return path


# ---- the whole evaluation ----------------------------------------------------------------------------
def evaluate(store: RunStore, config: RunConfig | None = None, num_samples: int | None = None,
             strategies: list[str] | None = None, seed: int = 0, seeds: int | None = None,
             log: Callable[[str], None] = lambda s: None, inception: str | None = None,
             allow_external_models: bool = False, device: str | torch.device = "auto",
             compare: dict[str, RunStore] | None = None) -> dict:
    """Every strategy (and the student) sampled with `seeds` sampling seeds (seed, seed + 1, ...) on
    `device` ("auto": CUDA when visible) and scored on the CPU; each metric is reported as the mean and the
    half-width of its 95% Student-t interval over seeds.
    `inception`: FID Inception-v3 weights (a state dict) for image runs, else DDM_INCEPTION_WEIGHTS.
    `allow_external_models`: see `Ensemble.load` (the VAE named by the run).
    A bucketed run (rows of several shapes) gets class accuracy per bucket shape instead (worker/eval_buckets.py);
    `compare` = {name: run store} adds other runs sampled at its shapes and judged by the same classifier."""
    inception = fid_weights(inception)
    config = config or run_config(store)
    data = store.child(HIRES_ROOT) if config.hires is not None else store  # the data the ensemble's exports last trained on
    dataset = data.read_record("data/dataset.json", DatasetManifest)
    if dataset is None:
        raise EvalError(f"{data.url}/data/dataset.json: not committed")
    ensemble = Ensemble.load(store, device=device, allow_external_models=allow_external_models)
    n = num_samples or config.eval.num_samples
    seed_list = list(range(seed, seed + (seeds or config.eval.seeds)))
    if len({tuple(s.bucket) for s in dataset.shards if s.bucket is not None}) > 1:  # several shapes: per-shape metrics
        from worker import eval_buckets

        others = {name: Ensemble.load(other, device=device, allow_external_models=allow_external_models)
                  for name, other in (compare or {}).items()}
        results = eval_buckets.evaluate_buckets(data, config, dataset, ensemble, n, seed_list, others, log)
        store.write_bytes("eval/results.json", json.dumps(results, indent=2).encode())
        store.write_bytes("eval/results.md", eval_buckets.to_markdown(results).encode())
        return results
    if compare:
        raise EvalError("ddm eval --compare: other runs are judged at this run's bucket shapes; this run has one shape")
    strategies = strategies or list(config.eval.strategies)
    unknown = [s for s in strategies if s not in STRATEGIES or s == "single"]
    if unknown:
        raise EvalError(f"eval.strategies: {unknown[0]!r} is not a comparable strategy; use {', '.join(STRATEGIES[:-1])}")
    results: dict[str, Any] = {"run": store.url, "source": dataset.source, "num_samples": n, "seeds": seed_list,
                               "experts": ensemble.present_ids, "missing": ensemble.manifest.missing,
                               "sampling": config.sampling.model_dump(mode="json"), "rows": [], "notes": []}
    judge: Callable | None = None
    if dataset.source == "builtin:digits":
        judge = DigitsJudge(data, dataset, ensemble.decode, n, seed)
    elif dataset.source == "builtin:gmm":
        judge = GMMJudge(data, dataset, seed, n)
        log("gmm: router posterior and velocity errors over t")
        results["gmm_fields"] = judge.field_errors(ensemble, config.eval.t_grid, seed)
    elif inception is not None:
        from worker.models.inception import load_fid_inception

        try:
            model = load_fid_inception(inception)
        except ValueError as exc:
            raise EvalError(str(exc)) from None
        judge = FIDJudge(model, data, dataset, ensemble.decode, n)
    else:
        results["notes"].append(f"FID skipped: no Inception-v3 weights given (inception argument or {INCEPTION_ENV}; "
                                f"a state dict, never downloaded)")
    if judge is not None:
        results["reference"] = judge.reference
        results["notes"] += judge.notes
    target = heldout_split(data, dataset)
    if target is not None:
        log("router: accuracy and calibration per t-bucket on held-out rows")
        results["router"] = router_calibration(data, ensemble, target, seed)

    models: list[tuple[str, Ensemble, str]] = [(s, ensemble, s) for s in strategies]
    from worker.distill import load_student  # the dense student (paper §3.6) sits beside the ensemble

    student = load_student(store, allow_external_models, device=ensemble.device)
    if student is not None:
        models.append(("student (dense)", student, "top1"))
    classes = ensemble.classes_for(n, None)
    for name, model, strategy in models:
        log(f"sampling {n} x {len(seed_list)} seeds with {name}")
        sampling = config.sampling.model_copy(update={"strategy": strategy})
        per_seed = []
        for s in seed_list:
            latents = model.sample(n, sampling, classes=classes, seed=s)
            per_seed.append(judge(latents, model, classes) if judge is not None else {})
        row: dict[str, Any] = {"strategy": name, "gflops_per_sample": round(gflops_per_sample(model, sampling, seed), 4)}
        for key in per_seed[0]:
            iv = mean_interval([m[key] for m in per_seed])
            row[key] = round(iv["mean"], 4)
            row[f"{key}_ci95"] = None if iv["ci95"] is None else round(iv["ci95"], 4)
        row["per_seed"] = {key: [round(m[key], 4) for m in per_seed] for key in per_seed[0]}
        results["rows"].append(row)
    store.write_bytes("eval/results.json", json.dumps(results, indent=2).encode())
    store.write_bytes("eval/results.md", to_markdown(results).encode())
    return results
