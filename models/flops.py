"""FLOP of a model's forward, counted by ``torch.utils.flop_counter``.

Counted: matrix products, convolutions and attention kernels (element-wise work, normalisations and
the softmax are not). PyTorch's counter has no rule for the CPU's fused attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``); it is given the one of the other fused
kernels: ``2 T S (d_k + d_v)`` per head and batch element for ``T`` queries against ``S`` keys.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOP of one fused attention call from its input shapes ``(B, H, T, d_k)``, ``(B, H, S, d_k)``,
    ``(B, H, S, d_v)`` (mask, dropout and scale arguments ignored)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOP of one call of ``fn`` (matrix products, convolutions, attention; see the module's doc)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()
