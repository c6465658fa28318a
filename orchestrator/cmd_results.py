"""`ddm sample`, `ddm eval`, `ddm report`, `ddm export`, `ddm distill`: what the user gets from a run.

All of them read the run store only (no Ray). Errors are one line; bad usage exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from common.config import RunConfig, format_validation_error
from common.manifests import RunRecord
from common.storage import RunStore
from orchestrator.cli import COMMANDS, UsageError

STRATEGY_CHOICES = ("top1", "topk", "full", "sample", "threshold", "nucleus", "oracle", "single")


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


def cmd_sample(args: argparse.Namespace) -> int:
    from worker.distill import load_student
    from worker.ensemble import Ensemble
    from worker.sampler import save_grid

    store, config = open_run(args.run)
    device = _device(args)
    s = config.sampling
    if args.student:
        ensemble = load_student(store, device=device)
        if ensemble is None:
            raise UsageError(f"{args.run}: no student/export.json (run `ddm distill {args.run}` first)")
    else:
        ensemble = Ensemble.load(store, device=device)
    text = None
    if args.prompt is not None:
        if config.model.conditioning != "text" or config.text.encoder == "none":
            raise UsageError(f"--prompt: {args.run} is not text-conditional (model.conditioning = "
                             f"{config.model.conditioning}); use --class for class-conditional runs")
        from worker.encoders import ClipText

        text = ClipText(config.text.model, config.text.max_length, device)([args.prompt])[1]  # [1, L, D]
    strategy = "top1" if args.student else (args.strategy or s.strategy)
    n = args.n or min(s.num_samples, 64)
    latents = ensemble.sample(n, strategy=strategy, steps=args.steps or s.steps, solver=args.solver or s.solver,
                              cfg_scale=s.cfg_scale if args.cfg is None else args.cfg, classes=args.klass, seed=args.seed,
                              top_k=s.top_k if args.k is None else args.k, threshold=s.threshold if args.threshold is None else args.threshold,
                              nucleus_p=s.nucleus_p if args.nucleus_p is None else args.nucleus_p, oracle_cluster=args.cluster, expert=args.expert,
                              text=text)
    classes = None if text is not None else ensemble.classes_for(n, args.klass)
    if text is not None:
        labels = [args.prompt[:12]] * n
    elif classes is not None:
        labels = [str(int(c)) for c in classes]
    else:  # unconditional: label each sample with the expert the router picks for the clean image
        labels = [f"k{int(k)}" for k in ensemble.router_posterior(latents, 0.0).argmax(1)]
    title = f"{'student' if args.student else strategy}  steps {args.steps or s.steps}  cfg {s.cfg_scale if args.cfg is None else args.cfg}"
    out = save_grid(ensemble, latents, args.out or f"samples-{'student' if args.student else strategy}.png",
                    labels=labels, title=title)
    print(out)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from worker.evaluate import evaluate, to_markdown

    store, config = open_run(args.run)
    strategies = [s.strip() for s in args.strategies.split(",")] if args.strategies else None
    log = (lambda m: print(m, file=sys.stderr)) if not args.json else (lambda m: None)
    results = evaluate(store, config, num_samples=args.n, strategies=strategies, seed=args.seed, log=log,
                       device=_device(args))
    print(json.dumps(results, indent=2) if args.json else to_markdown(results))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.report import write_report

    store, config = open_run(args.run)
    out = Path(args.out) if args.out else default_report_dir(store, config)
    print(write_report(store, config, out, run_eval=not args.no_eval, device=_device(args)))
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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample a labelled grid PNG from the gathered ensemble")
    p.add_argument("run", help="run store URI or path")
    p.add_argument("--n", type=_positive, help="number of samples (default: min(sampling.num_samples, 64))")
    p.add_argument("--strategy", choices=STRATEGY_CHOICES, help="inference strategy (default: sampling.strategy)")
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
    p.add_argument("--out", help="output PNG (default: samples-<strategy>.png)")
    _add_device(p)
    p.set_defaults(func=cmd_sample)

    e = sub.add_parser("eval", help="offline evaluation table (strategies, GFLOPs, dataset metrics)")
    e.add_argument("run")
    e.add_argument("--json", action="store_true")
    e.add_argument("--n", type=_positive, help="samples per strategy (default: eval.num_samples)")
    e.add_argument("--strategies", help="comma-separated (default: eval.strategies)")
    e.add_argument("--seed", type=int, default=0)
    _add_device(e)
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("report", help="static HTML report (one file + PNGs)")
    r.add_argument("run")
    r.add_argument("--out", help="output folder (default: <run>/report for local runs, else reports/<name>)")
    r.add_argument("--no-eval", action="store_true", help="do not run the evaluation when eval/results.json is absent")
    _add_device(r)
    r.set_defaults(func=cmd_report)

    x = sub.add_parser("export", help="write a self-contained ensemble folder (safetensors + JSON)")
    x.add_argument("run")
    x.add_argument("dir")
    x.set_defaults(func=cmd_export)

    d = sub.add_parser("distill", help="distil the ensemble into one dense student (paper §3.6)")
    d.add_argument("run")
    d.add_argument("--nimg", type=_positive, help="images the student sees (default: training.duration_nimg)")
    d.add_argument("--batch", type=_positive, help="images per step (default: training.global_batch)")
    d.add_argument("--lr", type=float)
    d.add_argument("--seed", type=int, default=0)
    _add_device(d)
    d.set_defaults(func=cmd_distill)


COMMANDS.append(register)
