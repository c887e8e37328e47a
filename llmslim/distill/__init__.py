"""Knowledge distillation: losses, the training loop, and data-parallel helpers."""

from llmslim.distill.distributed import init_distributed, world
from llmslim.distill.losses import distillation_loss, forward_kl, hidden_cosine, next_token_ce, reverse_kl

__all__ = ["init_distributed", "world", "distillation_loss", "forward_kl", "reverse_kl", "next_token_ce",
           "hidden_cosine"]
