# syntax=docker/dockerfile:1
# Placeholder until `invoke build` lands: only the `models` stage exists. It bakes
# verified weights with the same model commands used on laptops and hosts; the
# HF token arrives as a build secret, never as an argument or a layer.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE} AS models
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ops ops
RUN pip install --no-cache-dir .
COPY models.toml models.lock ./
ARG MODELS=""
ARG HF_ENDPOINT=""
RUN --mount=type=secret,id=hf_token \
    HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)" \
    python -m ops.models fetch --models "${MODELS}" --dest /models
