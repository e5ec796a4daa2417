"""The method's choices and rules that params.yaml is checked against, importable without torch or transformers.

Every stage validates all of params.yaml before it starts, so validation must stay cheap (a test runs it in a fresh
interpreter and checks that neither torch nor transformers got imported). `longlora.method.s2attn`,
`longlora.method.rope` and `longlora.method.lora` use these same definitions: each rule is written once.
"""

from __future__ import annotations

from typing import Literal, get_args

DEFAULT_GROUP_SIZE_RATIO = 0.25
"""S²-Attn group size as a share of the sequence length (paper: 1/4; 1/8 degrades, 1/2 does as well)."""

RopeType = Literal["linear", "dynamic", "yarn", "llama3"]
"""Position interpolation: linear (the paper), dynamic NTK, YaRN, Llama-3 scaling."""
ROPE_TYPES: tuple[str, ...] = get_args(RopeType)

S2AttnKernel = Literal["auto", "flash_attn", "flex", "varlen", "sdpa"]
"""The kernel S²-Attn trains with (see `stages.sections.S2AttnParams.kernel` and `longlora.method.s2attn`)."""
S2ATTN_KERNELS: tuple[str, ...] = get_args(S2AttnKernel)

PAPER_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
"""LoRA targets of the paper: the attention projections, by the names Llama-family models give them."""


def check_group_size(group_size: object) -> int:
    """`group_size` as an int, or ValueError: it must be an even integer >= 2, since the shifted heads move by half
    a group."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(
            f"S²-Attn group size {group_size!r} is not an even integer >= 2 (the shifted heads move by half a group)"
        )
    return group_size


def check_group_size_ratio(ratio: object) -> float:
    """`ratio` as a float, or ValueError unless it is in (0, 1]."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
        raise ValueError(f"S²-Attn group size ratio {ratio!r} is not in (0, 1]")
    return float(ratio)


def group_size_for(
    seq_len: int, group_size: int | None = None, ratio: float | None = None, whole_groups: bool = True
) -> int:
    """The S²-Attn group size on `seq_len` tokens: `group_size` when given, else `ratio` (default 0.25) × `seq_len`.

    Raises ValueError naming the numbers unless the result is an even integer dividing `seq_len` (dividing is not
    needed with `whole_groups=False`: document-aware S² lays groups out per document, cut at its end).
    """
    if group_size is None:
        ratio = DEFAULT_GROUP_SIZE_RATIO if ratio is None else check_group_size_ratio(ratio)
        exact = ratio * seq_len
        group_size = round(exact)
        if abs(exact - group_size) > 1e-6 or group_size < 2 or group_size % 2:
            raise ValueError(
                f"S²-Attn group size ratio {ratio} gives group size {exact:g} for sequence length {seq_len}; it must "
                "be an even integer dividing the sequence length (pad or chunk sequences to a suitable length, or set "
                "a fixed group size)"
            )
    group_size = check_group_size(group_size)
    if whole_groups and seq_len % group_size:
        raise ValueError(f"sequence length {seq_len} is not divisible by S²-Attn group size {group_size}")
    return group_size


Method = Literal["lora_plus", "lora", "full", "qlora"]
"""What `extend` trains: LoRA+ (LoRA plus embeddings and norms, the paper's method), LoRA alone (adapter only, the
ablation that fails to extend context), every weight (full fine-tuning, the paper's upper reference), or QLoRA (LoRA+
over a frozen base loaded in 4-bit NF4 with bitsandbytes, as the reference's supervised-fine-tune-qlora.py; the
embeddings and norms stay unquantised and train in fp32; needs the `qlora` extra)."""

Attention = Literal["s2", "dense"]
"""Attention while training: shifted sparse attention (the paper's S²-Attn) or dense causal attention (comparison)."""

Precision = Literal["auto", "bf16", "fp16", "fp32"]
"""Training precision: auto is bf16 on a GPU that has it and fp32 on a CPU (CPU bf16 autocast is slow and lossy)."""

LrSchedule = Literal["constant_with_warmup", "constant", "linear", "cosine"]
"""Learning-rate schedules by their transformers names; the paper's is constant_with_warmup."""

EvalDtype = Literal["auto", "float32", "bfloat16", "float16"]
"""Weights dtype while evaluating: auto is bfloat16 on a GPU that has it (as the paper evaluates), else float32."""

PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Where the passkey sits, as a share of the filler tokens before it: the depth grid of the reported accuracy."""

MergeDtype = Literal["auto", "float32", "bfloat16", "float16"]
"""Dtype of the merged model's weights: auto keeps the base model's own (its config's dtype), else as named."""
