"""Installs t5x_lite: pre-training and fine-tuning of transformer LMs in JAX/Flax."""
import setuptools

setuptools.setup(
    name="t5x_lite",
    version="0.1.0",
    description="A small, fast JAX/Flax codebase for pre-training and fine-tuning T5-style models.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=setuptools.find_packages(include=["t5x_lite", "t5x_lite.*"]),
    package_data={
        "t5x_lite.data": ["bundled/*.txt", "bundled/*.md", "bundled/*.model", "bundled/*.vocab", "bundled/qa/*.jsonl", "bundled/qa/*.md"]
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
        "test": [
            "pytest",
            "torch==2.13.0",
            "transformers==5.23.0",
        ],
    },
)
