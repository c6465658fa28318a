"""The gathered ensemble: K experts + router, loadable anywhere (no Ray) from a run store or a folder.

`Ensemble.load(uri)` reads `ensemble.json`, verifies every payload's sha256 and builds the models
through their real `from_pretrained` path. `export(dir)` writes the same payloads under the same
relative keys plus its own `ensemble.json`, so a folder loads exactly like a run store.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.config import ModelLimits, SamplingConfig, StorageConfig
from common.errors import UsageError
from common.manifests import EnsembleManifest, EnsembleMember
from common.storage import RunStore
from worker.checkpoint import model_from_refs
from worker.devices import resolve_device
from worker.sampler import EnsembleVelocity, SamplerError, as_time, guided, posterior, settings

# `sample` integrates at most SAMPLE_CHUNK trajectories at once (the solver's working memory: CFG doubles
# the batch, attention is per row) and returns at most MAX_SAMPLE_BYTES of latents in one call.
SAMPLE_CHUNK = 256
MAX_SAMPLE_BYTES = 2 << 30


class EnsembleError(UsageError, RuntimeError):
    """The ensemble cannot be loaded or used; one line naming the file or argument."""


class ExternalModelError(EnsembleError):
    """A run names a model outside its own folder and the caller did not allow that."""


def _local_root(store: RunStore) -> Path | None:
    return Path(store.url.removeprefix("file://")).resolve() if store.protocol == "file" else None


def model_location(store: RunStore, name: str | None, field: str, allow_external: bool = False,
                   subfolder: str | None = None) -> str:
    """Where to load a model that a run names (its VAE, its text encoder) from.

    A run store or an export folder is untrusted input: by default a model must be a folder inside it
    (a relative path, symlinks resolved). Any other local path or Hub id is loaded only when the caller
    passes allow_external (the user's explicit trust in this run)."""
    if not name:
        raise EnsembleError(f"{field}: not set, so there is no model to load")
    if allow_external:
        return name
    root = _local_root(store)
    if root is not None and "://" not in name and not Path(name).is_absolute():
        inside = (root / name / (subfolder or "")).resolve()
        if inside.is_relative_to(root) and inside.is_dir():
            return str((root / name).resolve())
    raise ExternalModelError(f"{field} = {name!r}{f' (subfolder {subfolder!r})' if subfolder else ''} is not a "
                             f"folder inside {store.url}; loading it needs allow_external_models=True")


def load_member(store: RunStore, member: EnsembleMember, kind: str, allow_external: bool = False) -> torch.nn.Module:
    """A member's verified payloads through the real `from_pretrained` path, frozen for inference.

    Its sizes are bounded before allocation (worker/models/dit.py check_dims); a size outside those
    limits, or a payload file that resolves outside the store's folder, is one EnsembleError."""
    root = _local_root(store)
    for ref in (member.weights, member.model_config_file):
        if root is not None and not allow_external and not (root / ref.path).resolve().is_relative_to(root):
            raise ExternalModelError(f"{ref.path}: resolves outside {store.url} (a symlink?); loading it needs "
                                     f"allow_external_models=True")
    try:
        return model_from_refs(store, kind, member.weights, member.model_config_file).requires_grad_(False)
    except (ValueError, TypeError) as exc:  # check_dims and the model's own checks: one line naming the file
        raise EnsembleError(f"{member.model_config_file.path}: {str(exc).splitlines()[0][:300]}") from None


def check_manifest_sizes(manifest: EnsembleManifest, key: str) -> None:
    """ensemble.json sizes used to allocate (the expert table, the noise) are bounded before use."""
    if not 1 <= manifest.num_experts <= ModelLimits.num_experts:
        raise EnsembleError(f"{key}: num_experts = {manifest.num_experts} is outside [1, {ModelLimits.num_experts}]")
    shape = manifest.latent_shape
    limits = (ModelLimits.in_channels, ModelLimits.input_side, ModelLimits.input_side)
    if len(shape) != 3 or not all(1 <= d <= lim for d, lim in zip(shape, limits)):
        raise EnsembleError(f"{key}: latent_shape = {shape} is not [channels, height, width] within "
                            f"[{', '.join(f'1..{lim}' for lim in limits)}]")


def pixel_factor(image_size: int, latent_shape: Sequence[int]) -> int:
    """Pixels per latent cell along a side: 1 for identity latents (pixels), the VAE's downsampling (8 for the
    SD VAEs) otherwise; read off the run's square image size and the latent shape it was encoded to."""
    side = latent_shape[-2]
    if side < 1 or image_size % side:
        raise EnsembleError(f"latent_shape = {list(latent_shape)} does not divide data.image_size = {image_size}")
    return image_size // side


class Ensemble:
    """Experts (None where missing), router and the manifest they came from."""

    def __init__(self, manifest: EnsembleManifest, experts: Sequence[torch.nn.Module | None],
                 router: torch.nn.Module | None, store: RunStore | None = None,
                 allow_external_models: bool = False) -> None:
        self.manifest, self.experts, self.router, self.store = manifest, list(experts), router, store
        self.allow_external_models = allow_external_models
        self.present = torch.tensor([e is not None for e in self.experts])

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, uri_or_store: str | RunStore, storage: StorageConfig | None = None,
             device: str | torch.device = "auto", key: str = "ensemble.json",
             allow_external_models: bool = False) -> Ensemble:
        """Experts and router from `key` in a run store or an exported folder, on `device` ("auto": CUDA
        when visible, else CPU; "cpu", "cuda" or a torch.device).

        Every model comes from inside that store unless `allow_external_models` (the VAE that decodes
        latents is named in ensemble.json and is then loaded from wherever it says)."""
        device = resolve_device(device) if isinstance(device, str) else device
        store = uri_or_store if isinstance(uri_or_store, RunStore) else RunStore(str(uri_or_store), storage)
        manifest = store.read_record(key, EnsembleManifest)
        if manifest is None:
            raise EnsembleError(f"{store.url}/{key}: not committed (has the gather stage run?)")
        check_manifest_sizes(manifest, key)
        experts: list[torch.nn.Module | None] = [None] * manifest.num_experts
        for member in manifest.experts:
            if not 0 <= member.expert < len(experts):
                raise EnsembleError(f"ensemble.json: expert {member.expert} is outside 0..{len(experts) - 1}")
            experts[member.expert] = load_member(store, member, "expert", allow_external_models).to(device)
        router = (load_member(store, manifest.router, "router", allow_external_models).to(device)
                  if manifest.router else None)
        if router is None and len(manifest.experts) > 1:
            raise EnsembleError(f"{store.url}/{key}: {len(manifest.experts)} experts but no router")
        return cls(manifest, experts, router, store, allow_external_models)

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
    def patch_size(self) -> int:
        """The patch every latent side must be a multiple of: the members' patch sizes' least common multiple."""
        members = [m for m in [*self.experts, self.router] if m is not None]
        return math.lcm(*(int(m.config.patch_size) for m in members))

    def latent_shape_at(self, size: tuple[int, int] | None) -> list[int]:
        """[C, H, W] of samples at latent `size` = (height, width); None = the size the run was trained at.
        A size that the models cannot patch or that is outside ModelLimits is one SamplerError naming `size`."""
        C, H, W = self.manifest.latent_shape
        if size is None:
            return [C, H, W]
        if (len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in size)):
            raise SamplerError(f"size = {size!r}: must be (height, width) in latent cells")
        p, (h, w) = self.patch_size, size
        if not (1 <= h <= ModelLimits.input_side and 1 <= w <= ModelLimits.input_side):
            raise SamplerError(f"size = {h}x{w} (height x width): each side must be in [1, {ModelLimits.input_side}]")
        if h % p or w % p:
            raise SamplerError(f"size = {h}x{w} (height x width): each side must be a multiple of the patch size {p}")
        if (h // p) * (w // p) > ModelLimits.tokens:
            raise SamplerError(f"size = {h}x{w}: {(h // p) * (w // p):,} tokens; at most {ModelLimits.tokens:,}")
        return [C, h, w]

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
        # A view, not a copy: n copies of one prompt are materialised a chunk at a time by `sample`.
        return text.expand(n, *text.shape[-2:]) if text.dim() == 2 or len(text) == 1 else text

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
    def velocity_field(self, sampling: SamplingConfig | str | None = None, *, cond: Tensor | None = None,
                       fixed: Tensor | None = None, generator: torch.Generator | None = None,
                       **overrides: Any) -> EnsembleVelocity:
        """The guided ensemble velocity of `sampling` (a SamplingConfig or a strategy name; keyword overrides
        such as cfg_scale=2.0 are validated like the config)."""
        s = settings(SamplingConfig, sampling, overrides)
        experts = [None if e is None else guided(e, s.cfg_scale, e.null_class) for e in self.experts]
        router = None
        if self.router is not None:  # a class-conditional router sees the same labels (all rows)
            routed_cond = cond if self.router.config.conditioning != "none" else None
            prior = self.class_log_prior(cond) if routed_cond is None and cond is not None else None
            router = lambda x, t: self.router(x, t, routed_cond) + (0 if prior is None else prior)  # noqa: E731
        return EnsembleVelocity(experts, router, s.routing, cond=cond, fixed=fixed, generator=generator)

    @torch.no_grad()
    def router_posterior(self, x: Tensor, t: Tensor | float) -> Tensor:
        """p(k | x_t, t) [B, K], renormalised over the experts present."""
        return posterior(None if self.router is None else self.router, x, as_time(t, x), self.present)

    @torch.no_grad()
    def velocity(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None,
                 sampling: SamplingConfig | str | None = None, *, oracle_cluster: Tensor | int | None = None,
                 expert: int | None = None, seed: int = 0, **overrides: Any) -> Tensor:
        s = settings(SamplingConfig, sampling, overrides)
        fixed = self._fixed(s.strategy, x.shape[0], cond, oracle_cluster, expert, torch.Generator().manual_seed(seed))
        return self.velocity_field(s, cond=cond, fixed=fixed, generator=torch.Generator().manual_seed(seed))(x, t)

    def _fixed(self, strategy: str, n: int, cond: Tensor | None, oracle_cluster: Tensor | int | None,
               expert: int | None, generator: torch.Generator) -> Tensor | None:
        if strategy == "single":
            if expert is None:
                raise SamplerError("strategy single: give the expert index (expert=K)")
            return torch.full((n,), int(expert), device=self.device)
        if strategy == "oracle":
            if oracle_cluster is None:
                return self.oracle_prior(cond, n, generator)
            return torch.as_tensor(oracle_cluster, device=self.device).reshape(-1).expand(n).long()
        return None

    @torch.no_grad()
    def sample(self, n: int, sampling: SamplingConfig | str | None = None, *,
               classes: int | Sequence[int] | Tensor | None = None, seed: int = 0,
               oracle_cluster: Tensor | int | None = None, expert: int | None = None, text: Tensor | None = None,
               chunk: int = SAMPLE_CHUNK, size: tuple[int, int] | None = None, **overrides: Any) -> Tensor:
        """n latents [n, C, H, W] integrated from t = 1 (noise) to t = 0.

        `size`: latent (height, width), each a multiple of the patch size (an image of W x H pixels is
        (H // f, W // f) with f = `pixel_factor`); None = the latent shape the run was trained at.
        `sampling`: a SamplingConfig (e.g. the run's `config.sampling`) or a strategy name; keyword overrides
        (strategy, steps, solver, cfg_scale, top_k, threshold, nucleus_p) are validated like the config, so
        `sample(16, strategy="top1", cfg_scale=2.0)` works. Trajectories run `chunk` at a time.
        `text`: token embeddings [L, D] or [n, L, D] of a prompt, for text-conditional runs."""
        from worker.flow import sample as integrate

        s = settings(SamplingConfig, sampling, overrides)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SamplerError(f"n = {n!r}: must be an integer >= 1")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise SamplerError(f"chunk = {chunk!r}: must be an integer >= 1")
        shape = self.latent_shape_at(size)
        row_bytes = 4 * math.prod(shape)
        if n * row_bytes > MAX_SAMPLE_BYTES:
            raise SamplerError(f"n = {n:,}: {n * row_bytes / 2**30:.1f} GiB of latents; at most "
                               f"{MAX_SAMPLE_BYTES // row_bytes:,} samples per call")
        generator = torch.Generator().manual_seed(seed)
        latents = torch.randn([n, *shape], generator=generator).to(self.device)
        cond = self.text_for(n, text) if text is not None else self.classes_for(n, classes)
        fixed = self._fixed(s.strategy, n, cond, oracle_cluster, expert, generator)
        for start in range(0, n, chunk):  # each chunk is integrated in place of its noise
            rows = slice(start, min(start + chunk, n))
            field = self.velocity_field(s, cond=None if cond is None else cond[rows].contiguous(),
                                        fixed=None if fixed is None else fixed[rows], generator=generator)
            latents[rows] = integrate(field, latents[rows], steps=s.steps, solver=s.solver)
        return latents

    def decode(self, latents: Tensor) -> Tensor:
        """Images in [0, 1] [n, C, H, W]: the VAE when the run used latents, else pixels in [-1, 1]."""
        settings = self.manifest.latents
        if settings.get("encoder", "identity") == "vae":
            from worker.encoders import decode_latents, load_vae

            if getattr(self, "_vae", None) is None:  # loaded once, from inside the store unless allowed
                if self.store is None:
                    raise EnsembleError("decode: this ensemble was not loaded from a store, so its VAE is unknown")
                where = model_location(self.store, settings.get("model"), "ensemble.json latents.model",
                                       self.allow_external_models, settings.get("subfolder"))
                self._vae = load_vae(where, settings.get("subfolder"), self.device)
            return ((decode_latents(self._vae, latents) + 1) / 2).cpu()
        return ((latents.float().clamp(-1, 1) + 1) / 2).cpu()
