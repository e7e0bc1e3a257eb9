#!/usr/bin/env bash
# Fetches and converts the ImageNet EfficientNet-Lite0 weights: scripts/fetch-weights.sh efficientnet_lite0
# (kept under this name for the quickstart; see that script).
exec "$(dirname "${BASH_SOURCE[0]}")/fetch-weights.sh" efficientnet_lite0 "$@"
