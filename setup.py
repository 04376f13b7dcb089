"""kdjax: a JAX/Flax research codebase for studying what knowledge distillation transfers.

Install for use:        pip install -c constraints.txt -e .
Install for development: pip install -c constraints.txt -e ".[test]"
(`./kd test` and `./kd run` do this by themselves in .venv on first use.)
`constraints.txt` pins a set of versions known to work together, so a study can be reproduced
months later; the lower bounds below are what the code needs.
"""

from setuptools import find_packages, setup

setup(
    name="kdjax",
    version="0.1.0",
    description="Knowledge distillation studies in JAX: many seeds as one compiled program, "
                "functional-similarity metrics and statistics.",
    python_requires=">=3.10",
    packages=find_packages(include=["kdjax", "kdjax.*"]),
    install_requires=[
        "jax>=0.6.0",
        "flax>=0.10.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "tensorflow-datasets>=4.9.7",
        # TFDS uses it to build datasets (`tfds build`) but does not declare it
        # (tensorflow/datasets#11212).
        "importlib_resources>=6.0",
        "tensorflow-cpu>=2.18",
        "tensorboard>=2.18",
        "ml-collections>=1.0.0",
        "clu>=0.0.12",
        "numpy>=1.26",
        "scipy>=1.13",
        "matplotlib>=3.8",
        "scikit-learn>=1.5",
        # MNIST-1D's procedural generator (kdjax.data.mnist1d; its download path is not used).
        "mnist1d>=0.0.2",
    ],
    extras_require={
        # The GCS emulator and gcsfs: tests/test_object_store.py runs a study on a gs:// workdir.
        # statsmodels: the reference implementation tests/test_stats.py checks Holm against
        # (reference libraries a test needs belong here, so that no test skips on a clean clone).
        "test": ["pytest>=8.0", "pytest-xdist>=3.6", "gcp-storage-emulator>=2026.7",
                 "gcsfs>=2026.10", "statsmodels>=0.14"],
    },
)
