"""The model section: :class:`MoEConfig` (every MoE layer), :class:`ModelConfig` (the language model) and the
model presets (:data:`MODEL_PRESETS`), from the tiny models trained here to the paper's sizes, which are only
simulated."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from fsmoe.config.values import (
    ARCH_NAMES,
    DROP_POLICIES,
    EXPERT_NAMES,
    GATE_NAMES,
    MODEL_NAMES,
    NOISY_GATES,
    ORDER_NAMES,
    check_at_least,
    check_choice,
    choice_parser,
    opt,
    optional_parser,
    parse_bool,
)

# What a gate does not use: set anyway (changed from the default), MoEConfig warns; a job that switches to
# the gate without giving them resets them to their defaults (JobConfig.with_overrides).
GATE_IGNORES = {
    "expert_choice": ("drop_policy", "renormalize"),
    "softmoe": ("top_k", "capacity_factor", "min_capacity", "capacity_multiple", "drop_policy", "renormalize"),
}


@dataclass(kw_only=True, frozen=True)
class MoEConfig:
    """Everything needed to build an :class:`~fsmoe.moe.layer.MoELayer` for model dim D.

    ``capacity_factor`` is the paper's f: each expert has C = ceil(k·f·T/E) slots per routing group
    (T tokens in the group). ``None`` means no token is ever dropped (C = the busiest expert's load).
    """

    num_experts: int = opt(4, "number of experts E", flag="--experts", parse=int)
    top_k: int = opt(2, "experts per token k (the switch gate is top-1)", parse=int)
    d_hidden: int = opt(256, "expert hidden dim H", flag="--hidden", parse=int)
    gate: str = opt("gshard", "router", parse=choice_parser("gate", GATE_NAMES))
    order: str = opt("index", "token layout implementation", parse=choice_parser("order", ORDER_NAMES))
    expert: str = opt("ffn", "expert network", parse=choice_parser("expert", EXPERT_NAMES))
    capacity_factor: float | None = opt(1.25, "capacity factor f, or 'none' for no token dropping",
                                        parse=optional_parser(float))
    min_capacity: int = opt(0, "lower bound on the capacity C per expert", parse=int)
    capacity_multiple: int = opt(1, "C is rounded up to a multiple of this (pipelining pads to lcm(r_fwd, r_bwd))",
                                 parse=int)
    drop_policy: str = opt("position", "who keeps a slot when an expert is full",
                           parse=choice_parser("drop policy", DROP_POLICIES))
    renormalize: bool = opt(False, "divide each token's kept weights by their sum", parse=parse_bool)
    noisy: bool = opt(False, "GShard noisy gating (in training only)", parse=parse_bool)
    aux_loss_coef: float = opt(0.01, "load-balancing loss weight", parse=float)
    z_loss_coef: float = opt(0.0, "router z-loss weight", parse=float)
    xmoe_dim: int = opt(16, "X-MoE low-rank routing dimension", parse=int)
    softmoe_slots: int = opt(1, "SoftMoE slots per expert", parse=int)

    def __post_init__(self) -> None:
        """Refuses wrong types and values (naming the field and the value) and warns about settings the
        chosen gate ignores. Types are checked here because a config built in Python is not coerced
        like flags and job files are: ``True`` is not an int, ``4.0`` is not an int, ``'1.0'`` is not
        a number."""
        check_choice("gate", self.gate, GATE_NAMES)
        check_choice("order", self.order, ORDER_NAMES)
        check_choice("expert", self.expert, EXPERT_NAMES)
        check_choice("drop policy", self.drop_policy, DROP_POLICIES)
        check_at_least(self, 1, "num_experts", "d_hidden", "capacity_multiple", "xmoe_dim", "softmoe_slots")
        check_at_least(self, 0, "min_capacity")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"MoEConfig: top_k must be an int, got {self.top_k!r}")
        for name in ("renormalize", "noisy"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MoEConfig: {name} must be True or False, got {getattr(self, name)!r}")

        def finite_number(value: object) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

        f = self.capacity_factor
        if f is not None and not (finite_number(f) and f > 0):
            raise ValueError(
                f"MoEConfig: capacity_factor must be a finite number > 0 (or None for no dropping), got {f!r}"
            )
        for name in ("aux_loss_coef", "z_loss_coef"):  # a negative weight would reward imbalance
            if not (finite_number(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"MoEConfig: {name} must be a finite number >= 0, got {getattr(self, name)!r}")

        k, E = self.top_k, self.num_experts
        if self.gate not in ("expert_choice", "softmoe") and not 1 <= k <= E:
            raise ValueError(f"top_k must satisfy 1 <= k <= E, got k={k} with E={E} experts")
        if self.gate == "expert_choice" and not 1 <= k <= E:
            # C = ceil(k·f·T/E): with k > E an expert would pick more tokens than there are.
            raise ValueError(
                f"top_k is the average experts per token; expert_choice needs 1 <= k <= E, got k={k} with E={E} experts"
            )
        if self.noisy and self.gate not in NOISY_GATES:
            raise ValueError(f"noisy gating applies to the {', '.join(NOISY_GATES)} gates, not {self.gate!r}")
        if self.gate == "switch" and k != 1:
            raise ValueError(f"the switch gate is top-1, got top_k={k}")
        if self.gate == "expert_choice" and f is None:
            raise ValueError("the expert_choice gate needs a capacity_factor (each expert picks C tokens)")

        # Accepted but pointless: warn rather than refuse, so that one job file can switch gates. Only a
        # value changed from its default warns (every gate gets the defaults, e.g. top_k=2).
        ignored = GATE_IGNORES.get(self.gate, ())
        defaults = {fld.name: fld.default for fld in dataclasses.fields(self)}
        changed = [f"{name}={getattr(self, name)!r}" for name in ignored if getattr(self, name) != defaults[name]]
        if changed:
            warnings.warn(f"the {self.gate} gate ignores {', '.join(changed)}", UserWarning, stacklevel=3)
        if self.renormalize and k == 1 and self.gate not in ("expert_choice", "softmoe"):
            warnings.warn(
                f"renormalize=True with top_k=1 makes every kept weight 1, so the {self.gate} gate gets no "
                "gradient from the task loss (only from the aux losses)",
                UserWarning, stacklevel=3,
            )


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    """Shape of the language model. ``arch`` ``gpt``: GPT-2-MoE (LayerNorm, learned positions, GELU dense
    MLPs, multi-head attention); ``mixtral``: Mixtral-style (RMSNorm, RoPE with ``rope_theta``,
    grouped-query attention with ``n_kv_heads`` key/value heads, SwiGLU experts). ``moe`` configures every
    MoE layer; ``d_ff`` is the dense MLPs' hidden size; block i (0-based) is MoE when
    ``(i + 1) % moe_every == 0`` (``moe_every > n_layers``: a purely dense model). ``name`` is the preset it
    started from (:data:`MODEL_PRESETS`)."""

    name: str = opt("tiny", "model preset (its sizes; the flags below override them)", flag="--model",
                    parse=choice_parser("model preset", MODEL_NAMES))
    arch: str = opt("gpt", "model family: gpt (GPT-2-MoE) or mixtral", parse=choice_parser("arch", ARCH_NAMES))
    vocab_size: int = opt(256, "vocabulary size (256: bytes)", parse=int)
    seq_len: int = opt(128, "sequence length L", parse=int)
    d_model: int = opt(128, "model dim D", parse=int)
    n_layers: int = opt(4, "transformer blocks", parse=int)
    n_heads: int = opt(4, "attention heads", parse=int)
    n_kv_heads: int | None = opt(None, "key/value heads of grouped-query attention (mixtral; none: n_heads)",
                                 flag="--kv-heads", parse=optional_parser(int))
    rope_theta: float = opt(10000.0, "RoPE base (mixtral)", parse=float)
    d_ff: int = opt(512, "dense MLP hidden size", parse=int)
    moe: MoEConfig = field(default_factory=MoEConfig)
    moe_every: int = opt(2, "block i is MoE when (i+1) %% N == 0", parse=int)
    dropout: float = opt(0.0, "dropout probability", parse=float)
    tie_embeddings: bool = opt(True, "share the input embedding and the output head", parse=parse_bool)

    def __post_init__(self) -> None:
        check_choice("model preset", self.name, tuple(MODEL_PRESETS))
        check_choice("arch", self.arch, ARCH_NAMES)
        check_at_least(self, 1, "vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "d_ff", "moe_every")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model must be divisible by n_heads, got d_model={self.d_model}, n_heads={self.n_heads}"
            )
        if self.n_kv_heads is not None:
            check_at_least(self, 1, "n_kv_heads")
            if self.arch == "gpt" and self.n_kv_heads != self.n_heads:
                raise ValueError(f"n_kv_heads={self.n_kv_heads}: the gpt arch has multi-head attention "
                                 f"(n_kv_heads = n_heads = {self.n_heads}); grouped-query attention is --arch mixtral")
            if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
                raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} >= 1")
        if self.arch == "mixtral" and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"RoPE needs an even head dim, got d_model/n_heads = {self.d_model // self.n_heads}")
        if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, int | float) or not (
                0 < self.rope_theta < math.inf):
            raise ValueError(f"rope_theta must be a finite number > 0, got {self.rope_theta!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def kv_heads(self) -> int:
        """Key/value heads (``n_heads`` unless grouped-query attention)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def is_moe_layer(self, i: int) -> bool:
        """Whether block ``i`` (0-based) uses an MoE layer instead of the dense MLP."""
        return (i + 1) % self.moe_every == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    def estimated_params(self) -> int:
        """Parameters the model would have, counted from the sizes without building it (embeddings, head
        unless tied, attention, norms, dense MLPs, experts and routers; biases of the gpt arch included)."""
        D, H, E, V = self.d_model, self.moe.d_hidden, self.moe.num_experts, self.vocab_size
        Dh = D // self.n_heads
        gpt = self.arch == "gpt"
        attn = D * D + 2 * D * self.kv_heads * Dh + D * D + (4 * D if gpt else 0)
        norms = (4 if gpt else 2) * D
        expert = 3 * D * H if self.moe.expert == "swiglu" else 2 * D * H + H + D
        dense = 2 * D * self.d_ff + self.d_ff + D if gpt else 3 * D * self.d_ff
        m, R = self.moe, self.moe.xmoe_dim
        router = {"xmoe": D * R + E * R + 1, "softmoe": D * E * m.softmoe_slots}.get(m.gate, D * E)
        blocks = sum(attn + norms + (E * expert + router if self.is_moe_layer(i) else dense)
                     for i in range(self.n_layers))
        embed = V * D + (self.seq_len * D if gpt else 0)
        return embed + blocks + (2 if gpt else 1) * D + (0 if self.tie_embeddings else V * D)


def gpt2_moe_tiny() -> ModelConfig:
    """About 1.1M parameters; ``make run`` trains it on 4 CPU ranks in a few minutes. Each expert's
    hidden size is half the dense MLP's, so with top-2 routing an MoE layer does about the same FLOPs
    per token as the dense MLP it replaces."""
    return ModelConfig(name="tiny", seq_len=128, d_model=128, n_layers=4, n_heads=4, d_ff=512,
                       moe=MoEConfig(num_experts=4, top_k=2, d_hidden=256, capacity_factor=1.25))


def gpt2_moe_small() -> ModelConfig:
    """GPT-2 small's dense dimensions (12 layers, D=768, 12 heads, L=1024) with 8 experts, top-2, in
    every second block: about 284M parameters. Sized for a GPU."""
    return ModelConfig(name="small", seq_len=1024, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                       moe=MoEConfig(num_experts=8, top_k=2, d_hidden=3072, capacity_factor=1.25))


def mixtral_tiny() -> ModelConfig:
    """A Mixtral-style byte model that trains on CPU: 4 layers, all MoE, D=128, 4 heads / 2 KV heads,
    4 SwiGLU experts of H=192 (about the FLOPs of a 512-wide GELU MLP at top-2), untied head."""
    return ModelConfig(name="mixtral-tiny", arch="mixtral", seq_len=128, d_model=128, n_layers=4, n_heads=4,
                       n_kv_heads=2, d_ff=512, moe_every=1, tie_embeddings=False,
                       moe=MoEConfig(num_experts=4, top_k=2, d_hidden=192, expert="swiglu", capacity_factor=1.25))


def gpt2_xl_moe() -> ModelConfig:
    """The paper's GPT2-XL-MoE (digest §6.5): GPT2-XL's 48 layers, D=1600, 25 heads, L=1024, every block
    MoE with FFN experts of H=4D, top-2, f=1.2; 8 experts (the paper sets E by the cluster). A
    simulation preset: about 8.4B parameters, never built on this machine."""
    return ModelConfig(name="gpt2-xl-moe", vocab_size=50257, seq_len=1024, d_model=1600, n_layers=48, n_heads=25,
                       d_ff=6400, moe_every=1,
                       moe=MoEConfig(num_experts=8, top_k=2, d_hidden=6400, capacity_factor=1.2))


def mixtral_8x7b() -> ModelConfig:
    """Mixtral-8x7B: 32 layers, D=4096, 32 heads / 8 KV heads, 8 SwiGLU experts of H=14336, top-2,
    vocabulary 32000, RoPE base 1e6; about 46.7B parameters. A simulation preset."""
    return ModelConfig(name="mixtral-8x7b", arch="mixtral", vocab_size=32000, seq_len=4096, d_model=4096,
                       n_layers=32, n_heads=32, n_kv_heads=8, rope_theta=1e6, d_ff=14336, moe_every=1,
                       tie_embeddings=False,
                       moe=MoEConfig(num_experts=8, top_k=2, d_hidden=14336, expert="swiglu", capacity_factor=1.2))


def mixtral_8x22b() -> ModelConfig:
    """Mixtral-8x22B: 56 layers, D=6144, 48 heads / 8 KV heads, 8 SwiGLU experts of H=16384, top-2,
    vocabulary 32768, RoPE base 1e6; about 141B parameters. A simulation preset."""
    return ModelConfig(name="mixtral-8x22b", arch="mixtral", vocab_size=32768, seq_len=4096, d_model=6144,
                       n_layers=56, n_heads=48, n_kv_heads=8, rope_theta=1e6, d_ff=16384, moe_every=1,
                       tie_embeddings=False,
                       moe=MoEConfig(num_experts=8, top_k=2, d_hidden=16384, expert="swiglu", capacity_factor=1.2))


# The largest model fsmoe builds on a CPU; the paper-sized presets are for `fsmoe simulate`.
MAX_CPU_PARAMS = 2_000_000_000


MODEL_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": gpt2_moe_tiny, "small": gpt2_moe_small, "mixtral-tiny": mixtral_tiny, "gpt2-xl-moe": gpt2_xl_moe,
    "mixtral-8x7b": mixtral_8x7b, "mixtral-8x22b": mixtral_8x22b,
}
assert tuple(MODEL_PRESETS) == MODEL_NAMES


def model_preset(name: str) -> ModelConfig:
    check_choice("model preset", name, tuple(MODEL_PRESETS))
    return MODEL_PRESETS[name]()
