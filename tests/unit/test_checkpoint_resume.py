"""Resume restores the optimizer's state, never its construction options (fused/foreach, lr, betas, decay)."""

from __future__ import annotations

import copy

import pytest
import torch

from common.storage import RunStore
from worker.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

torch.set_num_threads(1)


def _trained_optimizer(**options) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), **options)
    for _ in range(3):
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_resume_keeps_the_optimizer_construction_options(tmp_path):
    """A checkpoint written by a CPU run (foreach AdamW, old lr/betas/decay) restores only the moments and
    step counts; the optimizer built by the resuming process keeps fused, lr, betas and weight_decay."""
    store = RunStore(str(tmp_path / "run"))
    model, opt = _trained_optimizer(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, foreach=True)
    save_checkpoint(store, "experts/00", "expert-00", 15, 3, model, copy.deepcopy(model), opt, keep=1)

    resumed = copy.deepcopy(model)
    new = torch.optim.AdamW(resumed.parameters(), lr=2e-4, betas=(0.8, 0.95), weight_decay=0.1, fused=True)
    nimg, step = load_checkpoint(store, latest_checkpoint(store, "experts/00"), resumed, copy.deepcopy(model), new)
    assert (nimg, step) == (15, 3)
    group = new.param_groups[0]
    assert group["fused"] is True and not group["foreach"]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (2e-4, (0.8, 0.95), 0.1)
    for p_old, p_new in zip(model.parameters(), resumed.parameters()):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p_old][name].float(), new.state[p_new][name].float()), name
    resumed(torch.randn(5, 4)).square().sum().backward()
    new.step()  # the fused kernel accepts the restored state


def test_resume_into_a_different_parameter_layout_is_a_one_line_error(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    model, opt = _trained_optimizer(lr=1e-3)
    save_checkpoint(store, "router", "router", 15, 3, model, copy.deepcopy(model), opt, keep=1)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    groups = torch.optim.AdamW([{"params": list(other.parameters())[:2]}, {"params": list(other.parameters())[2:]}])
    with pytest.raises(ValueError, match=r"optimizer.safetensors: optimizer has parameter groups of sizes \[4\]"):
        load_checkpoint(store, latest_checkpoint(store, "router"), other, copy.deepcopy(other), groups)
