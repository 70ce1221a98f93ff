"""The decoder shared by Llama, Qwen2, Qwen3 and Mistral, running on a paged KV cache.

The model takes flattened tokens of a whole batch (`input_ids [T]`, `positions [T]`) and hands
each layer's q/k/v to the attention backend, which owns the KV pages and the batch layout.
Projections are fused (q/k/v in one GEMM, gate/up in one) so later GPU kernels can replace them
one for one. Parameter names follow the HF checkpoint names where they are not fused.

Layers carry the residual stream beside the hidden states (SGLang style): each norm adds the
previous block's output to the residual and normalises the sum, so on CUDA one fused kernel
does both (`CausalLM.set_fused_kernels`); the PyTorch path computes exactly what HF does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pegboard.core.models.config import ModelConfig
from pegboard.core.models.layers import Linear, MergedLinear, RMSNorm, silu_and_mul
from pegboard.core.models.rope import RotaryEmbedding
from pegboard.sdk.linear import LinearLayer
from pegboard.sdk.slots import AttentionBackend
from torch import nn

#: Builds one projection: `(name, in_features, out_features, shards, bias) -> LinearLayer`
#: (the active linear plugin's `LinearMethod.create`, see `pegboard.sdk.linear`).
LinearFactory = Callable[[str, int, int, "dict[str, int] | None", bool], LinearLayer]


def dense_linear(
    name: str, in_features: int, out_features: int, shards: dict[str, int] | None, bias: bool
) -> LinearLayer:
    """The unquantized layers, for a model built without a linear plugin (tests, tools)."""
    if shards is not None:
        return MergedLinear(in_features, shards, bias)
    return Linear(in_features, out_features, bias=bias)


class DecoderAttention(nn.Module):
    """Self-attention of one layer: fused qkv projection, optional per-head q/k RMSNorm
    (Qwen3), rope, the paged attention backend, output projection."""

    def __init__(
        self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding, linear: LinearFactory
    ) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        q_size = cfg.num_heads * cfg.head_dim
        kv_size = cfg.num_kv_heads * cfg.head_dim
        prefix = f"model.layers.{layer}.self_attn"
        self.qkv_proj = linear(
            f"{prefix}.qkv_proj",
            cfg.hidden_size,
            q_size + 2 * kv_size,
            {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size},
            cfg.qkv_bias,
        )
        self.o_proj = linear(f"{prefix}.o_proj", q_size, cfg.hidden_size, None, cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.split = [q_size, kv_size, kv_size]
        # A plain attribute, not a submodule: every layer shares the model's one rope table.
        self.__dict__["rotary"] = rotary
        self.fused_rope = False  # q/k norm + rope in one in-place kernel
        self.fused_store = False  # ... that also stores K/V (`kernels.fused_rope_store`)

    def set_fused_kernels(self, enabled: bool) -> None:
        from pegboard.core.kernels import fused_rope_store

        self.fused_rope = enabled
        self.fused_store = enabled and fused_rope_store()

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor | None,
        attn: AttentionBackend,
        qkv: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention over `x`, or over `qkv`, its projection computed already (x None: the
        layer's norm ran inside the qkv GEMV, `DecoderLayer`)."""
        if qkv is None:
            qkv = self.qkv_proj(x)
        q, k, v = qkv.split(self.split, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        target = self._kv_store_target(attn)
        if target is not None:  # rope and the KV store in one kernel
            self.rotary.rotate_and_store(positions, q, k, v, target, self.q_norm, self.k_norm)
            out = attn.attend(self.layer, q)
        else:
            if self.fused_rope:
                self.rotary.rotate_in_place(positions, q, k, self.q_norm, self.k_norm)
            else:
                if self.q_norm is not None:
                    q = self.q_norm(q)
                    k = self.k_norm(k)
                q, k = self.rotary(positions, q, k)
            out = attn.forward(self.layer, q, k, v)
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))

    def _kv_store_target(self, attn: AttentionBackend):
        """Where the rope kernel stores K/V itself (`AttentionBackend.kv_store_target`), when
        the switch is on and the backend offers it; else None (`forward` stores them)."""
        if not self.fused_store or not getattr(attn, "supports_fused_kv_store", False):
            return None
        return attn.kv_store_target(self.layer)


class DecoderMLP(nn.Module):
    """SwiGLU feed-forward with the gate and up projections fused."""

    def __init__(self, cfg: ModelConfig, layer: int, linear: LinearFactory) -> None:
        super().__init__()
        size = cfg.intermediate_size
        prefix = f"model.layers.{layer}.mlp"
        self.gate_up_proj = linear(
            f"{prefix}.gate_up_proj",
            cfg.hidden_size,
            2 * size,
            {"gate_proj": size, "up_proj": size},
            cfg.mlp_bias,
        )
        self.down_proj = linear(f"{prefix}.down_proj", size, cfg.hidden_size, None, cfg.mlp_bias)
        self.act_fn: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul
        #: `dense.takes_gate_up` when the down projection may take the gate/up output and
        #: compute SiLU-and-mul in its GEMV (`dense.shares_silu` or, with
        #: `PEGBOARD_FUSED_SILU_DOWN=1`, `dense.takes_gate_up`), else None.
        self.takes_gate_up: Callable[[int, torch.Tensor], bool] | None = None
        #: `dense.silu_gate_up` when the gate/up GEMV may compute SiLU-and-mul in its epilogue
        #: (`PEGBOARD_FUSED_SILU_GATE_UP=1`), else None.
        self.silu_gate_up: Callable | None = None

    def set_fused_kernels(self, enabled: bool) -> None:
        self.takes_gate_up = self.silu_gate_up = None
        if enabled:
            from pegboard.core.kernels import dense, fused_silu_down, fused_silu_gate_up
            from pegboard.core.kernels.activation import silu_and_mul as fused_silu_and_mul

            self.act_fn = fused_silu_and_mul
            if fused_silu_gate_up():
                self.silu_gate_up = dense.silu_gate_up
            mode = fused_silu_down()
            if mode != "0":
                self.takes_gate_up = dense.shares_silu if mode == "auto" else dense.takes_gate_up
        else:
            self.act_fn = silu_and_mul

    def forward(self, x: torch.Tensor | None, gate_up: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP of `x`, or of `gate_up`, its gate/up projection computed already (x None:
        the layer's norm ran inside the gate/up GEMV, `DecoderLayer`)."""
        if gate_up is None:
            act = self._silu_in_gate_up(x)
            if act is not None:  # SiLU-and-mul in the gate/up GEMV's epilogue
                return self.down_proj(act)
            gate_up = self.gate_up_proj(x)
        if self._down_takes_gate_up(gate_up):  # SiLU-and-mul inside the down GEMV
            return self.down_proj(gate_up, gate_up=True)
        return self.down_proj(self.act_fn(gate_up))

    def _silu_in_gate_up(self, x: torch.Tensor) -> torch.Tensor | None:
        """`silu_and_mul(gate_up_proj(x))` from one GEMV launch where the switch is on, the
        gate/up layer is a dense `Linear` on its kernels and its GEMV takes these rows
        (`dense.silu_gate_up`); else None. Decided in Python by the row count (graph-safe)."""
        layer = self.gate_up_proj
        if self.silu_gate_up is None or not isinstance(layer, Linear) or layer.kernel is None:
            return None
        return self.silu_gate_up(x, layer.weight, layer.bias)

    def _down_takes_gate_up(self, gate_up: torch.Tensor) -> bool:
        """Whether the down projection is a dense layer on its GEMV/skinny kernels
        (`Linear.kernel`) whose GEMV takes this many rows; decided in Python by the row
        count, so a CUDA graph captures whichever path its batch size takes. Other linear
        plugins' layers (W4A16) keep the separate SiLU-and-mul."""
        down = self.down_proj
        if self.takes_gate_up is None or not isinstance(down, Linear) or down.kernel is None:
            return False
        rows = gate_up.numel() // gate_up.shape[-1] if gate_up.shape[-1] else 0
        return self.takes_gate_up(rows, down.weight)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: `x + attn(norm(x))`, then `x + mlp(norm(x))`, with the
    residual stream carried separately: `forward(positions, hidden, residual, attn)` takes the
    previous block's output and the residual before it (None in the first layer, whose input
    is the embedding) and returns this layer's MLP output and the residual before it."""

    def __init__(
        self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding, linear: LinearFactory
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DecoderAttention(cfg, layer, rotary, linear)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = _mlp(cfg, layer, linear)
        #: `fused_norm_gemv()` when switched on: each norm with its residual add may run
        #: inside the next GEMV (qkv, gate/up) with at least this many rows per program; 0 off.
        self.norm_in_gemv = 0

    def set_fused_kernels(self, enabled: bool) -> None:
        from pegboard.core.kernels import fused_norm_gemv

        self.norm_in_gemv = fused_norm_gemv() if enabled else 0

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        attn: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
            hidden = self.self_attn(positions, hidden, attn)
        else:
            qkv_proj = self.self_attn.qkv_proj
            hidden, residual, qkv = self._norm(self.input_layernorm, hidden, residual, qkv_proj)
            hidden = self.self_attn(positions, hidden, attn, qkv=qkv)
        gate_up_proj = getattr(self.mlp, "gate_up_proj", None)  # (an MoE block has none)
        hidden, residual, gate_up = self._norm(
            self.post_attention_layernorm, hidden, residual, gate_up_proj
        )
        if gate_up is None:
            return self.mlp(hidden), residual
        return self.mlp(None, gate_up=gate_up), residual

    def _norm(self, norm: RMSNorm, hidden: torch.Tensor, residual: torch.Tensor, proj):
        """`(norm(hidden, residual)..., None)`, or `(None, hidden + residual, proj(normed))`
        from one GEMV launch (`dense.norm_linear`) where the switch is on, `proj` is a dense
        layer on its kernels, neither module is wrapped (tensor parallelism's fused all-reduce
        replaces the norm's forward; hooks) and the GEMV takes the rows. Decided in Python by
        the row count, so a CUDA graph captures whichever path its batch size takes."""
        if (
            self.norm_in_gemv
            and _on_kernels(norm)
            and isinstance(proj, Linear)
            and _on_kernels(proj)
        ):
            from pegboard.core.kernels.dense import norm_linear

            x = hidden.reshape(-1, hidden.shape[-1])
            fused = norm_linear(
                x, residual.reshape(x.shape), norm.weight, norm.eps, proj.weight, proj.bias,
                self.norm_in_gemv,
            )  # fmt: skip
            if fused is not None:
                out, residual = fused
                return None, residual.view(hidden.shape), out
        hidden, residual = norm(hidden, residual)
        return hidden, residual, None


def _on_kernels(module: nn.Module) -> bool:
    """Whether `module` runs its fused kernel (`kernel` set) through its own class's forward:
    no hooks, no replaced `forward`."""
    wrapped = "forward" in vars(module) or module._forward_hooks or module._forward_pre_hooks
    return getattr(module, "kernel", None) is not None and not wrapped


def _mlp(cfg: ModelConfig, layer: int, linear: LinearFactory) -> nn.Module:
    """The layer's feed-forward: SwiGLU, or an MoE family's sparse block (`moe.MoEBlock`)."""
    if cfg.moe is None or not cfg.moe.is_sparse(layer):
        return DecoderMLP(cfg, layer, linear)
    from pegboard.core.models.moe import MoEBlock  # imports this module

    return MoEBlock(cfg, layer, sum(cfg.moe.is_sparse(i) for i in range(layer)), linear)


class DecoderBody(nn.Module):
    """Embedding, the layers and the final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig, max_len: int, linear: LinearFactory) -> None:
        super().__init__()
        # `_weight`: no random init (the loader fills every value). Its `normal_` would also
        # import torch._dynamo under the loader's meta-device context: seconds per process.
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.rotary_emb = RotaryEmbedding(cfg.rope, cfg.head_dim, max_len)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, self.rotary_emb, linear) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """A decoder-only language model over flattened batches and a paged KV cache.

    `forward(input_ids [T], positions [T], attn)` returns the final hidden states `[T, hidden]`;
    `compute_logits(hidden [N, hidden])` returns logits `[N, vocab]` in `logits_dtype`
    (float32; None: the model's dtype, as the LM head computes them, which the model runner
    sets), written into `out` when given (the decode CUDA graphs' static buffer).
    `fused_kernels` says whether the fused Triton kernels run (`set_fused_kernels`),
    `gemv_kernels` whether the linear layers' GEMV kernels are among them.
    `linear` builds each projection (the linear plugin's layers; dense without one).
    """

    logits_dtype: torch.dtype | None = torch.float32

    def __init__(
        self, cfg: ModelConfig, max_len: int, linear: LinearFactory = dense_linear
    ) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderBody(cfg, max_len, linear)
        self.lm_head = linear("lm_head", cfg.hidden_size, cfg.vocab_size, None, False)
        self.fused_kernels = False
        #: Per-layer KV cache scales read from the checkpoint (`{layer: {"k": s, "v": s}}`).
        self.kv_scales: dict[int, dict[str, float]] = {}
        self.gemv_kernels = False
        self.tie_weights()

    def set_fused_kernels(self, enabled: bool) -> None:
        """Run the norms (with the residual add), rope (with Qwen3's q/k norm) and SiLU-and-mul
        as the fused Triton kernels of `pegboard.core.kernels`, or as PyTorch ops; with them, the
        linear layers and the LM head run few-row products as GEMV kernels where those were
        measured faster than cuBLAS (unless `PEGBOARD_DISABLE_GEMV=1`; `gemv_kernels` says).
        Enabling imports Triton; the kernels need CUDA tensors (or `TRITON_INTERPRET=1` on CPU)."""
        kinds = (RMSNorm, RotaryEmbedding, DecoderAttention, DecoderMLP, DecoderLayer, LinearLayer)
        for module in self.modules():
            if isinstance(module, kinds):
                module.set_fused_kernels(enabled)
        self.fused_kernels = enabled
        self.gemv_kernels = getattr(self.lm_head, "kernel", None) is not None

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config ties them (again after
        `to_empty`, which gives every module its own new parameter)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        hidden = self.model.embed_tokens(input_ids)
        residual = None
        for layer in self.model.layers:
            hidden, residual = layer(positions, hidden, residual, attn)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if out is not None:
            return out.copy_(logits)
        return logits if self.logits_dtype is None else logits.to(self.logits_dtype)
