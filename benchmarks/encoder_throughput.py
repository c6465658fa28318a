"""Throughput of prepare's encoders through their real classes (`worker.encoders.Dinov2Features`,
`VaeLatents`), on randomly initialised models of the presets' shapes saved to a temp dir (no downloads):
DINOv2-L/14 with its processor settings (shortest edge 256, centre crop 224, ImageNet mean/std) and the
SD VAE (sd-vae-ft-mse's architecture), on 256x256 RGB batches in [-1, 1].

Reports img/s of the tensor preprocessing alone, of DINOv2 features (preprocessing + bf16 forward on CUDA),
of the VAE encoder in fp32 (TF32 on CUDA) and bf16, and of the Hugging Face PIL processor on one CPU core
(what preprocessing cost before it moved to the device).

    python benchmarks/encoder_throughput.py [--device cuda|cpu] [--size large|tiny] [--batch 128] [--iters 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # DINOv2 (hidden, layers, heads), VAE block_out_channels
    "large": (dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096), (128, 256, 512, 512)),
    "tiny": (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128), (8, 16, 16, 16)),
}


def _timed(fn, x: torch.Tensor, iters: int) -> float:
    fn(x)  # warm up (allocation, cuDNN algorithm choice)
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return iters * x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=list(SHAPES), default="large")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--pil-images", type=int, default=32, help="images through the HF PIL processor (1 core)")
    args = p.parse_args()
    from diffusers import AutoencoderKL
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from worker.encoders import Dinov2Features, VaeLatents

    device = torch.device(args.device)
    dino_dims, vae_blocks = SHAPES[args.size]
    base = {"bench": "encoder_throughput", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "size": args.size, "batch": args.batch, "image": [3, 256, 256], "torch": torch.__version__}
    x = torch.rand(args.batch, 3, 256, 256, device=device) * 2 - 1
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        Dinov2Model(Dinov2Config(patch_size=14, image_size=518, **dino_dims)).save_pretrained(Path(tmp) / "dino")
        processor = BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3)
        processor.save_pretrained(Path(tmp) / "dino")
        dino = Dinov2Features(str(Path(tmp) / "dino"), device)
        rows = {"dinov2_preprocess_img_per_s": _timed(dino.preprocess, x, args.iters),
                "dinov2_features_img_per_s": _timed(dino, x, args.iters)}
        del dino
        AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_blocks,
                      down_block_types=("DownEncoderBlock2D",) * len(vae_blocks),
                      up_block_types=("UpDecoderBlock2D",) * len(vae_blocks), layers_per_block=2,
                      norm_num_groups=min(32, vae_blocks[0]), sample_size=256).save_pretrained(Path(tmp) / "vae")
        vae_batch = x[: max(1, args.batch // 4)]  # the VAE's activations at 256^2 are large; preset batch_size 128
        for dtype in ("fp32", "bf16"):
            vae = VaeLatents(str(Path(tmp) / "vae"), None, device, dtype)
            rows[f"vae_encode_{dtype}_img_per_s"] = _timed(vae.encode, vae_batch, max(1, args.iters // 2))
            del vae
    torch.set_num_threads(1)
    images = list(((x[: args.pil_images].float().cpu() + 1) / 2).clamp(0, 1))
    start = time.perf_counter()
    processor(images=images, return_tensors="pt", do_rescale=False)
    rows["hf_pil_processor_img_per_s_1core"] = len(images) / (time.perf_counter() - start)
    print(json.dumps({**base, **{k: round(v, 1) for k, v in rows.items()}}), flush=True)


if __name__ == "__main__":
    main()
