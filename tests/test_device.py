import pytest
import torch

from skcdf import device as devices
from skcdf.nn.vnet import ConvStack


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    flags = "flags\t\t: fpu sse2 avx2 avx512f"
    plain, bf16, amx = (tmp_path / name for name in ("plain", "bf16", "amx"))
    plain.write_text(flags + "\n")
    bf16.write_text(flags + " avx512_bf16 avx512_vnni\n")
    amx.write_text(flags + " amx_bf16 amx_tile\n")
    assert [devices.cpu_has_native_bf16(p) for p in (plain, bf16, amx)] == [False, True, True]
    assert devices.cpu_has_native_bf16(tmp_path / "missing") is False  # not Linux: fp32
    assert devices.amp_dtype(torch.device("cpu")) == torch.bfloat16


def _weight_gradient(stack: ConvStack, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    stack.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = stack(x)
    out.float().square().mean().backward()
    return stack[0].weight.grad.clone()


@pytest.mark.parametrize("shape", [(2, 2, 2), (2, 4, 4), (4, 4, 4)])
def test_bf16_conv_gradients_are_right_at_every_depth(shape):
    # oneDNN's bf16 weight gradient of a 3x3x3 conv over a depth of 2 is garbage; the stack computes it in fp32
    torch.manual_seed(0)
    stack = ConvStack(2, 32, 32)
    x = torch.randn(4, 32, *shape).bfloat16().float()  # exact in bf16: the two runs see the same input
    exact = _weight_gradient(stack, x, bf16=False)
    for _ in range(3):  # the broken kernel is also nondeterministic: one good draw proves little
        mixed = _weight_gradient(stack, x, bf16=True)
        assert torch.isfinite(mixed).all()
        assert (mixed - exact).norm() <= 0.05 * exact.norm()  # bf16's rounding, not garbage (1e30 and NaN)


def test_the_fp32_fallback_is_inert_without_autocast():
    torch.manual_seed(0)
    stack = ConvStack(1, 4, 4)
    x = torch.randn(1, 4, 2, 4, 4)
    assert torch.equal(stack(x), torch.nn.Sequential(*stack)(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert stack(x).dtype == torch.float32  # depth 2: computed in fp32
        assert stack(torch.randn(1, 4, 4, 4, 4)).dtype == torch.bfloat16
