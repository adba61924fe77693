"""Test setup: 8 simulated CPU devices and quick compiles (set before JAX starts), bf16 dots everywhere, quiet TensorFlow."""

import os

# The tests' tiny models spend far more time compiling than running: XLA's LLVM at -O0 with its older fusion
# emitter compiles a small BART's train step in 13 s instead of 28, and the suite in 30 minutes instead of 45 on
# 2 cores. Programs mean the same; tools/benchmark.py and users run with XLA's defaults.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# bf16 matmuls take bf16 dots on every CPU, as on CPUs with bf16 dot instructions: some CPU bf16 dot layouts
# fail only at run time, and CI machines without those instructions would otherwise run float32 dots.
os.environ.setdefault("T5X_LITE_BF16_DOTS", "bfloat16")
