#!/bin/sh
# pip install inside an image build; trusts the extra CA bundle when one was given
# as the `ca_bundle` build secret (corporate proxies), without writing it to a layer.
set -eu
if [ -s /run/secrets/ca_bundle ]; then
  export PIP_CERT=/run/secrets/ca_bundle
fi
exec pip install --no-cache-dir "$@"
