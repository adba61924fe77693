"""Test setup: 8 simulated CPU devices and quick compiles (set before JAX starts), bf16 dots everywhere, quiet TensorFlow."""

import os

from tests.subprocess_env import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(devices=8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# bf16 matmuls take bf16 dots on every CPU, as on CPUs with bf16 dot instructions: some CPU bf16 dot layouts
# fail only at run time, and CI machines without those instructions would otherwise run float32 dots.
os.environ.setdefault("T5X_LITE_BF16_DOTS", "bfloat16")

pytest_plugins = ["tests.gcs_emulator"]  # the `gcs_emulator` and `gcs_dir` fixtures: a local GCS emulator
