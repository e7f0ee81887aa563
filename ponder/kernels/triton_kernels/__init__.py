"""Triton kernels, one op per module: a `@triton.jit` kernel and a launcher that asserts shapes,
strides and dtypes. `ponder/kernels/__init__.py` dispatches CUDA tensors here (the references in
ponder/kernels/reference.py stay the oracle). Imported lazily: the API and CPU paths never load Triton.
Without a GPU the tests run these kernels under TRITON_INTERPRET=1 on CPU tensors."""
