"""`ddm eval` on a bucketed run (data.buckets): class accuracy at each bucket's shape.

One tensor cannot hold rows of several shapes, so the single-shape metrics of worker/evaluate.py do not
apply. Instead a small convolutional classifier that ends in global average pooling (so it takes any
height and width) is trained on the run's training rows of every bucket, one bucket per batch, and its
accuracy on the held-out rows of each bucket is the reference: what real images of that shape score.
Each model then samples class-conditionally at each bucket's shape, and the classifier judges whether
the sample shows the class that was asked for. Mean and 95% interval over sampling seeds, chance = 1 / C.

`others` are further runs sampled at the same shapes and judged by the same classifier: a square-only
run (buckets off) on the same source shows what training on centre-cropped squares costs at non-square
shapes.

Each shape also gets a floor, fixed before any model is sampled: midway between chance and the classifier's
accuracy on the real held-out rows of that shape. A model is `above` it when its whole 95% interval over
seeds and the Wilson interval of its samples pooled are above, `below` when both are below, and
`straddles` otherwise (no claim either way).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from common.config import RunConfig
from common.manifests import DatasetManifest, ShardRef
from common.storage import RunStore, sha256_bytes
from worker.ensemble import Ensemble, pixel_factor
from worker.evalmath import mean_interval, wilson_interval

Shape = tuple[int, int]  # (width, height) in pixels, as data.buckets names a bucket


class GridClassifier(nn.Module):
    """Four 3x3 convolutions (two of stride 2) and a global average pool: one set of weights for every image shape."""

    def __init__(self, channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
                                  nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
                                  nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.head(self.body(pixels.float().clamp(-1, 1)).mean((2, 3)))


def rows_by_bucket(store: RunStore, refs: list[ShardRef], ds: DatasetManifest | None = None
                   ) -> dict[Shape, tuple[Tensor, Tensor]]:
    """(latents, labels) per bucket; with `ds`, only training rows (held-out ones dropped)."""
    from worker.evaluate import _load_rows

    out: dict[Shape, tuple[Tensor, Tensor]] = {}
    for bucket in sorted({tuple(r.bucket) for r in refs if r.bucket is not None}):
        split = _load_rows(store, [r for r in refs if r.bucket is not None and tuple(r.bucket) == bucket], ds)
        out[bucket] = (split.latents, split.labels)  # type: ignore[index]
    return out


def train_grid_classifier(train: dict[Shape, tuple[Tensor, Tensor]], num_classes: int, seed: int,
                          steps: int = 600, batch: int = 64) -> GridClassifier:
    """Adam on pixels in [-1, 1]; each step draws one bucket (in proportion to its rows), then a batch of it.
    Mild noise on the inputs: samples are never exact images."""
    g = torch.Generator().manual_seed(seed)
    shapes = list(train)
    sizes = torch.tensor([len(train[s][1]) for s in shapes], dtype=torch.float64)
    torch.manual_seed(seed)
    model = GridClassifier(next(iter(train.values()))[0].shape[1], num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.enable_grad():
        for _ in range(steps):
            x, y = train[shapes[int(torch.multinomial(sizes, 1, generator=g))]]
            pick = torch.randint(len(y), (min(batch, len(y)),), generator=g)
            noisy = x[pick] + 0.05 * torch.randn(x[pick].shape, generator=g)
            loss = nn.functional.cross_entropy(model(noisy), y[pick])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval().requires_grad_(False)


def shape_classifier(store: RunStore, dataset: DatasetManifest, train: dict[Shape, tuple[Tensor, Tensor]],
                     held: dict[Shape, tuple[Tensor, Tensor]], num_classes: int, seed: int,
                     log: Callable[[str], None]) -> GridClassifier:
    """Trained once per prepared dataset and seed, cached in the store (eval/shape_classifier.json)."""
    from worker.evaluate import ClassifierRecord, _data_sha

    model, data_sha = GridClassifier(next(iter(train.values()))[0].shape[1], num_classes), _data_sha(dataset)
    record = store.read_record("eval/shape_classifier.json", ClassifierRecord)
    if record is not None and record.data_sha == data_sha and record.seed == seed:
        model.load_state_dict(st_load(store.get_payload(record.weights)))
        return model.eval().requires_grad_(False)
    log(f"buckets: training the shape classifier on {sum(len(y) for _, y in train.values()):,} rows of "
        f"{len(train)} shapes")
    model = train_grid_classifier(train, num_classes, seed)
    data = st_save({k: v.contiguous() for k, v in model.state_dict().items()})
    ref = store.put_payload(f"eval/shape_classifier/{sha256_bytes(data)[:16]}.safetensors", data)
    pooled = sum(accuracy(model, x, y) * len(y) for x, y in held.values()) / sum(len(y) for _, y in held.values())
    store.commit("eval/shape_classifier.json", ClassifierRecord(weights=ref, heldout_accuracy=pooled, seed=seed,
                                                                data_sha=data_sha))
    return model


def accuracy(model: GridClassifier, pixels: Tensor, labels: Tensor) -> float:
    with torch.no_grad():
        return float((model(pixels).argmax(-1) == labels).float().mean())


def floor_verdict(model_row: dict[str, Any], floor: float) -> str:
    """'above' / 'below' when the model's whole 95% interval over seeds, and the pooled binomial interval
    where recorded, are on that side of the floor, else 'straddles'. One seed gives no interval over seeds,
    so no claim however tight its pooled interval; the pooled interval keeps a verdict honest when every
    seed scores the same (a t-interval of 0)."""
    mean, half = model_row["class_acc"], model_row["class_acc_ci95"]
    if half is None:
        return "straddles"
    low, high = model_row.get("pooled_wilson95") or (mean - half, mean + half)
    lowest, highest = min(mean - half, low), max(mean + half, high)
    return "above" if lowest > floor else "below" if highest < floor else "straddles"


def evaluate_buckets(store: RunStore, config: RunConfig, dataset: DatasetManifest, ensemble: Ensemble, n: int,
                     seeds: list[int], others: dict[str, Ensemble] | None = None,
                     log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Per bucket shape: the classifier's accuracy on real held-out rows, and each model's class accuracy on
    its class-conditional samples at that shape (the run's sampling settings, classes cycled 0..C-1)."""
    from worker.evaluate import EvalError

    held_refs = [ShardRef(**r) for r in (dataset.extra.get("holdout") or {}).get("shards", [])]
    if not held_refs:
        raise EvalError("ddm eval: a bucketed run is judged against its held-out rows; this run was prepared with "
                        "data.holdout_fraction = 0")
    if ensemble.num_classes is None:
        raise EvalError("ddm eval: a bucketed run is judged by class accuracy per shape; this run is not "
                        "class-conditional (model.conditioning = class)")
    to_pixels = lambda latents: ensemble.decode(latents) * 2 - 1  # noqa: E731 - pixels in [-1, 1]
    train = {s: (to_pixels(x), y) for s, (x, y) in rows_by_bucket(store, dataset.shards, dataset).items()}
    held = {s: (to_pixels(x), y) for s, (x, y) in rows_by_bucket(store, held_refs).items()}
    classifier = shape_classifier(store, dataset, train, held, ensemble.num_classes, seeds[0], log)
    factor = ensemble.manifest.latents.get("pixel_factor") or pixel_factor(config.data.image_size,
                                                                           ensemble.manifest.latent_shape)
    models = {"this run": ensemble, **(others or {})}
    classes = ensemble.classes_for(n, None)
    chance = 1 / ensemble.num_classes
    rows = []
    for (width, height), (x_held, y_held) in held.items():
        real = accuracy(classifier, x_held, y_held)
        floor = chance + (real - chance) / 2  # fixed here, before any sample exists
        row: dict[str, Any] = {"bucket": f"{width}x{height}", "heldout_rows": len(y_held),
                               "train_rows": len(train.get((width, height), (None, []))[1]),
                               "real_heldout_acc": round(real, 4), "floor": round(floor, 4), "models": {}}
        for name, model in models.items():
            log(f"buckets: sampling {n} x {len(seeds)} seeds at {width}x{height} with {name}")
            per_seed = [accuracy(classifier, model.decode(model.sample(n, config.sampling, classes=classes, seed=s,
                                                                       size=(height // factor, width // factor))) * 2 - 1,
                                 classes) for s in seeds]
            iv = mean_interval(per_seed)
            correct = sum(round(acc * len(classes)) for acc in per_seed)
            cell = {"class_acc": round(iv["mean"], 4),
                    "class_acc_ci95": None if iv["ci95"] is None else round(iv["ci95"], 4),
                    "per_seed": [round(v, 4) for v in per_seed],
                    "pooled_wilson95": [round(b, 4) for b in wilson_interval(correct, len(classes) * len(seeds))]}
            row["models"][name] = {**cell, "floor_verdict": floor_verdict(cell, floor)}
        rows.append(row)
    return {"run": store.url, "source": dataset.source, "num_samples": n, "seeds": seeds,
            "sampling": config.sampling.model_dump(mode="json"), "chance_class_acc": round(chance, 4),
            "reference": "real held-out rows of each bucket under the same classifier (trained on the run's "
                         "training rows of every bucket)",
            "floor": "per shape, midway between chance and the classifier on that shape's real held-out rows; "
                     "a model is above / below it when its whole 95% interval over seeds and the Wilson interval of "
                     "its samples pooled are", "shapes": rows}


def accuracy_cell(model_row: dict[str, Any]) -> str:
    """'mean ± half-width', or the mean alone when one seed gave no interval; the pooled binomial interval
    where recorded (the verdict needs both); then the floor verdict, if any."""
    iv, verdict, pooled = model_row["class_acc_ci95"], model_row.get("floor_verdict"), model_row.get("pooled_wilson95")
    return (f"{model_row['class_acc']:.3f}" + ("" if iv is None else f" ± {iv:.3f}")
            + (f", pooled [{pooled[0]:.3f}, {pooled[1]:.3f}]" if pooled else "")
            + ("" if verdict is None else f" ({verdict})"))


def to_markdown(results: dict[str, Any]) -> str:
    names = list(results["shapes"][0]["models"]) if results["shapes"] else []
    lines = [f"Class accuracy per bucket shape ({results['num_samples']} samples x {len(results['seeds'])} seeds, "
             f"mean ± 95% interval; chance {results['chance_class_acc']:.3g}). Reference: {results['reference']}. "
             f"Floor: {results['floor']}.", "",
             "| shape (WxH px) | held-out rows | real held-out | floor | " + " | ".join(names) + " |",
             "|" + "---|" * (4 + len(names))]
    for r in results["shapes"]:
        cells = [accuracy_cell(m) for m in r["models"].values()]
        lines.append(f"| {r['bucket']} | {r['heldout_rows']} | {r['real_heldout_acc']:.3f} | {r['floor']:.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
