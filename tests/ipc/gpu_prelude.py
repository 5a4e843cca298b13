# SPDX-License-Identifier: MIT
"""What the GPU tests of the Python binding share: the binding on the path, torch and a
CUDA device, and a client of a daemon on the cuda backend; each missing one exits 77
(skip), as meson counts it."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "ipc",
                                "python"))
try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print("torch missing: skip")
    sys.exit(77)
import kvtier  # noqa: E402

if not torch.cuda.is_available():
    print("no CUDA device: skip")
    sys.exit(77)

__all__ = ["torch", "F", "kvtier", "cuda_client"]


def cuda_client(*args, **kw):
    """kvtier.Client(*args, **kw), or exit 77 if the daemon's backend is not cuda."""
    c = kvtier.Client(*args, **kw)
    if c.backend != "cuda":
        print(f"daemon backend {c.backend}: skip")
        sys.exit(77)
    return c
