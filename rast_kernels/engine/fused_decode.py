"""The engine's own decode-step forward for Llama-family models: the same math as transformers' forward, with
about a quarter of its kernel launches.

Why: a decode step of a small model is launch-bound. Transformers' Llama/Qwen2 decoder layer runs about 40
kernels per token (RMSNorm alone is eight: cast, pow, mean, add, rsqrt, mul, cast, mul; rotary ten; the cache
write two), most of them on a few kilobytes. This forward reuses the model's own modules and weights (its
linear layers, embedding, rotary tables and LM head) and replaces the elementwise chains with fused ops:

=========================================  ====================================================
per layer                                  kernels
=========================================  ====================================================
residual add + RMSNorm (x2)                :func:`rast_kernels.ops.rms_norm.add_rms_norm`
q/k/v projection, gate/up projection       one GEMM each over concatenated weights (below)
o and down projections                     the model's ``nn.Linear`` modules
rotary on q and k + KV-cache slot write    :func:`rast_kernels.ops.rope_cache.rope_cache_write`
attention over the row's cache blocks      :func:`rast_kernels.ops.paged_attention.paged_decode_attention`
``silu(gate) * up``                        :func:`rast_kernels.ops.silu_mul.silu_mul`
=========================================  ====================================================

so 9-10 launches per layer instead of about 40. Prefill keeps transformers' forward (it is one call per
prompt, not per token).

Concatenated projections: at decode a projection is a matrix-vector product per row, and the small ones
(``k_proj``/``v_proj``: a few MB) cost a launch and a tail more than their bytes. With ``fuse_projections``
the q/k/v weights (and biases) become one ``[N_q + 2 N_kv, H]`` tensor and gate/up one ``[2 I, H]`` tensor,
and the model's ``q_proj``/``k_proj``/``v_proj``/``gate_proj``/``up_proj`` parameters are re-pointed to row
views of them: no extra memory, the same values, and transformers' own forward (prefill) keeps working on
the same storage. Only plain ``nn.Linear`` modules are concatenated (quantized or adapter-wrapped layers are
called as they are). Each output element is the same dot product, but the BLAS library may block the wider
GEMM differently (seen on CPU in bf16: one element in a few hundred calls one unit in the last place apart).

Exactness: with ``backend="torch"`` and ``fuse_projections=False`` every op is transformers' own sequence of
PyTorch ops, so this forward returns bit for bit the logits of the model's ``forward`` with the same attention
function (checked by the tests on CPU). With the Triton kernels the residual stream, rotary and cache writes
are still bit-identical (16-bit dtypes); RMSNorm and SiLU may differ by a unit or two in the last place (fp32
summation order, ``exp``, then two roundings), attention by its summation order.

Supported: ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM`` with ``hidden_act="silu"``, no
tensor-parallel pretraining split and norms in the model's dtype (:func:`unsupported_reason` says why a model is
not); others keep transformers' forward at decode.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from ..ops.linear_rows import MAX_ROWS, linear_rows, linear_rows_available
from ..ops.paged_attention import paged_decode_attention, paged_multi_token_attention
from ..ops.rms_norm import add_rms_norm
from ..ops.rope_cache import rope_cache_write
from ..ops.silu_mul import silu_mul
from ..parallel.tensor_parallel import finish_projection

_FAMILIES = ("llama", "qwen2", "mistral")


def unsupported_reason(model) -> Optional[str]:
    """None when :class:`FusedDecoder` can run ``model``, else a short reason."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in _FAMILIES:
        return f"model type {getattr(cfg, 'model_type', None)!r} (fused decode covers {', '.join(_FAMILIES)})"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"hidden_act {cfg.hidden_act!r} (fused decode needs 'silu')"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
        return "unexpected module layout"
    dtype = inner.embed_tokens.weight.dtype
    for layer in inner.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if norm.weight.dtype != dtype or not hasattr(norm, "variance_epsilon"):
                return "RMSNorm weights not in the model's dtype"
        attn = layer.self_attn
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            return "unexpected attention module layout"
        if attn.head_dim % 2:
            return f"odd head_dim {attn.head_dim}"
    if inner.norm.weight.dtype != dtype:
        return "final norm weight not in the model's dtype"
    return None


def _rows_of_one_tensor(tensors) -> Optional[torch.Tensor]:
    """The tensor whose consecutive row blocks ``tensors`` are (an earlier :func:`concat_linears` on the same
    modules), else None."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or t.storage_offset() != offset \
                or not t.is_contiguous() or t.shape[1:] != first.shape[1:]:
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride())


def concat_linears(linears) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``(weight, bias)`` of one linear layer computing ``linears`` side by side, with each module's parameters
    re-pointed to row views of them (no copy kept, same values); None when they are not all plain
    ``nn.Linear`` of one dtype and device with contiguous weights, or only some have a bias."""
    if not all(type(m) is nn.Linear for m in linears):
        return None
    ws = [m.weight for m in linears]
    if any(w.dtype != ws[0].dtype or w.device != ws[0].device or not w.is_contiguous() for w in ws):
        return None
    has_bias = [m.bias is not None for m in linears]
    if any(has_bias) and not all(has_bias):
        return None
    fused = []
    for name in ("weight", "bias") if all(has_bias) else ("weight",):
        parts = [getattr(m, name) for m in linears]
        whole = _rows_of_one_tensor(parts)
        if whole is None:
            whole = torch.cat([p.detach() for p in parts])
            start = 0
            for m, p in zip(linears, parts):
                setattr(m, name, nn.Parameter(whole[start:start + p.shape[0]], requires_grad=p.requires_grad))
                start += p.shape[0]
        fused.append(whole)
    return fused[0], (fused[1] if len(fused) == 2 else None)


class FusedDecoder:
    """Decode-step forward of one model over a :class:`~rast_kernels.engine.cache.PagedKVCache`.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A supported model (:func:`unsupported_reason` returns None); its modules are used, not copied.
    backend : {"auto", "triton", "torch"}
        The fused ops' backend (``"auto"``: Triton kernels on CUDA, PyTorch ops on CPU).
    fuse_projections : bool
        Concatenate the q/k/v and the gate/up weights (module docstring); this re-points the model's
        parameters to views of the concatenated tensors.
    onednn : bool or None
        Run the linear layers through :func:`cpu_linear` (the weight-streaming ``linear_rows`` kernel for up to 8
        rows, oneDNN above) instead of ``nn.functional.linear``. None (default): on for float32 models on CPU when
        oneDNN is available. At decode a linear layer is a few matrix-vector products; PyTorch's CPU ``linear``
        goes to MKL, which on the AMD EPYC development VM reads the weights at 13-17 GB/s for one row and 5-9 GB/s
        for four, against 23-30 and 17 GB/s through oneDNN (``benchmarks/RESULTS.md``). Same dot products,
        another summation order (fp32 rounding noise).
    """

    def __init__(self, model, backend: str = "auto", fuse_projections: bool = True, onednn: Optional[bool] = None):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"fused decode does not support this model: {reason}")
        self.model = model
        self.backend = backend
        if onednn is None:
            p = next(model.parameters())
            onednn = p.device.type == "cpu" and p.dtype == torch.float32 and onednn_linear_available()
        self.onednn = bool(onednn)
        self.linear = cpu_linear if self.onednn else nn.functional.linear
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        # per layer: (qkv weight, bias) and (gate/up weight, bias), or None to call the modules one by one
        self.qkv, self.gate_up = [], []
        with torch.no_grad():
            for layer in model.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                self.qkv.append(concat_linears([attn.q_proj, attn.k_proj, attn.v_proj]) if fuse_projections else None)
                self.gate_up.append(concat_linears([mlp.gate_proj, mlp.up_proj]) if fuse_projections else None)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, cache, slot: torch.Tensor, lens: torch.Tensor,
                 block_table: torch.Tensor) -> torch.Tensor:
        """Logits ``[b * Q, V]`` (model dtype; row-major over ``[b, Q]``) of ``Q`` new tokens per row over a paged
        cache: a decode step (``Q = 1``) or a speculative verify pass.

        ``ids``/``pos``: ``[b, Q]`` int64 tokens and their (consecutive) positions per row. ``cache``: the model's
        :class:`~rast_kernels.engine.cache.PagedKVCache`; the new keys/values go to the token slots ``slot``
        ``[b * Q]``. ``lens``: ``[b]`` each row's cache length, the new tokens included (0: the row attends to
        nothing); query ``j`` of a row reads positions ``< lens - Q + j + 1`` (causal). ``block_table``:
        ``[b, max_blocks]`` int32. Device ops only (capturable in a CUDA graph)."""
        inner, be = self.model.model, self.backend
        b, nq = ids.shape
        rows = b * nq
        h = inner.embed_tokens(ids.reshape(-1))                 # [b * Q, H]
        cos, sin = inner.rotary_emb(h.view(b, nq, -1), pos)     # [b, Q, D] each, model dtype
        cos, sin = cos.reshape(rows, -1), sin.reshape(rows, -1)
        residual = None
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            norm = layer.input_layernorm
            x, residual = add_rms_norm(h, norm.weight, norm.variance_epsilon, residual, backend=be)
            d = attn.head_dim
            nh, nk = self.n_heads * d, self.n_kv_heads * d
            if self.qkv[i] is not None:
                qkv = self.linear(x, *self.qkv[i])                   # [rows, nh + 2 nk]; q/k/v are row-strided views
                q, k, v = qkv[:, :nh], qkv[:, nh:nh + nk], qkv[:, nh + nk:]
            else:
                q, k, v = self._proj(attn.q_proj, x), self._proj(attn.k_proj, x), self._proj(attn.v_proj, x)
            q, k, v = q.view(rows, self.n_heads, d), k.view(rows, self.n_kv_heads, d), v.view(rows, self.n_kv_heads, d)
            pool = cache.layers[i]
            k_pool, v_pool = pool.keys, pool.values                 # [num_blocks + 1, BS, H_kv, D]
            q = rope_cache_write(q, k, v, cos, sin, k_pool.view(-1, self.n_kv_heads, d),
                                 v_pool.view(-1, self.n_kv_heads, d), slot, backend=be)
            if nq == 1:
                o = paged_decode_attention(q, k_pool, v_pool, block_table, lens, scale=attn.scaling, backend=be)
            else:
                o = paged_multi_token_attention(q.view(b, nq, self.n_heads, d), k_pool, v_pool, block_table, lens,
                                                scale=attn.scaling, backend=be)
            h = self._proj(attn.o_proj, o.reshape(rows, self.n_heads * d))
            norm = layer.post_attention_layernorm
            x, residual = add_rms_norm(h, norm.weight, norm.variance_epsilon, residual, backend=be)
            if self.gate_up[i] is not None:
                gu = self.linear(x, *self.gate_up[i])                # [rows, 2 I]
                n_i = mlp.gate_proj.out_features
                gate, up = gu[:, :n_i], gu[:, n_i:]
            else:
                gate, up = self._proj(mlp.gate_proj, x), self._proj(mlp.up_proj, x)
            h = self._proj(mlp.down_proj, silu_mul(gate, up, backend=be))
        x, _ = add_rms_norm(h, inner.norm.weight, inner.norm.variance_epsilon, residual, backend=be)
        return self._proj(self.model.lm_head, x)

    def _proj(self, module, x):
        """A projection module on ``x``: plain ``nn.Linear`` through :attr:`linear` (then the collective of a
        tensor-parallel shard, which the module's own forward hook does on transformers' path), anything else
        (quantized, adapter-wrapped) as it is."""
        if type(module) is nn.Linear:
            return finish_projection(module, self.linear(x, module.weight, module.bias))
        return module(x)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T + bias`` through oneDNN (the op PyTorch's own CPU inference compiler uses), on the plain
    ``[N, K]`` weight: no packed copy, no extra memory. CPU tensors."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused forward's float32 CPU linear layer: :func:`~rast_kernels.ops.linear_rows.linear_rows` for up to
    ``MAX_ROWS`` rows (a decode step of up to 8 rows, a speculative verify pass: the weight read once, and a row's
    result independent of the other rows), oneDNN (:func:`onednn_linear`) for more rows or without the kernel."""
    if x.shape[0] <= MAX_ROWS and linear_rows_available():
        return linear_rows(x, weight, bias)
    return onednn_linear(x, weight, bias)


@functools.lru_cache(maxsize=None)
def onednn_linear_available() -> bool:
    """Whether :func:`onednn_linear` works in this PyTorch build (a private op: probed, not assumed)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        got = onednn_linear(torch.ones(2, 3), torch.ones(4, 3), torch.ones(4))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool(torch.equal(got, torch.full((2, 4), 4.0)))
