"""grain pipelines: batch format, determinism, epochs, sharding, resume (also through orbax),
worker processes, and exact evaluation passes."""

from __future__ import annotations

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from data_fakes import (
    ade20k_config,
    color_code,
    custom_config,
    data_config,
    write_ade20k,
    write_custom,
)

from clade_jax.data import pipeline
from clade_jax.data.sources import make_source
from clade_jax.data.transforms import AugmentOptions, EvalTransform
from clade_jax.layers.labels import icpe_offsets


def _train(cfg, batch=4, seed=0, p=0, n=1, epochs=None, names=False):
    ds = pipeline.build_train_dataset(
        cfg,
        global_batch_size=batch,
        seed=seed,
        process_index=p,
        process_count=n,
        num_epochs=epochs,
        keep_names=names,
    )
    return iter(ds)


def _take(it, k):
    return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_train_batch_format_synthetic():
    cfg = data_config(use_instance=True, icpe=True)
    it = pipeline.make_train_iterator(
        cfg, global_batch_size=4, seed=0, process_index=0, process_count=1
    )
    b = next(it)
    assert set(b) == {"label", "image", "instance", "icpe"}
    assert b["label"].shape == (4, 32, 32) and b["label"].dtype == np.int32
    assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["instance"].shape == (4, 32, 32) and b["instance"].dtype == np.int32
    assert b["icpe"].shape == (4, 32, 32, 2) and b["icpe"].dtype == np.float32
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0 and b["image"].std() > 0.1
    assert 0 <= b["label"].min() and b["label"].max() < 10
    for i in range(4):  # ICPE is the map of the final (augmented) label map
        np.testing.assert_allclose(b["icpe"][i], icpe_offsets(b["label"][i], ignore=(9,)))


def test_icpe_is_computed_after_the_flip():
    """With no crop (preprocess 'fixed' at the rendered size) each training label map is its
    source map or that map mirrored; over an epoch both occur, and the flipped ones carry the
    ICPE map of the flipped labels (not the source map's, flipped or not)."""
    cfg = data_config(icpe=True, preprocess="fixed", load_size=32, crop_size=32)
    source = make_source(cfg, "train")
    by_name = {source[i]["name"]: source[i]["label"] for i in range(len(source))}
    flipped = kept = 0
    for b in _take(_train(cfg, names=True), 6):  # 24 examples: one epoch
        for name, label, icpe in zip(b["name"], b["label"], b["icpe"], strict=True):
            raw = by_name[name]
            np.testing.assert_allclose(icpe, icpe_offsets(label, ignore=(9,)))
            if np.array_equal(raw, raw[:, ::-1]):
                continue  # a mirror-symmetric scene: a flip is not observable
            if np.array_equal(label, raw[:, ::-1]):
                flipped += 1
                before = icpe_offsets(raw, ignore=(9,))
                assert np.abs(icpe - before).max() > 0.5
                assert np.abs(icpe - before[:, ::-1]).max() > 0.5  # the official loader's map
            else:
                np.testing.assert_array_equal(label, raw)
                kept += 1
    assert flipped >= 3 and kept >= 3


def test_train_batches_without_optional_maps():
    b = next(_train(data_config()))
    assert set(b) == {"label", "image"}


def test_deterministic_per_seed():
    cfg = data_config(use_instance=True)
    _assert_batches_equal(_take(_train(cfg, seed=5), 4), _take(_train(cfg, seed=5), 4))
    a, b = next(_train(cfg, seed=5)), next(_train(cfg, seed=6))
    assert not np.array_equal(a["label"], b["label"])


def test_epochs_cover_every_example_once_and_reshuffle():
    cfg = data_config()  # 24 synthetic scenes
    batches = list(_train(cfg, batch=4, epochs=2, names=True))
    assert len(batches) == 12
    names = np.concatenate([b["name"] for b in batches])
    first, second = names[:24], names[24:]
    assert sorted(first) == sorted(second) == [f"synthetic_train_{i:07d}" for i in range(24)]
    assert list(first) != list(second)


def test_finite_epochs_keep_whole_global_batches_only():
    batches = list(_train(data_config(), batch=5, epochs=1))  # 24 examples -> 4 batches of 5
    assert len(batches) == 4


def test_process_shards_are_disjoint_and_recompose_the_global_batches():
    cfg = data_config()
    single = list(_train(cfg, batch=8, epochs=1, names=True))
    shards = [list(_train(cfg, batch=8, p=p, n=2, epochs=1, names=True)) for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(single) == 3
    for step, global_batch in enumerate(single):
        local = [shards[p][step] for p in range(2)]
        assert all(b["label"].shape[0] == 4 for b in local)
        assert not set(local[0]["name"]) & set(local[1]["name"])
        assert sorted(np.concatenate([b["name"] for b in local])) == sorted(global_batch["name"])
        # The same example is augmented the same way whichever process reads it.
        rows = {n: i for i, n in enumerate(global_batch["name"])}
        for b in local:
            for j, n in enumerate(b["name"]):
                np.testing.assert_array_equal(b["image"][j], global_batch["image"][rows[n]])
    all_names = np.concatenate([b["name"] for s in shards for b in s])
    assert len(set(all_names)) == 24


def test_resume_from_state_gives_the_same_batches():
    cfg = data_config(use_instance=True, icpe=True)
    it = _train(cfg, seed=1)
    _take(it, 7)  # crosses an epoch boundary (24 examples = 6 batches)
    state = it.get_state()
    expected = _take(it, 4)
    resumed = _train(cfg, seed=1)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 4), expected)


def test_resume_through_an_orbax_checkpoint_manager(tmp_path):
    cfg = data_config()
    it = pipeline.make_train_iterator(
        cfg, global_batch_size=4, seed=3, process_index=0, process_count=1
    )
    _take(it, 5)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    params = {"w": np.arange(3, dtype=np.float32)}
    mngr.save(
        5,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(params), data=grain.checkpoint.CheckpointSave(it)
        ),
    )
    mngr.wait_until_finished()
    expected = _take(it, 4)
    mngr.close()

    fresh = pipeline.make_train_iterator(
        cfg, global_batch_size=4, seed=3, process_index=0, process_count=1
    )
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    restored = mngr.restore(
        mngr.latest_step(),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(params), data=grain.checkpoint.CheckpointRestore(fresh)
        ),
    )
    mngr.close()
    np.testing.assert_array_equal(restored["state"]["w"], params["w"])
    _assert_batches_equal(_take(restored["data"], 4), expected)


def test_worker_processes_give_the_same_batches_and_resume():
    cfg = data_config(use_instance=True)
    expected = _take(_train(cfg, seed=2), 6)
    cfg.num_workers = 2
    it = _train(cfg, seed=2)
    try:
        got = _take(it, 3)
        state = it.get_state()
        got += _take(it, 3)
    finally:
        it.close()
    _assert_batches_equal(got, expected)
    resumed = _train(cfg, seed=2)
    try:
        resumed.set_state(state)
        _assert_batches_equal(_take(resumed, 3), expected[3:])
    finally:
        resumed.close()


def test_eval_sees_every_example_once_with_padding_mask():
    cfg = data_config(icpe=True)  # 10 validation scenes
    source = make_source(cfg, "validation")
    transform = EvalTransform(AugmentOptions.from_config(cfg))
    batches = list(pipeline.make_eval_iterator(cfg, batch_size=4, process_index=0, process_count=1))
    assert len(batches) == 3
    mask = np.concatenate([b["mask"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    assert mask.tolist() == [True] * 10 + [False] * 2
    assert index[mask].tolist() == list(range(10)) and np.all(index[~mask] == -1)
    assert batches[-1]["name"][-1] == "" and batches[0]["name"][0] == "synthetic_validation_0000000"
    for b in batches:  # no flip, no random crop: the deterministic test-time transform
        for j in range(4):
            if b["mask"][j]:
                want = transform(source[int(b["index"][j])])
                np.testing.assert_array_equal(b["label"][j], want["label"])
                np.testing.assert_allclose(b["icpe"][j], want["icpe"])
                np.testing.assert_allclose(b["image"][j], want["image"] / 127.5 - 1, atol=1e-6)


def test_eval_shards_cover_the_split_once():
    cfg = data_config()
    seen = []
    counts = []
    for p in range(2):
        batches = list(
            pipeline.make_eval_iterator(cfg, batch_size=4, process_index=p, process_count=2)
        )
        counts.append(len(batches))
        for b in batches:
            assert b["label"].shape[0] == 2
            seen += b["index"][b["mask"]].tolist()
    assert counts == [3, 3] and sorted(seen) == list(range(10))


def test_ade20k_folder_pipeline_runs_end_to_end(tmp_path):
    write_ade20k(str(tmp_path), n_train=5, n_val=3)
    cfg = ade20k_config(str(tmp_path), icpe=True)
    b = next(
        pipeline.make_train_iterator(
            cfg, global_batch_size=2, seed=0, process_index=0, process_count=1
        )
    )
    assert b["label"].shape == (2, 32, 32) and b["icpe"].shape == (2, 32, 32, 2)
    assert b["label"].max() <= 150
    ev = list(pipeline.make_eval_iterator(cfg, batch_size=2, process_index=0, process_count=1))
    assert sum(int(b["mask"].sum()) for b in ev) == 3


def test_pipeline_keeps_image_label_instance_aligned(tmp_path):
    # Images are PNG colour codings of their label maps, so the augmented image must show the
    # colour of the augmented label away from class borders, and instance // 1000 == label.
    write_custom(str(tmp_path), n_train=6, num_classes=5)
    cfg = custom_config(str(tmp_path), load_size=50, crop_size=40)
    for b in _take(_train(cfg, batch=3, seed=4), 4):
        np.testing.assert_array_equal(b["instance"] // 1000, b["label"])
        image = np.rint((b["image"] + 1) * 127.5).astype(int)
        for j in range(3):
            lab = b["label"][j]
            interior = np.ones_like(lab, bool)
            for dy in (-2, -1, 0, 1, 2):
                for dx in (-2, -1, 0, 1, 2):
                    interior &= np.roll(lab, (dy, dx), axis=(0, 1)) == lab
            interior[:2], interior[-2:], interior[:, :2], interior[:, -2:] = (False,) * 4
            err = np.abs(image[j] - color_code(lab, 5).astype(int))[interior]
            assert err.max() <= 3


def test_batch_size_must_split_over_processes():
    with pytest.raises(ValueError, match="multiple of the process count 3"):
        pipeline.make_train_iterator(
            data_config(), global_batch_size=4, seed=0, process_index=0, process_count=3
        )
