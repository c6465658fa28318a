"""Ensemble inference strategies (paper §3.4, Table 1) over plain velocity callables.

The DDM marginal velocity factors exactly as (paper eq. 7)

    u_t(x_t) = sum_k p(k | x_t, t) * v_k(x_t, t)

where v_k is expert k's flow and the router estimates p(k | x_t, t). Every strategy below turns the
router posterior into sparse per-row expert weights w[B, K] (rows sum to 1) and evaluates
sum_k w[:, k] * v_k, running expert k ONLY on the rows with w[:, k] > 0. So top-1 costs one expert
forward per row plus the router, whatever K is.

The one-expert-per-row strategies (top1, sample, oracle, single) dispatch through `routed_velocity`: one
stable sort of the rows by expert per step and one host sync (the K row counts), then each expert runs on
a contiguous slice. Optionally (bucket=True) the slices are padded to a few bucket sizes, so a compiled or graph-captured
expert sees a handful of shapes rather than one per routing outcome; on CPU they are exact, and the result
is bit-identical to the general weighted path.

    top1       argmax_k p(k | x_t, t), re-chosen at every step (the paper's best; the default)
    topk       the k most probable experts, weights renormalised
    full       all experts weighted by the posterior: eq. 7 exactly
    sample     one expert drawn from the posterior at every step (collapses in the paper)
    threshold  experts with p >= threshold (the argmax always kept), renormalised
    nucleus    the smallest set whose mass reaches nucleus_p, renormalised
    oracle     one fixed expert per sample for the whole trajectory (its cluster is given)
    single     one fixed expert for every sample
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from torch import Tensor

from common.config import STRATEGIES, RoutingConfig, short_value
from common.errors import UsageError

# (x[B, ...], t[B], cond[B] | None) -> velocity[B, ...]
VelocityFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
# (x[B, ...], t[B]) -> logits[B, K]
RouterFn = Callable[[Tensor, Tensor], Tensor]

ONE_EXPERT_PER_ROW = ("top1", "sample", "oracle", "single")



class SamplerError(UsageError, ValueError):
    """Bad sampling arguments, phrased as one line."""


def settings(cls: type[RoutingConfig], base: RoutingConfig | str | None, overrides: dict[str, Any]) -> Any:
    """`base` (a config of type `cls`, a strategy name, or None for the defaults) with keyword overrides,
    validated by the config's own rules: a bad value is one SamplerError naming the parameter."""
    if isinstance(base, str):
        overrides = {"strategy": base, **overrides}
        base = None
    if base is not None and not isinstance(base, BaseModel):
        raise SamplerError(f"sampling settings: expected a {cls.__name__} or a strategy name, got {type(base).__name__}")
    if base is not None and not overrides and isinstance(base, cls):
        return base
    data = {k: v for k, v in (base.model_dump() if base is not None else {}).items() if k in cls.model_fields}
    try:
        return cls.model_validate({**data, **overrides})
    except ValidationError as err:
        first = err.errors()[0]
        name = ".".join(str(p) for p in first["loc"]) or cls.__name__
        if first["type"] == "extra_forbidden":
            raise SamplerError(f"{name}: not a sampling parameter; known: {', '.join(cls.model_fields)}") from None
        raise SamplerError(f"{name} = {short_value(first.get('input'))}: "
                           f"{first['msg'].removeprefix('Value error, ')}") from None


def as_time(t: Tensor | float, x: Tensor) -> Tensor:
    """t as a [B] tensor on x's device, whatever the solver passed (scalar or per row)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1)
    return t.expand(x.shape[0]) if t.numel() == 1 else t


def guided(model: Callable[..., Tensor], cfg_scale: float, null_class: int | None) -> VelocityFn:
    """Classifier-free guidance applied inside ONE expert: v = v(x, 0) + w (v(x, c) - v(x, 0)).

    Guidance is per expert (each expert's own conditional and unconditional flows are mixed), then
    the router mixes the guided experts; cond and null rows share one batched forward.
    """
    def velocity(x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        text = cond is not None and cond.is_floating_point()  # text embeddings: all zeros = null text
        if cond is None or (null_class is None and not text) or cfg_scale == 1.0:
            return model(x, t, cond)
        null = torch.zeros_like(cond) if text else torch.full_like(cond, null_class)
        if cfg_scale == 0.0:
            return model(x, t, null)
        v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]))  # [2B, ...]
        v_cond, v_null = v.chunk(2)
        return v_null + cfg_scale * (v_cond - v_null)
    return velocity


def posterior(router: RouterFn | None, x: Tensor, t: Tensor, present: Tensor) -> Tensor:
    """p(k | x_t, t) [B, K], renormalised over the experts that are present (missing ones get 0)."""
    if router is None:  # K = 1 or no router: uniform over present experts
        logits = torch.zeros(x.shape[0], present.numel(), device=x.device)
    else:
        logits = router(x, t).float()
    logits = logits.masked_fill(~present.to(logits.device), float("-inf"))
    return logits.softmax(dim=-1)


def expert_choice(p: Tensor | None, strategy: str, *, fixed: Tensor | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """The one expert of each row [B] for the ONE_EXPERT_PER_ROW strategies (p[B, K] unused by oracle/single)."""
    if strategy in ("oracle", "single"):
        if fixed is None:
            raise SamplerError(f"strategy {strategy}: needs the expert of each sample")
        return fixed
    if strategy == "top1":
        return p.argmax(-1)
    if strategy == "sample":
        return torch.multinomial(p.cpu(), 1, generator=generator).squeeze(1).to(p.device)
    raise SamplerError(f"strategy {strategy!r}: not a one-expert-per-row strategy")


def expert_weights(p: Tensor, strategy: str, *, top_k: int = 2, threshold: float = 0.1, nucleus_p: float = 0.9,
                   fixed: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Sparse mixing weights w[B, K] (rows sum to 1) from the posterior p[B, K]."""
    B, K = p.shape
    if strategy in ONE_EXPERT_PER_ROW:
        chosen = expert_choice(p, strategy, fixed=fixed, generator=generator)
        return torch.nn.functional.one_hot(chosen.to(p.device), K).to(p.dtype)
    if strategy == "full":
        return p
    if strategy == "topk":
        keep = torch.zeros_like(p, dtype=torch.bool).scatter_(1, p.topk(min(top_k, K), dim=-1).indices, True)
    elif strategy == "threshold":
        keep = p >= threshold
        keep.scatter_(1, p.argmax(-1, keepdim=True), True)
    elif strategy == "nucleus":
        sorted_p, order = p.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the more probable experts
        keep = torch.zeros_like(p, dtype=torch.bool).scatter_(1, order, before < nucleus_p)
    else:
        raise SamplerError(f"strategy {strategy!r}: unknown; choose one of {', '.join(STRATEGIES)}")
    w = p * keep
    return w / w.sum(-1, keepdim=True)


def mixture_velocity(x: Tensor, t: Tensor, cond: Tensor | None, experts: Sequence[VelocityFn | None],
                     weights: Tensor) -> Tensor:
    """sum_k w[:, k] v_k(x), evaluating expert k only on its rows (w[:, k] > 0)."""
    v = torch.zeros_like(x)
    shape = (-1,) + (1,) * (x.dim() - 1)
    for k, expert in enumerate(experts):
        rows = (weights[:, k] > 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        if expert is None:
            raise SamplerError(f"expert {k} is missing but received weight")
        vk = expert(x[rows], t[rows], None if cond is None else cond[rows])
        v.index_add_(0, rows, vk * weights[rows, k].to(vk.dtype).view(shape))
    return v


def bucket_size(n: int) -> int:
    """n rounded up to one of 4 sizes per octave (8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ...): at most 25% padding,
    about 4 log2(B) distinct shapes."""
    if n <= 8:
        return 8
    step = 1 << max(0, n.bit_length() - 3)  # a quarter of the octave [2^(b-1), 2^b) holding n
    return -(-n // step) * step


def routed_velocity(x: Tensor, t: Tensor, cond: Tensor | None, experts: Sequence[VelocityFn | None],
                    chosen: Tensor, bucket: bool | None = None) -> Tensor:
    """v[i] = v_{chosen[i]}(x[i]): rows sorted by expert once, each expert on its contiguous slice.

    One host sync per call (the per-expert row counts, needed for the slice shapes), not one per expert.
    `bucket` pads each slice to `bucket_size` rows, repeating the last row; the padded rows are computed
    and dropped. It pays only for compiled or graph-captured experts (few distinct shapes); in eager mode
    it is off by default: on an H200 it cost 1.7x for XL/2 experts at 4 rows each (BENCHMARKS.md)."""
    B = x.shape[0]
    bucket = bool(bucket)
    order = torch.argsort(chosen, stable=True)                    # rows grouped by expert, ascending within
    counts = torch.bincount(chosen, minlength=len(experts)).tolist()  # the one host sync of the step
    if len(counts) > len(experts):
        raise SamplerError(f"expert {len(counts) - 1}: not in this ensemble of {len(experts)}")
    xs, ts, cs = x[order], t[order], None if cond is None else cond[order]
    outs, start = [], 0
    for k, n in enumerate(counts):
        if n == 0:
            continue
        if experts[k] is None:
            raise SamplerError(f"expert {k} is missing but received weight")
        size = bucket_size(n) if bucket else n
        rows = slice(start, start + n) if size == n else (start + torch.arange(size, device=x.device)).clamp_max(B - 1)
        outs.append(experts[k](xs[rows], ts[rows], None if cs is None else cs[rows])[:n])
        start += n
    v = torch.empty_like(x)
    v[order] = torch.cat(outs).to(x.dtype)
    return v


class EnsembleVelocity:
    """The velocity field of one strategy, callable by a flow solver as fn(x, t)."""

    def __init__(self, experts: Sequence[VelocityFn | None], router: RouterFn | None,
                 routing: RoutingConfig | str = "top1", *, cond: Tensor | None = None, fixed: Tensor | None = None,
                 generator: torch.Generator | None = None, bucket: bool | None = None, **overrides: Any) -> None:
        """`routing`: a RoutingConfig (or SamplingConfig), or a strategy name; keyword overrides (top_k,
        threshold, nucleus_p) are validated by the same config rules. `bucket` (default off) pads the
        per-expert slices of one-expert-per-row strategies to a few sizes (`routed_velocity`)."""
        routing = settings(RoutingConfig, routing, overrides)
        strategy, top_k, threshold, nucleus_p = routing.strategy, routing.top_k, routing.threshold, routing.nucleus_p
        self.experts = list(experts)
        self.present = torch.tensor([e is not None for e in self.experts])
        if fixed is not None:
            bad = [int(k) for k in fixed.unique() if not (0 <= k < len(self.experts)) or self.experts[int(k)] is None]
            if bad:
                raise SamplerError(f"expert {bad[0]}: not in this ensemble (present: "
                                   f"{[k for k, e in enumerate(self.experts) if e is not None]})")
        self.router, self.strategy, self.cond, self.fixed, self.generator = router, strategy, cond, fixed, generator
        self.options = dict(top_k=top_k, threshold=threshold, nucleus_p=nucleus_p)
        self.bucket, self.calls = bucket, 0

    def _posterior(self, x: Tensor, t: Tensor) -> Tensor:
        if self.present.device != x.device:  # once, not a host-to-device copy every step
            self.present = self.present.to(x.device)
        return posterior(self.router, x, t, self.present)

    def weights(self, x: Tensor, t: Tensor) -> Tensor:
        if self.strategy in ("oracle", "single"):  # no router call: the expert is fixed
            return expert_weights(torch.zeros(x.shape[0], len(self.experts), device=x.device), self.strategy,
                                  fixed=self.fixed)
        return expert_weights(self._posterior(x, t), self.strategy, generator=self.generator, **self.options)

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        self.calls += 1
        t = as_time(t, x)
        if self.strategy in ONE_EXPERT_PER_ROW:
            p = None if self.strategy in ("oracle", "single") else self._posterior(x, t)
            chosen = expert_choice(p, self.strategy, fixed=self.fixed, generator=self.generator)
            return routed_velocity(x, t, self.cond, self.experts, chosen.to(x.device), self.bucket)
        return mixture_velocity(x, t, self.cond, self.experts, self.weights(x, t))


def save_grid(ensemble, latents: Tensor, path, labels: Sequence | None = None, title: str | None = None):
    """Decode `latents` with the ensemble's decoder and write a labelled grid PNG; returns the path."""
    from worker.grid import write_grid

    return write_grid(ensemble.decode(latents), path, labels=None if labels is None else [str(x) for x in labels],
                      title=title)
