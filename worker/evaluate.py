"""Offline evaluation of a gathered run (`ddm eval`): the paper's claims checked at our scale.

- every run: the inference strategies of paper Table 1 side by side, with measured GFLOPs per sample
  (torch's FLOP counter around a real sampling call, router included), plus the distilled student;
- builtin:gmm: router posterior vs the closed-form p(k | x_t, t) and ensemble velocity vs the exact
  marginal velocity, per t (worker/evalmath.py), and sample quality vs the true mixture;
- builtin:digits: class accuracy of class-conditional samples under a digit classifier trained on
  the bundled data (cached in the run store) and a Fréchet distance in its feature space;
- other images: FID only with local Inception-v3 weights given by the caller (`ddm eval --inception PATH` or
  DDM_INCEPTION_WEIGHTS), loaded as a tensors-only state dict; never downloaded, never named by the run.
Results go to `eval/results.json` and `eval/results.md` in the run store.
"""

from __future__ import annotations

from common.errors import DDMError

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.utils.flop_counter import FlopCounterMode

from common.config import STRATEGIES, RunConfig, SamplingConfig
from common.manifests import DatasetManifest, FileRef, Record, RunRecord
from common.storage import RunStore
from worker.ensemble import Ensemble
from worker.evalmath import (GMM, DigitClassifier, digits_data, frechet_distance, inception_features, mmd_rbf,
                             mode_coverage, sliced_wasserstein, train_digit_classifier)

INCEPTION_ENV = "DDM_INCEPTION_WEIGHTS"
FLOP_BATCH = 8  # samples per FLOP count: the count is exact per sample, a small batch suffices
FLOP_STEPS = 4


class EvalError(DDMError, RuntimeError):
    """Evaluation cannot run; one line naming the missing record or bad argument."""


class ClassifierRecord(Record):
    """eval/digit_classifier.json: the cached digit classifier (weights + its held-out accuracy)."""
    weights: FileRef
    heldout_accuracy: float
    seed: int


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


# ---- digits ----------------------------------------------------------------------------------------
def digit_classifier(store: RunStore, seed: int = 0) -> tuple[DigitClassifier, float]:
    """Train once on the bundled digits, cache the weights (safetensors) in the run store."""
    model = DigitClassifier()
    record = store.read_record("eval/digit_classifier.json", ClassifierRecord)
    if record is not None:
        model.load_state_dict(st_load(store.get_payload(record.weights)))
        return model.eval().requires_grad_(False), record.heldout_accuracy
    model, accuracy = train_digit_classifier(seed)
    data = st_save({k: v.contiguous() for k, v in model.state_dict().items()})
    from common.storage import sha256_bytes

    ref = store.put_payload(f"eval/digit_classifier/{sha256_bytes(data)[:16]}.safetensors", data)
    store.commit("eval/digit_classifier.json", ClassifierRecord(weights=ref, heldout_accuracy=accuracy, seed=seed))
    return model, accuracy


class DigitsJudge:
    def __init__(self, store: RunStore, seed: int) -> None:
        self.classifier, self.heldout = digit_classifier(store, seed)
        self.real, _ = digits_data()
        self.real_feats = self.classifier.features(self.real).double().numpy()
        half = len(self.real) // 2
        self.reference = {"classifier_heldout_accuracy": round(self.heldout, 4),
                          "fd_real_half_vs_half": round(frechet_distance(self.real_feats[:half], self.real_feats[half:]), 3)}

    def __call__(self, latents: torch.Tensor, model: Ensemble, classes: torch.Tensor | None) -> dict[str, float]:
        x = model.decode(latents) * 2 - 1                                     # pixels in [-1, 1]
        feats = self.classifier.features(x).double().numpy()
        out = {"fd": round(frechet_distance(self.real_feats, feats), 3)}
        if classes is not None:
            out["class_acc"] = round(float((self.classifier(x).argmax(-1) == classes.cpu()).float().mean()), 4)
        return out


# ---- gmm -------------------------------------------------------------------------------------------
class GMMJudge:
    def __init__(self, store: RunStore, dataset: DatasetManifest, seed: int) -> None:
        if "gmm" not in dataset.extra:
            raise EvalError("data/dataset.json: builtin:gmm without extra.gmm (weights, means, stds)")
        self.gmm = GMM.from_extra(dataset.extra)
        self.latent_shape = dataset.latent_shape
        self.real, _ = self.gmm.sample(4096, torch.Generator().manual_seed(seed + 1))
        self.cluster_of_component = self._component_to_cluster(store)
        self.reference = {"true_mean_loglik": round(float(self.gmm.log_prob(self.real).mean()), 4)}

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
        return {"sliced_w2": round(sliced_wasserstein(x, self.real), 4), "mmd2": round(mmd_rbf(x[:2048], self.real[:2048]), 5),
                "mean_loglik": round(float(self.gmm.log_prob(x).mean()), 4),
                "mode_coverage": round(mode_coverage(x, self.gmm)[0], 3)}

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
    def __init__(self, model: torch.nn.Module, real_images: torch.Tensor) -> None:
        self.model = model
        self.real = inception_features(model, real_images)

    def __call__(self, latents: torch.Tensor, model: Ensemble, classes: torch.Tensor | None) -> dict[str, float]:
        return {"fid": round(frechet_distance(self.real, inception_features(self.model, model.decode(latents))), 3)}


def fid_weights(path: str | None) -> str | None:
    """The FID weights the caller names: the argument, else DDM_INCEPTION_WEIGHTS; never the run's config."""
    path = path or os.environ.get(INCEPTION_ENV) or None
    if path is not None and not Path(path).is_file():
        raise EvalError(f"inception = {path!r}: no such file")
    return path


def real_images(store: RunStore, dataset: DatasetManifest, ensemble: Ensemble, n: int) -> torch.Tensor:
    from safetensors.torch import load_file

    out, have = [], 0
    for ref in dataset.shards:
        lat = load_file(str(store.local_copy(ref)))["latents"]
        out.append(ensemble.decode(lat[: n - have].float()))
        have += out[-1].shape[0]
        if have >= n:
            break
    return torch.cat(out)


# ---- the whole evaluation ----------------------------------------------------------------------------
def evaluate(store: RunStore, config: RunConfig | None = None, num_samples: int | None = None,
             strategies: list[str] | None = None, seed: int = 0, log: Callable[[str], None] = lambda s: None,
             inception: str | None = None, allow_external_models: bool = False,
             device: str | torch.device = "auto") -> dict:
    """Sample every strategy on `device` ("auto": CUDA when visible) and score the samples on the CPU.
    `inception`: FID Inception-v3 weights (a state dict) for image runs, else DDM_INCEPTION_WEIGHTS.
    `allow_external_models`: see `Ensemble.load` (the VAE named by the run)."""
    config = config or run_config(store)
    inception = fid_weights(inception)
    dataset = store.read_record("data/dataset.json", DatasetManifest)
    if dataset is None:
        raise EvalError(f"{store.url}/data/dataset.json: not committed")
    ensemble = Ensemble.load(store, device=device, allow_external_models=allow_external_models)
    n = num_samples or config.eval.num_samples
    strategies = strategies or list(config.eval.strategies)
    unknown = [s for s in strategies if s not in STRATEGIES or s == "single"]
    if unknown:
        raise EvalError(f"eval.strategies: {unknown[0]!r} is not a comparable strategy; use {', '.join(STRATEGIES[:-1])}")
    results: dict[str, Any] = {"run": store.url, "source": dataset.source, "num_samples": n,
                               "experts": ensemble.present_ids, "missing": ensemble.manifest.missing,
                               "sampling": config.sampling.model_dump(mode="json"), "rows": [], "notes": []}
    judge: Callable | None = None
    if dataset.source == "builtin:digits":
        judge = DigitsJudge(store, seed)
    elif dataset.source == "builtin:gmm":
        judge = GMMJudge(store, dataset, seed)
        log("gmm: router posterior and velocity errors over t")
        results["gmm_fields"] = judge.field_errors(ensemble, config.eval.t_grid, seed)
    elif inception is not None:
        from worker.models.inception import load_fid_inception

        try:
            model = load_fid_inception(inception)
        except ValueError as exc:
            raise EvalError(str(exc)) from None
        judge = FIDJudge(model, real_images(store, dataset, ensemble, n))
    else:
        results["notes"].append(f"FID skipped: no Inception-v3 weights given (inception argument or {INCEPTION_ENV}; "
                                f"a state dict, never downloaded)")
    if judge is not None:
        results["reference"] = getattr(judge, "reference", {})

    models: list[tuple[str, Ensemble, str]] = [(s, ensemble, s) for s in strategies]
    from worker.distill import load_student  # the dense student (paper §3.6) sits beside the ensemble

    student = load_student(store, allow_external_models, device=ensemble.device)
    if student is not None:
        models.append(("student (dense)", student, "top1"))
    classes = ensemble.classes_for(n, None)
    for name, model, strategy in models:
        log(f"sampling {n} with {name}")
        sampling = config.sampling.model_copy(update={"strategy": strategy})
        latents = model.sample(n, sampling, classes=classes, seed=seed)
        row: dict[str, Any] = {"strategy": name, "gflops_per_sample": round(gflops_per_sample(model, sampling, seed), 4)}
        if judge is not None:
            row.update(judge(latents, model, classes))
        results["rows"].append(row)
    store.write_bytes("eval/results.json", json.dumps(results, indent=2).encode())
    store.write_bytes("eval/results.md", to_markdown(results).encode())
    return results


def to_markdown(results: dict) -> str:
    s = results["sampling"]
    lines = [f"## Evaluation of {results['run']}", "",
             f"{results['source']}: {results['num_samples']} samples per strategy, {s['steps']} {s['solver']} steps, "
             f"CFG {s['cfg_scale']}; experts {results['experts']}" + (f", missing {results['missing']}" if results["missing"] else ""), ""]
    metric_keys = [k for k in results["rows"][0] if k not in ("strategy",)] if results["rows"] else []
    lines += ["| " + " | ".join(["strategy"] + metric_keys) + " |", "|" + "---|" * (len(metric_keys) + 1)]
    for row in results["rows"]:
        lines.append("| " + " | ".join([row["strategy"]] + [_fmt(row.get(k)) for k in metric_keys]) + " |")
    if results.get("reference"):
        lines += ["", "Reference: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in results["reference"].items())]
    fields = results.get("gmm_fields")
    if fields:
        keys = [k for k in fields if k != "t"]
        lines += ["", "GMM fields vs closed form (router: total variation to p(k | x_t, t); velocity: "
                  "E||v - u||^2 / E||u||^2 against the exact marginal velocity, eq. 7)", "",
                  "| t | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
        for i, t in enumerate(fields["t"]):
            lines.append(f"| {t} | " + " | ".join(_fmt(fields[k][i]) for k in keys) + " |")
    for note in results["notes"]:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)
