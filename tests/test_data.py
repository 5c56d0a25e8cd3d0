"""ShapesWorld: determinism, splits, value ranges, and the geometric guarantees the notebooks rely on."""
import pytest
import torch

from dinolab import _render
from dinolab._render import _sample_keys
from dinolab.data import (
    CLASS_NAMES,
    DOMAINS,
    FLOOR_TEXTURES,
    MASK_COLORS,
    NUM_CLASSES,
    PALETTES,
    SHAPES,
    TEXTURES,
    WALL_TEXTURES,
    ShapesWorld,
    load_split,
)

SIZE = 64  # small images keep the suite fast; the geometry does not depend on the size
KEYS = ("image", "mask", "depth", "label", "boxes", "box_labels")


@pytest.fixture(scope="module")
def ds():
    return ShapesWorld("train", size=SIZE, num_samples=1000)


@pytest.fixture(scope="module")
def layered(ds):
    """48 samples with the render's intermediate layers; tiny chunks exercise the chunking."""
    return ShapesWorld("train", size=SIZE, num_samples=1000, chunk_size=13).batch(range(48), layers=True)


def test_constants():
    assert CLASS_NAMES == ("background", "circle", "square", "triangle", "star", "ring") and SHAPES == CLASS_NAMES[1:]
    assert NUM_CLASSES == 6
    assert MASK_COLORS.shape == (NUM_CLASSES, 3) and MASK_COLORS.dtype == torch.float32
    assert 0 <= MASK_COLORS.min() and MASK_COLORS.max() <= 1
    assert set(DOMAINS) == {"source", "shifted"} and set(DOMAINS["shifted"]) == set(DOMAINS["source"])


def test_renderer_ids_follow_the_public_names():
    # dinolab._render refers to classes and textures by their positions in these tuples.
    r = _render
    assert r._NUM_CLASSES == NUM_CLASSES
    assert (r._FLAT, r._STRIPES, r._CHECKER, r._DOTS, r._NOISE) == tuple(map(TEXTURES.index, TEXTURES))
    assert TEXTURES == ("flat", "stripes", "checker", "dots", "noise")
    assert FLOOR_TEXTURES == ("tiles", "planks", "noise") and (r._TILES, r._PLANKS, r._FLOOR_NOISE) == (0, 1, 2)
    assert WALL_TEXTURES == ("gradient", "stripes", "noise")
    assert (r._GRADIENT, r._WALL_STRIPES, r._WALL_NOISE) == (0, 1, 2)


def test_sample_shapes_dtypes_ranges(ds):
    for i in (0, 1, 999):
        s = ds[i]
        assert set(s) == set(KEYS)
        assert s["image"].shape == (3, SIZE, SIZE) and s["image"].dtype == torch.float32
        assert 0 <= s["image"].min() and s["image"].max() <= 1
        assert s["mask"].shape == (SIZE, SIZE) and s["mask"].dtype == torch.int64
        assert 0 <= s["mask"].min() and s["mask"].max() < NUM_CLASSES
        assert s["depth"].shape == (SIZE, SIZE) and s["depth"].dtype == torch.float32
        assert 0.5 < s["depth"].min() and s["depth"].max() <= 10.0  # metres: ~1 m near, wall at 7-10 m
        assert s["label"].shape == () and s["label"].dtype == torch.int64
        n = len(s["box_labels"])
        assert s["boxes"].shape == (n, 4) and s["boxes"].dtype == torch.float32
        assert s["box_labels"].dtype == torch.int64 and 1 <= n <= 4
        assert ((1 <= s["box_labels"]) & (s["box_labels"] < NUM_CLASSES)).all()


def test_deterministic_and_independent_of_instance(ds):
    a, b = ds[7], ShapesWorld("train", size=SIZE, num_samples=1000)[7]
    for k in KEYS:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(ds[7]["image"], ds[8]["image"])
    assert not torch.equal(ShapesWorld("train", size=SIZE, seed=1)[7]["image"], a["image"])


def test_splits_differ_and_never_share_a_scene():
    imgs = {s: ShapesWorld(s, size=32).batch(range(8))["image"] for s in ("train", "val", "test")}
    for s, t in (("train", "val"), ("train", "test"), ("val", "test")):
        assert (imgs[s][:, None] - imgs[t][None]).abs().flatten(2).amax(-1).min() > 0  # no equal pair
    # Every scene is a function of its key, and keys never repeat across splits (the split
    # lives in the top bits of a bijection); checked on a large range of indices.
    idx = torch.arange(100_000)
    keys = torch.cat([_sample_keys(s, 0, idx) for s in ("train", "val", "test")])
    assert keys.unique().numel() == keys.numel()


def test_batch_equals_per_index_path(ds):
    idx = [5, 0, 999, 17, 5, 42, 3]  # unordered, repeated: per-sample results must not care
    small = ShapesWorld("train", size=SIZE, num_samples=1000, chunk_size=3)
    for out in (ds.batch(idx), small.batch(torch.tensor(idx))):
        for b, i in enumerate(idx):
            s = ds[i]
            for k in ("image", "mask", "depth", "label"):
                assert torch.equal(out[k][b], s[k]), (i, k)
            n = len(s["box_labels"])
            assert torch.equal(out["boxes"][b, :n], s["boxes"])
            assert torch.equal(out["box_labels"][b, :n], s["box_labels"])
            assert (out["box_labels"][b, n:] == 0).all() and (out["boxes"][b, n:] == 0).all()  # padding


def test_dataloader_getitems_collate_and_tensors(ds):
    dl = torch.utils.data.DataLoader(ds, batch_size=6, collate_fn=ShapesWorld.collate)
    first = next(iter(dl))
    ref = ds.tensors(6)
    assert ref["image"].shape == (6, 3, SIZE, SIZE) and ref["mask"].shape == (6, SIZE, SIZE)
    for k in ("image", "mask", "depth", "label"):
        assert torch.equal(first[k], ref[k]), k
    n = first["box_labels"].shape[1]
    assert torch.equal(first["box_labels"], ref["box_labels"][:, :n])
    assert (ref["box_labels"][:, n:] == 0).all()
    loaded = load_split("train", 6, size=SIZE)
    assert torch.equal(loaded["image"], ref["image"]) and torch.equal(ds.tensors(3, start=2)["mask"], ref["mask"][2:5])


def test_mask_matches_layers_and_depth_is_a_zbuffer(layered):
    out = layered
    inst, obj_depth, obj_class = out["instance"], out["object_depth"], out["object_class"]
    # The mask is the class of the visible instance.
    lookup = torch.cat([torch.zeros(len(obj_class), 1, dtype=torch.int64), obj_class], 1)
    assert torch.equal(out["mask"], torch.gather(lookup, 1, inst.flatten(1)).view_as(inst))
    # Objects never lie behind the floor/wall behind them (they stand on the floor), and the
    # background shows exactly where no object is.
    bg = out["background_depth"]
    assert (out["depth"] <= bg).all()
    assert torch.equal(out["depth"][out["mask"] == 0], bg[out["mask"] == 0])
    assert (out["depth"][out["mask"] > 0] < bg[out["mask"] > 0]).all()
    # Occlusion: the visible surface is the nearest one covering the pixel, and it is the
    # visible object's own depth.
    nearest = torch.minimum(obj_depth.amin(1), bg)
    assert torch.equal(out["depth"], nearest)
    on = inst > 0
    own = torch.gather(obj_depth, 1, (inst - 1).clamp(min=0)[:, None]).squeeze(1)
    assert torch.equal(out["depth"][on], own[on])


def test_ground_plane_depth(layered):
    bg = layered["background_depth"]
    assert (bg[:, :, 1:] == bg[:, :, :1]).all()  # constant along each row
    assert (bg[:, 1:, 0] <= bg[:, :-1, 0]).all()  # nearer toward the bottom of the image
    assert (bg[:, 0, 0] >= 7.0).all() and (bg[:, -1, 0] <= 1.6).all()  # far wall on top, floor below


def test_objects_stand_on_the_floor():
    # A lone circle's rim (its farthest point) is at the floor depth of its base row, which
    # lies between its lowest covered pixel row and two rows below it.
    out = ShapesWorld("val", size=SIZE, classes=("circle",), n_objects=(1, 1)).batch(range(24))
    checked = 0
    for m, d in zip(out["mask"], out["depth"]):
        rows = torch.nonzero(m.any(1)).flatten()
        low = rows.max().item()
        if low + 2 >= SIZE:
            continue  # base below the image edge
        z_rim = d[m > 0].max().item()
        floor = d[:, 0] if not m[:, 0].any() else d[:, -1]  # a column with background only
        assert floor[low + 2] <= z_rim + 0.02 and z_rim <= floor[low]
        checked += 1
    assert checked >= 10


def test_boxes_are_tight_around_each_visible_object(layered):
    out = layered
    for b in range(len(out["label"])):
        labels = out["box_labels"][b]
        n = int((labels > 0).sum())
        assert (labels[:n] > 0).all() and (labels[n:] == 0).all()  # visible ones first
        visible_slots = [j for j in range(out["object_class"].shape[1]) if (out["instance"][b] == j + 1).any()]
        assert len(visible_slots) == n
        for (x0, y0, x1, y1), c, j in zip(out["boxes"][b, :n].long().tolist(), labels[:n].tolist(), visible_slots):
            ys, xs = torch.nonzero(out["instance"][b] == j + 1, as_tuple=True)
            assert (x0, y0, x1, y1) == (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)
            assert c == out["object_class"][b, j]
        # Every object pixel of the mask lies in a box of its class.
        for c in range(1, NUM_CLASSES):
            cover = torch.zeros(SIZE, SIZE, dtype=torch.bool)
            for (x0, y0, x1, y1), l in zip(out["boxes"][b, :n].long().tolist(), labels[:n].tolist()):
                if l == c:
                    cover[y0:y1, x0:x1] = True
            assert not ((out["mask"][b] == c) & ~cover).any()


def test_label_is_class_with_most_visible_pixels(layered):
    counts = torch.stack([torch.bincount(m.flatten(), minlength=NUM_CLASSES) for m in layered["mask"]])
    expect = torch.where(counts[:, 1:].amax(1) > 0, counts[:, 1:].argmax(1) + 1, 0)
    assert torch.equal(layered["label"], expect)
    assert (layered["label"] > 0).all()  # at least one object, and the nearest one is never hidden here


def test_class_subset_object_count_and_empty_scenes():
    out = ShapesWorld("val", size=32, classes=("star", "ring"), n_objects=(2, 3)).batch(range(24))
    assert set(out["mask"].unique().tolist()) <= {0, 4, 5}  # global class ids are kept
    assert set(out["box_labels"].unique().tolist()) <= {0, 4, 5} and out["box_labels"].shape[1] == 3
    empty = ShapesWorld("val", size=32, n_objects=(0, 0))[0]
    assert (empty["mask"] == 0).all() and empty["label"] == 0 and empty["boxes"].shape == (0, 4)


def test_same_scene_at_every_size():
    small, big = ShapesWorld("test", size=64).batch(range(6)), ShapesWorld("test", size=128).batch(range(6))
    down = big["mask"][:, 1::2, 1::2]  # 128-px pixel centres nearest to the 64-px ones
    assert (small["mask"] == down).float().mean() > 0.97
    assert torch.equal(small["label"], big["label"])


def test_object_scale_grows_objects_in_place():
    small = ShapesWorld("val", size=SIZE, n_objects=(1, 1)).batch(range(32))
    big = ShapesWorld("val", size=SIZE, n_objects=(1, 1), object_scale=2.0).batch(range(32))
    assert torch.equal(small["label"], big["label"])  # the same single object, only larger
    area = lambda b: (b["mask"] > 0).flatten(1).sum(1).float()  # noqa: E731
    grown = area(big) / area(small).clamp_min(1)
    assert grown.median() > 2.5  # twice the radius: about 4x the area (less where it leaves the frame)


def test_scene_attributes_describe_the_rendered_scene():
    ds = ShapesWorld("val", size=SIZE, n_objects=(0, 3))
    a = ds.scene_attributes(range(64))
    layers = ds.batch(range(64), layers=True)
    assert torch.equal(a["n_objects"], (layers["object_class"] > 0).sum(1))  # placed objects = used slots
    assert set(a["n_objects"].tolist()) == {0, 1, 2, 3}
    assert ((a["floor_hue"] >= 0) & (a["floor_hue"] < 1)).all() and a["floor_hue"].std() > 0.1
    only = lambda **kw: ShapesWorld("val", size=SIZE, **kw).scene_attributes(range(16))  # noqa: E731
    assert (only(floor_textures=("planks",))["floor_texture"] == FLOOR_TEXTURES.index("planks")).all()
    assert (only(wall_textures=("stripes",))["wall_texture"] == WALL_TEXTURES.index("stripes")).all()
    # the floor's hue is the hue of its rendered pixels: bottom rows of hue-bin-0 vs hue-bin-3 scenes differ
    img = ds.batch(range(64))["image"][:, :, -8:].mean((2, 3))  # (64, 3) mean floor colour
    warm, cool = a["floor_hue"] < 0.08, (a["floor_hue"] > 0.45) & (a["floor_hue"] < 0.6)
    assert warm.any() and cool.any()
    assert img[warm, 0].mean() > img[cool, 0].mean()  # red-ish floors have more red than cyan-ish ones
    with pytest.raises(IndexError, match="out of range"):
        ds.scene_attributes([64 * 1024])


def test_shifted_domain_changes_appearance_not_layout():
    src = ShapesWorld("train", size=SIZE, num_samples=64)
    for shifted in (src.shifted(), ShapesWorld("train", size=SIZE, num_samples=64, domain="shifted")):
        a, b = src.tensors(32), shifted.tensors(32)
        assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["depth"], b["depth"])
        mean_a, mean_b = a["image"].mean((0, 2, 3)), b["image"].mean((0, 2, 3))
        assert (mean_a - mean_b).abs().max() > 0.15  # much darker
        # Saturation-like statistic: spread between channels per pixel differs too.
        spread = lambda x: (x.amax(1) - x.amin(1)).mean()  # noqa: E731
        assert abs(spread(a["image"]) - spread(b["image"])) > 0.02
    pastel = ShapesWorld("train", size=SIZE, num_samples=64, palette="pastel").tensors(16)["image"]
    assert pastel.mean() > src.tensors(16)["image"].mean()
    assert "dusk" in PALETTES and DOMAINS["shifted"]["palette"] == "dusk"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(size=31), "size"),
        (dict(size=64.0), "size"),
        (dict(classes=("circle", "hexagon")), "hexagon"),
        (dict(classes=()), "classes"),
        (dict(n_objects=(3, 2)), "n_objects"),
        (dict(n_objects=(-1, 2)), "n_objects"),
        (dict(n_objects=(1, 17)), "n_objects"),
        (dict(n_objects=5), "n_objects"),
        (dict(split="dev"), "split"),
        (dict(num_samples=0), "num_samples"),
        (dict(seed=-1), "seed"),
        (dict(domain="night"), "domain"),
        (dict(palette="neon"), "palette"),
        (dict(textures=("plaid",)), "plaid"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(object_scale=0.1), "object_scale"),
        (dict(object_scale=True), "object_scale"),
        (dict(object_scale="2"), "object_scale"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    kwargs = {"split": "train", **kwargs}
    with pytest.raises(ValueError, match=match):
        ShapesWorld(**kwargs)


def test_threads_setting_is_restored():
    n = torch.get_num_threads()
    ShapesWorld("val", size=32, threads=1).batch(range(2))
    assert torch.get_num_threads() == n
    with pytest.raises(ValueError, match="threads"):
        ShapesWorld("val", threads=0)


def test_bad_indices_raise(ds):
    for i in (-1, len(ds), 10**6):
        with pytest.raises(IndexError, match=str(i)):
            ds[i]
    with pytest.raises(IndexError):
        ds.batch([0, 1000])
    with pytest.raises(IndexError):
        ds.tensors(10, start=995)
    with pytest.raises(TypeError):
        ds[1.5]


def test_appearance_keeps_the_layout_and_changes_every_colour(ds):
    idx = torch.arange(24)
    own = ds.batch(idx)
    assert all(torch.equal(own[k], ds.batch(idx, appearance=0)[k]) for k in KEYS)  # 0 = the scene as it is
    new = ds.batch(idx, appearance=idx + 1)
    for k in ("mask", "depth", "label", "boxes", "box_labels"):
        assert torch.equal(new[k], own[k]), k
    # colours are re-drawn: the mean colour of the background and of the objects moves in (nearly) every image
    bg = own["mask"] == 0
    def mean_colour(img, where):
        w = where[:, None].float()
        return (img * w).sum((2, 3)) / w.sum((2, 3)).clamp_min(1)
    moved = (mean_colour(new["image"], bg) - mean_colour(own["image"], bg)).abs().amax(1) > 0.02
    assert moved.float().mean() > 0.9
    # deterministic, and per-index values equal one shared value where they agree
    assert torch.equal(ds.batch(idx, appearance=7)["image"], ds.batch(idx, appearance=torch.full((24,), 7))["image"])
    assert not torch.equal(ds.batch(idx, appearance=7)["image"], ds.batch(idx, appearance=8)["image"])


@pytest.mark.parametrize("bad", [-1, 1.5, torch.tensor([1, 2]), torch.tensor([[1]])])
def test_appearance_rejects_bad_values(ds, bad):
    with pytest.raises(ValueError, match="appearance"):
        ds.batch(torch.arange(3), appearance=bad)


def test_instances_are_aligned_with_boxes(ds):
    idx = torch.arange(40)
    out = ds.instances(idx)
    plain = ds.batch(idx)
    assert all(torch.equal(out[k], plain[k]) for k in KEYS)
    masks = out["instance_masks"]
    assert masks.shape == (40, ds.n_objects[1], SIZE, SIZE) and masks.dtype == torch.bool
    assert not (masks.sum(1) > 1).any()  # instances never overlap
    assert torch.equal(masks.any(1), out["mask"] > 0)  # together they are the objects of the semantic mask
    for b in range(40):
        for k, label in enumerate(out["box_labels"][b].tolist()):
            if label == 0:
                assert not masks[b, k].any()
                continue
            ys, xs = torch.nonzero(masks[b, k], as_tuple=True)
            tight = (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)
            assert tight == tuple(out["boxes"][b, k].long().tolist())
            assert (out["mask"][b][masks[b, k]] == label).all()
