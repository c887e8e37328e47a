"""Structured pruning: remove whole attention heads, MLP channels and decoder
layers so that the result stays a plain, smaller checkpoint of the same
architecture.

* :mod:`llmslim.families` - one description per supported family
  (module names, fused layouts, config keys), shared with calibration and
  loading; no torch. ``llmslim.prune.families`` re-exports it.
* :mod:`llmslim.prune.shapes` - turning a recipe's targets into valid sizes
  (whole KV groups, ``round_to``); no torch, so recipes validate without it.
* :mod:`llmslim.prune.importance` - importance scores and selections, pure
  functions on tensors.
* :mod:`llmslim.prune.surgery` - slicing the linears, removing layers and
  updating the config.

The ``prune`` step that ties them together is :mod:`llmslim.steps.prune`.
"""
