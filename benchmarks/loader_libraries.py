"""Our streaming loader against mosaicml-streaming, litdata and webdataset on the same latents.

    python3 -m venv /tmp/loaderlibs && /tmp/loaderlibs/bin/pip install torch==2.13.0 numpy==2.4.6 \
        safetensors==0.8.0 pydantic==2.14.4 fsspec==2026.9.0 s3fs==2026.9.0 psutil==7.2.2 pyyaml==6.0.4 \
        mosaicml-streaming==0.10.0 litdata==0.2.76 webdataset==1.0.2
    PYTHONPATH=$PWD /tmp/loaderlibs/bin/python benchmarks/loader_libraries.py [--rows 100000] [--work /tmp/ddm-loaderlibs]

The dataset is an expert partition as cluster commits it: `--rows` rows of 4x8x8 bf16 latents and an
int64 label (the row id, so equal label sequences mean equal rows) in 4,096-row safetensors shards, written
with `RunStore.put_payload` and listed in `experts/00/manifest.json`. Each library converts it, read through
`read_tensors`, into its own format (MDSWriter, litdata.optimize, webdataset.ShardWriter; 4,096 rows per
shard or chunk, no compression): conversion seconds and the bytes of that second copy are reported.

Ours is read with the default window (`training.data_window_rows` = 65,536) and, as `ours-w16k`, 16,384.
Each loader reads a shuffled epoch (seed 0, batch 256, 0 workers: every loader's default) in its own
subprocess, `--repeats` times from a fresh loader, the fastest counting; "vs ours" is the ratio to ours in
the same run; img per CPU-s divides by the process's CPU time (less sensitive to other load on the box);
peak RSS is the subprocess's ru_maxrss after the epochs (in brackets: after the imports); load is the
1-minute load average over the epochs. Shuffles: mosaicml py1e and litdata's defaults; webdataset shard
shuffle + a 5,000-row buffer. Resume: a loader is run to batch N (`--resume-at`), its `state_dict()` taken
(ours: nimg = N x 256), a fresh loader built from it, and its next 20 batches' labels compared with
batches N..N+19 of the uninterrupted epoch. webdataset has no state: it is restarted with the same seeds
(and, as a second figure, re-read up to batch N). PyPI's torchvision, which `import streaming` imports,
needs a CUDA torch; when it fails to load, mosaicml-streaming runs with stand-ins for the two names it uses.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BATCH, SHARD_ROWS, SEED, COMPARE = 256, 4096, 0, 20
WINDOWS = {"ours": 65_536, "ours-w16k": 16_384}  # training.data_window_rows: the default, and a smaller one
LIBRARIES = {"mosaicml-streaming": "streaming", "litdata": "litdata", "webdataset": "webdataset"}  # dist: module
LOADERS = {**dict.fromkeys(WINDOWS), **LIBRARIES}
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def write_ours(run: Path, rows: int) -> None:
    """The partition as cluster commits an expert's shards (payloads first, then the manifest)."""
    import numpy as np
    import torch
    from safetensors.torch import save

    from common.manifests import ExpertManifest, ShardRef
    from common.storage import RunStore

    store, rng, shards = RunStore(str(run)), np.random.default_rng(0), []
    for i, a in enumerate(range(0, rows, SHARD_ROWS)):
        m = min(SHARD_ROWS, rows - a)
        lat = torch.from_numpy(rng.standard_normal((m, 4, 8, 8), dtype=np.float32)).to(torch.bfloat16)
        ref = store.put_payload(f"experts/00/data/{i:05d}.safetensors",
                                save({"latents": lat, "labels": torch.arange(a, a + m), "index": torch.arange(a, a + m)}))
        shards.append(ShardRef(**ref.model_dump(), rows=m))
    store.commit("experts/00/manifest.json", ExpertManifest(expert=0, num_experts=1, rows=rows, latent_shape=[4, 8, 8],
                                                            shards=shards))


def source_rows(run: Path, shard: int | None = None) -> Iterator[tuple[bytes, int]]:
    """The rows of one shard (default: all) as (bf16 latent bytes, label), read through the run store (sha256 checked)."""
    from common.storage import RunStore
    from worker.data import open_partition, read_tensors

    part = open_partition(RunStore(str(run)), "experts/00/manifest.json", "expert")
    for ref in part.shards if shard is None else [part.shards[shard]]:
        t = read_tensors(part.store, ref, ("latents", "labels"))
        raw = t["latents"].view(-1).view(__import__("torch").int16).numpy().tobytes()
        size = len(raw) // ref.rows
        for r, label in enumerate(t["labels"].tolist()):
            yield raw[r * size:(r + 1) * size], label


def collate(items: list) -> dict[str, Any]:
    """Per-sample (latent bytes, label) -> one step's tensors, as `step_batch` hands them to training."""
    import torch

    lat = [it["latents"] if isinstance(it, dict) else it[0] for it in items]
    lab = [it["label"] if isinstance(it, dict) else it[1] for it in items]
    x0 = torch.frombuffer(bytearray(b"".join(lat)), dtype=torch.bfloat16).view(len(items), 4, 8, 8).float()
    return {"x0": x0, "labels": torch.tensor([int(v) for v in lab], dtype=torch.long)}


def stub_torchvision() -> None:
    """streaming/__init__ imports streaming.vision, which imports torchvision; PyPI's torchvision needs CUDA
    torch. The vision datasets are not used here, so stand-ins for the two names it imports are enough."""
    from importlib.machinery import ModuleSpec

    import torch

    tv = types.ModuleType("torchvision")
    datasets, transforms, functional = (types.ModuleType(f"torchvision.{n}") for n in
                                        ("datasets", "transforms", "transforms.functional"))
    datasets.VisionDataset = torch.utils.data.Dataset  # type: ignore[attr-defined]
    functional.to_tensor = lambda x: x  # type: ignore[attr-defined]
    tv.datasets, tv.transforms, transforms.functional = datasets, transforms, functional  # type: ignore[attr-defined]
    for mod in (tv, datasets, transforms, functional):
        mod.__spec__ = ModuleSpec(mod.__name__, None)
        sys.modules[mod.__name__] = mod


# ---- per library: convert(run, out) writes its copy; *_loader(out, state) builds a loader, resumed from state ----

def convert_mosaic(run: Path, out: Path) -> None:
    from streaming import MDSWriter

    with MDSWriter(out=str(out), columns={"latents": "bytes", "label": "int64"}, size_limit=SHARD_ROWS * 530) as w:
        for lat, label in source_rows(run):
            w.write({"latents": lat, "label": label})


def convert_litdata(run: Path, out: Path) -> None:
    import litdata

    n = len(json.loads((run / "experts/00/manifest.json").read_text())["shards"])
    litdata.optimize(fn=partial(litdata_rows, run), inputs=list(range(n)), output_dir=str(out), chunk_size=SHARD_ROWS,
                     verbose=False)


def litdata_rows(run: Path, shard: int) -> Iterator[dict[str, Any]]:
    for lat, label in source_rows(run, shard):
        yield {"latents": lat, "label": label}


def convert_wds(run: Path, out: Path) -> None:
    import webdataset as wds

    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=SHARD_ROWS, verbose=0) as w:
        for lat, label in source_rows(run):
            w.write({"__key__": f"{label:09d}", "lat.bin": lat, "label.cls": label})


def mosaic_loader(out: Path, state: dict | None) -> Any:
    from streaming import StreamingDataLoader, StreamingDataset

    ds = StreamingDataset(local=str(out), shuffle=True, shuffle_seed=SEED, batch_size=BATCH)
    loader = StreamingDataLoader(ds, batch_size=BATCH, num_workers=0, collate_fn=collate, drop_last=True)
    if state is not None:
        loader.load_state_dict(state)
    return loader


def litdata_loader(out: Path, state: dict | None) -> Any:
    import litdata

    ds = litdata.StreamingDataset(str(out), shuffle=True, seed=SEED, drop_last=True)
    loader = litdata.StreamingDataLoader(ds, batch_size=BATCH, num_workers=0, collate_fn=collate, drop_last=True)
    if state is not None:
        loader.load_state_dict(state)
    return loader


def wds_loader(out: Path, state: dict | None) -> Any:
    import webdataset as wds

    urls = sorted(str(p) for p in out.glob("*.tar"))
    ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=SEED, empty_check=False).shuffle(5000, seed=SEED)
          .to_tuple("lat.bin", "label.cls").batched(BATCH, collation_fn=collate, partial=False))
    return wds.WebLoader(ds, batch_size=None, num_workers=0)


def ours_loader(run: Path, rows: int, start_nimg: int, window: int) -> Iterator[Any]:
    import torch

    from common.storage import RunStore
    from worker.data import open_partition

    part = open_partition(RunStore(str(run)), "experts/00/manifest.json", "expert", window_rows=window)
    end = rows - rows % BATCH
    return part.stream(start_nimg, end, BATCH, torch.arange(BATCH), torch.device("cpu"), seed=SEED)


def child(name: str, phase: str, run: Path, out: Path, rows: int, resume_at: int, repeats: int) -> dict[str, Any]:
    """One loader's convert or read phase; returns the figures as a dict (printed as JSON)."""
    if phase == "convert":
        if name == "ours":
            shutil.rmtree(run, ignore_errors=True)
            t0 = time.perf_counter()
            write_ours(run, rows)
            return {"convert_s": time.perf_counter() - t0,
                    "bytes": sum(f.stat().st_size for f in (run / "experts").rglob("*") if f.is_file())}
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        {"mosaicml-streaming": convert_mosaic, "litdata": convert_litdata, "webdataset": convert_wds}[name](run, out)
        return {"convert_s": time.perf_counter() - t0, "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
                "files": sum(1 for _ in out.rglob("*"))}

    factory: Callable[[dict | None], Any] = {"mosaicml-streaming": lambda s: mosaic_loader(out, s),
                                             "litdata": lambda s: litdata_loader(out, s),
                                             "webdataset": lambda s: wds_loader(out, s)}.get(name, lambda s: None)

    def batches(state: Any) -> Iterator[Any]:
        return ours_loader(run, rows, state or 0, WINDOWS[name]) if name in WINDOWS else iter(factory(state))

    import worker.data  # noqa: F401 - imports first, so the RSS after them is the baseline
    if LOADERS[name]:
        __import__(LOADERS[name])
    base_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load, epoch_s, cpu_s = [os.getloadavg()[0]], [], []
    for _ in range(repeats):  # the uninterrupted epoch, from a fresh loader each time; the fastest counts
        t0, c0, n, labels = time.perf_counter(), time.process_time(), 0, []
        for b in batches(None):
            n += 1
            if resume_at <= n - 1 < resume_at + COMPARE:
                labels.append(b["labels"].tolist())
        epoch_s.append(time.perf_counter() - t0)
        cpu_s.append(time.process_time() - c0)
        load.append(os.getloadavg()[0])
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result: dict[str, Any] = {"batches": n, "img_s": n * BATCH / min(epoch_s), "img_cpu_s": n * BATCH / min(cpu_s),
                              "epoch_s": epoch_s, "cpu_s": cpu_s, "rss_mib": rss_mib, "import_mib": base_mib, "load": load}

    # resume: run to batch N, take the state, rebuild from it
    if name in WINDOWS:
        state: Any = resume_at * BATCH
    elif name == "webdataset":
        state = None  # no state to take: a restart with the same seeds
    else:
        loader = factory(None)
        it = iter(loader)
        for _ in range(resume_at):
            next(it)
        state = loader.state_dict()
        del it, loader
    it = batches(state)
    got = [next(it)["labels"].tolist() for _ in range(COMPARE)]
    result["resume"] = "exact" if got == labels else "different"
    if got != labels:
        result["resume_note"] = f"first labels after resuming {got[0][:4]}, uninterrupted {labels[0][:4]}"
    if name == "webdataset":  # re-read and skip N batches with the same seeds
        it = batches(None)
        t0 = time.perf_counter()
        for _ in range(resume_at):
            next(it)
        skip_s = time.perf_counter() - t0
        got = [next(it)["labels"].tolist() for _ in range(COMPARE)]
        result["skip"] = f"{'exact' if got == labels else 'different'} after re-reading {resume_at} batches ({skip_s:.1f} s)"
    return result


def run_child(args: argparse.Namespace, name: str, phase: str, stub: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", name, "--phase", phase, "--rows", str(args.rows), "--work", str(args.work),
           "--resume-at", str(args.resume_at), "--repeats", str(args.repeats)] + (["--stub-torchvision"] if stub else [])
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit " + str(proc.returncode)])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def probe(module: str, stub: bool = False) -> tuple[str | None, str]:
    """(version or None, the import error's last line), in a fresh interpreter."""
    pre = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
           "from loader_libraries import stub_torchvision; stub_torchvision(); ") if stub else ""
    code = pre + f"import importlib.metadata as m, {module}; print(m.version({next(d for d, m in LIBRARIES.items() if m == module)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    return (proc.stdout.strip(), "") if proc.returncode == 0 else (None, proc.stderr.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ddm-loaderlibs"))
    parser.add_argument("--resume-at", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2, help="epochs timed per loader (the fastest counts)")
    parser.add_argument("--child"), parser.add_argument("--phase")
    parser.add_argument("--stub-torchvision", action="store_true")
    args = parser.parse_args()
    run = args.work / "run"
    if args.child:
        if args.stub_torchvision:
            stub_torchvision()
        import torch
        torch.set_num_threads(1)
        out = args.work / args.child
        print(json.dumps(child(args.child, args.phase, run, out, args.rows, args.resume_at, args.repeats)))
        return

    import torch
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} CPUs, {args.rows:,} rows")
    rows: dict[str, dict[str, Any]] = {}
    for name, module in LOADERS.items():
        stub = False
        if module is not None:
            version, error = probe(module)
            if version is None and "torchvision" in error:
                print(f"{name}: import fails ({error}); retried with a torchvision stand-in (vision datasets unused)")
                stub = True
                version, error = probe(module, stub=True)
            if version is None:
                print(f"{name}: not importable, skipped ({error})")
                continue
            print(f"{name} {version}")
        conv = {k: rows["ours"][k] for k in ("convert_s", "bytes")} if name == "ours-w16k" else run_child(args, name, "convert", stub)
        read = run_child(args, name, "read", stub) if "error" not in conv else {}
        rows[name] = {**conv, **read}
        print(f"  {name}: {json.dumps(rows[name])}")

    base = rows.get("ours", {}).get("img_s")
    print(f"\n| loader | convert s (ours: write) | extra bytes on disk | img/s, 0 workers | vs ours | img per CPU-s | "
          f"peak RSS MiB (after imports) | resume at batch {args.resume_at} | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | | | | |")
            continue
        extra = f"0 (the partition: {r['bytes'] / 1e6:.1f} MB)" if name in WINDOWS else f"{r['bytes'] / 1e6:.1f} MB"
        resume = r["resume"] + (f"; skip: {r['skip']}" if "skip" in r else "")
        ratio = f"{r['img_s'] / base:.3f}x" if base else "-"
        print(f"| {name} | {r['convert_s']:.1f} | {extra} | {r['img_s']:,.0f} | {ratio} | {r['img_cpu_s']:,.0f} | "
              f"{r['rss_mib']:.0f} ({r['import_mib']:.0f}) | {resume} | {min(r['load']):.1f}-{max(r['load']):.1f} |")


if __name__ == "__main__":
    main()
