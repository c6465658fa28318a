"""The DiT and the router at any token grid: positions follow the input, exports keep their native outputs."""

from __future__ import annotations

import pytest
import torch

from common.config import ConfigError, ModelConfig
from common.storage import RunStore
from worker.checkpoint import load_export, save_export
from worker.flow import interpolate
from worker.models.dit import build_dit, sincos_pos_embed_2d
from worker.models.router import build_router

torch.set_num_threads(1)


def _opened(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere (zero-init gates and heads would hide the positions from the output)."""
    torch.manual_seed(3)
    for p in model.parameters():
        p.data.normal_(std=0.2)
    return model.eval()


def test_export_keeps_native_outputs_and_runs_at_a_non_square_grid(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    dit = _opened(build_dit(ModelConfig(size="tiny", patch_size=2, conditioning="class"), [3, 8, 8], 5, None))
    router = _opened(build_router(ModelConfig(size="tiny", patch_size=2, conditioning="none"), [3, 8, 8], 3, None, None))
    save_export(store, "experts/expert-00", "expert-00", "expert", 10, dit)
    save_export(store, "router", "router", "router", 10, router)
    dit2, _ = load_export(store, "experts/expert-00")
    router2, _ = load_export(store, "router")

    x, t, y = torch.randn(4, 3, 8, 8), torch.rand(4), torch.tensor([0, 1, 4, 5])
    with torch.no_grad():
        assert torch.equal(dit(x, t, y), dit2(x, t, y))                  # native 8x8: bit-identical after the export
        assert torch.equal(router(x, t), router2(x, t))
        # the native grid's positions are exactly the fixed sin-cos table the model was trained with
        assert torch.equal(dit2.trunk.positions(4, 4), sincos_pos_embed_2d(dit2.config.width, 4, 4)[None])

        wide = torch.randn(2, 3, 8, 16)                                  # 4 x 8 tokens, patch 2
        out, logits = dit2(wide, t[:2], y[:2]), router2(wide, t[:2])
        tall = dit2(wide.transpose(-1, -2).contiguous(), t[:2], y[:2])
    assert out.shape == (2, 3, 8, 16) and tall.shape == (2, 3, 16, 8) and logits.shape == (2, 3)
    assert torch.isfinite(out).all() and torch.isfinite(tall).all() and torch.isfinite(logits).all()
    pos_wide, pos_tall = dit2.trunk.positions(4, 8), dit2.trunk.positions(8, 4)
    assert pos_wide.shape == pos_tall.shape == (1, 32, dit2.config.width)
    assert not torch.equal(pos_wide, pos_tall)                            # rows and columns are told apart
    # absolute positions: the 4 x 4 grid is the left half of the 4 x 8 one, token for token
    left = pos_wide.view(4, 8, -1)[:, :4].reshape(1, 16, -1)
    assert torch.equal(left, dit2.trunk.positions(4, 4))


def test_one_model_trains_at_two_grids_and_caches_per_device_dtype():
    model = build_dit(ModelConfig(size="tiny", patch_size=2, conditioning="none"), [1, 8, 8], None, None)
    torch.nn.init.normal_(model.final.linear.weight, std=0.1)
    for shape in ((8, 8), (8, 16), (16, 8)):
        x0, eps, t = torch.randn(2, 1, *shape), torch.randn(2, 1, *shape), torch.rand(2)
        loss = (model(interpolate(x0, eps, t), t) - (eps - x0)).square().mean()
        model.zero_grad()
        loss.backward()
        assert torch.isfinite(loss) and model.final.linear.weight.grad.abs().sum() > 0
    assert {k[:2] for k in model.trunk._pos_cache} == {(4, 4), (4, 8), (8, 4)}
    model.double()  # positions follow the weights like a buffer would, cached again for the new dtype
    assert model.trunk.positions(4, 8).dtype == torch.float64
    assert torch.equal(model.trunk.positions(4, 8).float(), sincos_pos_embed_2d(model.config.width, 4, 8)[None])


def test_an_input_that_does_not_patch_is_one_line_naming_patch_size():
    model = build_dit(ModelConfig(size="tiny", patch_size=2, conditioning="none"), [1, 8, 8], None, None)
    with pytest.raises(ConfigError, match=r"^input 8x7: not a multiple of model.patch_size = 2 on each side$"):
        model(torch.randn(1, 1, 8, 7), torch.rand(1))
