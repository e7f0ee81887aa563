# The inference worker's image: `ponder worker` on NVIDIA GPUs (compose.yaml's `worker` and
# `worker-r1`). The rest of the stack runs the slim image, docker/api.Dockerfile.
#
# Why python:3.11-slim and not nvidia/cuda or pytorch/pytorch: the CUDA build of torch from the
# PyTorch index ships the CUDA user-space libraries it needs as wheels (nvidia-cublas-cu12,
# nvidia-cudnn-cu12, nvidia-nccl-cu12, ...), so a CUDA base image would only add a second copy of
# them. The GPU driver (libcuda) comes from the host: the NVIDIA Container Toolkit mounts it into
# any container given GPUs (compose's `deploy.resources.reservations.devices`). Same Python as the
# slim image, and the torch version is exactly the one the Makefile pins, not a base image's.
FROM python:3.11-slim

# Triton compiles a small C launcher per kernel at first use (JIT): it needs a C compiler and the C
# library headers (Python's headers are in this image already; ptxas ships inside the triton wheel).
# No g++: the C++ CPU kernels (ponder/kernels/cpu) only serve PONDER_DEVICE=cpu.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# NVIDIA_*: what the Container Toolkit mounts (the CUDA driver, nvidia-smi). TRITON_CACHE_DIR: the
# compiled Triton kernels survive a restart when it is a volume (compose.yaml: triton-cache).
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    TRITON_CACHE_DIR=/var/cache/triton

WORKDIR /app

# The CUDA 12.8 build of the torch version the Makefile pins (torch==2.13.0), from the PyTorch
# index: https://download.pytorch.org/whl/cu128. cu128 covers Hopper (H100/H200) and Blackwell; the
# host's driver must support CUDA 12.8 (nvidia-smi shows the highest it supports), else pick an
# older cu12x index of the same version. The wheel brings the matching triton. Installed first, so the project's torch range (<2.14) is already
# satisfied and pip fetches no other torch below.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128

COPY pyproject.toml README.md ./
COPY ponder ponder
COPY migrations migrations
# The engine extra: triton (already there), safetensors, gguf, the tokenizer files of tiny-r1, ...
RUN pip install -e '.[engine]'

# `ponder worker` checks at start-up that torch sees the GPUs asked for and that they hold the model
# (ponder/workers/device_check.py), and says what is missing.
CMD ["ponder", "worker"]
