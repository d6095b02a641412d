# syntax=docker/dockerfile:1.7
# The mmrank images, one build with three targets:
#   docker build --target operator  -t ghcr.io/mmrank/mmrank-operator:0.1.0 .   (no torch)
#   docker build --target runtime   -t ghcr.io/mmrank/mmrank:0.1.0 .            (predictor, embedder, backfill)
# The predictor runs `mmrank predictor serve`, the embedder `mmrank embedder run`, a backfill Job
# `mmrank backfill run`; the operator `mmrank operator run` (charts/mmrank-operator).

FROM python:3.11-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --uid 10001 --create-home mmrank
WORKDIR /src

# The operator needs the API models, kopf and the Kubernetes client, never torch.
FROM base AS operator
COPY requirements.lock ./
RUN grep -E '^(kopf|kubernetes|pydantic|pydantic[-_]core|annotated-types|typing[-_]extensions|typing-inspection|pyyaml|PyYAML|redis|numpy|prometheus[-_]client|aiohttp|aiosignal|aiohappyeyeballs|attrs|frozenlist|multidict|yarl|propcache|idna|iso8601|python-json-logger|click|certifi|urllib3|requests|requests-oauthlib|oauthlib|charset[-_]normalizer|six|python-dateutil|websocket-client|durationpy|google-auth|cachetools|pyasn1|pyasn1-modules|rsa)==' requirements.lock > operator.lock \
 && pip install -r operator.lock
COPY pyproject.toml README.md ./
COPY mmrank mmrank
COPY operator operator
COPY encoders/triton_config.py encoders/triton_config.py
RUN pip install --no-deps . && rm -rf /src/*
USER 10001
CMD ["mmrank", "operator", "run", "--standalone"]

# Everything else: torch (CPU wheels; GPU nodes run Triton's own image for the encoder).
FROM base AS runtime
COPY requirements.lock ./
RUN sed 's/^torch==2.13.0+cpu$/torch==2.13.0/' requirements.lock > runtime.lock \
 && pip install --extra-index-url https://download.pytorch.org/whl/cpu -r runtime.lock
COPY pyproject.toml README.md ./
COPY mmrank mmrank
COPY operator operator
COPY encoders encoders
COPY predictors predictors
RUN pip install --no-deps . && rm -rf /src/*
USER 10001
CMD ["mmrank", "--help"]
