"""topology.precision: names checked, TF32 flags set, bf16 autocast only on CUDA."""

from __future__ import annotations

import pytest
import torch

from alpagym_ray.precision import PRECISIONS, autocast, check_precision, maybe_compile, set_matmul_precision


def test_unknown_precision_names_the_valid_ones():
    assert [check_precision(p) for p in PRECISIONS] == list(PRECISIONS)
    with pytest.raises(ValueError, match=r"topology.precision 'fp16' unknown; valid: \['fp32', 'tf32', 'bf16'\]"):
        check_precision("fp16")
    with pytest.raises(ValueError, match="unknown"), autocast("half", "cpu"):
        pass


def test_matmul_precision_flags():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        set_matmul_precision("tf32")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_matmul_precision("bf16")
        assert torch.backends.cuda.matmul.allow_tf32
        set_matmul_precision("fp32")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_bf16_is_float32_on_cpu():
    a = torch.randn(4, 4)
    with autocast("bf16", torch.device("cpu")):
        assert (a @ a).dtype == torch.float32
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocasts_on_cuda():
    a = torch.randn(4, 4, device="cuda")
    with autocast("bf16", "cuda"):
        assert (a @ a).dtype == torch.bfloat16
    assert (a @ a).dtype == torch.float32


def test_maybe_compile_calls_the_policys_compile_only_when_on():
    calls = []

    class Policy(torch.nn.Module):
        def compile(self, *args, **kwargs):
            calls.append(args)

    p = Policy()
    assert maybe_compile(p, False) is p and calls == []
    assert maybe_compile(p, True) is p and calls == [()]
    with pytest.raises(ValueError, match="topology.compile must be true or false, got 'yes'"):
        maybe_compile(p, "yes")
