"""Models larger than the device: the weights stay in the checkpoint and each
decoder layer is materialised only while it is worked on.

:class:`LazyModel` builds the architecture of a checkpoint folder on the meta
device (no memory) and knows which safetensors file holds each tensor
(single-file or sharded, :mod:`llmslim.shards`). :meth:`LazyModel.load_layer`
reads one decoder layer's tensors (one at a time, ``safe_open``) onto the
compute device and :meth:`LazyModel.release_layer` sends them back to meta;
:meth:`LazyModel.load_outer` does the same for everything outside the decoder
layers (embeddings, final norm, head, rotary tables). Tied weights stay one
parameter. Non-persistent buffers (rotary ``inv_freq``, Gemma's
``embed_scale``) are not in a checkpoint: they are computed on the target
device by the model's own ``_init_weights``, as transformers does when it
loads a model, so the streamed model computes exactly what a loaded one does.
A packed GPTQ checkpoint gets :class:`~llmslim.quant.qlinear.QuantLinear`
modules (on meta) where it stores ``qweight``.

:class:`StreamedLayers` is the calibration loop's layer source
(:func:`llmslim.calibration.sequential_calibrate`) over a lazy model: it loads
each layer and, once the layer is done, writes it to a
:class:`~llmslim.shards.ShardWriter` and releases it. :class:`LayerPacker`
installs the packed linears of one finished layer (``format: gptq``), so no
quantized codes are kept between layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmslim.errors import ModelLoadError
from llmslim.evaluate.memory import release_host_memory
from llmslim.modeling import decoder_layers, layer_prefix, resolve_dtype
from llmslim.shards import checkpoint_keys

__all__ = ["LazyModel", "StreamedLayers", "LayerPacker", "is_materialised"]


def is_materialised(module: nn.Module) -> bool:
    """True when any parameter or buffer of ``module`` holds data (is not on the meta device)."""
    return any(t.device.type != "meta" for t in (*module.parameters(), *module.buffers()))


def _join(module: str, key: str) -> str:
    return f"{module}.{key}" if module else key


def _skeleton_dtype(config, dtype: str) -> torch.dtype:
    resolved = resolve_dtype(dtype, torch.device("cpu")) if dtype != "auto" else None
    if isinstance(resolved, torch.dtype):
        return resolved
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, stored.removeprefix("torch.")) if isinstance(stored, str) else stored


def build_skeleton(folder: Path, dtype: str = "auto", *, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``folder``'s config.json on the meta device, with packed linears where the
    checkpoint stores GPTQ tensors; ``quantization_config`` is kept on its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmslim.modeling import linear_features
    from llmslim.quant.checkpoint import read_gptq_config
    from llmslim.quant.qlinear import QuantLinear

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    quant = getattr(config, "quantization_config", None)
    zero_offset = None
    if quant is not None:
        quant, zero_offset = read_gptq_config(quant if isinstance(quant, dict) else quant.to_dict(), folder)
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=_skeleton_dtype(config, dtype),
                                                 trust_remote_code=trust_remote_code)
        if quant is not None:
            keys = checkpoint_keys(folder)
            for name in sorted(k.removesuffix(".qweight") for k in keys if k.endswith(".qweight")):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                in_f, out_f = linear_features(getattr(parent, child))
                setattr(parent, child, QuantLinear(in_f, out_f, quant["bits"], quant["group_size"], quant["sym"],
                                                   bias=f"{name}.bias" in keys, dtype=model.dtype,
                                                   zero_offset=zero_offset))
    if quant is not None:
        model.config.quantization_config = quant
    model.config.use_cache = True
    return model.eval()


def _checkpoint_names(model: nn.Module, files: dict[str, Path], folder: Path) -> dict[str, str]:
    """Model state-dict key -> checkpoint key, as transformers renames them when it loads (base-model
    prefix, legacy names). A checkpoint whose tensors must be merged or split (fused experts) is refused."""
    from llmslim.weight_files import _key_renamer

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rename = _key_renamer(model, expected)
    names: dict[str, str] = {}
    for key in files:
        target, converted = rename(key)
        if converted:
            raise ModelLoadError(f"{folder}: tensor {key} is converted (merged or split) when transformers loads "
                                 "it; such checkpoints cannot be streamed layer by layer yet (use memory.mode: "
                                 "resident)")
        names[target] = key
    return names


class LazyModel:
    """A checkpoint's causal LM on the meta device, materialised one part at a time (see the module docstring)."""

    def __init__(self, folder: Path, dtype: str = "auto", *, trust_remote_code: bool = False,
                 prefetch: bool = False):
        """``prefetch``: while a layer is worked on, a side thread reads the next one's tensors from disk
        (worth it when the compute device is a GPU: disk reads overlap its work; the host then holds
        up to two layers' weights)."""
        from llmslim.weight_files import weights_problem

        self.folder = Path(folder)
        if not any(self.folder.glob("*.safetensors")):
            raise ModelLoadError(f"{self.folder}: a streamed model is read from safetensors files, and this folder "
                                 "has none; convert its weights to safetensors, or use memory.mode: resident")
        why = weights_problem(self.folder, trust_remote_code=trust_remote_code)
        if why:
            raise ModelLoadError(why)
        self.files = checkpoint_keys(self.folder)
        self.model = build_skeleton(self.folder, dtype, trust_remote_code=trust_remote_code)
        self.layers = decoder_layers(self.model)
        self.prefix = layer_prefix(self.model, self.layers)
        self.names = _checkpoint_names(self.model, self.files, self.folder)
        self.tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        self._handles: dict[Path, Any] = {}
        self._ahead: dict[int, Future] = {}     # layer index -> its tensors being read by the side thread
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="llmslim-prefetch") if prefetch else None
        self.loaded: set[int] = set()       # decoder layers materialised now
        self.peak_loaded = 0                 # the most decoder layers materialised at once

    # -- reading ---------------------------------------------------------------------------------
    def read(self, name: str, like: torch.Tensor | None = None, handles: dict | None = None) -> torch.Tensor:
        """The checkpoint tensor of model key ``name`` (on the CPU), in the dtype of ``like`` when given;
        ``handles``: the open files to read through (the side thread has its own)."""
        key = self.names.get(name)
        if key is None:
            raise ModelLoadError(f"{self.folder}: the checkpoint holds no tensor for {name}")
        file, handles = self.files[key], self._handles if handles is None else handles
        if file not in handles:
            from safetensors import safe_open

            handles[file] = safe_open(str(file), framework="pt")
        tensor = handles[file].get_tensor(key)
        return tensor if like is None or tensor.dtype == like.dtype else tensor.to(like.dtype)

    def _read_ahead(self, wanted: dict[str, torch.Tensor], pin: bool) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of ``wanted`` (model key -> a tensor of its dtype), read by the prefetch
        thread through its own open files; pinned for a fast copy to a GPU."""
        handles: dict = {}
        out = {key: self.read(key, like, handles) for key, like in wanted.items()}
        return {key: value.pin_memory() for key, value in out.items()} if pin else out

    def saved_keys(self) -> list[str]:
        """The state-dict keys a checkpoint of this model holds, in state-dict order (tied copies left out)."""
        ignored = set(getattr(self.model, "_keys_to_ignore_on_save", None) or ())
        return [k for k in self.model.state_dict() if k not in self.tied and k not in ignored]

    def outer_keys(self) -> tuple[list[str], list[str]]:
        """The saved keys outside the decoder layers: those before them and those after (state-dict order)."""
        keys, inside = self.saved_keys(), f"{self.prefix}."
        positions = [i for i, k in enumerate(keys) if k.startswith(inside)]
        first = positions[0] if positions else len(keys)
        return ([k for k in keys[:first] if not k.startswith(inside)],
                [k for k in keys[first:] if not k.startswith(inside)])

    def read_saved(self, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, tensor)`` of the given saved keys as a resident save would write them (the model's dtypes)."""
        state = self.model.state_dict(keep_vars=True)
        for key in keys:
            yield key, self.read(key, state[key])

    def saved_bytes(self) -> int:
        """Bytes of the tensors a checkpoint of this model holds (what save_pretrained would write)."""
        state = self.model.state_dict(keep_vars=True)
        return sum(state[k].numel() * state[k].element_size() for k in self.saved_keys())

    def parameters_count(self) -> int:
        """Logical parameters (as :func:`llmslim.modeling.count_parameters`; a packed linear counts its matrix)."""
        logical = sum(m.logical_parameters() for m in self.model.modules() if hasattr(m, "logical_parameters"))
        return logical + sum(p.numel() for p in self.model.parameters())

    # -- materialising ---------------------------------------------------------------------------
    def _materialise(self, select: Callable[[str], bool], device: torch.device,
                     ready: dict[str, torch.Tensor] | None = None) -> None:
        """Every tensor of the modules whose names ``select`` accepts onto ``device``: read from the
        checkpoint (or taken from ``ready``, read ahead), or (non-persistent buffers) computed by the
        model's own initialisation."""
        ready = ready or {}
        read = lambda key, like: ready.pop(key) if key in ready else self.read(key, like)  # noqa: E731
        aliases = self._aliases()
        computed = []
        for name, owner in self.model.named_modules():
            if not select(name):
                continue
            for key, tensor in list(owner._buffers.items()):
                if tensor is None or tensor.device.type != "meta":
                    continue
                if key in owner._non_persistent_buffers_set:
                    owner._buffers[key] = torch.empty_like(tensor, device=device)
                    computed.append(owner)
                else:
                    owner._buffers[key] = read(_join(name, key), tensor).to(device, non_blocking=True)
                    owner._buffers[key]._is_hf_initialized = True
            for key, param in list(owner._parameters.items()):
                if param is None or param.device.type != "meta":
                    continue  # a tied weight already loaded under its other name
                full = _join(name, key)
                found = next((k for k in aliases[id(param)] if k in self.names), full)
                value = nn.Parameter(read(found, param).to(device, non_blocking=True),
                                     requires_grad=param.requires_grad)
                value._is_hf_initialized = True  # transformers' init functions leave it as it is
                self._replace(param, value)
        with torch.no_grad():
            for owner in dict.fromkeys(computed):
                self.model._init_weights(owner)
        for name, owner in self.model.named_modules():
            if select(name) and hasattr(owner, "reset_kernel"):
                owner.reset_kernel()  # a packed linear prepares its kernel tensors again

    def _aliases(self) -> dict[int, list[str]]:
        names: dict[int, list[str]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        return names

    def _replace(self, old: nn.Parameter, new: nn.Parameter) -> None:
        """Put ``new`` wherever ``old`` is registered (a tied weight is one parameter in several modules)."""
        for module in self.model.modules():
            for key, param in module._parameters.items():
                if param is old:
                    module._parameters[key] = new

    def _in_layers(self, name: str) -> bool:
        return name == self.prefix or name.startswith(f"{self.prefix}.")

    def _in_layer(self, index: int) -> Callable[[str], bool]:
        root = f"{self.prefix}.{index}"
        return lambda name: name == root or name.startswith(f"{root}.")

    def load_outer(self, device: torch.device) -> None:
        """Embeddings, final norm, head and the rest outside the decoder layers, onto ``device``."""
        self._materialise(lambda name: not self._in_layers(name), torch.device(device))

    def release_outer(self) -> None:
        """Send everything outside the decoder layers back to the meta device."""
        self._release(lambda name: not self._in_layers(name))
        self._handles.clear()

    def _release(self, select: Callable[[str], bool]) -> None:
        """The tensors of the selected modules onto the meta device (ties kept), freeing their memory."""
        for name, owner in self.model.named_modules():
            if not select(name):
                continue
            for key, tensor in list(owner._buffers.items()):
                if tensor is not None and tensor.device.type != "meta":
                    owner._buffers[key] = torch.empty_like(tensor, device="meta")
            for param in list(owner._parameters.values()):
                if param is not None and param.device.type != "meta":
                    self._replace(param, nn.Parameter(torch.empty_like(param, device="meta"),
                                                      requires_grad=param.requires_grad))
            if hasattr(owner, "reset_kernel"):
                owner.reset_kernel()

    def load_layer(self, index: int, device: torch.device) -> nn.Module:
        """Decoder layer ``index`` with its checkpoint tensors on ``device`` (and, with ``prefetch``,
        the next layer's being read meanwhile)."""
        device = torch.device(device)
        ahead = self._ahead.pop(index, None)
        self._materialise(self._in_layer(index), device, ahead.result() if ahead is not None else None)
        if self._reader is not None and index + 1 < len(self.layers) and index + 1 not in self._ahead:
            wanted = {k: v for k, v in self.layer_state(index + 1).items() if k in self.names}  # meta: dtypes only
            self._ahead[index + 1] = self._reader.submit(self._read_ahead, wanted, device.type == "cuda")
        self.loaded.add(index)
        self.peak_loaded = max(self.peak_loaded, len(self.loaded))
        return self.layers[index]

    def layer_state(self, index: int) -> dict[str, torch.Tensor]:
        """Layer ``index``'s tensors as a checkpoint stores them (full names)."""
        return {f"{self.prefix}.{index}.{k}": v for k, v in self.layers[index].state_dict().items()}

    def release_layer(self, index: int) -> None:
        """Send layer ``index`` back to the meta device (its memory is freed)."""
        self._release(self._in_layer(index))
        self.loaded.discard(index)
        # safetensors' tensors are views of the file's mapping: the pages read (and those written in place,
        # which become private copies) stay in the process until its handles close
        self._handles.clear()
        release_host_memory()

    def close(self) -> None:
        """Drop the open files and any layer read ahead."""
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
        self._ahead.clear()
        self._handles.clear()


class StreamedLayers:
    """The calibration loop's layer source over a :class:`LazyModel`: ``load`` materialises a layer on
    the compute device; ``done`` writes it to ``writer`` (when given) and releases it."""

    def __init__(self, lazy: LazyModel, device: torch.device, writer=None,
                 before_write: Callable[[int, nn.Module], None] | None = None):
        self.lazy, self.device, self.writer, self.before_write = lazy, torch.device(device), writer, before_write
        self.written: set[int] = set()

    def __len__(self) -> int:
        return len(self.lazy.layers)

    def load(self, index: int) -> nn.Module:
        return self.lazy.load_layer(index, self.device)

    def done(self, index: int, layer: nn.Module) -> None:
        if self.before_write is not None:
            self.before_write(index, layer)
        if self.writer is not None:
            self.writer.add(self.lazy.layer_state(index))
            self.written.add(index)
        self.lazy.release_layer(index)

    def finish(self) -> None:
        """Write, unchanged, every layer not handed back yet (in order, so the output is complete)."""
        if self.writer is None:
            return
        for index in range(len(self)):
            if index not in self.written:
                self.done(index, self.load(index))


class LayerPacker:
    """Per-layer packing for streamed quantizing steps: ``pack(index)`` hands layer ``index``'s entries
    of ``results`` (module name -> (QuantizedWeight, bias)) to ``install`` (which installs packed
    linears for ``format: gptq`` and does nothing for ``dense``), counts them and drops them."""

    def __init__(self, model: nn.Module, results: dict, install: Callable[[dict], None]):
        self.model, self.results, self.install = model, results, install
        self.prefix = layer_prefix(model, decoder_layers(model))
        self.modules = 0
        self.weights = 0
        self.kernels: dict[str, str] = {}

    def pack(self, index: int, *_ignored) -> None:
        """Also usable as the loop's ``on_layer(index, inputs, outputs)`` observer."""
        mine = {n: r for n, r in self.results.items() if n.startswith(f"{self.prefix}.{index}.")}
        self.modules += len(mine)
        self.weights += sum(qw.codes.numel() for qw, _ in mine.values())
        self.install(mine)
        for name in mine:
            module = self.model.get_submodule(name)
            if hasattr(module, "qweight"):
                self.kernels[name] = module.kernel
            del self.results[name]

    def with_kernels(self, stats: list[dict]) -> list[dict]:
        """Per-module statistics with the kernel each packed linear takes (as ``with_kernels`` resident)."""
        return [{**row, "kernel": self.kernels[row["module"]]} if row.get("module") in self.kernels else row
                for row in stats]
