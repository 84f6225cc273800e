"""Loading checkpoints of the SKCDF reference implementation.

The reference names its modules after the original VNet code (``block_one``, ``block_one_dw``,
``out_conv9_abc``, ``cross_attention_local``, …); :func:`reference_to_skcdf_key` maps each of its
state-dict keys to ours. Its token learners also hold ``map_in`` convolutions that the forward pass
never uses: they are dropped.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

from skcdf.nn import SKCDFNet

_NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_ENCODER_STAGE = {f"block_{n}": i for i, n in enumerate(_NUMBERS[:5])}
_ENCODER_DOWN = {f"block_{n}_dw": i for i, n in enumerate(_NUMBERS[:4])}
_DECODER_UP = {f"block_{n}_up": i for i, n in enumerate(_NUMBERS[4:8])}
_DECODER_STAGE = {f"block_{n}": i for i, n in enumerate(_NUMBERS[5:9])}
_DECODERS = {"decoder_l": "labeled_decoder", "decoder_u": "unlabeled_decoder"}
_SKCM_BLOCKS = {"cross_attention_local": "skcm.local_block", "cross_attention_global": "skcm.global_block"}
_SKCM_PARTS = {"token_learner.proj": "token_embed", "attn_norm": "attn_norm", "attn": "attn",
               "ffn_norm": "out_norm", "map_out": "out_conv"}
_HEADS = {"out_conv9": "main_head", "out_conv9_abc": "aux_head"}

#: Reference keys with no counterpart in the model (dead weights of the reference's token learners).
UNUSED_KEY = re.compile(r"^cross_attention_(local|global)\.token_learner\.map_in\.")


def reference_to_skcdf_key(key: str) -> str | None:
    """Map one reference state-dict key to the SKCDFNet key; None if the key is not a reference key."""
    parts = key.split(".")
    head, rest = parts[0], parts[1:]
    if head == "encoder" and len(rest) >= 3 and rest[1] == "conv":
        if rest[0] in _ENCODER_STAGE:
            return ".".join(["encoder.stages", str(_ENCODER_STAGE[rest[0]]), *rest[2:]])
        if rest[0] in _ENCODER_DOWN:
            return ".".join(["encoder.downs", str(_ENCODER_DOWN[rest[0]]), *rest[2:]])
    if head in _DECODERS and rest:
        decoder = _DECODERS[head]
        if rest[0] in _HEADS:
            return ".".join([decoder, _HEADS[rest[0]], *rest[1:]])
        if len(rest) >= 3 and rest[1] == "conv":
            if rest[0] in _DECODER_UP:
                return ".".join([decoder, "ups", str(_DECODER_UP[rest[0]]), *rest[2:]])
            if rest[0] in _DECODER_STAGE:
                return ".".join([decoder, "stages", str(_DECODER_STAGE[rest[0]]), *rest[2:]])
    if head in _SKCM_BLOCKS:
        tail = ".".join(rest)
        for old, new in _SKCM_PARTS.items():
            if tail.startswith(old + "."):
                return f"{_SKCM_BLOCKS[head]}.{new}{tail[len(old):]}"
    return None


def from_reference_state_dict(state_dict: Mapping[str, torch.Tensor],
                              patch_size: Sequence[int] = (64, 128, 128),
                              num_heads: int = 2, dropout: bool = True,
                              dtype: torch.dtype = torch.float32) -> SKCDFNet:
    """Build an :class:`SKCDFNet` holding the weights of a reference-implementation state dict.

    The number of classes, input channels and base filters are read from the tensor shapes; the patch
    size and head count cannot be (the global token embedding fixes d·h·w only), so they are arguments.
    ``dropout`` only matters when the model is trained further (the reference trains with dropout on).
    ``dtype``: the model's floating-point type; ``torch.float64`` keeps a float64 state dict exact
    (as for replaying the reference's training fixture).
    A ``{"state_dict": …}`` / ``{"model": …}`` wrapper and a DataParallel ``module.`` prefix are accepted.

    Raises:
        ValueError: listing every missing, unexpected or mis-shaped key.
    """
    state_dict = _unwrap(state_dict)
    try:
        first_conv = state_dict["encoder.block_one.conv.0.weight"]
        head = state_dict["decoder_l.out_conv9.weight"]
    except KeyError as exc:
        raise ValueError(f"not a reference SKCDF state dict: key {exc.args[0]!r} is missing "
                         f"(keys start with {sorted(state_dict)[:3]})") from None
    has_skcm = any(k.startswith("cross_attention_") for k in state_dict)
    model = SKCDFNet(in_channels=first_conv.shape[1], num_classes=head.shape[0], filters=first_conv.shape[0],
                     patch_size=patch_size, num_heads=num_heads, skcm=has_skcm,
                     aux_heads="decoder_l.out_conv9_abc.weight" in state_dict, dropout=dropout).to(dtype)
    expected = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    unexpected, mis_shaped, mis_shaped_keys = [], [], set()
    for key, value in state_dict.items():
        if UNUSED_KEY.match(key):
            continue
        ours = reference_to_skcdf_key(key)
        if ours is None or ours not in expected:
            unexpected.append(key)
        elif tuple(value.shape) != tuple(expected[ours].shape):
            mis_shaped.append(f"{key}: checkpoint {tuple(value.shape)}, model {tuple(expected[ours].shape)}")
            mis_shaped_keys.add(ours)
        else:
            converted[ours] = value
    missing = sorted(set(expected) - set(converted) - mis_shaped_keys)
    problems = []
    if missing:
        problems.append("missing keys (model names): " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if mis_shaped:
        problems.append("mis-shaped keys (check patch_size and num_heads): " + "; ".join(mis_shaped))
    if problems:
        raise ValueError("cannot load the reference state dict:\n  " + "\n  ".join(problems))
    model.load_state_dict(converted)
    return model


def _unwrap(state_dict: Mapping) -> dict[str, torch.Tensor]:
    for wrapper in ("state_dict", "model", "net"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
            break
    return {k.removeprefix("module."): v for k, v in state_dict.items() if torch.is_tensor(v)}
