"""Quantized Hugging Face checkpoints, dequantized on load.

The policy trains and publishes bf16/fp32 weights, but the checkpoints users start from are
often published quantized: gpt-oss's experts in MXFP4, DeepSeek-V3/R1, Kimi-K2, GLM-4.5-FP8 and
Qwen3's ``-FP8`` releases in block-wise FP8 (``float8_e4m3fn`` weights with one fp32
``weight_scale_inv`` per 128 x 128 block). Both are dequantized here to bf16 as the checkpoint
is read; every other quantization is refused by name. MXFP4 values are exact in bf16; FP8
values times their block scales are rounded to bf16 once (what transformers' ``dequantize=True``
and DeepSeek's own ``weight_dequant`` produce).
"""

from __future__ import annotations

import torch

from rlpost.config import ConfigError

# the 16 values of a 4-bit e2m1 float (sign, 2 exponent bits, 1 mantissa bit), by code
_FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def quantization(hf: dict, path: str) -> dict | None:
    """config.json's ``quantization_config`` when it is one this loader dequantizes (gpt_oss's
    ``mxfp4`` experts; ``fp8`` with ``fmt: e4m3`` and a 2-d ``weight_block_size`` or none, per
    tensor), None without one; anything else is a one-line config error."""
    quant = hf.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    block = quant.get("weight_block_size") if isinstance(quant, dict) else None
    if method == "mxfp4" and hf.get("model_type") == "gpt_oss":
        return quant
    # fmt: DeepSeek's and Qwen's "e4m3", MiniMax-M2's "float8_e4m3fn" (the same format)
    if method == "fp8" and quant.get("fmt", "e4m3") in ("e4m3", "float8_e4m3fn") and (
            block is None or (isinstance(block, list) and len(block) == 2
                              and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block))):
        return quant
    raise ConfigError(f"model.path={path!r}: config.json quantization_config={quant!r}: not supported (fp8 e4m3 "
                      f"with weight_scale_inv, and gpt_oss's mxfp4 experts, are dequantized on load; "
                      f"dequantize others to bf16 first)")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """gpt-oss's MXFP4 expert tensor as the (E, columns, rows) weight its bf16 checkpoints hold:
    ``blocks`` (E, rows, G, 16) uint8, two e2m1 values per byte (low nibble first), 32 values per
    group; ``scales`` (E, rows, G) uint8, one power of two per group (E8M0: 2^(s - 127)). Every
    value is exact in bf16 (a 2-bit mantissa times a power of two), so dequantizing loses nothing."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.dim() != 4 \
            or blocks.shape[-1] != 16 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} and scales {tuple(scales.shape)} "
                         f"{scales.dtype}: expected uint8 (E, rows, G, 16) and (E, rows, G)")
    lut = torch.tensor(_FP4_E2M1, dtype=torch.float32)
    out = []
    for e in range(blocks.shape[0]):  # one expert at a time: the fp32 values are 8x the packed bytes
        values = torch.stack([lut[(blocks[e] & 0x0F).long()], lut[(blocks[e] >> 4).long()]], dim=-1).flatten(-2)
        values = torch.ldexp(values, scales[e].to(torch.int32)[..., None] - 127)  # (rows, G, 32)
        if not bool(torch.isfinite(values).all()):  # E8M0's 255 is NaN; 254 x 6 overflows
            raise ValueError(f"expert {e}: scales give non-finite values (largest scale byte {int(scales[e].max())})")
        out.append(values.flatten(-2).t().to(dtype))
    return torch.stack(out)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: list[int] | None,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A block-wise FP8 weight (rows, cols) ``float8_e4m3fn`` times its ``scale_inv``: one fp32
    scale per ``block`` (rows x cols of a block, DeepSeek's 128 x 128) tile, the last row and
    column of tiles cut at the matrix's edge (DeepSeek-V3's 576-row ``kv_a_proj_with_mqa`` has 5
    row tiles); without ``block``, one scale for the whole tensor."""
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise ValueError(f"FP8 weight {tuple(weight.shape)} {weight.dtype}: expected a 2-d float8_e4m3fn matrix")
    rows, cols = weight.shape
    scale = scale_inv.to(torch.float32)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("weight_scale_inv has non-finite values")
    if block is None:
        if scale.numel() != 1:
            raise ValueError(f"weight_scale_inv {tuple(scale.shape)}: one scale per tensor expected (no weight_block_size)")
        return (weight.to(torch.float32) * scale.reshape(())).to(dtype)
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale.shape) != grid:
        raise ValueError(f"weight_scale_inv {tuple(scale.shape)}: expected {grid} for a {rows} x {cols} weight in "
                         f"{block[0]} x {block[1]} blocks")
    scale = scale.repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]
    return (weight.to(torch.float32) * scale).to(dtype)


def dequantized(state: dict[str, torch.Tensor], quant: dict | None, path: str) -> dict[str, torch.Tensor]:
    """``state`` with its quantized tensors replaced by bf16 ones (``quant``: what
    :func:`quantization` returned). MXFP4: each ``<name>_blocks`` / ``<name>_scales`` pair
    becomes ``<name>``. FP8: each ``float8_e4m3fn`` ``<name>.weight`` is multiplied by its
    ``<name>.weight_scale_inv`` (``input_scale`` / ``activation_scale`` tensors of static
    activation quantization are dropped: the policy runs in bf16/fp32). A part missing or of
    other shapes is a one-line config error naming the tensor."""
    if quant is None:
        return state
    if quant["quant_method"] == "mxfp4":
        parts, dequantize = ("_blocks", "_scales"), dequantize_mxfp4
    else:
        block = quant.get("weight_block_size")
        parts = (".weight", ".weight_scale_inv")

        def dequantize(weight, scale):
            return dequantize_fp8(weight, scale, block)
    quantized = [k for k, v in state.items() if k.endswith(parts[0])
                 and (quant["quant_method"] == "mxfp4" or v.dtype == torch.float8_e4m3fn)]
    out = {k: v for k, v in state.items()
           if not k.endswith((parts[1], ".input_scale", ".activation_scale")) and k not in quantized}
    for key in quantized:
        name = key.removesuffix(parts[0])
        scale = state.get(name + parts[1])
        try:
            if scale is None:
                raise ValueError(f"no {parts[1]} tensor for it")
            out[name + (".weight" if parts[0] == ".weight" else "")] = dequantize(state[key], scale)
        except ValueError as exc:
            raise ConfigError(f"model.path={path!r}: {key}: {exc}") from None
    orphans = [k for k in state if k.endswith(parts[1]) and k.removesuffix(parts[1]) + parts[0] not in quantized]
    if orphans:
        raise ConfigError(f"model.path={path!r}: {orphans[0]} scales no quantized tensor")
    return out
