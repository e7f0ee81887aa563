# The image compose.yaml runs. CPU build of torch here; a GPU deployment installs the CUDA build
# of torch first (e.g. FROM a pytorch/pytorch CUDA image) and the rest the same way.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /app
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY engine engine
COPY kernels kernels
COPY service service
COPY cli cli
COPY workers workers
COPY migrations migrations
RUN pip install --no-cache-dir -e .
CMD ["ponder", "--help"]
