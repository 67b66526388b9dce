"""Tests of the built-in `synthetic:shapes` data: determinism, held-out pairs, captions, evaluation tasks."""

import pickle

import numpy as np
import pytest

from clipworks.data.synthetic import (
    COLORS,
    SHAPES,
    ShapesConfig,
    ShapesDataset,
    compositional_task,
    heldout_pairs,
    zero_shot_task,
)


def _pixels(image):
    return np.asarray(image)


def test_heldout_pairs_leave_every_colour_and_shape_in_training():
    held = heldout_pairs()
    assert 0.15 <= len(held) / (len(COLORS) * len(SHAPES)) <= 0.2
    assert sorted(c for c, _ in held) == sorted(COLORS) and sorted(s for _, s in held) == sorted(SHAPES)


def test_same_index_same_sample_across_instances():
    a, b = ShapesDataset("train", 100), ShapesDataset("train", 100)
    for i in (0, 7, 99):
        (ia, ca), (ib, cb) = a[i], b[i]
        assert ca == cb and np.array_equal(_pixels(ia), _pixels(ib))
        assert a.scene(i) == b.scene(i)
    assert np.array_equal(_pixels(a[-1][0]), _pixels(a[99][0]))


def test_reading_order_does_not_matter():
    ds = ShapesDataset("val", 50)
    forward = [ds[i][1] for i in range(50)]
    backward = [ds[i][1] for i in reversed(range(50))][::-1]
    assert forward == backward


def test_seeds_and_splits_differ():
    base = ShapesDataset("train", 20)
    other_seed = ShapesDataset("train", 20, ShapesConfig(seed=1))
    val = ShapesDataset("val", 20)
    assert [base[i][1] for i in range(20)] != [other_seed[i][1] for i in range(20)]
    assert [base[i][1] for i in range(20)] != [val[i][1] for i in range(20)]
    assert not np.array_equal(_pixels(base[0][0]), _pixels(other_seed[0][0]))


def test_images_are_rgb_of_the_configured_size():
    for size in (64, 32):
        image, caption = ShapesDataset("train", 4, ShapesConfig(image_size=size))[3]
        assert image.mode == "RGB" and image.size == (size, size) and isinstance(caption, str)


def test_train_never_shows_a_heldout_pair_and_shows_every_colour_and_shape():
    held = set(heldout_pairs())
    ds = ShapesDataset("train", 4000)
    colors, shapes, two = set(), set(), 0
    for i in range(len(ds)):
        scene = ds.scene(i)
        two += len(scene.objects) == 2
        for obj in scene.objects:
            assert (obj.color, obj.shape) not in held, (i, scene)
            colors.add(obj.color)
            shapes.add(obj.shape)
    assert colors == set(COLORS) and shapes == set(SHAPES)
    assert 0.15 < two / len(ds) < 0.35  # two_object_fraction=0.25


def test_heldout_split_has_only_heldout_main_pairs():
    held = set(heldout_pairs())
    ds = ShapesDataset("heldout", 1000)
    mains = {(ds.scene(i).objects[0].color, ds.scene(i).objects[0].shape) for i in range(len(ds))}
    assert mains == held


def test_captions_mention_the_scene():
    ds = ShapesDataset("train", 500)
    for i in range(len(ds)):
        scene = ds.scene(i)
        caption = ds[i][1] if i < 50 else scene.caption
        assert caption == scene.caption
        for obj in scene.objects:
            assert f"{obj.color} {obj.shape}" in caption
        if scene.relation is not None:
            assert any(rel in caption for rel in ("left of", "right of", "above", "below"))
        assert " a orange" not in caption and not caption.startswith("a orange")


def test_objects_lie_where_the_relation_says():
    ds = ShapesDataset("val", 300, ShapesConfig(two_object_fraction=1.0))
    for i in range(len(ds)):
        scene = ds.scene(i)
        (ax, ay), (bx, by) = (obj.center for obj in scene.objects)
        expected = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}
        assert expected[scene.relation], scene


def test_drawn_colour_matches_the_scene():
    # A large single object covers its centre; the pixel there is near its named colour (jitter + noise).
    config = ShapesConfig()
    ds = ShapesDataset("train", 200, config)
    checked = 0
    for i in range(len(ds)):
        scene = ds.scene(i)
        obj = scene.objects[0]
        if len(scene.objects) == 1 and obj.size == "large" and obj.shape != "star":
            x, y = (round(v) for v in obj.center)
            pixel = _pixels(ds[i][0])[y, x].astype(int)
            assert np.abs(pixel - COLORS[obj.color]).max() <= config.color_jitter + config.noise
            checked += 1
    assert checked > 20


def test_zero_shot_task_labels_match_scenes():
    task = zero_shot_task("heldout", size=200)
    assert len(task.class_names) == len(COLORS) * len(SHAPES) == len(set(task.class_names))
    assert task.chance == pytest.approx(1 / 36)
    assert all("{}" in t for t in task.templates)
    assert len(task) == 200
    for index, label in task.samples:
        scene = task.dataset.scene(index)
        assert len(scene.objects) == 1
        assert task.class_names[label] == scene.objects[0].name
        assert tuple(task.class_names[label].split()) in heldout_pairs()
    image, label = task.item(0)
    assert image.size == (64, 64) and label == task.samples[0][1]


def test_compositional_task_swaps_attributes():
    task = compositional_task("heldout", size=50)
    assert task.chance == 0.5 and len(task.pairs) == 100
    for pair in task.pairs:
        scene = task.dataset.scene(pair.index)
        a, b = scene.objects
        assert pair.caption != pair.negative
        assert pair.caption.split() != pair.negative.split()
        assert sorted(pair.caption.split()) == sorted(pair.negative.split()) or pair.kind == "relation"
        assert f"{a.color} {a.shape} {scene.relation} " in pair.caption
        assert f"{b.color} {b.shape}" in pair.caption


def test_pickle_round_trip():
    ds = ShapesDataset("heldout", 30, ShapesConfig(seed=3, image_size=48))
    clone = pickle.loads(pickle.dumps(ds))
    assert (clone.split, clone.size, clone.config) == (ds.split, ds.size, ds.config)
    assert clone[5][1] == ds[5][1] and np.array_equal(_pixels(clone[5][0]), _pixels(ds[5][0]))


def test_bad_input_names_the_choices():
    with pytest.raises(ValueError, match="train, val, heldout"):
        ShapesDataset("test")
    with pytest.raises(ValueError, match="two_object_fraction"):
        ShapesConfig(two_object_fraction=1.5)
    with pytest.raises(IndexError):
        ShapesDataset("train", 3)[3]


def test_partial_captions_name_one_attribute():
    ds = ShapesDataset("train", 400, ShapesConfig(partial_caption_fraction=1.0, two_object_fraction=0.0))
    captions = {ds.scene(i).caption for i in range(len(ds))}
    for i in range(len(ds)):
        obj, caption = ds.scene(i).objects[0], ds.scene(i).caption
        assert (obj.shape in caption) != (obj.color in caption), caption
    assert len(captions) > 20
    heldout = ShapesDataset("heldout", 50, ShapesConfig(partial_caption_fraction=1.0, two_object_fraction=0.0))
    assert all(heldout.scene(i).objects[0].name in heldout.scene(i).caption for i in range(50))
