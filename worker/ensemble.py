"""The gathered ensemble: K experts + router, loadable anywhere (no Ray) from a run store or a folder.

`Ensemble.load(uri)` reads `ensemble.json`, verifies every payload's sha256 and builds the models
through their real `from_pretrained` path. `export(dir)` writes the same payloads under the same
relative keys plus its own `ensemble.json`, so a folder loads exactly like a run store.
"""

from __future__ import annotations

from common.errors import UsageError

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from common.config import StorageConfig
from common.manifests import EnsembleManifest, EnsembleMember
from common.storage import RunStore
from worker.checkpoint import model_from_refs
from worker.devices import resolve_device
from worker.sampler import STRATEGIES, EnsembleVelocity, SamplerError, as_time, guided, posterior


class EnsembleError(UsageError, RuntimeError):
    """The ensemble cannot be loaded or used; one line naming the file or argument."""


def load_member(store: RunStore, member: EnsembleMember, kind: str) -> torch.nn.Module:
    """A member's verified payloads through the real `from_pretrained` path, frozen for inference."""
    return model_from_refs(store, kind, member.weights, member.model_config_file).requires_grad_(False)


class Ensemble:
    """Experts (None where missing), router and the manifest they came from."""

    def __init__(self, manifest: EnsembleManifest, experts: Sequence[torch.nn.Module | None],
                 router: torch.nn.Module | None, store: RunStore | None = None) -> None:
        self.manifest, self.experts, self.router, self.store = manifest, list(experts), router, store
        self.present = torch.tensor([e is not None for e in self.experts])

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, uri_or_store: str | RunStore, storage: StorageConfig | None = None,
             device: str | torch.device = "auto", key: str = "ensemble.json") -> "Ensemble":
        """device: "auto" (CUDA when visible, else CPU), "cpu", "cuda" or a torch.device."""
        device = resolve_device(device) if isinstance(device, str) else device
        store = uri_or_store if isinstance(uri_or_store, RunStore) else RunStore(str(uri_or_store), storage)
        manifest = store.read_record(key, EnsembleManifest)
        if manifest is None:
            raise EnsembleError(f"{store.url}/{key}: not committed (has the gather stage run?)")
        experts: list[torch.nn.Module | None] = [None] * manifest.num_experts
        for member in manifest.experts:
            if not 0 <= member.expert < len(experts):
                raise EnsembleError(f"ensemble.json: expert {member.expert} is outside 0..{len(experts) - 1}")
            experts[member.expert] = load_member(store, member, "expert").to(device)
        router = load_member(store, manifest.router, "router").to(device) if manifest.router else None
        if router is None and len(manifest.experts) > 1:
            raise EnsembleError(f"{store.url}/{key}: {len(manifest.experts)} experts but no router")
        return cls(manifest, experts, router, store)

    def export(self, directory: str | Path) -> Path:
        """A self-contained folder (safetensors + JSON + ensemble.json) that `Ensemble.load` reads."""
        if self.store is None:
            raise EnsembleError("export: this ensemble was not loaded from a store")
        target = RunStore(str(directory))
        members = list(self.manifest.experts) + ([self.manifest.router] if self.manifest.router else [])
        for ref in [r for m in members for r in (m.weights, m.model_config_file)] + (
                [self.manifest.centroids] if self.manifest.centroids else []):
            target.put_payload(ref.path, self.store.get_payload(ref))  # verified read, same relative key
        target.commit("ensemble.json", self.manifest)  # last: the folder is complete once it exists
        return Path(target.url.removeprefix("file://"))

    # ---- properties -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(m for m in self.experts if m is not None).device

    @property
    def num_classes(self) -> int | None:
        model = next(m for m in self.experts if m is not None)
        return model.config.num_classes if model.config.conditioning == "class" else None

    @property
    def present_ids(self) -> list[int]:
        return [k for k, e in enumerate(self.experts) if e is not None]

    def classes_for(self, n: int, classes: int | Sequence[int] | Tensor | None) -> Tensor | None:
        """Class labels for n samples: cycled 0..C-1 by default so a grid shows every class."""
        C = self.num_classes
        if C is None:
            if classes is not None:
                raise SamplerError("classes: this run is not class-conditional")
            return None
        if classes is None:
            labels = torch.arange(n) % C
        elif isinstance(classes, int):
            labels = torch.full((n,), classes)
        else:
            labels = torch.as_tensor(classes).reshape(-1).long()
            labels = labels.repeat((n + len(labels) - 1) // len(labels))[:n]
        if ((labels < 0) | (labels >= C)).any():
            raise SamplerError(f"classes: label {int(labels[(labels < 0) | (labels >= C)][0])}: out of range [0, {C - 1}]")
        return labels.to(self.device)

    def text_for(self, n: int, text: Tensor) -> Tensor:
        """A prompt's token embeddings repeated for n samples; refused when the experts are not text models."""
        model = next(e for e in self.experts if e is not None)
        if model.config.conditioning != "text":
            raise SamplerError(f"text: this run is not text-conditional (conditioning = {model.config.conditioning})")
        text = text.float().to(self.device)
        return text.expand(n, *text.shape[-2:]).contiguous() if text.dim() == 2 or len(text) == 1 else text

    def oracle_prior(self, cond: Tensor | None, n: int, generator: torch.Generator) -> Tensor:
        """Draw each sample's cluster from p(k) (cluster sizes) or p(k | class) (class counts)."""
        K = self.manifest.num_experts
        counts = torch.zeros(n, K)
        for m in self.manifest.experts:
            if cond is None or cond.is_floating_point() or not m.class_counts:
                counts[:, m.expert] = float(m.rows or 1)
            else:
                per_class = torch.tensor([float(m.class_counts.get(c, 0)) for c in range(self.num_classes)])
                counts[:, m.expert] = per_class[cond.cpu()]
        counts[counts.sum(1) == 0] = torch.tensor([float(e is not None) for e in self.experts])
        return torch.multinomial(counts, 1, generator=generator).squeeze(1).to(self.device)

    def class_log_prior(self, cond: Tensor) -> Tensor | None:
        """log p(c | k) [B, K] from the clusters' class counts, for an unconditional router.

        Bayes: p(k | x_t, c) = p(k | x_t) p(c | x_t, k) / p(c | x_t). Approximating p(c | x_t, k) by
        p(c | k) is exact at t = 1 (x_1 is independent of (k, c)), where the unconditional router is
        blind, and keeps a class-c sample away from experts that never saw class c (add-one smoothed).
        """
        if cond.is_floating_point() or not any(m.class_counts for m in self.manifest.experts):
            return None
        C, K = self.num_classes, self.manifest.num_experts
        counts = torch.ones(K, C)
        for m in self.manifest.experts:
            for c, v in m.class_counts.items():
                counts[m.expert, int(c)] += v
        log_p = (counts / counts.sum(1, keepdim=True)).log()                 # [K, C]
        return log_p.T[cond.cpu()].to(self.device)                           # [B, K]

    # ---- inference --------------------------------------------------------------------------------
    def velocity_field(self, strategy: str = "top1", *, cond: Tensor | None = None, cfg_scale: float = 1.0,
                       top_k: int = 2, threshold: float = 0.1, nucleus_p: float = 0.9, fixed: Tensor | None = None,
                       generator: torch.Generator | None = None) -> EnsembleVelocity:
        experts = [None if e is None else guided(e, cfg_scale, e.null_class) for e in self.experts]
        router = None
        if self.router is not None:  # a class-conditional router sees the same labels (all rows)
            routed_cond = cond if self.router.config.conditioning != "none" else None
            prior = self.class_log_prior(cond) if routed_cond is None and cond is not None else None
            router = lambda x, t: self.router(x, t, routed_cond) + (0 if prior is None else prior)  # noqa: E731
        return EnsembleVelocity(experts, router, strategy, cond=cond, top_k=top_k, threshold=threshold,
                                nucleus_p=nucleus_p, fixed=fixed, generator=generator)

    @torch.no_grad()
    def router_posterior(self, x: Tensor, t: Tensor | float) -> Tensor:
        """p(k | x_t, t) [B, K], renormalised over the experts present."""
        return posterior(None if self.router is None else self.router, x, as_time(t, x), self.present)

    @torch.no_grad()
    def velocity(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None, strategy: str = "top1", *,
                 cfg_scale: float = 1.0, top_k: int = 2, threshold: float = 0.1, nucleus_p: float = 0.9,
                 oracle_cluster: Tensor | int | None = None, expert: int | None = None, seed: int = 0) -> Tensor:
        fixed = self._fixed(strategy, x.shape[0], cond, oracle_cluster, expert, torch.Generator().manual_seed(seed))
        field = self.velocity_field(strategy, cond=cond, cfg_scale=cfg_scale, top_k=top_k, threshold=threshold,
                                    nucleus_p=nucleus_p, fixed=fixed, generator=torch.Generator().manual_seed(seed))
        return field(x, t)

    def _fixed(self, strategy: str, n: int, cond: Tensor | None, oracle_cluster: Tensor | int | None,
               expert: int | None, generator: torch.Generator) -> Tensor | None:
        if strategy == "single":
            if expert is None:
                raise SamplerError("strategy single: give the expert (--expert K)")
            return torch.full((n,), int(expert), device=self.device)
        if strategy == "oracle":
            if oracle_cluster is None:
                return self.oracle_prior(cond, n, generator)
            return torch.as_tensor(oracle_cluster, device=self.device).reshape(-1).expand(n).long()
        return None

    @torch.no_grad()
    def sample(self, n: int, strategy: str = "top1", steps: int = 32, solver: str = "euler", cfg_scale: float = 1.0,
               classes: int | Sequence[int] | Tensor | None = None, seed: int = 0, top_k: int = 2,
               threshold: float = 0.1, nucleus_p: float = 0.9, oracle_cluster: Tensor | int | None = None,
               expert: int | None = None, text: Tensor | None = None) -> Tensor:
        """n latents [n, C, H, W] integrated from t = 1 (noise) to t = 0 with the chosen strategy.

        `text`: token embeddings [L, D] or [n, L, D] of a prompt, for text-conditional runs."""
        from worker.flow import sample as integrate

        if strategy not in STRATEGIES:
            raise SamplerError(f"strategy = {strategy!r}: unknown; choose one of {', '.join(STRATEGIES)}")
        if n < 1 or steps < 1:
            raise SamplerError(f"n = {n}, steps = {steps}: both must be >= 1")
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn([n, *self.manifest.latent_shape], generator=generator).to(self.device)
        cond = self.text_for(n, text) if text is not None else self.classes_for(n, classes)
        fixed = self._fixed(strategy, n, cond, oracle_cluster, expert, generator)
        field = self.velocity_field(strategy, cond=cond, cfg_scale=cfg_scale, top_k=top_k, threshold=threshold,
                                    nucleus_p=nucleus_p, fixed=fixed, generator=generator)
        return integrate(field, noise, steps=steps, solver=solver)

    def decode(self, latents: Tensor) -> Tensor:
        """Images in [0, 1] [n, C, H, W]: the VAE when the run used latents, else pixels in [-1, 1]."""
        settings = self.manifest.latents
        if settings.get("encoder", "identity") == "vae":
            from worker.encoders import decode_latents, load_vae

            if getattr(self, "_vae", None) is None:  # loaded once, from the local path / id in the config
                self._vae = load_vae(settings["model"], settings.get("subfolder"), self.device)
            return ((decode_latents(self._vae, latents) + 1) / 2).cpu()
        return ((latents.float().clamp(-1, 1) + 1) / 2).cpu()
