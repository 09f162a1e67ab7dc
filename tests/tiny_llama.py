"""A tiny random Llama built from a config (nothing is downloaded), shared by the tests that need one.

2 layers, hidden 32, 4 heads, 2 kv heads (grouped-query attention), rotary, RMSNorm, SwiGLU: small enough
for CPU tests, shaped like the models users merge. A "fine-tune" is a base plus a small random task vector.
"""

from __future__ import annotations

from typing import Any

import torch


def tiny_llama(seed: int, base: Any | None = None, *, scale: float = 0.02, **config: Any) -> Any:
    """``LlamaForCausalLM`` with random weights (seeded); with ``base``: the base plus ``scale`` * noise."""
    import transformers

    settings: dict[str, Any] = {
        "vocab_size": 16,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
        **config,
    }
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings))
    if base is not None:
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(scale * torch.randn_like(parameter))
    return model
