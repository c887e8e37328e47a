"""Weight quantization math: quantizer grids, RTN, GPTQ, GPTQ v1 packing and
the packed :class:`QuantLinear` layer."""

from llmslim.quant.gptq import GPTQStats, accumulate_hessian, gptq_quantize_weight, make_empty_hessian
from llmslim.quant.packing import (
    PACKABLE_BITS,
    from_gptq_tensors,
    pack_cols,
    pack_rows,
    to_gptq_tensors,
    unpack_cols,
    unpack_rows,
)
from llmslim.quant.qlinear import QuantLinear
from llmslim.quant.quantizer import (
    QuantizedWeight,
    QuantSpec,
    dequantize,
    find_params,
    quantize,
    rtn_quantize_weight,
)

__all__ = [
    "QuantSpec", "QuantizedWeight", "find_params", "quantize", "dequantize", "rtn_quantize_weight",
    "GPTQStats", "make_empty_hessian", "accumulate_hessian", "gptq_quantize_weight",
    "PACKABLE_BITS", "pack_rows", "unpack_rows", "pack_cols", "unpack_cols", "to_gptq_tensors",
    "from_gptq_tensors", "QuantLinear",
]
