import math

import pytest

from nanoforge.train.schedule import lr_at


def test_warmup_then_cosine_to_the_floor():
    lrs = [lr_at(s, peak=1.0, warmup=10, total=110, schedule="cosine", min_ratio=0.1) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))  # monotone decay after warmup
    assert lrs[60] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))  # half way: the midpoint
    assert lr_at(110, peak=1.0, warmup=10, total=110, min_ratio=0.1) == pytest.approx(0.1)


def test_wsd_holds_the_peak_then_decays_linearly():
    kw = dict(peak=2.0, warmup=5, total=100, schedule="wsd", min_ratio=0.0, decay_fraction=0.2)
    assert lr_at(50, **kw) == 2.0 and lr_at(79, **kw) == 2.0
    assert lr_at(90, **kw) == pytest.approx(1.0) and lr_at(100, **kw) == pytest.approx(0.0)
