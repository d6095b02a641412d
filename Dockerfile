# syntax=docker/dockerfile:1.7
# The mmrank images, one build with three targets:
#   docker build --target operator  -t ghcr.io/mmrank/mmrank-operator:0.1.0 .   (no torch)
#   docker build --target runtime   -t ghcr.io/mmrank/mmrank:0.1.0 .            (predictor, embedder, backfill)
#   docker build --target triton    -t ghcr.io/mmrank/mmrank-triton:0.1.0 .     (CPU Triton, development clusters)
# The predictor runs `mmrank predictor serve`, the embedder `mmrank embedder run`, a backfill Job
# `mmrank backfill run`; the operator `mmrank operator run` (charts/mmrank-operator). Production
# encoders run NVIDIA's Triton image; the `triton` target is the CPU stand-in for the local node.
#
# Build arguments (the defaults suit a plain `docker build` anywhere):
#   BASE_IMAGE      any Debian bookworm image with python3.11 (the local node: a debootstrap base)
#   PIP_FIND_LINKS  a folder of wheels bind-mounted into the build (torch's CPU wheel), or empty
#   TORCH_INDEX     where torch's CPU wheel comes from when PIP_FIND_LINKS does not hold it
#   PIP_CERT        a CA bundle for pip (bind-mounted), where a proxy re-signs PyPI's certificate
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/mmrank PATH=/opt/mmrank/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# A virtualenv: Debian's own python3 refuses system-wide pip installs (PEP 668).
RUN useradd --uid 10001 --create-home mmrank && python3 -m venv /opt/mmrank
WORKDIR /src

# The operator needs the API models, kopf, the Kubernetes client and httpx (Prometheus queries), never torch.
FROM base AS operator
ARG PIP_CERT
COPY requirements.lock ./
RUN grep -E '^(kopf|kubernetes|pydantic|pydantic[-_]core|annotated-types|typing[-_]extensions|typing-inspection|pyyaml|PyYAML|redis|numpy|prometheus[-_]client|aiohttp|aiosignal|aiohappyeyeballs|attrs|frozenlist|multidict|yarl|propcache|idna|iso8601|python-json-logger|click|certifi|urllib3|requests|requests-oauthlib|oauthlib|charset[-_]normalizer|six|python-dateutil|websocket-client|durationpy|google-auth|cachetools|pyasn1|pyasn1-modules|rsa|httpx|httpcore|h11|anyio|sniffio)==' requirements.lock > operator.lock \
 && pip install -r operator.lock
COPY pyproject.toml README.md ./
COPY mmrank mmrank
COPY operator operator
COPY encoders/triton_config.py encoders/triton_config.py
# pyproject names every part's folder; the operator image installs only the operator's code.
RUN mkdir -p predictors && pip install --no-deps . && rm -rf /src/*
USER 10001
CMD ["mmrank", "operator", "run", "--standalone"]

# Everything else: torch (CPU wheels; GPU nodes run Triton's own image for the encoder).
FROM base AS runtime
ARG PIP_FIND_LINKS=
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_CERT
COPY requirements.lock ./
RUN pip install ${PIP_FIND_LINKS:+--find-links ${PIP_FIND_LINKS}} ${TORCH_INDEX:+--extra-index-url ${TORCH_INDEX}} \
      -r requirements.lock
COPY pyproject.toml README.md ./
COPY mmrank mmrank
COPY operator operator
COPY encoders encoders
COPY predictors predictors
RUN pip install --no-deps . && rm -rf /src/*
USER 10001
CMD ["mmrank", "--help"]

# Triton on the CPU: the tritonserver inside the nvidia-pytriton wheel (in the runtime image),
# its Python backend with the stub for this Python, and torch/numpy < 2 for the exported encoder.
# `tritonserver` on PATH, as in NVIDIA's image, so the operator's encoder Deployment runs as is.
# The backends belong to the user Triton runs as: the Python backend chmods its stub before each
# model load and fails ("Failed to give execute permission") on a file it does not own.
FROM runtime AS triton
USER root
# The Python backend's stub links libpython3.11.so.1.0, which Debian's python3 does not ship.
RUN if ! ldconfig -p | grep -q 'libpython3.11.so.1.0'; then \
      apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libpython3.11 \
      && rm -rf /var/lib/apt/lists/*; fi
COPY tools/prepare_triton_backends.py images/triton/tritonserver /src/
RUN python /src/prepare_triton_backends.py /opt/tritonserver/backends \
 && install -m 0755 /src/tritonserver /usr/local/bin/tritonserver && rm -rf /src/* \
 && chown -R 10001:10001 /opt/tritonserver/backends
USER 10001
CMD ["tritonserver", "--model-repository=/models"]
