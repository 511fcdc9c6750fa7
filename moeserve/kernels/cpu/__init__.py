"""Native CPU kernels as torch operators (`torch.ops.moeserve.*`) and the kernel objects over them.

* `build`: compiles `csrc/` (C kernels by family + `ops.cpp`, the operator registrations) into a
  cached shared library and loads it; `NativeBuildError` on any failure, never a silent fallback.
* `native`: per-weight kernel objects (`NativeLinear`, `NativeExperts`, `FusedLinears`, `QKVRope`,
  `NormRope`, `EmbeddingRows`) and functions (`attn_decode`, `rms_norm`, `argmax`).
* `moe`: the fused decode MoE (`FusedMoE`, `make_moe`).

Every kernel object is immutable after construction (attaching a router aside) and every call is
independent: several threads may call the same object at once.
"""
