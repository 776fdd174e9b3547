"""g2rpo_jax: G²RPO-A (guided GRPO with adaptive guidance) in JAX/Flax."""

import os

# transformers prints "PyTorch was not found" on import; we use only its tokenizers and configs.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
