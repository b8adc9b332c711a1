"""The painting app's server: one model, loaded once, behind a small Starlette (ASGI) app.

HTTP API (all errors are 4xx JSON `{"error": "..."}` naming the problem; the server keeps serving):

* `GET /` the page; `GET /static/...` its script and style sheet (shipped in the package).
* `GET /api/info` JSON: `num_classes`, `class_names`, `palette` ([r, g, b] per class), `height`,
  `width` (the model's output size), `dontcare` (-1 if none), `use_vae`, `use_instance`,
  `use_icpe`, `generator`, `norm`, `dataset`, `has_validation` (whether `/api/validation_map`
  can read the run's validation data here).
* `POST /api/synthesize` body: a single-channel PNG (8- or 16-bit grey, or palette indices) whose
  pixel values are class ids in [0, num_classes). Query: `seed` (VAE models: z from the prior with
  the key of `clade_jax.synthesize`, sample 0; default 0), `style` (an id from `/api/style`: z from
  the encoder's posterior of that image), `instance_bytes=N` (models with instance maps: the body
  is the label PNG followed by an N-byte single-channel instance-id PNG of the same size; without
  it the label map is its own instance map, so edges lie on the class boundaries). Maps of another
  size are resized to the model's with the training pipeline's nearest rule
  (`config.data.label_resize`); ICPE maps (CLADE-ICPE) are computed from the resized labels, as
  the pipeline does. Response: `image/png` (RGB, the model's size), header `X-Synthesis-Ms`.
* `POST /api/labels?encoding=ids|dataset` body: a label PNG (ids, or the data set's own encoding,
  e.g. ADE20k's 0 = unknown). Validated, remapped and resized as above; response: the ids at the
  model's size as raw little-endian uint16 (`application/octet-stream`, row-major, H * W values).
* `GET /api/validation_map?index=K` (random K without it): a validation example of the run's data
  set at the model's size, as in evaluation: uint16 label ids, then (instance models) H * W uint16
  instance ids (renumbered 0..n-1, which keeps every edge). Headers `X-Index`, `X-Name`.
* `POST /api/style` body: an RGB image (VAE models). Returns `{"style": id}` for `/api/synthesize`.

Limits: bodies over 10 MB (413) and images over 4096 px a side (413) are refused before decoding.

The model is restored once (`load_inference_model`: EMA generator, spectral norm folded) and its
jit-compiled function is called under a lock, so concurrent requests run one at a time and every
input shape is compiled exactly once (the first request of a shape pays the compilation;
`python -m clade_jax.paint` compiles the model's size before it starts listening).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import io
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from clade_jax.data import synthetic
from clade_jax.data.classes import ADE20K_CLASSES
from clade_jax.data.decoding import label_encoding, read_id_map, read_image
from clade_jax.data.layouts import DataError
from clade_jax.data.transforms import resize_ids, resize_image
from clade_jax.inference import InferenceModel, load_inference_model, sample_keys, to_uint8
from clade_jax.layers.labels import check_labels, icpe_offsets
from clade_jax.visualize import generic_palette

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 10 * 1024 * 1024  # 10 MB
MAX_SIDE = 4096  # pixels
MAX_STYLES = 16  # uploaded style images kept (least recently used dropped)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SINGLE_CHANNEL_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")
CHANNELS = {"LA": 2, "PA": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "RGBA": 4, "CMYK": 4}


class RequestError(Exception):
    """A bad request: HTTP `status` and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def class_names_and_palette(config: Any) -> tuple[list[str], list[list[int]]]:
    """The data set's class names (indexed by class id) and display colours.

    Synthetic scenes: their names and palette (the mean colour of each class). ADE20k: its 150
    names and "unknown" for the don't-care id. Other data sets: "class k". Colours other than the
    synthetic scenes' come from `visualize.generic_palette`; the don't-care class is black.
    """
    n = int(config.data.num_classes)
    dontcare = int(config.data.get("dontcare_label", -1))
    dataset = config.data.dataset
    if dataset == "synthetic" and n == synthetic.NUM_CLASSES:
        return list(synthetic.CLASS_NAMES), synthetic.PALETTE.tolist()
    names = [f"class {k}" for k in range(n)]
    if dataset in ("ade20k", "ade20k_outdoor"):
        names[: min(n, len(ADE20K_CLASSES))] = ADE20K_CLASSES[:n]
    if 0 <= dontcare < n:
        names[dontcare] = "unknown (don't care)"
    palette = generic_palette(n).astype(int)
    if 0 <= dontcare < n:
        palette[dontcare] = 0
        if dontcare != 0 and not palette[0].any():  # keep black for don't-care only
            palette[0] = (96, 96, 96)
    return names, palette.tolist()


def png_bytes(array: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> RGB PNG bytes; (H, W) ids -> 8-bit (max < 256) or 16-bit grey PNG."""
    if array.ndim == 2:
        image = Image.fromarray(
            array.astype(np.uint8) if array.max(initial=0) < 256 else array.astype(np.uint16)
        )
    else:
        image = Image.fromarray(array)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _open_image(data: bytes, what: str) -> Image.Image:
    """PIL image of `data` (not decoded yet), its size checked against `MAX_SIDE`."""
    try:
        image = Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError) as e:
        raise RequestError(415, f"{what}: not a readable image ({e})") from None
    w, h = image.size
    if max(w, h) > MAX_SIDE:
        raise RequestError(413, f"{what}: {w}x{h} pixels (WxH) is larger than {MAX_SIDE} px a side")
    return image


def decode_id_png(data: bytes, what: str) -> np.ndarray:
    """A single-channel integer PNG -> (H, W) int32; RequestError for anything else."""
    if not data.startswith(PNG_SIGNATURE):
        raise RequestError(
            415, f"{what}: not a PNG (the body must be a PNG file, got {len(data)} bytes)"
        )
    image = _open_image(data, what)
    if image.format != "PNG":
        raise RequestError(415, f"{what}: not a PNG (PIL reads it as {image.format})")
    if image.mode not in SINGLE_CHANNEL_MODES:
        channels = CHANNELS.get(image.mode, len(image.getbands()))
        raise RequestError(
            422,
            f"{what}: a label map must be a single-channel PNG of class ids, got {channels} "
            f"channels (PIL mode {image.mode}); colour-coded maps are not accepted",
        )
    try:
        return read_id_map(data, what)
    except DataError as e:
        raise RequestError(422, str(e)) from None


def _int_param(query, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = query.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise RequestError(400, f"query parameter {name}={value!r} is not an integer") from None
    if not lo <= number < hi:
        raise RequestError(400, f"query parameter {name}={number} is outside [{lo}, {hi})")
    return number


class PaintModel:
    """A model for the painting app: validation, resizing, ICPE, styles and the locked call.

    Args:
      config: the run's config.
      net: its `InferenceModel` (spectral norm folded, jit-compiled).
      workdir: where it came from (shown in the log and `/api/info`).

    Attributes:
      last_request: the inputs of the last synthesis ({'labels', 'instance', 'seed', 'style'}),
        for tests and debugging.
    """

    def __init__(self, config: Any, net: InferenceModel, workdir: str = ""):
        self.config, self.net, self.workdir = config, net, workdir
        self.height, self.width = (int(s) for s in net.output_size)
        self.num_classes = net.num_classes
        self.dontcare = int(config.data.get("dontcare_label", -1))
        self.label_resize = config.data.get("label_resize", "pil")
        self.class_names, self.palette = class_names_and_palette(config)
        self._lock = threading.Lock()
        self._styles: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._validation = None
        self._validation_error = ""
        self.compile_seconds: dict[tuple, float] = {}  # input signature -> first-call seconds
        self.last_request: dict[str, Any] = {}

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None) -> PaintModel:
        """Restore the run in `workdir` (latest checkpoint, EMA generator when kept)."""
        config, net, step = load_inference_model(workdir, step)
        logging.info("paint: restored %s at step %d", workdir, step)
        return cls(config, net, workdir)

    def info(self) -> dict:
        """The `/api/info` JSON."""
        m = self.config.model
        return {
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "palette": self.palette,
            "height": self.height,
            "width": self.width,
            "dontcare": self.dontcare,
            "use_vae": self.net.use_vae,
            "has_encoder": self.net.has_encoder,
            "use_instance": self.net.use_instance,
            "use_icpe": self.net.use_icpe,
            "generator": m.get("generator", "spade_clade"),
            "norm": m.get("norm", "clade"),
            "dataset": self.config.data.dataset,
            "workdir": self.workdir,
            "has_validation": self._validation_source() is not None,
        }

    # ------------------------------------------------------------------------- inputs

    def labels_from_png(self, data: bytes, encoding: str = "ids") -> np.ndarray:
        """Label PNG bytes -> (H, W) int32 class ids at the model's size (validated)."""
        raw = decode_id_png(data, "label map")
        if encoding == "dataset":
            try:
                labels = label_encoding(self.config.data)(raw, "label map")
            except DataError as e:
                raise RequestError(422, str(e)) from None
        elif encoding == "ids":
            try:
                check_labels(raw, self.num_classes, source="label map")
            except ValueError as e:
                raise RequestError(
                    422, f"{e} (pixel values must be class ids in [0, {self.num_classes}))"
                ) from None
            labels = raw
        else:
            raise RequestError(400, f"encoding={encoding!r}: use 'ids' or 'dataset'")
        return self._resize(labels)

    def instance_from_png(self, data: bytes) -> np.ndarray:
        """Instance PNG bytes -> (H, W) int32 at the model's size."""
        return self._resize(decode_id_png(data, "instance map"))

    def _resize(self, ids: np.ndarray) -> np.ndarray:
        size = (self.height, self.width)
        return np.ascontiguousarray(resize_ids(ids, size, self.label_resize), np.int32)

    def add_style(self, data: bytes) -> str:
        """Store an uploaded style image (resized bicubic, in [-1, 1]); returns its id."""
        if not self.net.has_encoder:
            raise RequestError(
                400, "this model has no VAE encoder (model.use_vae = False): no style images"
            )
        _open_image(data, "style image")
        try:
            rgb = read_image(data, "style image")
        except DataError as e:
            raise RequestError(415, str(e)) from None
        image = resize_image(rgb, (self.height, self.width)).astype(np.float32)
        image = image / np.float32(127.5) - np.float32(1.0)
        key = hashlib.sha1(data).hexdigest()[:16]
        self._styles[key] = image
        self._styles.move_to_end(key)
        while len(self._styles) > MAX_STYLES:
            self._styles.popitem(last=False)
        return key

    def style(self, key: str | None) -> np.ndarray | None:
        """The stored style image `key` ((H, W, 3) float32) or None."""
        if not key:
            return None
        if key not in self._styles:
            raise RequestError(
                404, f"unknown style id {key!r} (upload the image again: POST /api/style)"
            )
        self._styles.move_to_end(key)
        return self._styles[key]

    # ------------------------------------------------------------------------- synthesis

    def synthesize(
        self,
        labels: np.ndarray,
        *,
        seed: int = 0,
        instance: np.ndarray | None = None,
        style: np.ndarray | None = None,
    ) -> np.ndarray:
        """(H, W) class ids at the model's size -> (H, W, 3) uint8 photo.

        The inputs are built exactly as `clade_jax.synthesize` builds them for one label map
        (batch of 1, ICPE from the labels without the don't-care class, key of sample 0 of
        `seed`), so the photo is bitwise the one it writes. Thread-safe: calls run one at a time.
        """
        icpe = None
        if self.net.use_icpe:
            ignore = (self.dontcare,) if self.dontcare >= 0 else ()
            icpe = icpe_offsets(labels, ignore=ignore)[None]
        if self.net.use_instance and instance is None:
            instance = labels  # each class region is one instance: edges on class boundaries
        batch = {
            "labels": labels[None],
            "instance": None if instance is None else instance[None],
            "icpe": icpe,
            "style": None if style is None else style[None],
        }
        signature = (labels.shape, instance is not None, style is not None)
        with self._lock:
            self.last_request = {
                "labels": labels,
                "instance": instance,
                "seed": seed,
                "style": style is not None,
            }
            t = time.perf_counter()
            keys = sample_keys(seed, 0, 1) if self.net.use_vae else None
            out = self.net(**batch, keys=keys)
            if signature not in self.compile_seconds:
                self.compile_seconds[signature] = time.perf_counter() - t
                logging.info(
                    "paint: first call for %s took %.1f s (compilation)",
                    signature,
                    self.compile_seconds[signature],
                )
        return to_uint8(out)[0]

    def warm_up(self) -> float:
        """Compile the model's size (a map of class 0); returns the seconds it took."""
        t = time.perf_counter()
        self.synthesize(np.zeros((self.height, self.width), np.int32))
        return time.perf_counter() - t

    # ------------------------------------------------------------------------- validation data

    def _validation_source(self):
        if self._validation is None and not self._validation_error:
            try:
                from clade_jax.data.sources import make_source
                from clade_jax.data.transforms import AugmentOptions, EvalTransform

                source = make_source(self.config.data, "validation")
                if len(source) == 0:
                    raise DataError("the validation split is empty")
                transform = EvalTransform(AugmentOptions.from_config(self.config.data))
                self._validation = (source, transform)
            except (OSError, ValueError, KeyError) as e:
                self._validation_error = f"{type(e).__name__}: {e}"
                logging.info("paint: no validation data: %s", self._validation_error)
        return self._validation

    def validation_example(self, index: int | None) -> tuple[int, str, np.ndarray, Any]:
        """(index, name, labels, instance or None) of a validation example at the model's size."""
        found = self._validation_source()
        if found is None:
            raise RequestError(
                404,
                f"the validation data of {self.config.data.dataset} is not readable here "
                f"({self._validation_error})",
            )
        source, transform = found
        n = len(source)
        if index is None:
            index = random.randrange(n)
        if not 0 <= index < n:
            raise RequestError(400, f"index={index} is outside [0, {n})")
        try:
            example = transform(source[index])
        except (OSError, ValueError) as e:
            raise RequestError(422, f"validation example {index}: {e}") from None
        labels = self._resize(example["label"])
        instance = example.get("instance")
        if instance is not None:
            instance = self._resize(instance)
        return index, str(example.get("name", index)), labels, instance


# ----------------------------------------------------------------------------- the ASGI app


def _error(status: int, message: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


async def _read_body(request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refusing (413) more than `limit` bytes without reading them all."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestError(413, f"request body of {int(length)} bytes is larger than 10 MB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is larger than 10 MB ({limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _ids_bytes(*arrays: np.ndarray) -> bytes:
    return b"".join(np.ascontiguousarray(a, "<u2").tobytes() for a in arrays)


def create_app(model: PaintModel):
    """The Starlette app serving `model` (see the module docstring for the API)."""
    from starlette.applications import Starlette
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    def handled(fn):
        async def endpoint(request):
            try:
                return await fn(request)
            except RequestError as e:
                logging.info(
                    "paint: %s %s -> %d %s", request.method, request.url.path, e.status, e.message
                )
                return _error(e.status, e.message)

        return endpoint

    async def index(request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def info(request):
        return JSONResponse(model.info())

    async def synthesize(request):
        q = request.query_params
        seed = _int_param(q, "seed", 0, 0, 2**31)
        n_inst = _int_param(q, "instance_bytes", None, 1, MAX_BODY_BYTES + 1)
        style = model.style(q.get("style"))
        if style is not None and not model.net.has_encoder:
            raise RequestError(400, "this model has no VAE encoder: no style")
        body = await _read_body(request)
        instance = None
        if n_inst is not None:
            if n_inst >= len(body):
                raise RequestError(
                    400, f"instance_bytes={n_inst} but the body has only {len(body)} bytes"
                )
            body, inst_png = body[:-n_inst], body[-n_inst:]
            raw = await asyncio.to_thread(decode_id_png, inst_png, "instance map")
            instance = raw
        labels_raw = await asyncio.to_thread(decode_id_png, body, "label map")
        if instance is not None and instance.shape != labels_raw.shape:
            raise RequestError(
                422,
                f"instance map is {instance.shape[1]}x{instance.shape[0]} (WxH) but the label map "
                f"is {labels_raw.shape[1]}x{labels_raw.shape[0]}",
            )
        try:
            check_labels(labels_raw, model.num_classes, source="label map")
        except ValueError as e:
            raise RequestError(
                422, f"{e} (pixel values must be class ids in [0, {model.num_classes}))"
            ) from None
        labels = model._resize(labels_raw)
        if instance is not None:
            instance = model._resize(instance)
        t = time.perf_counter()
        photo = await asyncio.to_thread(
            model.synthesize, labels, seed=seed, instance=instance, style=style
        )
        ms = (time.perf_counter() - t) * 1000
        data = await asyncio.to_thread(png_bytes, photo)
        return Response(
            data,
            media_type="image/png",
            headers={"X-Synthesis-Ms": f"{ms:.1f}", "Cache-Control": "no-store"},
        )

    async def labels(request):
        encoding = request.query_params.get("encoding", "ids")
        body = await _read_body(request)
        ids = await asyncio.to_thread(model.labels_from_png, body, encoding)
        return Response(
            _ids_bytes(ids),
            media_type="application/octet-stream",
            headers={"X-Height": str(ids.shape[0]), "X-Width": str(ids.shape[1])},
        )

    async def validation_map(request):
        index = _int_param(request.query_params, "index", None, 0, 2**31)
        index, name, ids, instance = await asyncio.to_thread(model.validation_example, index)
        arrays = [ids]
        if model.net.use_instance and instance is not None:
            arrays.append(np.unique(instance, return_inverse=True)[1].reshape(instance.shape))
        return Response(
            _ids_bytes(*arrays),
            media_type="application/octet-stream",
            headers={"X-Index": str(index), "X-Name": name, "X-Instance": str(len(arrays) > 1)},
        )

    async def style(request):
        body = await _read_body(request)
        key = await asyncio.to_thread(model.add_style, body)
        return JSONResponse({"style": key})

    async def not_found(request, exc):
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    routes = [
        Route("/", index),
        Route("/api/info", handled(info)),
        Route("/api/synthesize", handled(synthesize), methods=["POST"]),
        Route("/api/labels", handled(labels), methods=["POST"]),
        Route("/api/validation_map", handled(validation_map)),
        Route("/api/style", handled(style), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    from starlette.exceptions import HTTPException

    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found})
    app.state.model = model
    return app


# ----------------------------------------------------------------------------- serving


def free_port(host: str = "127.0.0.1") -> socket.socket:
    """A listening-ready TCP socket bound to a free port of `host`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1"):
    """Run `app` with uvicorn in a background thread on a free port; yields the base URL."""
    import uvicorn

    sock = free_port(host)
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started:
            if time.time() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def serve(model: PaintModel, host: str = "127.0.0.1", port: int = 8000, warm_up: bool = True):
    """Compile the model's size, then serve the app at http://host:port until interrupted."""
    import uvicorn

    if host in ("0.0.0.0", "::", ""):
        logging.warning(
            "paint: listening on %r exposes the app (and this machine's CPU) to every network "
            "this machine is on; use the default 127.0.0.1 unless you mean it",
            host,
        )
    if warm_up:
        logging.info("paint: compiling the model for %dx%d ...", model.height, model.width)
        logging.info("paint: compiled in %.1f s", model.warm_up())
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    print(f"clade_jax.paint: open http://{shown}:{port}/  (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(model), host=host, port=port, log_level="info", access_log=False)
