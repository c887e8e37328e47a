"""The arithmetic behind :mod:`llmslim.memory_plan`: each phase's peak memory and rough time, from the
model's sizes (:class:`ModelFacts`, read from a meta-device model) and the recipe. Pure functions.

Per phase the estimate is *what is held* plus *the phase's largest transient*:

* weights: ``parameters x dtype bytes``; resident: all of them on the device; streamed: the largest unit
  (a decoder layer, the embeddings or the head) on the device, the rest on the host;
* calibration activations (``gptq``, ``prune``, ``sparsify``): the layer inputs and outputs of every
  window, ``2 x samples x seqlen x hidden x dtype bytes``, plus the rotary tables and (sliding-window
  models) the masks captured once per batch;
* a decoder layer's forward on one batch: ``batch x seqlen x (4 hidden + 3 intermediate)`` values;
* GPTQ/SparseGPT: the group's fp32 Hessians (``in²``), their inverse, fp32 copies of the largest linear,
  and the uint8 codes of every quantized weight, kept until the step packs them;
* perplexity: the logits of a batch in the model's dtype, their fp32 copy and log-softmax;
* distill: the teacher, a float32 student with gradients and two AdamW moments, activations of a micro batch.

On the host: the process's own resident set before loading (``base_host``: the interpreter, torch,
transformers); in ``load`` (which also tokenizes the evaluation and calibration text) the tokenizer's
peak, ``TOKENIZE_PEAK_BYTES_PER_CHAR`` per character of text (fast tokenizers encode the whole text at
once); afterwards what the allocator still holds once the run hands freed memory back
(``TOKENIZED_HELD_BYTES_PER_CHAR``: the token ids and fragmentation). Both measured with the fast
tokenizers on Linux/glibc, 0.45 to 10 million characters. Once the model runs, a constant
``RUNTIME_HOST_BYTES`` more (kernels' scratch buffers, thread pools, the generation utilities). On a CPU run the device is the host, so
both columns are the process's resident set.
Times are rough: matmul FLOPs (forward passes) at one rate, the FLOPs of GPTQ/SparseGPT's per-linear
solve (factorisations and the column loop, ``K³ + 4K²·hidden``) at a lower one, bytes at an assumed
bandwidth, plus a per-call overhead (``RATES``). The CPU rates were fitted on one thread of an AMD
EPYC, in bfloat16 on the 0.5B-3B models of benchmarks/scale.py and in float32 on SmolLM2-135M
(more threads: expect less time);
the CUDA rates are guesses, not measured.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HEADROOM", "ModelFacts", "Estimate", "facts_from_model", "phase_estimates", "phase_names", "step_phase",
           "DTYPE_BYTES", "RATES"]

HEADROOM = 0.9  # a phase fits when its estimate is at most this share of the limit (allocator slack)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CALIBRATION_BATCH = 8  # windows per layer call in the calibration loop (llmslim.calibration)
TOKENIZE_PEAK_BYTES_PER_CHAR = 155  # host memory while the tokenizer encodes a text, per character
TOKENIZED_HELD_BYTES_PER_CHAR = 8   # what stays held afterwards (ids, fragmentation), per character
RUNTIME_HOST_BYTES = 50_000_000     # host memory of running the model at all: kernels' scratch, thread pools,
#                                     the generation utilities (measured 40-80 MB on CPU, whatever the model)
# matmul FLOP/s (16-bit and float32 weights), solve FLOP/s, bytes/s of memory and of disk, seconds per
# decoder-layer call: rough, for the time column only (cpu: one thread; bf16 fitted on benchmarks/scale.py,
# float32 on SmolLM2's gptq and awq rows, 3-4x too low with the bf16 rate; cuda: not measured)
RATES = {"cpu": {"flops": 1.3e11, "flops_float32": 4e10, "solve": 2.2e10, "memory": 1e10, "disk": 1e9,
                 "call": 2e-3},
         "cuda": {"flops": 5e13, "flops_float32": 5e13, "solve": 1e12, "memory": 1e12, "disk": 2e9, "call": 1e-4}}


@dataclass(frozen=True)
class ModelFacts:
    """The sizes of a model that its memory depends on."""

    parameters: int
    dtype_bytes: int
    layers: int
    layer_parameters: int       # the largest decoder layer
    embedding_parameters: int   # input embeddings (the head too when tied)
    head_parameters: int        # 0 when tied to the embeddings
    linear_parameters: int      # every linear of the decoder layers (what quantization packs)
    largest_linear: int         # out x in of the largest linear in a layer
    widest_input: int           # the largest in_features of a layer's linears
    inputs: tuple[int, ...]     # in_features of one layer's linears (Hessian sizes)
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    head_dim: int
    kv_dim: int
    sliding: bool

    @property
    def weight_bytes(self) -> int:
        return self.parameters * self.dtype_bytes

    @property
    def unit_bytes(self) -> int:
        """The largest piece a streamed run holds on the device at once."""
        return max(self.layer_parameters, self.embedding_parameters, self.head_parameters) * self.dtype_bytes


@dataclass(frozen=True)
class Estimate:
    """One phase in one mode; activations are counted apart, since they may live on either side."""

    weights: int                # weight bytes the mode holds where the model lives
    device_without_acts: int
    host_without_acts: int
    activations: int
    seconds: float | None

    @property
    def device_with_acts(self) -> int:
        return self.device_without_acts + self.activations

    @property
    def host_with_acts(self) -> int:
        return self.host_without_acts + self.activations


def _unique_parameters(module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def facts_from_model(model, config, dtype: str) -> ModelFacts:
    """Sizes from a model built on the meta device (no memory, no weights)."""
    from llmslim.families import hidden_size
    from llmslim.modeling import decoder_layers, find_linears, linear_features

    layers = decoder_layers(model)
    per_layer = [_unique_parameters(layer) for layer in layers] or [0]
    features = [linear_features(m) for m in find_linears(layers[0]).values()] if len(layers) else []
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is None or head.weight is embed.weight
    cfg = config.to_dict()
    hidden = hidden_size(cfg) or embed.weight.shape[-1]
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    layer_types = cfg.get("layer_types") or []
    sliding = any("sliding" in str(t) for t in layer_types) or (
        cfg.get("sliding_window") is not None and cfg.get("use_sliding_window", True) is not False)
    inputs = tuple(i for i, _ in features)
    return ModelFacts(
        parameters=_unique_parameters(model), dtype_bytes=DTYPE_BYTES.get(dtype, 4), layers=len(layers),
        layer_parameters=max(per_layer), embedding_parameters=embed.weight.numel(),
        head_parameters=0 if tied else head.weight.numel(),
        linear_parameters=sum(sum(i * o for i, o in (linear_features(m) for m in find_linears(layer).values()))
                              for layer in layers),
        largest_linear=max((i * o for i, o in features), default=0), widest_input=max(inputs, default=hidden),
        inputs=inputs, hidden=hidden, intermediate=max([o for _, o in features] + [hidden]),
        vocab=int(embed.weight.shape[0]), heads=heads, head_dim=head_dim, kv_dim=kv_heads * head_dim,
        sliding=bool(sliding))


# --- working sets (bytes) ---------------------------------------------------------------------------


def calibration_activations(f: ModelFacts, samples: int, seqlen: int) -> int:
    """Every window's layer inputs and outputs, the rotary tables and (sliding windows) masks."""
    tokens = samples * seqlen
    hidden = 2 * tokens * f.hidden * f.dtype_bytes
    rotary = 2 * tokens * f.head_dim * f.dtype_bytes
    masks = samples * seqlen * seqlen if f.sliding else 0
    return hidden + rotary + masks


def layer_forward(f: ModelFacts, batch: int, seqlen: int) -> int:
    """Transient tensors of one decoder layer's forward on ``batch`` windows."""
    return batch * seqlen * (4 * f.hidden + 3 * f.intermediate) * f.dtype_bytes


def _hessians(f: ModelFacts, sequential: bool) -> int:
    """fp32 Hessians alive at once: one group's (the widest input) or, not sequential, the layer's."""
    sizes = [i * i * 4 for i in f.inputs] or [f.hidden * f.hidden * 4]
    return max(sizes) if sequential else sum(sizes)


def _solve_workspace(f: ModelFacts) -> int:
    """GPTQ/SparseGPT on one linear: Hessian inverse and factor, fp32 weight, its update and result."""
    return 2 * f.widest_input ** 2 * 4 + 3 * f.largest_linear * 4


def _codes(f: ModelFacts) -> int:
    """uint8 codes of every quantized weight (kept until the step packs them), scales and zeros aside."""
    return f.linear_parameters


def _packed(f: ModelFacts, bits: int) -> int:
    return f.linear_parameters * bits // 8


def perplexity_working(f: ModelFacts, batch: int, seqlen: int) -> int:
    """Logits in the model's dtype, their fp32 copy and log-softmax, plus a layer's forward."""
    return batch * seqlen * f.vocab * (f.dtype_bytes + 8) + layer_forward(f, batch, seqlen)


def latency_working(f: ModelFacts, tokens: int) -> int:
    """KV cache of the prompt and the new tokens, and the prompt's logits."""
    return 2 * f.layers * tokens * f.kv_dim * f.dtype_bytes + tokens * f.vocab * (f.dtype_bytes + 4)


def _evaluate_working(f: ModelFacts, recipe) -> int:
    ev = recipe.evaluate
    parts = [0]
    if ev.perplexity is not None:
        parts.append(perplexity_working(f, ev.perplexity.batch_size, ev.perplexity.seqlen))
    if ev.latency is not None:
        parts.append(latency_working(f, ev.latency.prompt_tokens + ev.latency.new_tokens))
    return max(parts)


def _distill_working(f: ModelFacts, step) -> int:
    """A float32 student with gradients and two AdamW moments, and a micro batch's activations."""
    micro = step.micro_batch_size or step.batch_size
    per_token = f.layers * (16 * f.hidden + 2 * f.intermediate) * 4 + 3 * f.vocab * 4
    return 4 * f.parameters * 4 + micro * step.seqlen * per_token


# --- phases -------------------------------------------------------------------------------------------


def step_phase(index: int, step) -> str:
    """The phase name of the recipe's step ``index`` (from 0): ``step N <name>``."""
    return f"step {index + 1} {step.STEP_NAME}"


def phase_names(recipe) -> list[str]:
    """``load``, ``baseline``, ``step N <name>`` for each step, ``evaluate``."""
    return ["load", "baseline"] + [step_phase(i, s) for i, s in enumerate(recipe.steps)] + ["evaluate"]


def _solve_flops(f: ModelFacts) -> float:
    """GPTQ/SparseGPT's per-linear solve over the model: ``K³`` (factorisations) and ``4K²·hidden``."""
    return f.layers * sum(i ** 3 + 4 * i * i * f.hidden for i in f.inputs)


def _step_working(f: ModelFacts, step, recipe) -> tuple[int, int, int, tuple[float, float]]:
    """(resident working set, streamed working set, calibration activations, (matmul FLOPs, solve FLOPs))
    of one step, beside the weights. Streamed, a quantizing step packs each layer when it is done: one
    layer's codes at a time."""
    name = step.STEP_NAME
    cal = recipe.calibration
    acts = calibration_activations(f, cal.samples, cal.seqlen) if cal is not None and name != "rtn" else 0
    forward = layer_forward(f, CALIBRATION_BATCH, cal.seqlen) if cal is not None else 0
    tokens = cal.samples * cal.seqlen if cal is not None else 0
    layer_codes = _codes(f) // max(f.layers, 1)
    if name == "gptq":
        work = forward + _hessians(f, step.true_sequential) + _solve_workspace(f)
        packed = _packed(f, step.bits) if step.format == "gptq" else 0
        return work + _codes(f) + packed, work + layer_codes, acts, (2 * f.parameters * tokens * 3, _solve_flops(f))
    if name == "awq":   # one scale search per group: grid candidates, each an output error (or a GPTQ solve)
        work = forward + _hessians(f, True) + _solve_workspace(f)
        candidates = step.grid + 1
        search = candidates * 2 * f.widest_input * f.linear_parameters if step.rounding == "nearest" else 0.0
        solve = candidates * _solve_flops(f) if step.rounding == "gptq" else 0.0
        return work + _codes(f), work + layer_codes, acts, (2 * f.parameters * tokens * 2 + search, solve)
    if name == "signround":   # iters forward + backward passes of one batch per layer, on learned fp32 offsets
        work = 3 * forward + 4 * f.layer_parameters * 4 + (
            _hessians(f, True) + _solve_workspace(f) if step.start == "gptq" else 0)
        copies = 2 if step.target == "layer" else 3   # the inputs, the targets (and the model's hidden states)
        learn = 6 * f.parameters * step.iters * step.batch_size * (cal.seqlen if cal is not None else 0)
        solve = _solve_flops(f) if step.start == "gptq" else 0.0
        return work + _codes(f), work + layer_codes, acts * copies, (2 * f.parameters * tokens * 2 + learn, solve)
    if name == "rtn":
        work = 3 * f.largest_linear * 4
        return work + _codes(f), work + layer_codes, 0, (10 * f.linear_parameters, 0.0)
    if name == "sparsify":
        method = step.method
        if method == "sparsegpt":
            work = forward + _hessians(f, True) + _solve_workspace(f)
        elif method == "taylor":
            work = 2 * f.parameters * 4 + forward * f.layers
        else:
            work = forward + 2 * f.largest_linear * 4
        solve = _solve_flops(f) if method == "sparsegpt" else 0.0
        return work, work, acts if method in ("wanda", "sparsegpt") else 0, (2 * f.parameters * tokens * 2, solve)
    if name == "prune":
        work = forward + 2 * f.layer_parameters * f.dtype_bytes
        return work, work, acts, (2 * f.parameters * tokens * 2, 0.0)
    if name == "distill":
        work = _distill_working(f, step)
        return work, work, 0, (6 * f.parameters * step.tokens, 0.0)
    return forward, forward, acts, (2 * f.parameters * tokens, 0.0)


def _result_weights(f: ModelFacts, recipe) -> int:
    """Weights after the steps: packed when the last step packs, else as many as before (pruning: at most)."""
    last = recipe.steps[-1]
    if getattr(last, "format", None) == "gptq":
        return f.weight_bytes - f.linear_parameters * f.dtype_bytes + _packed(f, last.bits)
    return f.weight_bytes


def _kernel_working(f: ModelFacts, recipe) -> tuple[int, int]:
    """(resident, streamed) bytes a packed result's linears need beside their checkpoint tensors once
    they run: each prepares its kernel's own copy of the codes (as many bytes as the packed weights) and,
    while preparing, int32 unpacked codes of the largest linear (8 bytes per weight with the transpose)."""
    last = recipe.steps[-1] if recipe.steps else None
    if getattr(last, "format", None) != "gptq":
        return 0, 0
    copy, transient = _packed(f, last.bits), 8 * f.largest_linear
    return copy + transient, copy // max(f.layers, 1) + transient


def _pair(f: ModelFacts, weights: int, work: tuple[int, int], acts: int, seconds: float | None, *,
          on_cpu: bool, base: int, host_transit: int = 0, host_work: int = 0) -> tuple[Estimate, Estimate]:
    """(resident, streamed) estimates of a phase that holds ``weights`` and needs ``work`` (resident,
    streamed) beside them; ``base`` is what the host holds anyway (process, tokenized text),
    ``host_transit`` what passes through the host (weights read on their way to the device), and
    ``host_work`` what the phase needs on the host in either mode (a step's own tokenizing). Streamed, a
    unit is read from disk onto the device (twice its size at the switch); finished layers go to the
    output's spooled ShardWriter, on disk."""
    unit = min(f.unit_bytes, weights)
    slow = None if seconds is None else seconds * 1.5 + weights / RATES["cpu"]["disk"]
    base += host_work
    if on_cpu:  # one memory: the process holds everything
        resident = Estimate(weights, base + weights + work[0], base + weights + work[0], acts, seconds)
        streamed_bytes = base + 2 * unit + work[1]
        return resident, Estimate(unit, streamed_bytes, streamed_bytes, acts, slow)
    resident = Estimate(weights, weights + work[0], base + host_transit, acts, seconds)
    streamed = Estimate(unit, 2 * unit + work[1], base + unit, acts, slow)
    return resident, streamed


def _load(f: ModelFacts, *, on_cpu: bool, base: int, tokenize: int, seconds: float) -> tuple[Estimate, Estimate]:
    """Resident: the weights (through the host on their way to a GPU) and the tokenizer's peak. Streamed:
    the tokenizer only; the weights are read when a phase needs them."""
    weights = f.weight_bytes
    if on_cpu:
        held = base + weights + tokenize
        return Estimate(weights, held, held, 0, seconds), Estimate(0, base + tokenize, base + tokenize, 0, 0.0)
    return (Estimate(weights, weights, base + max(weights, tokenize), 0, seconds),
            Estimate(0, 0, base + tokenize, 0, 0.0))


def phase_estimates(recipe, f: ModelFacts, *, on_cpu: bool, base_host: int, text_chars: int = 0,
                    step_text_chars: tuple[int, ...] = (),
                    side_by_side_limit: int | None = None) -> list[tuple[str, Estimate, Estimate]]:
    """(phase, resident estimate, streamed estimate) for every phase of ``recipe``. ``text_chars``: the
    calibration and evaluation text, tokenized before the baseline; ``step_text_chars``: what each step
    tokenizes itself (a distill dataset)."""
    rate = dict(RATES["cpu" if on_cpu else "cuda"])
    if f.dtype_bytes == 4:
        rate["flops"] = rate["flops_float32"]
    held = base_host + TOKENIZED_HELD_BYTES_PER_CHAR * text_chars + RUNTIME_HOST_BYTES
    weights = f.weight_bytes
    load_s = weights / rate["disk"]
    out = [("load", *_load(f, on_cpu=on_cpu, base=base_host, tokenize=TOKENIZE_PEAK_BYTES_PER_CHAR * text_chars,
                           seconds=load_s))]
    eval_work = _evaluate_working(f, recipe)
    eval_s = _evaluate_seconds(f, recipe, rate)
    out.append(("baseline", *_pair(f, weights, (eval_work, eval_work), 0, eval_s, on_cpu=on_cpu, base=held)))
    for i, step in enumerate(recipe.steps, 1):
        own_text = TOKENIZE_PEAK_BYTES_PER_CHAR * (step_text_chars[i - 1] if i - 1 < len(step_text_chars) else 0)
        resident, streamed, acts, flops = _step_working(f, step, recipe)
        out.append((step_phase(i - 1, step), *_pair(f, weights, (resident, streamed), acts,
                                                          _step_seconds(f, step, recipe, flops, rate),
                                                          on_cpu=on_cpu, base=held,
                                                          host_work=own_text)))
    result = _result_weights(f, recipe)
    beside = 0
    if recipe.evaluate.latency is not None and side_by_side_limit is not None \
            and 2 * (weights + result) <= side_by_side_limit:
        beside = weights  # the original is loaded again to time both alternately (llmslim.run_env)
    kernel = _kernel_working(f, recipe)
    out.append(("evaluate", *_pair(f, result + beside, (eval_work + kernel[0], eval_work + kernel[1]), 0,
                                   eval_s * (2 if beside else 1) + (load_s if beside else 0), on_cpu=on_cpu,
                                   base=held, host_transit=beside)))
    return out


def _step_seconds(f: ModelFacts, step, recipe, flops: tuple[float, float], rate: dict) -> float:
    """Matmul and solve FLOPs at their rates, plus the per-call overhead of the calibration loop's calls."""
    cal = recipe.calibration
    batches = -(-cal.samples // CALIBRATION_BATCH) if cal is not None else 0
    calls = f.layers * batches * (len(set(f.inputs)) + 2) if step.STEP_NAME not in ("rtn", "distill") else 0
    return flops[0] / rate["flops"] + flops[1] / rate["solve"] + calls * rate["call"]


def _evaluate_seconds(f: ModelFacts, recipe, rate: dict) -> float:
    """Perplexity windows and latency runs: FLOPs, weight reads per decoded token, per-call overhead."""
    ev, seconds = recipe.evaluate, 0.0
    if ev.perplexity is not None:
        windows = ev.perplexity.max_windows or 64
        batches = -(-windows // ev.perplexity.batch_size)
        seconds += 2 * f.parameters * windows * ev.perplexity.seqlen / rate["flops"]
        seconds += batches * f.layers * rate["call"]
    if ev.latency is not None:
        lat = ev.latency
        runs = lat.repeats + lat.warmup
        per_token = f.weight_bytes / rate["memory"] + f.layers * rate["call"]
        seconds += runs * (lat.new_tokens * per_token + 2 * f.parameters * lat.prompt_tokens / rate["flops"])
    return seconds
