"""Resolution buckets: the official table, nearest-ratio snapping, size-string parsing."""

from __future__ import annotations

import pytest

from diffgentor.engine.models.hunyuan_image_3.resolution import ResolutionGroup

# the official table, base 1024: (height, width) by ratio index
SPEC_1024 = [
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (512, 1792), (512, 1728), (512, 1664), (512, 1600),
    (512, 1536), (576, 1472), (640, 1408), (704, 1344), (768, 1280), (832, 1216), (896, 1152), (960, 1088),
    (1024, 1024), (1088, 960), (1152, 896), (1216, 832), (1280, 768), (1344, 704), (1408, 640), (1472, 576),
    (1536, 512), (1600, 512), (1664, 512), (1728, 512), (1792, 512), (1856, 512), (1920, 512), (1984, 512),
    (2048, 512), (1024, 768), (1280, 720), (768, 1024), (720, 1280),
]


def test_table_1024_matches_spec():
    g = ResolutionGroup(1024)
    assert g.buckets == SPEC_1024
    assert len(g) == 37
    assert g.get(16) == (1024, 1024)
    tokens = [h // 16 * (w // 16) for h, w in g.buckets]
    assert min(tokens) == 3072 and max(tokens) == 4096


def test_table_256_tiny_golden_values():
    g = ResolutionGroup(256)
    assert len(g) == 37
    assert g.get(16) == (256, 256)
    assert g.nearest(96, 64) == (13, (208, 304))  # edit_input.png / cond0: 64x96 (HxW)
    assert g.nearest(48, 112) == (22, (352, 160))  # cond1: 112x48 (HxW)
    assert g.get(29) == (464, 128)  # T5: <img_ratio_29>
    # the four extras are absolute sizes, even for base 256
    assert g.buckets[33:] == [(1024, 768), (1280, 720), (768, 1024), (720, 1280)]


@pytest.mark.parametrize("base", [256, 512, 768, 1024, 2048])
def test_table_shape(base):
    g = ResolutionGroup(base)
    core = g.buckets[:33]
    ratios = [h / w for h, w in core]
    assert ratios == sorted(ratios)
    for h, w in core:
        assert h % 16 == 0 and w % 16 == 0
        assert base // 2 <= h <= 2 * base and base // 2 <= w <= 2 * base
    assert core[16] == (base, base)


def test_nearest_and_parse_size():
    g = ResolutionGroup(1024)
    assert g.nearest(1024, 1024) == (16, (1024, 1024))
    assert g.nearest(1920, 1080)[0] == 36  # 16:9 landscape extra
    assert g.nearest(1, 10000) == (32, (2048, 512))
    assert g.parse_size("1024x1024") == (16, (1024, 1024))
    assert g.parse_size("768x1024") == (35, (768, 1024))  # height first
    assert g.parse_size("16:9") == (36, (720, 1280))  # width:height
    assert g.parse_size("9:16") == (34, (1280, 720))
    assert g.parse_size("<img_ratio_5>") == (5, (512, 1728))
    assert g.parse_size((1000, 1000)) == (16, (1024, 1024))
    assert g.parse_size(" 1000x990 ") == (16, (1024, 1024))  # snapped


def test_nearest_ties_pick_first():
    g = ResolutionGroup(256)
    # buckets 0..8 share height 128 but differ in width; a request exactly on a ratio picks that bucket
    for k, (h, w) in enumerate(g.buckets[:33]):
        assert g.nearest(w, h)[0] == k


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(base_size=100), "multiple of align"),
        (dict(base_size=128), "must not exceed step"),
        (dict(base_size=1024, step=600), "base_size // 2"),
        (dict(base_size=0), "positive"),
        (dict(base_size=1024, step=0), "positive"),
    ],
)
def test_construction_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        ResolutionGroup(**kwargs)


@pytest.mark.parametrize(
    "size, msg",
    [
        ("abc", "not 'HxW'"),
        ("0x512", "positive"),
        ("16:0", "positive"),
        ("<img_ratio_37>", "out of range"),
        ("auto", "auto"),
        ((10, 0), "positive"),
        ((10,), "two ints"),
        (1024, "string"),
    ],
)
def test_parse_errors(size, msg):
    g = ResolutionGroup(1024)
    with pytest.raises(ValueError, match=msg):
        g.parse_size(size)


def test_get_and_nearest_errors():
    g = ResolutionGroup(1024)
    with pytest.raises(ValueError, match="out of range"):
        g.get(37)
    with pytest.raises(ValueError, match="out of range"):
        g.get(-1)
    with pytest.raises(ValueError, match="positive"):
        g.nearest(0, 5)
