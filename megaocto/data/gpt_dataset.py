"""GPT pretraining samples: Megatron's index mappings (doc / sample / shuffle) over an indexed dataset."""
from __future__ import annotations

import numpy as np


def text_to_sample(text: np.ndarray, eod: int | None, *, eod_mask_loss: bool = False,
                   reset_position_ids: bool = False) -> dict[str, np.ndarray]:
    """seq_length+1 tokens -> the design.md sample dict (Megatron get_batch semantics).

    `eod_mask_loss` zeroes the loss where the INPUT token is EOD; `reset_position_ids` restarts
    positions at 0 after every EOD input token.
    """
    text = np.asarray(text, dtype=np.int64)
    tokens, labels = text[:-1].copy(), text[1:].copy()
    n = tokens.shape[0]
    loss_mask = np.ones(n, dtype=np.float32)
    position_ids = np.arange(n, dtype=np.int64)
    if eod is not None and (eod_mask_loss or reset_position_ids):
        is_eod = tokens == eod
        if eod_mask_loss:
            loss_mask[is_eod] = 0.0
        if reset_position_ids:
            # start of the segment containing j = (index of the last EOD before j) + 1
            starts = np.where(is_eod, position_ids + 1, 0)
            starts = np.maximum.accumulate(np.concatenate([[0], starts[:-1]]))
            position_ids = position_ids - starts
    return {"input_ids": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
