"""Per-weight (unstructured and N:M) sparsity: importance scores and masks
(:mod:`.masks`), SparseGPT's OBS-style removal (:mod:`.sparsegpt`), the N:M
pattern syntax (:mod:`.pattern`, importable without torch). Pure math; the
``sparsify`` step (:mod:`llmslim.steps.sparsify`) runs it inside the shared
calibration loop."""
