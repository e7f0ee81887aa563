# The slim image: `ponder api`, `ponder beat`, `ponder webhooks-worker`, `ponder flower` and
# `ponder db upgrade` (compose.yaml). None of them imports torch (tests/service/test_images.py
# checks the imports), so this image installs the project without its `engine` extra: no torch,
# no triton, no CUDA libraries, a few hundred MB instead of several GB.
#
# The API still reads the model's config.json or GGUF metadata and its tokenizer (numpy, tokenizers,
# jinja2: the project's plain dependencies) to count and check prompt tokens. It resolves
# PONDER_MODEL like the worker: a path on the shared `models` volume, or an alias it can pull
# (smollm2-135m). The tiny-* aliases are made with torch: let the worker make them first.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md requirements-lock.txt ./
COPY ponder/__init__.py ponder/__main__.py ponder/
COPY ponder/engine ponder/engine
COPY ponder/service ponder/service
COPY ponder/cli ponder/cli
COPY ponder/workers ponder/workers
# `ponder db upgrade` runs the Alembic migrations from the source tree (hence the editable install)
COPY migrations migrations
# `.` without `[engine]`: the service's dependencies only, at the versions the suite passed with (the
# lock; the worker image does without it: the CUDA torch wheel pins its own triton). ponder/kernels
# (torch code) is not copied.
RUN pip install -c requirements-lock.txt -e .

CMD ["ponder", "--help"]
