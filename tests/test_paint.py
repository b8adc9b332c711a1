"""`clade_jax.paint`'s HTTP API on a real uvicorn server (127.0.0.1, a free port).

With the tiny trained run (`tiny_run`): `/api/info`, photos bitwise those of `clade_jax.synthesize`
for the same label map (also resized ones), every bad input answered with its 4xx while the server
keeps serving, and 20 concurrent requests all answered correctly with the generator traced (so
compiled) exactly once. With an initialized VAE + instance + ICPE model: seed, style image and
instance map reach the generator exactly as `clade_jax.synthesize` passes them.
"""

from __future__ import annotations

import concurrent.futures
import io
import re

import httpx
import numpy as np
import pytest
from conftest import TINY_RUN_GROUP, initial_state
from PIL import Image

from clade_jax.configs import synthetic as synthetic_config
from clade_jax.data import synthetic
from clade_jax.inference import InferenceModel
from clade_jax.models.generator import Generator
from clade_jax.paint.server import PaintModel, create_app, serve_in_thread
from clade_jax.synthesize import synthesize
from clade_jax.training import checkpoint

pytestmark = pytest.mark.xdist_group(TINY_RUN_GROUP)


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def scene_labels(index: int, height: int = 64, width: int = 64) -> np.ndarray:
    return synthetic.generate_scene(index, height, width, split="validation")["label"]


def reference_image(model, workdir, tmp_path, labels: np.ndarray, name: str, **kwargs):
    """What `clade_jax.synthesize` writes for this one label map (batch of 1)."""
    path = tmp_path / f"{name}.png"
    path.write_bytes(png(labels.astype(np.uint8)))
    (out,) = synthesize(workdir, [path], tmp_path / f"out_{name}", model=model, **kwargs)
    return np.asarray(Image.open(out))


# The 4-step run's photos are flat grey (outputs within +-0.003 of 0: every pixel 127 or 128), so a
# wrong label map would give the same PNG. The tests multiply its last convolution by this (the
# same weights in the server and in the reference) so that every map has its own photo.
AMPLIFY = 300.0


def amplified(workdir: str):
    """(config, InferenceModel) of the run with `conv_img` scaled by `AMPLIFY`."""
    config, g, e, _ = checkpoint.load_models(workdir)
    g.conv_img.kernel.set_value(g.conv_img.kernel[...] * AMPLIFY)
    g.conv_img.bias.set_value(g.conv_img.bias[...] * AMPLIFY)
    return config, InferenceModel(g, e)


def amplified_paint_model(workdir: str) -> PaintModel:
    config, net = amplified(workdir)
    return PaintModel(config, net, workdir)


@pytest.fixture(scope="module")
def server(tiny_run):
    """(PaintModel, client) of the tiny run, served on a free port of 127.0.0.1."""
    _, workdir, _, _ = tiny_run
    model = amplified_paint_model(workdir)
    with serve_in_thread(create_app(model)) as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            yield model, client


@pytest.fixture(scope="module")
def reference(tiny_run):
    """The tiny run restored separately, for `clade_jax.synthesize`."""
    _, workdir, _, _ = tiny_run
    return amplified(workdir), workdir


def test_info_describes_the_model_and_its_classes(server, tiny_run):
    _, client = server
    info = client.get("/api/info").json()
    restored = PaintModel.from_workdir(tiny_run[1])  # the CLI's way: restored as it was trained
    assert restored.info() == info
    assert info["num_classes"] == 10
    assert info["class_names"] == list(synthetic.CLASS_NAMES)
    assert info["palette"] == synthetic.PALETTE.tolist()
    assert (info["height"], info["width"]) == (64, 64)
    assert info["dontcare"] == synthetic.DONTCARE
    assert info["use_vae"] is False and info["use_instance"] is False
    assert (info["generator"], info["norm"]) == ("spade_clade", "clade")
    assert info["has_validation"] is True
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "encodeGreyPNG" in client.get("/static/app.js").text


def test_binds_localhost_by_default_and_warns_on_every_interface(server, monkeypatch, caplog):
    import uvicorn

    from clade_jax.paint import server as server_module

    model, _ = server
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    with caplog.at_level("WARNING"):
        server_module.serve(model, port=8123, warm_up=False)
        assert not caplog.records
        server_module.serve(model, host="0.0.0.0", port=8123, warm_up=False)
    assert [c["host"] for c in calls] == ["127.0.0.1", "0.0.0.0"]
    assert any("0.0.0.0" in r.getMessage() and "exposes" in r.getMessage() for r in caplog.records)
    main = pytest.importorskip("clade_jax.paint.__main__")
    with pytest.raises(SystemExit):
        main.main(["--workdir", "/nonexistent/run"])


def test_photo_is_bitwise_clade_jax_synthesize(server, reference, tmp_path):
    _, client = server
    model, workdir = reference
    for i, (h, w) in enumerate(((64, 64), (48, 40), (100, 128))):  # other sizes are resized
        labels = scene_labels(i, h, w)
        resp = client.post("/api/synthesize", content=png(labels.astype(np.uint8)))
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"] == "image/png"
        photo = decode(resp.content)
        assert photo.shape == (64, 64, 3) and photo.dtype == np.uint8
        np.testing.assert_array_equal(
            photo, reference_image(model, workdir, tmp_path, labels, f"map{i}")
        )
    # A 16-bit PNG of the same ids is the same map.
    labels = scene_labels(0)
    a = client.post("/api/synthesize", content=png(labels.astype(np.uint8))).content
    b = client.post("/api/synthesize", content=png(labels.astype(np.uint16))).content
    np.testing.assert_array_equal(decode(a), decode(b))
    assert (
        np.abs(
            decode(a).astype(int)
            - decode(
                client.post(
                    "/api/synthesize", content=png(scene_labels(5).astype(np.uint8))
                ).content
            )
        ).mean()
        > 0.5
    )


def test_bad_inputs_get_their_4xx_and_the_server_keeps_serving(server):
    _, client = server
    good = png(scene_labels(1).astype(np.uint8))
    expected = decode(client.post("/api/synthesize", content=good).content)
    out_of_range = scene_labels(1).astype(np.uint8)
    out_of_range[:2, :2] = 12
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(jpeg, format="JPEG")
    cases = [
        ("", b"no png here", 415, "not a PNG"),
        ("", jpeg.getvalue(), 415, "not a PNG"),
        ("", good[:40], 415, "label map"),  # truncated PNG
        ("", png(np.zeros((64, 64, 3), np.uint8)), 422, "3 channels"),
        ("", png(np.zeros((64, 64, 2), np.uint8), "LA"), 422, "2 channels"),
        ("", png(out_of_range), 422, "outside \\[0, 10\\): 12"),
        ("", png(np.zeros((1, 4097), np.uint8)), 413, "4096 px"),
        ("", b"\x89PNG\r\n\x1a\n" + bytes(10 * 1024 * 1024), 413, "10 MB"),
        ("?seed=abc", good, 400, "seed='abc'"),
        ("?seed=-1", good, 400, "seed=-1"),
        ("?style=nope", good, 404, "style"),
        ("?instance_bytes=99999", good, 400, "instance_bytes"),
    ]
    for query, body, status, message in cases:
        resp = client.post(f"/api/synthesize{query}", content=body)
        assert resp.status_code == status, (query, message, resp.text)
        assert resp.headers["content-type"] == "application/json"
        assert re.search(message, resp.json()["error"]), (message, resp.json())
        after = client.post("/api/synthesize", content=good)
        assert after.status_code == 200
        np.testing.assert_array_equal(decode(after.content), expected)
    assert client.get("/api/nothing").status_code == 404
    assert client.get("/api/synthesize").status_code == 405


def test_label_upload_and_validation_maps_are_ids_at_the_model_size(server):
    model, client = server
    raw = scene_labels(2, 32, 32).astype(np.uint8)
    resp = client.post("/api/labels?encoding=ids", content=png(raw))
    ids = np.frombuffer(resp.content, "<u2").reshape(64, 64)
    np.testing.assert_array_equal(ids, raw.repeat(2, 0).repeat(2, 1))  # nearest, 2x
    assert client.post("/api/labels", content=png(raw + 10)).status_code == 422
    resp = client.get("/api/validation_map?index=3")
    ids = np.frombuffer(resp.content, "<u2").reshape(64, 64)
    source, transform = model._validation_source()
    np.testing.assert_array_equal(ids, transform(source[3])["label"])
    assert resp.headers["X-Name"] == "synthetic_validation_0000003"
    assert client.get("/api/validation_map?index=100000").status_code == 400


def test_20_concurrent_requests_are_answered_correctly_and_compiled_once(
    tiny_run, reference, tmp_path, monkeypatch
):
    _, workdir, _, _ = tiny_run
    ref_model, _ = reference
    reference_image(ref_model, workdir, tmp_path, scene_labels(0), "warm")  # trace it first
    model = amplified_paint_model(workdir)
    traces = []
    original = Generator.__call__

    def counting_call(self, *args, **kwargs):
        traces.append(1)  # runs only while jax traces: compiled calls skip Python
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Generator, "__call__", counting_call)
    sizes = [(64, 64), (48, 48), (80, 64), (64, 64)]
    maps = [scene_labels(10 + i, *sizes[i % 4]) for i in range(20)]
    with serve_in_thread(create_app(model)) as url:
        with httpx.Client(base_url=url, timeout=300) as client:

            def post(labels):
                return client.post(
                    "/api/synthesize", content=png(labels.astype(np.uint8)), params={"seed": 1}
                )

            with concurrent.futures.ThreadPoolExecutor(20) as pool:
                responses = list(pool.map(post, maps))
    assert [r.status_code for r in responses] == [200] * 20
    assert len(traces) == 1, f"the generator was traced {len(traces)} times"
    assert len(model.compile_seconds) == 1
    monkeypatch.setattr(Generator, "__call__", original)
    for i, (labels, resp) in enumerate(zip(maps, responses, strict=True)):
        expected = reference_image(ref_model, workdir, tmp_path, labels, f"c{i}")
        np.testing.assert_array_equal(decode(resp.content), expected)


@pytest.fixture(scope="module")
def vae_instance_icpe(tmp_path_factory):
    """An initialized (untrained) CLADE-ICPE workdir with the VAE encoder and instance maps, in the
    layout `python -m clade_jax.convert` writes: config.json + checkpoint 0 (state only)."""
    config = synthetic_config.get_config("tiny,vae,icpe")
    config.data.use_instance = True
    workdir = str(tmp_path_factory.mktemp("paint_vae"))
    checkpoint.write_config(config, workdir)
    state = initial_state(config, config.seed)[1]
    manager = checkpoint.make_manager(workdir, with_data=False)
    checkpoint.save(manager, 0, state, force=True)
    manager.wait_until_finished()
    manager.close()
    return workdir


def test_seed_style_instances_and_icpe_reach_the_generator_as_in_synthesize(
    vae_instance_icpe, tmp_path
):
    workdir = vae_instance_icpe
    model = amplified_paint_model(workdir)
    reference = (model.config, model.net)  # one compilation per input signature for both paths
    scene = synthetic.generate_scene(0, 64, 64, split="validation")
    label_png, inst_png = (
        png(scene["label"].astype(np.uint8)),
        png(scene["instance"].astype(np.uint16)),
    )
    (tmp_path / "map.png").write_bytes(label_png)
    (tmp_path / "inst.png").write_bytes(inst_png)
    (tmp_path / "style.png").write_bytes(png(synthetic.generate_scene(5, 64, 64)["image"]))

    def expected(name, **kwargs):
        (out,) = synthesize(
            workdir, [tmp_path / "map.png"], tmp_path / name, model=reference, **kwargs
        )
        return np.asarray(Image.open(out))

    with serve_in_thread(create_app(model)) as url, httpx.Client(base_url=url, timeout=120) as c:
        info = c.get("/api/info").json()
        assert info["use_vae"] and info["has_encoder"] and info["use_instance"] and info["use_icpe"]

        def post(body, **params):
            resp = c.post("/api/synthesize", content=body, params=params)
            assert resp.status_code == 200, resp.text
            return decode(resp.content)

        n = len(inst_png)
        with_inst = post(label_png + inst_png, seed=3, instance_bytes=n)
        np.testing.assert_array_equal(
            with_inst, expected("inst", seed=3, instances=[tmp_path / "inst.png"])
        )
        other_seed = post(label_png + inst_png, seed=4, instance_bytes=n)
        assert np.abs(other_seed.astype(int) - with_inst).mean() > 0.5
        # Without an instance map the label map is the instance map (edges on class boundaries).
        np.testing.assert_array_equal(
            post(label_png, seed=3), expected("own", seed=3, instances=[tmp_path / "map.png"])
        )
        resp = c.post("/api/style", content=(tmp_path / "style.png").read_bytes())
        style = resp.json()["style"]
        styled = post(label_png + inst_png, seed=0, style=style, instance_bytes=n)
        np.testing.assert_array_equal(
            styled,
            expected(
                "style", seed=0, style=tmp_path / "style.png", instances=[tmp_path / "inst.png"]
            ),
        )
        assert (
            np.abs(styled.astype(int) - post(label_png + inst_png, seed=0, instance_bytes=n)).mean()
            > 0.5
        )
        small = png(np.zeros((32, 32), np.uint16))
        resp = c.post(
            "/api/synthesize", content=label_png + small, params={"instance_bytes": len(small)}
        )
        assert resp.status_code == 422 and "instance map is 32x32" in resp.json()["error"]
        assert c.post("/api/style", content=b"not an image").status_code == 415
        resp = c.get("/api/validation_map", params={"index": 0})
        assert resp.headers["X-Instance"] == "True" and len(resp.content) == 2 * 2 * 64 * 64
