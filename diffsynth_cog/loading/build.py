"""Building a model on the meta device and loading converted weights into it with ``assign=True``.

No memory is spent on random initialisation, and the loaded tensors become the parameters
directly (no second copy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from diffsynth_cog.loading.convert import Rename, convert_state_dict
from diffsynth_cog.loading.state_dict import WeightsSource, iter_tensors

logger = logging.getLogger(__name__)


def build_and_load(
    make_model: Callable[[], torch.nn.Module],
    source: WeightsSource,
    rename: Rename,
    *,
    dtype: torch.dtype | None,
    device: str | torch.device = "cpu",
    ignorable: Callable[[str], str | None] = lambda key: None,
) -> torch.nn.Module:
    """``make_model()`` is called under the meta device; weights come from ``source``.

    Raises WeightsFileError for unreadable files and StateDictMismatchError when the keys or
    shapes do not fit; in both cases no model is returned.
    """
    with torch.device("meta"):
        model = make_model()
    # Keys the converter will ignore (e.g. the encoder of a decoder-only load) are never read.
    state_dict = dict(iter_tensors(source, dtype=dtype, device=device, skip=lambda k: ignorable(k) is not None))
    converted = convert_state_dict(state_dict, model, rename, source=str(source.path), ignorable=ignorable)
    model.load_state_dict(converted, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # a non-persistent buffer would stay on meta: our models must not have any
        raise RuntimeError(f"{type(model).__name__}: tensors left on the meta device after loading: {leftover[:5]}")
    logger.info("loaded %s from %s (%d tensors)", type(model).__name__, source.path, len(converted))
    return model.eval()
