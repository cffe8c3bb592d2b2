#!/bin/sh
# The `models` stage: fetch (download + full verify + activate) the models named
# in $MODELS into /models; with none, leave an empty store (an unbaked image).
# The HF token and endpoint (which may carry credentials) are read from the
# `hf_token` and `hub_endpoint` build secrets into this process only.
set -eu
mkdir -p /models
if [ -z "${MODELS:-}" ]; then
  echo "bakehouse: no models to bake; the image will fetch them at start"
  exit 0
fi
if [ -s /run/secrets/hf_token ]; then
  HF_TOKEN="$(cat /run/secrets/hf_token)"
  export HF_TOKEN
fi
if [ -s /run/secrets/hub_endpoint ]; then
  HF_ENDPOINT="$(cat /run/secrets/hub_endpoint)"
  export HF_ENDPOINT
fi
if [ -s /run/secrets/ca_bundle ]; then
  export SSL_CERT_FILE=/run/secrets/ca_bundle
fi
cd /app
exec python -m ops.models fetch --models "$MODELS" --dest /models
