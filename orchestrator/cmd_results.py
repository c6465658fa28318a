"""`ddm sample`, `ddm eval`, `ddm report`, `ddm export`, `ddm distill`: what the user gets from a run.

All of them read the run store only (no Ray). Errors are one line; bad usage exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from common.config import STRATEGIES, RunConfig, format_validation_error
from common.manifests import RunRecord
from common.storage import RunStore
from orchestrator.cli import COMMANDS, UsageError

MAX_GRID_SAMPLES = 4096  # `ddm sample` writes one grid PNG; larger sets belong to `ddm eval`


def open_run(uri: str) -> tuple[RunStore, RunConfig]:
    """The run store and its resolved config (run.json); a path that is not a run is bad usage."""
    store = RunStore(uri)
    try:
        record = store.read_record("run.json", RunRecord)
    except Exception as exc:  # noqa: BLE001 - any storage failure is reported as one line
        raise UsageError(f"{uri}: cannot read run.json ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if record is None:
        raise UsageError(f"{uri}: no run.json (not a DDM run store)")
    try:
        config = RunConfig.model_validate(record.config)
    except ValidationError as err:
        raise UsageError(f"{uri}: run.json does not fit this code version: {format_validation_error(err)}") from None
    return RunStore(uri, config.storage), config


def _trust_hint(fn):
    """A model outside the run is refused by the library naming its parameter; here, name the flag too."""
    def run(args: argparse.Namespace) -> int:
        from worker.ensemble import ExternalModelError

        try:
            return fn(args)
        except ExternalModelError as exc:
            raise UsageError(f"{exc} (--trust-remote-paths)") from None
    return run


@_trust_hint
def cmd_sample(args: argparse.Namespace) -> int:
    from worker.distill import load_student
    from worker.ensemble import Ensemble
    from worker.sampler import save_grid

    store, config = open_run(args.run)
    flags = {"strategy": "top1" if args.student else args.strategy, "steps": args.steps, "solver": args.solver,
             "cfg_scale": args.cfg, "top_k": args.k, "threshold": args.threshold, "nucleus_p": args.nucleus_p}
    s = sampling_with(config.sampling, {k: v for k, v in flags.items() if v is not None})  # before any loading
    trust, device = args.trust_remote_paths, _device(args)
    if args.student:
        ensemble = load_student(store, allow_external_models=trust, device=device)
        if ensemble is None:
            raise UsageError(f"{args.run}: no student/export.json (run `ddm distill {args.run}` first)")
    else:
        ensemble = Ensemble.load(store, device=device, allow_external_models=trust)
    text = None
    if args.prompt is not None:
        if config.model.conditioning != "text" or config.text.encoder == "none":
            raise UsageError(f"--prompt: {args.run} is not text-conditional (model.conditioning = "
                             f"{config.model.conditioning}); use --class for class-conditional runs")
        from worker.encoders import ClipText
        from worker.ensemble import model_location

        where = model_location(store, config.text.model, "text.model", trust)
        text = ClipText(where, config.text.max_length, device)([args.prompt])[1]  # [1, L, D]
    n = args.n or min(s.num_samples, 64)
    latents = ensemble.sample(n, s, classes=args.klass, seed=args.seed, oracle_cluster=args.cluster,
                              expert=args.expert, text=text, size=latent_size(args.size, ensemble, config))
    classes = None if text is not None else ensemble.classes_for(n, args.klass)
    if text is not None:
        labels = [args.prompt[:12]] * n
    elif classes is not None:
        labels = [str(int(c)) for c in classes]
    else:  # unconditional: label each sample with the expert the router picks for the clean image
        labels = [f"k{int(k)}" for k in ensemble.router_posterior(latents, 0.0).argmax(1)]
    name = "student" if args.student else s.strategy
    out = save_grid(ensemble, latents, args.out or f"samples-{name}.png", labels=labels,
                    title=f"{name}  steps {s.steps}  cfg {s.cfg_scale}")
    print(out)
    return 0


def latent_size(size: tuple[int, int] | None, ensemble, config: RunConfig) -> tuple[int, int] | None:
    """--size W x H in pixels -> latent (height, width); each side must be a multiple of the pixels per latent cell
    (the VAE factor, 1 for pixel-space runs) times the models' patch size."""
    if size is None:
        return None
    from worker.ensemble import pixel_factor

    width, height = size
    factor = ensemble.manifest.latents.get("pixel_factor") or pixel_factor(config.data.image_size,
                                                                           ensemble.manifest.latent_shape)
    step = factor * ensemble.patch_size
    if width % step or height % step:
        raise UsageError(f"--size {width}x{height}: each side must be a multiple of {step} = {factor} pixels per "
                         f"latent cell (the VAE factor) x patch size {ensemble.patch_size}")
    return height // factor, width // factor


def _named_run(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not name or not url:
        raise UsageError(f"--compare {text!r}: expected NAME=RUN (a run store path or URL)")
    return name, url


@_trust_hint
def cmd_eval(args: argparse.Namespace) -> int:
    from worker.evaluate import evaluate, to_markdown

    store, config = open_run(args.run)
    strategies = [s.strip() for s in args.strategies.split(",")] if args.strategies else None
    log = (lambda m: print(m, file=sys.stderr)) if not args.json else (lambda m: None)
    results = evaluate(store, config, num_samples=args.n, strategies=strategies, seed=args.seed, seeds=args.seeds, log=log,
                       inception=args.inception, allow_external_models=args.trust_remote_paths, device=_device(args),
                       compare={name: open_run(url)[0] for name, url in map(_named_run, args.compare or [])})
    if "shapes" in results:
        from worker.eval_buckets import to_markdown as buckets_markdown

        print(json.dumps(results, indent=2) if args.json else buckets_markdown(results))
        return 0
    print(json.dumps(results, indent=2) if args.json else to_markdown(results))
    return 0


@_trust_hint
def cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.report import write_report

    store, config = open_run(args.run)
    out = Path(args.out) if args.out else default_report_dir(store, config)
    print(write_report(store, config, out, run_eval=not args.no_eval, allow_external_models=args.trust_remote_paths,
                       device=_device(args), full=args.full))
    return 0


def default_report_dir(store: RunStore, config: RunConfig) -> Path:
    if store.protocol == "file":
        return Path(store.url.removeprefix("file://")) / "report"
    return Path("reports") / config.name


def cmd_export(args: argparse.Namespace) -> int:
    from worker.ensemble import Ensemble

    store, _ = open_run(args.run)
    target = Path(args.dir)
    if target.exists() and any(target.iterdir()):
        raise UsageError(f"{args.dir}: exists and is not empty")
    print(Ensemble.load(store).export(target))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from worker.distill import DistillConfig, distill

    store, config = open_run(args.run)
    dc = DistillConfig(duration_nimg=args.nimg, batch=args.batch, lr=args.lr, seed=args.seed)
    record = distill(config, store, dc, log=lambda m: print(m, file=sys.stderr), device=_device(args))
    print(f"student: {record.nimg} images, exported to {store.url}/student/export.json")
    return 0


FLAG_OF = {"strategy": "--strategy", "steps": "--steps", "solver": "--solver", "cfg_scale": "--cfg",
           "top_k": "--k", "threshold": "--threshold", "nucleus_p": "--nucleus-p"}


def sampling_with(base, flags: dict):
    """The run's SamplingConfig with the given flags applied, validated by the config's rules; a bad value
    is a usage error naming the flag (e.g. `--cfg nan`)."""
    from worker.sampler import SamplerError, settings

    try:
        return settings(type(base), base, flags)
    except SamplerError as exc:
        name = str(exc).split(" ", 1)[0]
        raise UsageError(f"{FLAG_OF.get(name, name)}{str(exc)[len(name):]}") from None


def _device(args: argparse.Namespace):
    """--device as a torch.device; cuda where none is visible is bad usage, named with the node."""
    from worker.devices import DeviceError, resolve_device

    try:
        return resolve_device(args.device)
    except DeviceError as exc:
        raise UsageError(str(exc)) from None


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the models run (default auto: CUDA when visible, else CPU)")


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be >= 1")
    return n


def add_trust_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-remote-paths", action="store_true",
                        help="let the run load models (VAE, text encoder) from paths or Hub ids outside its own "
                             "folder, as its run.json / ensemble.json name them; only for runs you trust")


def _image_size(value: str) -> tuple[int, int]:
    """'320x192' -> (320, 192): width x height in pixels."""
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{value!r} is not WIDTHxHEIGHT in pixels (e.g. 320x192)")
    width, height = (int(p) for p in parts)
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: width and height must be >= 1")
    return width, height


def _grid_size(value: str) -> int:
    n = _positive(value)
    if n > MAX_GRID_SAMPLES:
        raise argparse.ArgumentTypeError(f"{n} is more than {MAX_GRID_SAMPLES} samples for one grid (use ddm eval)")
    return n


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample a labelled grid PNG from the gathered ensemble")
    p.add_argument("run", help="run store URI or path")
    p.add_argument("--n", type=_grid_size, help=f"number of samples, at most {MAX_GRID_SAMPLES} "
                   "(default: min(sampling.num_samples, 64))")
    p.add_argument("--strategy", choices=STRATEGIES, help="inference strategy (default: sampling.strategy)")
    p.add_argument("--k", type=_positive, help="experts kept by topk")
    p.add_argument("--threshold", type=float, help="posterior threshold for the threshold strategy")
    p.add_argument("--nucleus-p", type=float, help="mass kept by the nucleus strategy")
    p.add_argument("--steps", type=_positive)
    p.add_argument("--solver", choices=("euler", "heun"))
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale, applied per expert")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class", dest="klass", type=int, help="class label (class-conditional runs)")
    p.add_argument("--prompt", help="text prompt (text-conditional runs)")
    p.add_argument("--cluster", type=int, help="oracle strategy: the cluster to sample (default: drawn from the prior)")
    p.add_argument("--expert", type=int, help="single strategy: the expert to use")
    p.add_argument("--student", action="store_true", help="sample the distilled dense student instead")
    p.add_argument("--size", type=_image_size, metavar="WxH", help="image size in pixels, e.g. 320x192; each side a "
                   "multiple of the VAE factor x patch size (default: the run's data.image_size square)")
    p.add_argument("--out", help="output PNG (default: samples-<strategy>.png)")
    add_trust_arg(p)
    _add_device(p)
    p.set_defaults(func=cmd_sample)

    e = sub.add_parser("eval", help="offline evaluation table (strategies, GFLOPs, dataset metrics)")
    e.add_argument("run")
    e.add_argument("--json", action="store_true")
    e.add_argument("--n", type=_positive, help="samples per strategy (default: eval.num_samples)")
    e.add_argument("--strategies", help="comma-separated (default: eval.strategies)")
    e.add_argument("--seed", type=int, default=0, help="first sampling seed")
    e.add_argument("--seeds", type=_positive, help="sampling seeds per strategy, for the 95%% intervals (default: eval.seeds)")
    e.add_argument("--compare", action="append", metavar="NAME=RUN", help="bucketed runs: also sample run RUN at "
                   "this run's bucket shapes, judged by the same classifier (e.g. square-only=runs/shapes-square)")
    e.add_argument("--inception", metavar="PATH", help="FID Inception-v3 weights, a state dict (.pth) loaded "
                   "tensors-only (default: $DDM_INCEPTION_WEIGHTS; never downloaded)")
    add_trust_arg(e)
    _add_device(e)
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("report", help="static HTML report (one file + PNGs)")
    r.add_argument("run")
    r.add_argument("--out", help="output folder (default: <run>/report for local runs, else reports/<name>)")
    r.add_argument("--no-eval", action="store_true", help="do not run the evaluation when eval/results.json is absent")
    add_trust_arg(r)
    _add_device(r)
    r.add_argument("--full", action="store_true",
                   help="evaluate with eval.num_samples per strategy (default: a quick 128, progress on stderr)")
    r.set_defaults(func=cmd_report)

    x = sub.add_parser("export", help="write a self-contained ensemble folder (safetensors + JSON)")
    x.add_argument("run")
    x.add_argument("dir")
    x.set_defaults(func=cmd_export)

    d = sub.add_parser("distill", help="distil the ensemble into one dense student (paper §3.6)")
    d.add_argument("run")
    d.add_argument("--nimg", type=_positive, help="images the student sees (default: one expert's images)")
    d.add_argument("--batch", type=_positive, help="images per step (default: training.global_batch)")
    d.add_argument("--lr", type=float)
    d.add_argument("--seed", type=int, default=0)
    _add_device(d)
    d.set_defaults(func=cmd_distill)


COMMANDS.append(register)
