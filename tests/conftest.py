"""Shared fixtures: one local Ray per test session, a real S3 endpoint (moto over HTTP), run stores."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid

import pytest

# Tests must never reach a hub; every model they use is built and saved locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

S3_KEY_ID = "ddmtestkeyid"
S3_SECRET = "ddm-test-secret-" + uuid.uuid4().hex  # grepped for in stored files and logs


RAY_FIXTURES = {"ray_session", "ray_head"}


def pytest_collection_modifyitems(config, items):
    """Markers stay honest: a test that starts or joins Ray through a fixture must be marked `ray`, so
    `-m "not ray"` really runs without Ray."""
    unmarked = [item.nodeid for item in items
                if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("ray") is None]
    if unmarked:
        raise pytest.UsageError(f"tests use Ray without @pytest.mark.ray: {unmarked}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's ThreadedMotoServer on 127.0.0.1, reached over HTTP by s3fs (no in-process patching)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID=S3_KEY_ID, AWS_SECRET_ACCESS_KEY=S3_SECRET,
                      AWS_ENDPOINT_URL=url, AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="ddm-test")
    yield url
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(params=["file", "memory", "s3"])
def store_url(request, tmp_path) -> str:
    """A fresh run root on each backend."""
    if request.param == "file":
        return str(tmp_path / "run")
    if request.param == "memory":
        return f"memory://ddm-{uuid.uuid4().hex[:8]}"
    request.getfixturevalue("s3_endpoint")
    return f"s3://ddm-test/run-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session, with two simulated islands' resources."""
    import ray

    temp = f"/tmp/ddmt{os.getpid()}"  # short: Unix socket paths are capped near 107 bytes
    ray.init(num_cpus=2, resources={"island-a": 4.0, "island-b": 4.0}, include_dashboard=False,
             object_store_memory=150 * 2**20, _temp_dir=temp, log_to_driver=False,
             _system_config={"metrics_report_interval_ms": 1000},
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()
    if os.environ.get("CI"):  # on a CI machine nothing else runs Ray: sweep up any stray process
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """DINOv2, AutoencoderKL (scale 0.5, shift 0.1) and CLIP text + tokenizer, built from configs."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import BitImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, Dinov2Config, Dinov2Model

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(root / "dino")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.5,
                  shift_factor=0.1).save_pretrained(root / "sd" / "vae")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(letters)})
    vocab.update({c + "</w>": i + 2 + len(letters) for i, c in enumerate(letters)})
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(root / "clip")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(root / "clip")
    return root
