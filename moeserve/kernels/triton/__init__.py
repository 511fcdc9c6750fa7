"""The `triton` backend: GPU kernels on the packed GGUF blocks (see `backend.py`).

Every kernel here also runs under Triton's interpreter (`TRITON_INTERPRET=1`, set before triton is
imported) on CPU tensors, which is how CI tests them without a GPU: the kernels avoid what the
interpreter lacks (bfloat16 math, pointers stored in memory).
"""
