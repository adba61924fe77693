"""Installs t5x_lite: pre-training and fine-tuning of transformer LMs in JAX/Flax."""
import pathlib

import setuptools

HF = ["safetensors==0.8.0", "tokenizers==0.23.3", "datasets==5.2.0"]

setuptools.setup(
    name="t5x_lite",
    version="0.1.0",
    description="A small, fast JAX/Flax codebase for pre-training and fine-tuning T5-style models.",
    long_description=(pathlib.Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=setuptools.find_packages(include=["t5x_lite", "t5x_lite.*"]),
    package_data={
        "t5x_lite.data": ["bundled/*.txt", "bundled/*.md", "bundled/*.model", "bundled/*.vocab", "bundled/qa/*.jsonl", "bundled/qa/*.md",
                          "bundled/cls/*.tsv", "bundled/cls/*.md"]
    },
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "seqio==0.0.20",
        "tensorflow==2.21.0",
        "tensorflow-text==2.21.1",
        "tensorflow-datasets==4.9.10",
        "gin-config==0.5.0",
        "sentencepiece==0.2.3",
        "clu==0.0.12",
        "tensorboard==2.21.0",
        "tqdm==4.70.1",
        "matplotlib==3.11.2",
        "rouge-score==0.1.2",
    ],
    extras_require={
        # Hugging Face interop (t5x_lite.hf): checkpoints, tokenizer.json vocabularies, `datasets` sources.
        "hf": HF,
        # tools/benchmark.py --compare-hf times HF transformers T5 in PyTorch beside ours.
        "benchmark": ["torch==2.13.0", "transformers==5.23.0"],
        # The tests compare against transformers (PyTorch, CPU wheel) and exercise the hf extra; training needs none
        # of it (the quickstart installs `pip install -e .`, the README's test command `pip install -e ".[test]"`).
        "test": [
            "pytest==9.2.0",
            "pytest-xdist==3.8.0",  # pytest.ini runs the suite on parallel workers (compilation is single-threaded)
            "ruff==0.17.6",  # .ci/run lints with it (settings in ruff.toml)
            "gcp-storage-emulator==2026.7.19",  # a local GCS for the gs:// tests (tests/gcs_emulator.py)
            "peft==0.21.2",  # LoRA adapters are compared with PEFT's (tests/test_peft_interop.py)
            "torch==2.13.0",
            "transformers==5.23.0",
            *HF,
        ],
    },
)
