# bakehouse image: base -> models (optional bake) -> runtime.
#
# The `models` stage copies only what fetching needs (the model commands,
# models.toml, models.lock), so a change to the app never invalidates the model
# layer. The HF token, the hub endpoint (it may carry credentials) and an extra
# CA bundle arrive as build secrets, never as build arguments or environment:
# they are in no layer, no history and no cache key.
# Build with `invoke build [--bake]`; it fills in every argument below.

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
COPY docker/pip-install.sh /usr/local/bin/bakehouse-pip-install
# --system-site-packages: a CUDA/PyTorch base keeps its own torch.
RUN python3 -m venv --system-site-packages /opt/venv
COPY pyproject.toml /app/pyproject.toml
RUN --mount=type=secret,id=ca_bundle,required=false \
    bakehouse-pip-install $(python3 -c 'import tomllib; print(" ".join(tomllib.load(open("/app/pyproject.toml", "rb"))["project"]["dependencies"]))')

FROM base AS models
COPY ops/__init__.py ops/errors.py ops/units.py ops/runner.py ops/settings.py /app/ops/
COPY ops/models /app/ops/models
COPY models.toml models.lock /app/
COPY docker/fetch-models.sh /usr/local/bin/bakehouse-fetch-models
ARG MODELS=""
ARG HF_HUB_DISABLE_XET=""
RUN --mount=type=secret,id=hf_token,required=false \
    --mount=type=secret,id=hub_endpoint,required=false \
    --mount=type=secret,id=ca_bundle,required=false \
    bakehouse-fetch-models

FROM base AS runtime
ARG TORCH_SPEC=""
ARG TORCH_INDEX_URL=""
RUN --mount=type=secret,id=ca_bundle,required=false \
    --mount=type=bind,source=build/wheels,target=/wheels \
    if [ -n "$TORCH_SPEC" ]; then \
      bakehouse-pip-install --find-links /wheels ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"; \
    fi
RUN --mount=type=secret,id=ca_bundle,required=false \
    bakehouse-pip-install $(python3 -c 'import tomllib; print(" ".join(d for d in tomllib.load(open("/app/pyproject.toml", "rb"))["project"]["optional-dependencies"]["app"] if not d.startswith("torch")))')
# GPU images serve with vLLM (BAKEHOUSE_ENGINE=vllm), installed beside the app.
ARG APP_ENGINE=transformers
ARG VLLM_SPEC=vllm
RUN --mount=type=secret,id=ca_bundle,required=false \
    if [ "$APP_ENGINE" = vllm ]; then bakehouse-pip-install "$VLLM_SPEC"; fi
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin bakehouse
# The model layer comes before any app code, and is stamped here, once, by the
# same verifier the app runs at start; code changes below never touch it.
COPY --from=models /app /app
COPY --from=models --chown=bakehouse:bakehouse /models /models
ARG MODELS=""
RUN if [ -n "$MODELS" ]; then cd /app && python -m ops.models verify --full --models "$MODELS" --dest /models; fi
COPY ops /app/ops
COPY app /app/app
ENV BAKEHOUSE_ENGINE=${APP_ENGINE} PYTHONPATH=/app MODELS_DIR=/models BAKEHOUSE_LOCK=/app/models.lock BAKEHOUSE_MANIFEST=/app/models.toml \
    HOST=0.0.0.0 PORT=8000 HF_HUB_DISABLE_TELEMETRY=1
WORKDIR /app
USER bakehouse
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\", \"8000\")}/health', timeout=2)"
ENTRYPOINT ["python", "-m", "app.entrypoint"]
ARG GIT_REVISION=unknown
ARG GIT_SOURCE=""
ARG LOCK_DIGEST=""
LABEL org.opencontainers.image.title="bakehouse" \
      org.opencontainers.image.source="${GIT_SOURCE}" \
      org.opencontainers.image.revision="${GIT_REVISION}" \
      dev.bakehouse.lock-digest="${LOCK_DIGEST}" \
      dev.bakehouse.models="${MODELS}"
