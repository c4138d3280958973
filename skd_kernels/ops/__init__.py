"""One module per op: its public front end, input checks, reference, fake kernel, autograd and its kernel
per backend (registered with skd_kernels._dispatch).

Adding an op `<op>` (weighted_covariance.py is a complete example):

1. csrc/registration.cpp: the schema; csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu: the compiled kernels.
2. skd_kernels/ops/<op>.py: the public function (docstring with shapes, dtypes and "Equivalent to::"),
   `check` (ValueError naming the argument), `reference`, `fake` (registered for the compiled op when the
   extension defines it) and, if differentiable, the autograd; at the end
   `_dispatch.register_op(OP, {"cuda": _dispatch.compiled(OP, "CUDA"), "triton": _dispatch.triton(OP),
   "cpu": _dispatch.compiled(OP, "CPU"), "reference": _dispatch.Kernel(reference, FLOAT_DTYPES)})`,
   leaving out the backends that do not implement it (and with `forced_only=(...)` the ones measured slower
   than the next in line: they then run only under `use_backend`).
3. Optionally skd_kernels/triton/<op>.py: a torch.library custom op named `<op>` using this module's fake.
4. Export it from skd_kernels/__init__.py, re-export its reference from skd_kernels/reference.py, and test
   it in tests/test_<op>.py against the reference on every backend.
"""
