"""Model profiles: the architecture of an LLM, and what the cost model derives from it.

A profile states the published architecture (layers, widths, heads, experts, MLA ranks) and
the published parameter counts with their sources. Everything the cost model needs is derived
from the architecture: parameters per layer, weight bytes, KV bytes per token, FLOPs per token
at a given context. The stated parameter counts are a cross-check: a profile whose
architecture does not add up to them (within 2 %) is refused, which catches typos.
"""
from __future__ import annotations

import math
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from core.config import StrictModel

DTYPE_BYTES: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
Dtype = Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4"]

_COUNT = re.compile(r"^\s*(?P<num>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[KMBT]?)\s*$")
_COUNT_UNITS = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def parse_count(value: Any) -> int:
    """A parameter count: ``'8.03B'`` -> 8030000000, ``'46.7B'``, or a plain integer."""
    if isinstance(value, bool):
        raise ValueError(f"expected a count such as '8.03B', got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _COUNT.match(value)
        if match and (match["unit"] or "." not in match["num"]):
            return int(round(float(match["num"]) * _COUNT_UNITS[match["unit"]]))
    raise ValueError(f"expected a count such as '8.03B' or '405M' (K, M, B, T suffixes), got {value!r}")


Count = Annotated[int, BeforeValidator(parse_count)]

_PROFILE_NAME = re.compile(r"^[a-z][a-z0-9.-]{0,46}[a-z0-9]$")


def check_profile_name(value: str) -> str:
    """Profile names follow the vendors' (``llama-3.1-8b``): like SafeName, but dots allowed."""
    if not _PROFILE_NAME.match(value) or ".." in value:
        raise ValueError(f"{value!r} is not a valid profile name: use 2-48 lowercase letters, digits, '-' and '.', "
                         "starting with a letter and ending with a letter or digit")
    return value


ProfileName = Annotated[str, AfterValidator(check_profile_name)]


class MoeSpec(StrictModel):
    """Mixture of experts: each token is routed to ``experts_per_token`` of ``experts``."""

    experts: int = Field(gt=1)
    experts_per_token: int = Field(gt=0)
    expert_intermediate_size: int = Field(gt=0)
    shared_experts: int = Field(default=0, ge=0)  # always active (DeepSeek)
    dense_layers: int = Field(default=0, ge=0)  # the first N layers use the dense MLP instead

    @model_validator(mode="after")
    def _top_k(self) -> "MoeSpec":
        if self.experts_per_token > self.experts:
            raise ValueError(f"experts_per_token ({self.experts_per_token}) exceeds experts ({self.experts})")
        return self


class MlaSpec(StrictModel):
    """Multi-head latent attention (DeepSeek): the KV cache holds a compressed latent."""

    kv_lora_rank: int = Field(gt=0)
    qk_rope_head_dim: int = Field(gt=0)
    qk_nope_head_dim: int = Field(gt=0)
    v_head_dim: int = Field(gt=0)
    q_lora_rank: int = Field(default=0, ge=0)  # 0: queries projected directly from the hidden state


class ModelProfile(StrictModel):
    """An LLM's architecture (YAML ``kind: model``)."""

    KIND: ClassVar[str] = "model"

    name: ProfileName
    description: str = ""
    layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    heads: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)  # dense SwiGLU MLP width
    vocab_size: int = Field(gt=0)
    tie_embeddings: bool = False
    context_length: int = Field(gt=0)  # longest context the model supports
    dtype: Dtype = "bf16"  # weights as served
    compute_dtype: Dtype | None = None  # matmul precision where it differs from the weights' (fp8 weights, bf16 compute); None = dtype
    kv_dtype: Dtype = "bf16"
    moe: MoeSpec | None = None
    mla: MlaSpec | None = None
    parameters: Count = Field(gt=0)  # published total, a cross-check of the architecture
    active_parameters: Count | None = None  # published per-token count (MoE)
    sources: dict[str, str] = {}

    @model_validator(mode="after")
    def _consistent(self) -> "ModelProfile":
        if self.mla is None and self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.moe is not None and self.moe.dense_layers > self.layers:
            raise ValueError(f"moe.dense_layers ({self.moe.dense_layers}) exceeds layers ({self.layers})")
        for label, stated, derived in (("parameters", self.parameters, self.total_params),
                                       ("active_parameters", self.active_parameters, self.active_params)):
            if stated is not None and abs(derived / stated - 1.0) > 0.02:
                raise ValueError(f"{label}: the architecture adds up to {derived / 1e9:.2f}B parameters, "
                                 f"not the stated {stated / 1e9:.2f}B (check the widths)")
        if self.moe is not None and self.active_parameters is None:
            raise ValueError("a mixture-of-experts model must state active_parameters")
        unknown = sorted(k for k in self.sources if k.split(".")[0] not in type(self).model_fields)
        if unknown:
            raise ValueError(f"sources name keys that do not exist: {', '.join(unknown)}")
        return self

    # ---- structure -------------------------------------------------------------------------

    @property
    def weight_dtype_bytes(self) -> float:
        return DTYPE_BYTES[self.dtype]

    @property
    def attn_params_per_layer(self) -> int:
        """Projection weights of one attention block (Q, K, V, O; MLA's down/up projections)."""
        h = self.hidden_size
        if self.mla is None:
            return h * self.heads * self.head_dim * 2 + h * self.kv_heads * self.head_dim * 2
        a = self.mla
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        q = h * a.q_lora_rank + a.q_lora_rank * self.heads * qk if a.q_lora_rank else h * self.heads * qk
        kv = h * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * self.heads * (a.qk_nope_head_dim + a.v_head_dim)
        return q + kv + self.heads * a.v_head_dim * h

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size  # SwiGLU: gate, up, down

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.moe.expert_intermediate_size if self.moe else 0

    @property
    def moe_layers(self) -> int:
        return self.layers - self.moe.dense_layers if self.moe else 0

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    @property
    def shared_block_params(self) -> int:
        """Block weights every token uses: attention, norms, dense MLPs, shared experts, routers."""
        norms = 2 * self.hidden_size * self.layers
        shared = self.layers * self.attn_params_per_layer + norms + self.dense_layers * self.dense_mlp_params
        if self.moe:
            shared += self.moe_layers * (self.moe.shared_experts * self.expert_params + self.moe.experts * self.hidden_size)
        return shared

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """The LM head (logits); counted as separate weights unless tied to the embedding."""
        return self.vocab_size * self.hidden_size

    @property
    def block_params(self) -> int:
        return self.shared_block_params + (self.moe_layers * self.moe.experts * self.expert_params if self.moe else 0)

    @property
    def total_params(self) -> int:
        return self.block_params + self.embedding_params + (0 if self.tie_embeddings else self.head_params)

    @property
    def active_block_params(self) -> int:
        """Block weights one token multiplies with (top-k experts only)."""
        if not self.moe:
            return self.block_params
        return self.shared_block_params + self.moe_layers * self.moe.experts_per_token * self.expert_params

    @property
    def active_params(self) -> int:
        return self.active_block_params + self.embedding_params + (0 if self.tie_embeddings else self.head_params)

    def touched_block_params(self, tokens: int) -> float:
        """Block weights read by a step over ``tokens`` tokens: with MoE, the distinct experts the
        batch routes to grow with it (expected count under uniform routing)."""
        if not self.moe or tokens <= 0:
            return float(self.block_params if not self.moe else self.shared_block_params)
        e, k = self.moe.experts, self.moe.experts_per_token
        touched = e * (1.0 - (1.0 - k / e) ** tokens)
        return self.shared_block_params + self.moe_layers * touched * self.expert_params

    @property
    def active_mlp_width(self) -> int:
        """Intermediate width one token's MLP works through (average over layers)."""
        if not self.moe:
            return self.intermediate_size
        moe_width = (self.moe.experts_per_token + self.moe.shared_experts) * self.moe.expert_intermediate_size
        return round((self.dense_layers * self.intermediate_size + self.moe_layers * moe_width) / self.layers)

    @property
    def attn_dims(self) -> tuple[int, int]:
        """(query-key dot width, value width) per head, as attention computes them."""
        if self.mla is None:
            return self.head_dim, self.head_dim
        return self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim, self.mla.v_head_dim

    @property
    def attn_flops_per_pair(self) -> int:
        """FLOPs of one (query token, cached token) pair across all layers: QK^T and AV."""
        qk, v = self.attn_dims
        return 2 * self.layers * self.heads * (qk + v)

    # ---- what the rest of the testbed uses -------------------------------------------------------

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes of one token: K and V of every KV head in every layer, or MLA's latent."""
        per_elem = DTYPE_BYTES[self.kv_dtype]
        if self.mla is not None:
            return int(self.layers * (self.mla.kv_lora_rank + self.mla.qk_rope_head_dim) * per_elem)
        return int(2 * self.layers * self.kv_heads * self.head_dim * per_elem)

    @property
    def weight_bytes(self) -> int:
        """All weights as served (every expert, embedding and head)."""
        return int(math.ceil(self.total_params * self.weight_dtype_bytes))

    def flops_per_token(self, context_len: int = 0) -> float:
        """FLOPs to process one token attending over ``context_len`` tokens: 2 per multiply-add
        of every active weight except the embedding lookup, plus attention over the context."""
        if context_len < 0:
            raise ValueError("context_len must be >= 0")
        matmul = self.active_block_params + self.head_params
        return 2.0 * matmul + self.attn_flops_per_pair * context_len
