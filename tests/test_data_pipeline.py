"""make_batches: determinism, resume, sharding, evaluation padding, aligned augmentation."""

import numpy as np
import pytest

import rwseg.data as D
from rwseg.data import augment

PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]], np.uint8)


def colour_source(n=12, sizes=((18, 22),), seed=0):
    """In-memory source: blocky label maps, image = PALETTE[label] (label readable from colour)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        blocks = rng.integers(0, len(PALETTE), (-(-h // 6), -(-w // 6)))
        label = np.kron(blocks, np.ones((6, 6), int))[:h, :w].astype(np.int32)
        out.append({"image": PALETTE[label], "label": label})
    return out


def batches(src, **kw):
    kw = {"shard_index": 0, "shard_count": 1, **kw}
    return list(D.make_batches(src, **kw))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


TRAIN = dict(batch_size=4, crop_size=(12, 12), train=True)


def test_train_batch_shapes_and_dtypes():
    (b,) = batches(colour_source(), seed=0, num_steps=1, **TRAIN)
    assert b["image"].shape == (4, 12, 12, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (4, 12, 12) and b["label"].dtype == np.int32
    assert b["mask"].dtype == bool and b["valid"].all()
    assert ((b["label"] == 255) | ((b["label"] >= 0) & (b["label"] < 5))).all()
    assert (b["label"][~b["mask"]] == 255).all()


def test_deterministic_by_seed():
    src = colour_source()
    a = batches(src, seed=3, num_steps=5, **TRAIN)
    b = batches(src, seed=3, num_steps=5, **TRAIN)
    c = batches(src, seed=4, num_steps=5, **TRAIN)
    for x, y in zip(a, b):
        assert_same(x, y)
    assert any(not np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))


def test_resume_at_start_step_equals_tail_of_full_run():
    src = colour_source()
    full = batches(src, seed=1, num_steps=8, **TRAIN)  # 32 examples: crosses epochs of 12
    tail = batches(src, seed=1, start_step=5, num_steps=3, **TRAIN)
    for x, y in zip(full[5:], tail):
        assert_same(x, y)
    ds = D.batch_dataset(src, seed=1, shard_index=0, shard_count=1, **TRAIN)
    assert_same(ds[6], full[6])  # batch s is a pure function of (seed, s)


def test_epochs_cover_the_source_and_reshuffle():
    src = colour_source(n=12)
    b = batches(src, seed=0, num_steps=6, **TRAIN)  # two epochs of 12
    idx = np.concatenate([x["index"] for x in b])
    assert sorted(idx[:12]) == list(range(12)) and sorted(idx[12:]) == list(range(12))
    assert not np.array_equal(idx[:12], idx[12:])


def test_train_shards_disjoint_covering_and_equal_to_one_big_batch():
    src = colour_source(n=12)
    one = batches(src, seed=2, num_steps=4, batch_size=6, crop_size=(12, 12), train=True)
    shards = [
        batches(src, seed=2, num_steps=4, batch_size=2, crop_size=(12, 12), train=True, shard_index=p, shard_count=3)
        for p in range(3)
    ]
    for s in range(4):
        idx = np.concatenate([shards[p][s]["index"] for p in range(3)])
        assert len(set(idx.tolist())) == 6  # disjoint within a step
        for k in one[s]:
            np.testing.assert_array_equal(np.concatenate([shards[p][s][k] for p in range(3)]), one[s][k])
    epoch = np.concatenate([shards[p][s]["index"] for s in range(2) for p in range(3)])
    assert sorted(epoch.tolist()) == list(range(12))  # covering


def test_eval_padding_sharding_and_exact_metrics():
    sizes = ((10, 14), (16, 9), (12, 12))
    src = colour_source(n=7, sizes=sizes)
    for ex in src[::3]:
        ex["label"][0, :3] = 255  # unknown pixels in real examples
    runs = [batches(src, batch_size=3, train=False, seed=0, shard_index=p, shard_count=2) for p in range(2)]
    assert [len(r) for r in runs] == [2, 2]  # ceil(ceil(7/2)/3), same for both processes
    seen = []
    correct = total = 0
    for r in runs:
        for b in r:
            assert b["image"].shape == (3, 16, 14, 3)  # padded to the source maximum
            for j in range(3):
                i = b["index"][j]
                if not b["valid"][j]:
                    assert i == -1 and (b["label"][j] == 255).all() and not b["mask"][j].any()
                    assert (b["image"][j] == 0).all()
                    continue
                seen.append(i)
                h, w = src[i]["label"].shape
                np.testing.assert_array_equal(b["label"][j, :h, :w], src[i]["label"])
                np.testing.assert_allclose(b["image"][j, :h, :w], D.normalize(src[i]["image"]), rtol=1e-6)
                assert b["mask"][j, :h, :w].all() and not b["mask"][j].sum() > h * w
                assert (b["label"][j, h:] == 255).all() and (b["label"][j, :, w:] == 255).all()
            # A metric over the batch: a "prediction" reading the class from the colour.
            pred = np.argmin(((D.denormalize(b["image"])[..., None, :].astype(int) - PALETTE) ** 2).sum(-1), -1)
            keep = b["label"] != 255
            correct += (pred[keep] == b["label"][keep]).sum()
            total += keep.sum()
    assert sorted(seen) == list(range(7))  # each example exactly once over processes
    assert total == sum((ex["label"] != 255).sum() for ex in src) and correct == total
    assert [b["index"].tolist() for b in runs[0]] == [[0, 2, 4], [6, -1, -1]]  # deterministic order


def test_eval_pad_size_argument():
    src = colour_source(n=2, sizes=((10, 14),))
    (b,) = batches(src, batch_size=2, train=False, seed=0, pad_size=(16, 16))
    assert b["image"].shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match=r"pad_size: example 0 has \(H, W\) = \(10, 14\)"):
        batches(src, batch_size=2, train=False, seed=0, pad_size=(8, 16))


def test_augmentation_keeps_image_and_label_aligned():
    src = colour_source(n=8, sizes=((30, 36), (24, 40)))
    b = batches(src, seed=5, num_steps=6, batch_size=4, crop_size=(20, 20), train=True, scale_range=(0.6, 1.7))
    images = D.denormalize(np.concatenate([x["image"] for x in b])).astype(int)
    labels = np.concatenate([x["label"] for x in b])
    masks = np.concatenate([x["mask"] for x in b])
    # Interior pixels (3x3 neighbourhood of one label, inside the image): colour = PALETTE[label].
    lab = np.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=-1)
    same = np.ones_like(labels, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= lab[:, 1 + dy : 1 + dy + labels.shape[1], 1 + dx : 1 + dx + labels.shape[2]] == labels
    interior = same & masks & (labels != 255)
    assert interior.sum() > 0.4 * labels.size
    err = np.abs(images[interior] - PALETTE[labels[interior]]).max()
    assert err <= 2
    # The augmentation did something: scaled/cropped/flipped batches differ from plain crops.
    plain = batches(src, seed=5, num_steps=6, batch_size=4, crop_size=(20, 20), train=True, scale_range=None, flip=False)
    assert any(not np.array_equal(x["label"], y["label"]) for x, y in zip(b, plain))
    assert (~masks).any()  # some scaled-down images were padded with ignore


def test_flip_and_crop_without_scale_are_exact_views():
    src = colour_source(n=4, sizes=((18, 22),))
    b = batches(src, seed=0, num_steps=12, batch_size=1, crop_size=(18, 22), train=True, scale_range=None)
    flips = 0
    for x in b:
        i = x["index"][0]
        lab = src[i]["label"]
        if np.array_equal(x["label"][0], lab[:, ::-1]) and not np.array_equal(lab, lab[:, ::-1]):
            flips += 1
        else:
            np.testing.assert_array_equal(x["label"][0], lab)
    assert 0 < flips < 12  # both outcomes occur (deterministic for this seed)


def test_crop_none_needs_equal_sizes():
    src = colour_source(n=4, sizes=((10, 14), (12, 12)))
    with pytest.raises(ValueError, match="crop_size"):
        batches(src, seed=0, num_steps=1, batch_size=4, train=True, scale_range=None)
    (b,) = batches(colour_source(n=4), seed=0, num_steps=1, batch_size=4, train=True, scale_range=None)
    assert b["image"].shape == (4, 18, 22, 3)


def test_bad_arguments():
    src = colour_source(n=4)
    with pytest.raises(ValueError, match="batch_size"):
        batches(src, seed=0, batch_size=0, train=True)
    with pytest.raises(ValueError, match="shard_index"):
        list(D.make_batches(src, seed=0, batch_size=2, train=True, shard_index=2, shard_count=2))
    with pytest.raises(ValueError, match="crop_size"):
        batches(src, seed=0, batch_size=2, train=True, crop_size=(0, 4))
    with pytest.raises(ValueError, match="scale_range"):
        batches(src, seed=0, batch_size=2, train=True, scale_range=(1.2, 0.8))
    with pytest.raises(ValueError, match="start_step"):
        batches(src, seed=0, batch_size=2, train=True, start_step=-1)
    with pytest.raises(TypeError, match="seed"):
        batches(src, seed=1.5, batch_size=2, train=True)


def test_default_shards_are_jax_processes():
    src = colour_source(n=4)
    (b,) = list(D.make_batches(src, seed=0, batch_size=2, train=True, crop_size=(8, 8), num_steps=1))
    (c,) = batches(src, seed=0, batch_size=2, train=True, crop_size=(8, 8), num_steps=1)
    assert_same(b, c)  # one process here: shard 0 of 1


def test_normalize_denormalize_round_trip():
    img = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    x = augment.normalize(img)
    assert x.dtype == np.float32 and abs(float(x.mean())) < 2
    np.testing.assert_array_equal(D.denormalize(x), img)


def test_scribbles():
    src = colour_source(n=4)
    a = batches(src, seed=0, num_steps=2, batch_size=2, train=True, crop_size=(12, 12), scribbles=True)
    b = batches(src, seed=0, num_steps=2, batch_size=2, train=True, crop_size=(12, 12), scribbles=True)
    for x, y in zip(a, b):
        assert_same(x, y)
        s = x["scribbles"]
        assert s.shape == x["label"].shape and s.dtype == np.int32
        assert (s >= -1).all() and (s < 5).all() and (s >= 0).any()
        np.testing.assert_array_equal(s[s >= 0], x["label"][s >= 0])  # strokes carry the true label


def test_color_jitter_oracle():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 5, 3)).astype(np.uint8)
    # zero strength: the image (as float) and the random stream are unchanged
    r1, r2 = np.random.default_rng(4), np.random.default_rng(4)
    np.testing.assert_array_equal(augment.color_jitter(image, r1), image.astype(np.float32))
    assert r1.random() == r2.random()
    # brightness alone: one factor f in [0.7, 1.3] for every pixel, f drawn first from the stream
    f = np.random.default_rng(7).uniform(0.7, 1.3)
    out = augment.color_jitter(image, np.random.default_rng(7), (0.3, 0.0, 0.0))
    np.testing.assert_allclose(out, np.clip(image * f, 0, 255), rtol=1e-6)
    # saturation alone with factor 0 would give gray; any factor keeps gray pixels gray
    gray = np.full((4, 4, 3), 90, np.uint8)
    np.testing.assert_allclose(augment.color_jitter(gray, np.random.default_rng(1), (0.0, 0.5, 0.9)), gray, atol=1e-4)


def test_color_jitter_in_batches():
    src = colour_source(n=8, sizes=((30, 36),))
    kw = dict(seed=3, num_steps=3, batch_size=4, crop_size=(20, 20), train=True)
    plain = batches(src, **kw)
    for x, y in zip(plain, batches(src, color_jitter=(0.0, 0.0, 0.0), **kw)):
        assert_same(x, y)  # the default stream, exactly
    jit = batches(src, color_jitter=(0.4, 0.4, 0.4), **kw)
    for x, y in zip(plain, jit):
        assert not np.allclose(x["image"], y["image"])
    with pytest.raises(ValueError, match="color_jitter"):
        batches(src, color_jitter=(1.5, 0, 0), **kw)


def test_resume_with_fewer_processes_reads_the_same_global_stream():
    """Issue 29: a run checkpointed with 4 processes and resumed with 2 (or 1) reads the same
    global batches from the restored step on: the shards, concatenated in process order (the
    order of the global batch over a 1-d mesh), equal the 2-process and 1-process batches."""
    src = colour_source(n=12)
    kw = dict(seed=5, start_step=3, num_steps=3, crop_size=(12, 12), train=True)
    four = [batches(src, batch_size=2, shard_index=p, shard_count=4, **kw) for p in range(4)]
    two = [batches(src, batch_size=4, shard_index=p, shard_count=2, **kw) for p in range(2)]
    one = batches(src, batch_size=8, **kw)
    for s in range(3):
        for k in one[s]:
            np.testing.assert_array_equal(np.concatenate([four[p][s][k] for p in range(4)]), one[s][k], err_msg=k)
            np.testing.assert_array_equal(np.concatenate([two[p][s][k] for p in range(2)]), one[s][k], err_msg=k)
