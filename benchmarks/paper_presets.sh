#!/usr/bin/env bash
# One real AdamW step of every paper-size model on the CPU (B/4 ... XL/2, the CIFAR U-Net), with
# the time each takes. These are the `slow` tests, deselected from the default test run.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest tests/test_presets.py -m "slow or not slow" -q --durations=0 -k real_training_step
