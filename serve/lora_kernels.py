"""A faster multi-LoRA path for vLLM's CPU backend, installed as a vLLM plugin.

vLLM's CPU punica wrapper applies LoRA by gathering, for every token of the batch, a copy of its
adapter's A and B matrices (`weights[indices]`) and multiplying token by token (`einsum`). A
decode step of 16 sequences thus copies 16 A/B pairs per projection per layer, and a 100-token
prefill 100 of them: on SmolLM2-135M that more than doubled the step time (adapters ran at 0.43×
the base's tokens/s in bench/lora_kernel.py). But a batch holds only a few distinct adapters, so the same work is one pair of
dense GEMMs per adapter: tokens are grouped by adapter slot once per step (in `update_metadata`),
and each layer does `x[rows] @ A^T @ B^T` per group, or on the whole batch when one adapter
covers every token (the common case).

Two more differences from the stock path:
- a token without an adapter (slot -1) gets nothing added. The stock ops index `weights[-1]`,
  which is the *last* adapter slot: in a batch that mixes base and adapter requests, base tokens
  get that slot's adapter once it is occupied.
- the low-rank product runs in the model's dtype (as peft and a merged model do), not float32.

The same goes for the lm_head: with LoRA enabled vLLM runs the logits LoRA every step even when
no adapter has one, gathering a [vocab × rank] matrix per request (50 MB a step for 16 requests
on a 49k vocabulary). Stacked weights that are all zero for a slot (an adapter that does not
touch that module) are skipped; which slots are nonzero is recomputed only when vLLM writes the
weights. Embedding LoRA and anything unusual (rows that do not match the mapping) use the stock
code.

Prompt logprobs: vLLM's runner computes them with one `compute_logits` call per request on that
request's slice of the step's hidden states (`GPUModelRunner._get_prompt_logprobs_dict`), rows
one per prompt token, while the logits mapping (`sampler_indices`) has one entry per request. The
stock CPU op then fails on the shapes (and the engine with it) whenever the batch holds another
request, and would give every row one request's adapter if it did not. The plugin wraps that
method to publish the step's hidden states, so the logits LoRA of such a slice uses the adapter of
each of its tokens (`token_lora_indices`): prompt logprobs equal the adapter's, lm_head included.

`LORAFLEET_LORA_KERNEL=stock` turns the plugin off, as does `VLLM_PLUGINS` naming other plugins:
vLLM's own ops then run, with their faults (base tokens given the last slot's adapter, prompt
logprobs beside another request ending the engine); it is there to compare against.
"""

from __future__ import annotations

import functools
import os

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

QUALNAME = f"{__name__}.GroupedPunicaWrapperCPU"

# The step's token hidden states [tokens, hidden] while vLLM's runner computes prompt logprobs
# (set by the wrapper `register` installs); slices of it reaching the logits LoRA are prompt rows.
_step_hidden: list[torch.Tensor] = []


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    """PunicaWrapperCPU whose linear and logits LoRA are dense GEMMs per adapter group."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        publish_prompt_hidden_states()
        # [(slot, rows)] for the current step; rows None = every row. Tokens for the
        # projections, requests (rows of the logits) for the lm_head.
        self._token_groups: list[tuple[int, torch.Tensor | None]] = []
        self._sampler_groups: list[tuple[int, torch.Tensor | None]] = []
        self._num_tokens = self._num_samples = 0
        self._slots_cache: dict[int, tuple[int, frozenset[int]]] = {}
        self._fused_cache: dict[int, tuple] = {}
        self._mask: torch.Tensor | None = None

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self._token_groups, self._num_tokens = group_rows(self.token_lora_indices)
        self._sampler_groups, self._num_samples = group_rows(self.sampler_indices)
        self._mask = None

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *,
                        buffer=None, **kwargs) -> None:
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        if (x2.shape[0] != self._num_tokens or sum(output_slices) > y2.shape[1]
                or lora_a_stacked[0].dtype != x.dtype):
            # Not the shape the token mapping describes, or LoRA weights in another dtype than
            # the model (--lora-dtype): leave it to vLLM's own ops, which convert.
            return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                           buffer=buffer, **kwargs)
        slots, rank, d_in = lora_a_stacked[0].shape[0], lora_a_stacked[0].shape[2], x2.shape[1]
        if len(self._token_groups) > 1 and slots * rank <= 64 and slots * rank * len(output_slices) <= d_in // 2:
            self._apply_masked(y2, x2, lora_a_stacked, lora_b_stacked, scale, output_slices)
        else:
            self._apply(y2, x2, lora_a_stacked, lora_b_stacked, scale, output_slices, self._token_groups)

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        # vLLM calls this for every step once LoRA is enabled, whether or not an adapter has an
        # lm_head LoRA; the stock op then gathers a [vocab × rank] B per request. Here, slots
        # whose lm_head weights are zero (no adapter there) cost nothing.
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        rows = prompt_token_rows(x2)
        if rows is not None:  # prompt logprobs: one row per prompt token, each with its adapter
            groups = group_rows(self.token_lora_indices[rows])[0]
        elif x2.shape[0] == self._num_samples:
            groups = self._sampler_groups
        else:
            groups = None
        if groups is None or lora_a_stacked.dtype != x.dtype:
            return super().add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs)
        width = min(lora_b_stacked.shape[2], y2.shape[1])  # vocab padding may differ
        self._apply(y2, x2, (lora_a_stacked,), (lora_b_stacked,), scale, (width,), groups)

    def _apply(self, y2, x2, lora_a, lora_b, scale, widths, groups) -> None:
        """y2[rows, slices] += scale · x2[rows] @ A[slot]^T @ B[slot]^T for every (slot, rows)."""
        live = [self._nonzero_slots(b) for b in lora_b]
        for slot, rows in groups:
            if not any(slot in s for s in live):
                continue  # this adapter does not touch this module
            xs = x2 if rows is None else x2.index_select(0, rows)
            delta = None if rows is None else xs.new_zeros(xs.shape[0], sum(widths))
            offset = 0
            for a, b, width, nonzero in zip(lora_a, lora_b, widths, live):
                if slot in nonzero:
                    # a: [max_loras, 1, rank, in], b: [max_loras, 1, out, rank]; smaller ranks
                    # are zero-padded to max_lora_rank, which adds nothing to the product.
                    h = xs @ a[slot, 0].t()
                    if scale != 1.0:
                        h.mul_(scale)
                    bt = b[slot, 0, :width].t()
                    if rows is None:
                        y2[:, offset:offset + width].addmm_(h, bt)
                    else:
                        torch.mm(h, bt, out=delta[:, offset:offset + width])
                offset += width
            if rows is not None:
                y2[:, :offset].index_add_(0, rows, delta)

    def _apply_masked(self, y2, x2, lora_a, lora_b, scale, widths) -> None:
        """Several adapters in the batch, small ranks: one GEMM through every slot and every slice
        at once, the rows of slots a token does not use zeroed, then one GEMM per slice.

        Costs max_loras × the LoRA FLOPs but a handful of ops per layer instead of a gather,
        two GEMMs and a scatter per adapter per slice. Used when all slots' ranks together are
        small (≤ 64, and at most half the layer's input width), which also keeps the re-laid-out
        copy of the weights it caches small.
        """
        slots, rank = lora_a[0].shape[0], lora_a[0].shape[2]
        a_all, b_t = self._fused(lora_a, lora_b, widths)
        h = x2 @ a_all.t()  # [tokens, slices · slots · rank]
        h.view(h.shape[0], len(widths), slots, rank).mul_(self._slot_mask(slots, h.dtype))
        if scale != 1.0:
            h.mul_(scale)
        offset, block = 0, slots * rank
        for i, (width, bt) in enumerate(zip(widths, b_t)):
            y2[:, offset:offset + width].addmm_(h[:, i * block:(i + 1) * block], bt)
            offset += width

    def _fused(self, lora_a, lora_b, widths):
        """A of every slice and slot stacked ([slices·slots·rank, in]) and each slice's B as
        [slots·rank, out]; rebuilt only after vLLM writes new adapter weights."""
        key = tuple((t.data_ptr(), t._version) for t in (*lora_a, *lora_b))
        hit = self._fused_cache.get(key[0][0])
        if hit is None or hit[0] != key:
            slots, rank = lora_a[0].shape[0], lora_a[0].shape[2]
            a_all = torch.cat([a[:, 0].reshape(slots * rank, -1) for a in lora_a])
            b_t = [b[:, 0, :w].permute(0, 2, 1).reshape(slots * rank, w).contiguous()
                   for b, w in zip(lora_b, widths)]
            hit = (key, a_all, b_t)
            self._fused_cache[key[0][0]] = hit
        return hit[1], hit[2]

    def _slot_mask(self, slots: int, dtype: torch.dtype) -> torch.Tensor:
        """[tokens, 1, slots, 1]: 1 where the token uses the slot, else 0 (once per step)."""
        if self._mask is None or self._mask.dtype != dtype or self._mask.shape[2] != slots:
            mask = torch.zeros(self._num_tokens, slots, dtype=dtype)
            for slot, rows in self._token_groups:
                mask[rows if rows is not None else slice(None), slot] = 1
            self._mask = mask.view(self._num_tokens, 1, slots, 1)
        return self._mask

    def _nonzero_slots(self, weights: torch.Tensor) -> frozenset[int]:
        """Adapter slots with any nonzero weight in this stacked tensor.

        vLLM writes adapters into the stacked tensors in place (set_lora/reset_lora), which bumps
        the tensor's version counter: recomputed only after such a write.
        """
        key, version = weights.data_ptr(), weights._version
        hit = self._slots_cache.get(key)
        if hit is None or hit[0] != version:
            flags = weights.reshape(weights.shape[0], -1).ne(0).any(dim=1).tolist()
            hit = (version, frozenset(i for i, f in enumerate(flags) if f))
            self._slots_cache[key] = hit
        return hit[1]


def group_rows(indices: torch.Tensor) -> tuple[list[tuple[int, torch.Tensor | None]], int]:
    """Per-row adapter slots (-1 = none) → [(slot, rows)], rows None when one slot has all rows."""
    ids = indices.tolist()
    slots = sorted(set(ids) - {-1})
    if len(slots) == 1 and -1 not in ids:
        return [(slots[0], None)], len(ids)
    return [(s, (indices == s).nonzero().squeeze(1)) for s in slots], len(ids)


def prompt_token_rows(x2: torch.Tensor) -> slice | None:
    """The step's token positions that the rows of `x2` [rows, hidden] are, when `x2` is a row
    slice of the hidden states published for prompt logprobs; else None."""
    if not _step_hidden:
        return None
    h = _step_hidden[-1]
    if (x2.untyped_storage().data_ptr() != h.untyped_storage().data_ptr() or h.dim() != 2
            or x2.stride() != h.stride() or x2.dtype != h.dtype):
        return None
    start, extra = divmod(x2.storage_offset() - h.storage_offset(), h.stride(0))
    if extra or start < 0 or start + x2.shape[0] > h.shape[0]:
        return None
    return slice(start, start + x2.shape[0])


def _publishing_step_hidden(method):
    """Wraps GPUModelRunner._get_prompt_logprobs_dict(self, hidden_states, ...) so that the logits
    LoRA can tell prompt rows (slices of hidden_states) from sampled rows."""
    @functools.wraps(method)
    def wrapper(self, hidden_states, *args, **kwargs):
        _step_hidden.append(hidden_states)
        try:
            return method(self, hidden_states, *args, **kwargs)
        finally:
            _step_hidden.pop()
    wrapper.__lorafleet_wraps__ = method
    return wrapper


_STOCK: dict[str, object] = {}  # vLLM's own get_punica_wrapper, while ours replaces it


def register() -> None:
    """vLLM general-plugin entry point: runs in every vLLM process, before the model is built.
    LORAFLEET_LORA_KERNEL=stock keeps (or, in a process that registered before, puts back) vLLM's."""
    from vllm.platforms import current_platform

    platform = type(current_platform)
    if os.environ.get("LORAFLEET_LORA_KERNEL", "grouped") == "stock":
        if "get_punica_wrapper" in _STOCK:
            own = _STOCK.pop("get_punica_wrapper")
            if own is None:  # it was inherited: drop ours, the base class's shows again
                del platform.get_punica_wrapper
            else:
                platform.get_punica_wrapper = own
        return
    if not current_platform.is_cpu() or "get_punica_wrapper" in _STOCK:
        return  # GPUs keep vLLM's fused punica kernels; registered already
    if current_platform.get_punica_wrapper() != "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU":
        return  # a vLLM whose CPU path changed: do not guess
    _STOCK["get_punica_wrapper"] = platform.__dict__.get("get_punica_wrapper")
    platform.get_punica_wrapper = classmethod(lambda cls: QUALNAME)


def publish_prompt_hidden_states() -> None:
    """Wrap vLLM's runner method that computes prompt logprobs (once per process), so its hidden
    states reach `prompt_token_rows`. Called when the worker builds the punica wrapper: the runner
    is imported there already, and the front process never pays for importing it.

    Raises RuntimeError on a vLLM without that method: serving would otherwise stay open to the
    prompt-logprobs crash this guards against."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # the CPU runner's base

    method = getattr(GPUModelRunner, "_get_prompt_logprobs_dict", None)
    if method is None:
        raise RuntimeError("this vLLM's GPUModelRunner has no _get_prompt_logprobs_dict; "
                           "run with LORAFLEET_LORA_KERNEL=stock or the vLLM version lorafleet pins")
    if not hasattr(method, "__lorafleet_wraps__"):
        GPUModelRunner._get_prompt_logprobs_dict = _publishing_step_hidden(method)
