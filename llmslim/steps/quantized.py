"""What the quantizing steps (``rtn``, ``gptq``) share: the quantizer spec
from a step config, and installing the packed GPTQ layers when the step's
``format`` is ``gptq``."""

from __future__ import annotations

import torch
from torch import nn

from llmslim.quant import QuantSpec
from llmslim.quant.checkpoint import gptq_config_dict, install_quantized

__all__ = ["spec_from_config", "bias_copy", "install_if_packed"]


def spec_from_config(config) -> QuantSpec:
    return QuantSpec(bits=config.bits, group_size=config.group_size, sym=config.sym,
                     scale_search=config.scale_search)


def bias_copy(module: nn.Module) -> torch.Tensor | None:
    return module.bias.detach().clone() if module.bias is not None else None


def install_if_packed(model: nn.Module, results: dict, config, *, desc_act: bool, method: str,
                      true_sequential: bool | None = None, damp: float | None = None,
                      static_groups: bool | None = None) -> None:
    """Replace the quantized linears by packed ones (``format: gptq``); ``format: dense`` keeps the
    quantize-dequantized weights already in the model. The GPTQ-only fields are written when given."""
    if config.format != "gptq":
        return
    qcfg = gptq_config_dict(bits=config.bits, group_size=config.group_size, sym=config.sym, desc_act=desc_act,
                            true_sequential=true_sequential, damp=damp, static_groups=static_groups,
                            method=method)
    install_quantized(model, results, qcfg)
