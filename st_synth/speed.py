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


def check_fused_kernels(mode: str) -> str:
    if mode not in FUSED_KERNEL_MODES:
        raise ValueError(
            f"fused_kernels {mode!r} is unknown; choose one of: {', '.join(FUSED_KERNEL_MODES)}."
        )
    return mode


def apply_fused_kernels(backbone: Any, mode: str, device: str) -> str:
    """Patch ``backbone`` (a transformers model) per ``mode``; return what was done, for logs and cards."""
    if check_fused_kernels(mode) == "off":
        return "off"
    reason = _why_not(backbone, device)
    if reason is not None:
        if mode == "liger":
            raise ValueError(f"fused_kernels=liger cannot be honoured: {reason}.")
        logger.info("Fused kernels not used: %s.", reason)
        return f"not used: {reason}"
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
