"""The compact DiT and the router: shapes, adaLN-Zero init, conditioning, save/load through from_pretrained."""

from __future__ import annotations

import pytest
import torch

from common.config import ModelConfig
from worker.models.dit import DIT_SIZES, DiT, build_dit, dit_forward_flops
from worker.models.router import Router, build_router

torch.set_num_threads(1)


def test_shapes_zero_init_and_conditioning():
    torch.manual_seed(0)
    model = build_dit(ModelConfig(size="tiny", patch_size=2, conditioning="class"), [1, 8, 8], 10, None)
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    assert torch.equal(model(x, t, torch.tensor([0, 1, 2, 10])), torch.zeros(4, 1, 8, 8))  # zero final layer
    torch.nn.init.normal_(model.final.linear.weight, std=0.1)
    torch.nn.init.normal_(model.final.adaLN[-1].weight, std=0.1)
    for block in model.trunk.blocks:  # open the adaLN-Zero gates so the condition reaches the output
        torch.nn.init.normal_(block.adaLN[-1].weight, std=0.1)
    a, b = model(x, t, torch.tensor([1, 1, 1, 1])), model(x, t, torch.tensor([2, 2, 2, 2]))
    assert a.shape == (4, 1, 8, 8) and not torch.allclose(a, b)
    assert torch.equal(model(x, t, None), model(x, t, torch.full((4,), 10)))  # None = the null class
    assert len(model.trunk.blocks) == DIT_SIZES["tiny"]["depth"]
    assert not hasattr(model.trunk.blocks[0], "t_embed")  # one shared embedder, not one per block


def test_text_conditioning_joint_tokens():
    model = build_dit(ModelConfig(size="tiny", patch_size=4, conditioning="text"), [3, 16, 16], None, 24)
    out = model(torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 7, 24))
    assert out.shape == (2, 3, 16, 16)


def test_save_pretrained_roundtrip(tmp_path):
    torch.manual_seed(1)
    model = build_dit(ModelConfig(size="tiny", patch_size=1, conditioning="none", width=32, heads=2), [1, 2, 2], None, None)
    for p in model.parameters():
        p.data.normal_()
    model.save_pretrained(tmp_path / "dit")
    assert (tmp_path / "dit" / "diffusion_pytorch_model.safetensors").exists()
    loaded = DiT.from_pretrained(tmp_path / "dit", low_cpu_mem_usage=False)
    x, t = torch.randn(3, 1, 2, 2), torch.rand(3)
    assert torch.equal(model(x, t), loaded(x, t))

    router = build_router(ModelConfig(size="tiny", patch_size=2, conditioning="none"), [1, 8, 8], 4, None, None)
    router.save_pretrained(tmp_path / "router")
    logits = Router.from_pretrained(tmp_path / "router", low_cpu_mem_usage=False)(torch.randn(5, 1, 8, 8), torch.rand(5))
    assert logits.shape == (5, 4) and torch.equal(logits, torch.zeros(5, 4))  # zero head: uniform 1/K at init


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="model.patch_size = 3 does not divide the input size 8x8"):
        build_dit(ModelConfig(patch_size=3), [1, 8, 8], 10, None)
    with pytest.raises(ValueError, match="Input should be 'tiny', 'S', 'B', 'L' or 'XL'"):  # refused by the config
        ModelConfig(size="XXL")
    with pytest.raises(ValueError, match="needs num_classes"):
        build_dit(ModelConfig(conditioning="class"), [1, 8, 8], None, None)


def test_flops_match_the_dit_paper():
    # docs/design.md §10: training FLOPs per 256px image, DiT-B/2 139 G, DiT-XL/2 716 G (3x forward).
    xl = 3 * dit_forward_flops(1152, 28, (32, 32), 2, 4) / 1e9
    b = 3 * dit_forward_flops(768, 12, (32, 32), 2, 4) / 1e9
    assert abs(xl - 716) / 716 < 0.02 and abs(b - 139) / 139 < 0.02
