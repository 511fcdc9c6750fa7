"""The triton backend's RMSNorm and fused QK-norm + RoPE against the reference `RMSNorm` and `QKVRope`.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1 before triton is imported).
"""

from __future__ import annotations

import pytest  # noqa: E402
import torch

pytest.importorskip("triton")

from moeserve.kernels.reference import QKVRope, RMSNorm  # noqa: E402
from moeserve.kernels.rope import Rope  # noqa: E402
from moeserve.kernels.triton.norm import TritonQKV, TritonRMSNorm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class TorchLinear:
    """A plain `x @ W.T` Linear, float32 out (any backend's Linear would do)."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w, self.out_features, self.in_features = w, *w.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.w.T


@pytest.mark.parametrize("H", [64, 48, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_matches_reference(H, dtype):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(7, H, generator=g)).to(DEVICE, dtype)
    w = torch.randn(H, generator=g).to(DEVICE)
    got = TritonRMSNorm(w, 1e-6)(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, RMSNorm(w, 1e-6)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("H", [64, 1000])
def test_add_norm_is_the_sum_then_the_norm(H):
    """The fused residual add + RMSNorm: the same float32 sum as `x + delta` (bitwise) and its norm."""
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(5, H, generator=g)).to(DEVICE)
    delta = torch.randn(5, H, generator=g).to(DEVICE)
    w = torch.randn(H, generator=g).to(DEVICE)
    s, h = TritonRMSNorm(w, 1e-6).add_norm(x, delta)
    ref_s, ref_h = RMSNorm(w, 1e-6).add_norm(x, delta)
    assert torch.equal(s, ref_s) and torch.equal(ref_s, x + delta)
    torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-5)
    s0, h0 = TritonRMSNorm(w, 1e-6).add_norm(x, None)  # the first block: nothing pending
    assert s0 is x
    torch.testing.assert_close(h0, RMSNorm(w, 1e-6)(x), rtol=1e-5, atol=1e-5)


def test_rms_norm_of_a_strided_view_and_no_rows():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 96, generator=g).to(DEVICE)[:, :32]
    w = torch.randn(32, generator=g).to(DEVICE)
    torch.testing.assert_close(TritonRMSNorm(w, 1e-5)(x), RMSNorm(w, 1e-5)(x), rtol=1e-5, atol=1e-5)
    assert TritonRMSNorm(w, 1e-5)(x[:0]).shape == (0, 32)


HEADS = [(4, 2, 16), (6, 1, 64), (3, 3, 24), (40, 8, 64)]  # (q heads, kv heads, head_dim); the last takes 2 programs


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "interleaved"])
@pytest.mark.parametrize("rope_frac", [1, 2], ids=["full", "partial"])
@pytest.mark.parametrize("norms", ["qk", "none", "q"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}-{h[1]}-{h[2]}")
def test_qkv_matches_reference(neox, rope_frac, norms, heads):
    nh, nkv, hd = heads
    H = 40
    g = torch.Generator().manual_seed(2)
    wq, wk, wv = (TorchLinear(torch.randn(n * hd, H, generator=g).to(DEVICE) / 4) for n in (nh, nkv, nkv))
    qn = torch.randn(hd, generator=g).to(DEVICE) if "q" in norms else None
    kn = torch.randn(hd, generator=g).to(DEVICE) if "k" in norms else None
    rope = Rope(hd // rope_frac, 10000.0, neox, 64, DEVICE)
    args = (wq, wk, wv, qn, kn, rope, nh, nkv, hd, 1e-6)
    h = torch.randn(5, H, generator=g).to(DEVICE)
    positions = torch.tensor([0, 3, 17, 18, 63], device=DEVICE)
    got, want = TritonQKV(*args)(h, positions), QKVRope(*args)(h, positions)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_qkv_with_no_tokens():
    g = torch.Generator().manual_seed(3)
    wq, wk, wv = (TorchLinear(torch.randn(n * 16, 8, generator=g).to(DEVICE)) for n in (2, 1, 1))
    rope = Rope(16, 10000.0, True, 8, DEVICE)
    q, k, v = TritonQKV(wq, wk, wv, None, None, rope, 2, 1, 16, 1e-6)(torch.empty(0, 8, device=DEVICE),
                                                                      torch.empty(0, dtype=torch.long, device=DEVICE))
    assert q.shape == (0, 2, 16) and k.shape == v.shape == (0, 1, 16)
