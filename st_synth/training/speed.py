"""Optional fused GPU kernels for the backbone, with a clean fallback everywhere else.

``fused_kernels`` (a recipe setting, ``ModelArguments.fused_kernels``):

* ``auto`` (default): on a CUDA device with ``liger-kernel`` installed, swap the backbone's RMSNorm, RoPE and
  SwiGLU for Liger's Triton kernels (exact, not approximations); anywhere else (CPU, no CUDA, no Liger, an
  architecture Liger does not patch, or Liger failing to apply) keep the plain modules and say why.
* ``liger``: the same, but a missing piece is an error (for benchmarks that must measure the kernels).
* ``off``: never patch.

Only the model instance is patched (``model=``), never the transformers classes, so other models in the
same process are untouched.
"""

from __future__ import annotations

import importlib.util
import logging
import types
from typing import Any

logger = logging.getLogger(__name__)

FUSED_KERNEL_MODES = ("auto", "liger", "off")
_LIGER_FUNCTIONS = {"mistral": "apply_liger_kernel_to_mistral", "llama": "apply_liger_kernel_to_llama",
                    "qwen2": "apply_liger_kernel_to_qwen2", "qwen3": "apply_liger_kernel_to_qwen3"}  # fmt: skip


def _why_not(backbone: Any, device: str) -> str | None:
    """The reason Liger cannot be used here, or None when it can."""
    if not device.startswith("cuda"):
        return f"the model trains on {device}, Liger's kernels need CUDA"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    model_type = getattr(getattr(backbone, "config", None), "model_type", None)
    if model_type not in _LIGER_FUNCTIONS:
        return f"Liger does not patch {model_type!r} here; it does: {', '.join(_LIGER_FUNCTIONS)}"
    return None


def _check_mode(setting: str, mode: str | bool, modes: tuple[str, ...], on: str) -> str:
    """``mode`` if it is one of ``modes``, else a ValueError naming them. A YAML config's bare ``off`` /
    ``on`` arrives as a boolean (or as ``"False"`` after the recipe's flags): it means the switch it spells."""
    spelled = str(mode).lower() if isinstance(mode, (bool, str)) else None
    mode = {"false": "off", "no": "off", "true": on, "yes": on}.get(spelled, mode)
    if mode not in modes:
        raise ValueError(f"{setting} {mode!r} is unknown; choose one of: {', '.join(modes)}.")
    return mode


def _unavailable(setting: str, required: bool, reason: str) -> str:
    """A speed feature that cannot be used here: an error when the user required it, else logged."""
    if required:
        raise ValueError(f"{setting} cannot be honoured: {reason}.")
    logger.info("%s not used: %s.", setting, reason)
    return f"not used: {reason}"


def check_fused_kernels(mode: str | bool) -> str:
    return _check_mode("fused_kernels", mode, FUSED_KERNEL_MODES, on="liger")


def apply_fused_kernels(backbone: Any, mode: str | bool, device: str) -> str:
    """Patch ``backbone`` (a transformers model) per ``mode``; return what was done, for logs and cards."""
    if (mode := check_fused_kernels(mode)) == "off":
        return "off"
    if (reason := _why_not(backbone, device)) is not None:
        return _unavailable(
            "fused_kernels=liger" if mode == "liger" else "fused_kernels", mode == "liger", reason
        )
    import liger_kernel.transformers as liger

    apply = getattr(liger, _LIGER_FUNCTIONS[backbone.config.model_type])
    try:
        apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
              model=backbone)  # fmt: skip
    except Exception as error:  # a Liger/transformers mismatch must not stop a training run in auto mode
        if mode == "liger":
            raise
        logger.warning("Liger kernels failed to apply (%s); training with the plain modules.", error)
        return f"not used: Liger failed to apply ({type(error).__name__})"
    return "liger: rms_norm, rope, swiglu"


# -- packed sequences: little compute spent on padding ---------------------------------------------
PACKED_SEQUENCE_MODES = ("auto", "on", "off")


def check_packed_sequences(mode: str | bool) -> str:
    return _check_mode("packed_sequences", mode, PACKED_SEQUENCE_MODES, on="on")


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices grouped into rows of at most ``capacity`` tokens."""
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[index]), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= lengths[index]
    return rows


def _packing(mask: Any) -> tuple[Any, Any, Any, int] | None:
    """Where each real token of a padded ``(batch, length)`` batch goes in rows of the same length with
    several sequences each: ``(source, target, positions, rows)``, or None when packing saves no row."""
    import torch

    batch, capacity = mask.shape
    if bool(mask.all()):  # every input as long as the longest: nothing to pack
        return None
    lengths = mask.sum(dim=1).tolist()
    rows = pack_rows(lengths, capacity)
    if len(rows) >= batch:
        return None
    row_of, offset_of = [0] * batch, [0] * batch
    positions = torch.zeros(len(rows) * capacity, dtype=torch.long)
    for r, members in enumerate(rows):
        used = 0
        for index in members:
            row_of[index], offset_of[index] = r, used
            used += lengths[index]
        # The rest of the row is one more short "sequence" of filler: it attends to itself only.
        positions[r * capacity + used : (r + 1) * capacity] = torch.arange(capacity - used)
    # Real tokens in the padded batch's row-major order, and the same tokens' places in the packed rows.
    source = mask.reshape(-1).nonzero().squeeze(1)
    within = torch.cat([torch.arange(length) for length in lengths])  # each token's place in its text
    starts = torch.tensor([row_of[i] * capacity + offset_of[i] for i in range(batch)])
    target = within + starts.repeat_interleave(torch.tensor(lengths))
    positions[target] = within
    return source, target, positions, len(rows)


_PACKABLE_KEYS = {"input_ids", "attention_mask", "modality", "prompt_length"}


def packed_forward(self: Any, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """A forward for a text-only ST ``Transformer`` that runs the backbone on packed rows.

    The batch's real tokens are laid out several sequences to a row (rows as long as the batch's longest
    input), each sequence with positions from 0 and no attention mask, so transformers masks each
    sequence to itself (packed-sequence format). Token embeddings are put back in the padded layout, so
    pooling and every loss see what the padded forward gives them; only the rows' unfilled ends are padding.
    Bound to one module instance by :func:`apply_packed_sequences`; anything else takes the padded path.
    """
    mask = features.get("attention_mask")
    plan = None
    wants_layers = getattr(self.model.config, "output_hidden_states", False)  # per-layer outputs: padded path
    if not kwargs and mask is not None and set(features) <= _PACKABLE_KEYS and not wants_layers:
        plan = _packing(mask.to("cpu").bool())
    if plan is None:
        return type(self).forward(self, features, **kwargs)
    source, target, positions = (tensor.to(mask.device) for tensor in plan[:3])
    rows, (batch, capacity) = plan[3], mask.shape
    input_ids = features["input_ids"].reshape(-1)
    packed_ids = input_ids.new_zeros(rows * capacity).index_copy(0, target, input_ids.index_select(0, source))
    output = self.model(
        input_ids=packed_ids.view(rows, capacity), position_ids=positions.view(rows, capacity),
        attention_mask=None, return_dict=True,
    )  # fmt: skip
    hidden = output.last_hidden_state.reshape(rows * capacity, -1)
    tokens = hidden.new_zeros(batch * capacity, hidden.shape[-1]).index_copy(
        0, source, hidden.index_select(0, target)
    )
    features[self.module_output_name] = tokens.view(batch, capacity, -1)
    return features


def _separate_and_packed_agree(backbone: Any) -> str | None:
    """Run two short random sequences through ``backbone`` apart and packed in one row; None when the
    packed hidden states match, else why not (a model that ignores packed positions would let the second
    sequence attend to the first)."""
    import torch

    vocab = backbone.config.vocab_size
    device = next(backbone.parameters()).device
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(3, vocab, (n,), generator=generator).to(device) for n in (5, 7))
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            apart = [
                backbone(input_ids=s[None], return_dict=True).last_hidden_state[0] for s in (first, second)
            ]
            positions = torch.cat([torch.arange(5), torch.arange(7)]).to(device)[None]
            packed = backbone(
                input_ids=torch.cat([first, second])[None], position_ids=positions, attention_mask=None,
                return_dict=True,
            ).last_hidden_state[0]  # fmt: skip
    except Exception as error:  # an architecture that refuses packed positions is a fallback, not a crash
        return f"the backbone refused packed positions ({type(error).__name__}: {error})"
    finally:
        backbone.train(was_training)
    expected = torch.cat(apart).float()
    error = (packed.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-6)
    if not torch.isfinite(error) or error > 0.05:
        return f"packed sequences leak into each other in this backbone (relative error {float(error):.2g})"
    return None


def apply_packed_sequences(module: Any, mode: str | bool) -> str:
    """Give the ST ``Transformer`` ``module`` the packed forward per ``mode``; return what was done.

    auto: when the module is text-only and the backbone keeps packed sequences apart (checked on two
    short sequences); otherwise the padded forward, and the reason. on: the same, a missing piece is an
    error. off: the padded forward. Only this instance changes; what is saved is the plain module.
    """
    if (mode := check_packed_sequences(mode)) == "off":
        return "off"
    config = getattr(module, "modality_config", {}) or {}
    text = config.get("text", {})
    if (
        set(config) != {"text"}
        or text.get("method") != "forward"
        or module.module_output_name != "token_embeddings"
    ):
        reason = "the Transformer module is not a text-only forward"
    else:
        reason = _separate_and_packed_agree(module.model)
    if reason is not None:
        return _unavailable(f"packed_sequences={mode}", mode == "on", reason)
    module.forward = types.MethodType(packed_forward, module)  # a deep copy binds to the copied module
    return "packed rows"
