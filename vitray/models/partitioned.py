"""Init code that still works when DeepSpeed ZeRO-3 builds the model already partitioned (`deepspeed.zero.Init`).

Under `zero.Init`, every module's parameters are split across the ranks as soon as that module's constructor
returns, so no rank ever holds the whole model (ViT-H/14 is 2.5 GB in fp32 per rank otherwise). A parent that
re-initialises a child's weights afterwards (ViT's `_init_weights`, BiT's zero-initialised head) would write into
empty placeholders — silently, for `zeros_`. Such code runs inside `with whole(child):`, which gathers that one
child's parameters for the block and partitions them again after it. Outside `zero.Init` it does nothing, and the
random draws are the same either way, so a model is built with the same weights with or without ZeRO-3.
"""
from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def whole(*modules: nn.Module):
    params = [p for m in modules for p in m.parameters() if hasattr(p, "ds_id")]  # ds_id: a ZeRO-3 parameter
    if not params:
        yield
        return
    import deepspeed

    # Every rank draws the same values (same seed, same order); rank 0's are the ones kept.
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield
