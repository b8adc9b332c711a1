// clade_jax paint: the page's logic (plain JavaScript, no libraries).
//
// The label map lives in an integer buffer (`state.labels`, Uint16Array, H * W class ids, row
// major); every tool writes ids into it and the visible canvas is only its colourized view
// (ImageData from the palette), so no stroke ever produces a colour that is no class. The map is
// sent to the server as a single-channel PNG (8-bit grey, or 16-bit when there are more than 256
// classes) written by the small encoder below (zlib via CompressionStream("deflate")), since
// canvas.toBlob cannot write single-channel PNGs. Instance models also keep `state.instance`.
"use strict";

const $ = (id) => document.getElementById(id);
const DEBOUNCE_MS = 150;
const MAX_UNDO = 50;

const state = {
  info: null,
  W: 0,
  H: 0,
  labels: null, // Uint16Array(H * W) class ids
  instance: null, // Uint16Array(H * W) instance ids (instance models)
  nextInstance: 1,
  cls: 0,
  tool: "brush",
  size: 8,
  undo: [],
  redo: [],
  lut: null, // Uint8Array(num_classes * 3)
  image: null, // ImageData of the canvas
  styleId: "",
  photoBlob: null,
  photoUrl: "",
  request: null, // AbortController of the request in flight
  sequence: 0, // number of the latest request; older responses are dropped
  timer: 0,
  sent: 0, // requests sent (for tests)
  lastSent: null, // Uint16Array copy of the last label map sent (for tests)
};

// ------------------------------------------------------------------ PNG encoder (grey, 8/16 bit)

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32(bytes) {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

async function zlibDeflate(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new CompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

function pngChunk(type, data) {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  for (let i = 0; i < 4; i++) out[4 + i] = type.charCodeAt(i);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

// ids: Uint16Array(w * h) -> PNG bytes (colour type 0, bit depth 8 or 16, filter 0 on every row).
async function encodeGreyPNG(ids, w, h, bits) {
  const bpp = bits / 8;
  const rowLen = 1 + w * bpp;
  const raw = new Uint8Array(h * rowLen);
  for (let y = 0; y < h; y++) {
    const row = y * rowLen;
    for (let x = 0; x < w; x++) {
      const v = ids[y * w + x];
      if (bits === 8) raw[row + 1 + x] = v;
      else {
        raw[row + 1 + 2 * x] = v >> 8; // PNG samples are big-endian
        raw[row + 2 + 2 * x] = v & 0xff;
      }
    }
  }
  const ihdr = new Uint8Array(13);
  const v = new DataView(ihdr.buffer);
  v.setUint32(0, w);
  v.setUint32(4, h);
  ihdr[8] = bits; // bit depth; colour type 0 (grey), compression 0, filter 0, no interlace
  const parts = [
    new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    pngChunk("IHDR", ihdr),
    pngChunk("IDAT", await zlibDeflate(raw)),
    pngChunk("IEND", new Uint8Array(0)),
  ];
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function labelBits() {
  return state.info.num_classes > 256 ? 16 : 8;
}

// ------------------------------------------------------------------ rendering

function render() {
  const px = state.image.data;
  const { labels, lut } = state;
  for (let i = 0, j = 0; i < labels.length; i++, j += 4) {
    const c = labels[i] * 3;
    px[j] = lut[c];
    px[j + 1] = lut[c + 1];
    px[j + 2] = lut[c + 2];
    px[j + 3] = 255;
  }
  $("canvas").getContext("2d").putImageData(state.image, 0, 0);
}

let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => {
    renderPending = false;
    render();
  });
}

// ------------------------------------------------------------------ editing

function snapshot() {
  return { labels: state.labels.slice(), instance: state.instance ? state.instance.slice() : null };
}

function pushUndo() {
  state.undo.push(snapshot());
  if (state.undo.length > MAX_UNDO) state.undo.shift();
  state.redo = [];
  updateButtons();
}

function restore(from, to) {
  if (!from.length) return;
  to.push(snapshot());
  const s = from.pop();
  state.labels = s.labels;
  state.instance = s.instance;
  changed();
}

function updateButtons() {
  $("undo").disabled = !state.undo.length;
  $("redo").disabled = !state.redo.length;
}

function eraseClass() {
  return state.info.dontcare >= 0 ? state.info.dontcare : 0;
}

function strokeValues() {
  const cls = state.tool === "eraser" ? eraseClass() : state.cls;
  let inst = cls;
  if (state.instance && state.tool !== "eraser" && $("new-instance").checked) {
    inst = state.nextInstance;
    state.nextInstance = state.nextInstance >= 65535 ? state.info.num_classes : state.nextInstance + 1;
  }
  return { cls, inst };
}

function stamp(cx, cy, value) {
  const { W, H, labels, instance } = state;
  const r = state.size / 2;
  const lo = Math.floor(-r + 0.5);
  const hi = Math.ceil(r - 0.5);
  for (let dy = lo; dy <= hi; dy++) {
    const y = cy + dy;
    if (y < 0 || y >= H) continue;
    for (let dx = lo; dx <= hi; dx++) {
      const x = cx + dx;
      if (x < 0 || x >= W || dx * dx + dy * dy > r * r) continue;
      labels[y * W + x] = value.cls;
      if (instance) instance[y * W + x] = value.inst;
    }
  }
}

function line(x0, y0, x1, y1, value) {
  const steps = Math.max(Math.abs(x1 - x0), Math.abs(y1 - y0), 1);
  for (let i = 0; i <= steps; i++) {
    stamp(Math.round(x0 + ((x1 - x0) * i) / steps), Math.round(y0 + ((y1 - y0) * i) / steps), value);
  }
}

// 4-connected flood fill of the region (same class, and same instance on instance models).
function floodFill(x, y, value) {
  const { W, H, labels, instance } = state;
  const start = y * W + x;
  const cls0 = labels[start];
  const inst0 = instance ? instance[start] : 0;
  if (cls0 === value.cls && (!instance || inst0 === value.inst)) return false;
  const same = (i) => labels[i] === cls0 && (!instance || instance[i] === inst0);
  const seen = new Uint8Array(W * H);
  const stack = [start];
  seen[start] = 1;
  while (stack.length) {
    const i = stack.pop();
    labels[i] = value.cls;
    if (instance) instance[i] = value.inst;
    const px = i % W;
    const neighbours = [px > 0 ? i - 1 : -1, px < W - 1 ? i + 1 : -1, i - W, i + W];
    for (const n of neighbours) {
      if (n >= 0 && n < W * H && !seen[n] && same(n)) {
        seen[n] = 1;
        stack.push(n);
      }
    }
  }
  return true;
}

function changed() {
  scheduleRender();
  updateButtons();
  scheduleSynthesis();
}

function setLabels(labels, instance) {
  pushUndo();
  state.labels = labels;
  if (state.info.use_instance) {
    state.instance = instance || labels.slice();
    let max = 0;
    for (const v of state.instance) if (v > max) max = v;
    state.nextInstance = Math.max(state.info.num_classes, max + 1);
  }
  changed();
}

function clearAll() {
  setLabels(new Uint16Array(state.W * state.H).fill(state.cls), null);
}

// ------------------------------------------------------------------ pointer input

function canvasPoint(ev) {
  const rect = $("canvas").getBoundingClientRect();
  const x = Math.floor(((ev.clientX - rect.left) / rect.width) * state.W);
  const y = Math.floor(((ev.clientY - rect.top) / rect.height) * state.H);
  return { x: Math.min(Math.max(x, 0), state.W - 1), y: Math.min(Math.max(y, 0), state.H - 1) };
}

function setupPointer() {
  const canvas = $("canvas");
  let drawing = null; // {x, y, value} of the stroke in progress
  canvas.addEventListener("contextmenu", (ev) => {
    ev.preventDefault();
    const p = canvasPoint(ev);
    selectClass(state.labels[p.y * state.W + p.x]);
  });
  canvas.addEventListener("pointerdown", (ev) => {
    if (ev.button !== 0) return;
    const p = canvasPoint(ev);
    if (state.tool === "fill") {
      const before = snapshot();
      if (floodFill(p.x, p.y, strokeValues())) {
        state.undo.push(before);
        if (state.undo.length > MAX_UNDO) state.undo.shift();
        state.redo = [];
        changed();
      }
      return;
    }
    canvas.setPointerCapture(ev.pointerId);
    pushUndo();
    drawing = { ...p, value: strokeValues() };
    stamp(p.x, p.y, drawing.value);
    scheduleRender();
    clearTimeout(state.timer);
  });
  canvas.addEventListener("pointermove", (ev) => {
    const p = canvasPoint(ev);
    const id = state.labels ? state.labels[p.y * state.W + p.x] : 0;
    $("hover").textContent = `(${p.x}, ${p.y}) ${id} ${state.info ? state.info.class_names[id] : ""}`;
    if (!drawing) return;
    line(drawing.x, drawing.y, p.x, p.y, drawing.value);
    drawing.x = p.x;
    drawing.y = p.y;
    scheduleRender();
  });
  const end = () => {
    if (!drawing) return;
    drawing = null;
    changed();
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
}

// ------------------------------------------------------------------ palette and tools

function selectClass(id) {
  state.cls = id;
  for (const li of $("palette").children) li.classList.toggle("selected", Number(li.dataset.class) === id);
  const [r, g, b] = state.info.palette[id];
  $("current").innerHTML = "";
  const sw = document.createElement("span");
  sw.className = "swatch-inline";
  sw.style.cssText = `display:inline-block;width:0.9em;height:0.9em;margin-right:0.4em;border-radius:2px;background:rgb(${r},${g},${b})`;
  $("current").append(sw, `${id} ${state.info.class_names[id]}`);
  if (state.tool === "eraser") setTool("brush");
}

function buildPalette() {
  const ul = $("palette");
  state.info.class_names.forEach((name, id) => {
    const li = document.createElement("li");
    li.dataset.class = id;
    li.dataset.name = name.toLowerCase();
    li.setAttribute("role", "option");
    const [r, g, b] = state.info.palette[id];
    li.innerHTML = `<span class="swatch" style="background:rgb(${r},${g},${b})"></span><span class="id">${id}</span>`;
    li.append(name);
    li.addEventListener("click", () => selectClass(id));
    ul.append(li);
  });
  $("search").addEventListener("input", () => {
    const q = $("search").value.trim().toLowerCase();
    for (const li of ul.children) li.hidden = q !== "" && !li.dataset.name.includes(q) && li.dataset.class !== q;
  });
}

function setTool(tool) {
  state.tool = tool;
  for (const b of document.querySelectorAll(".tool")) b.classList.toggle("active", b.dataset.tool === tool);
}

function setSize(size) {
  state.size = Math.min(Math.max(size, 1), Number($("size").max));
  $("size").value = state.size;
  $("size-value").textContent = state.size;
}

// ------------------------------------------------------------------ server calls

function showStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function errorText(resp) {
  try {
    return (await resp.json()).error;
  } catch {
    return `HTTP ${resp.status}`;
  }
}

function scheduleSynthesis() {
  clearTimeout(state.timer);
  state.timer = setTimeout(synthesize, DEBOUNCE_MS);
}

async function synthesize() {
  if (state.request) state.request.abort(); // a newer map supersedes the request in flight
  const controller = new AbortController();
  state.request = controller;
  const sequence = ++state.sequence;
  const labels = state.labels.slice();
  const t0 = performance.now();
  try {
    let body = await encodeGreyPNG(labels, state.W, state.H, labelBits());
    const params = new URLSearchParams();
    if (state.info.use_vae) params.set("seed", String(Number($("seed").value) || 0));
    if (state.styleId) params.set("style", state.styleId);
    if (state.instance) {
      const inst = await encodeGreyPNG(state.instance, state.W, state.H, 16);
      const both = new Uint8Array(body.length + inst.length);
      both.set(body);
      both.set(inst, body.length);
      body = both;
      params.set("instance_bytes", String(inst.length));
    }
    if (sequence !== state.sequence) return;
    state.sent++;
    state.lastSent = labels;
    const resp = await fetch(`/api/synthesize?${params}`, {
      method: "POST",
      body,
      headers: { "Content-Type": "image/png" },
      signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    const blob = await resp.blob();
    if (sequence !== state.sequence) return; // superseded while reading
    const ms = performance.now() - t0;
    if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
    state.photoBlob = blob;
    state.photoUrl = URL.createObjectURL(blob);
    const img = $("photo");
    img.onload = () => {
      img.dataset.version = String(Number(img.dataset.version) + 1);
    };
    img.src = state.photoUrl;
    const server = resp.headers.get("X-Synthesis-Ms");
    $("latency").textContent = `${ms.toFixed(0)} ms request to photo (model ${Number(server).toFixed(0)} ms)`;
    if ($("status").classList.contains("error")) showStatus(""); // the map is fine now
  } catch (err) {
    if (err.name === "AbortError") return;
    showStatus(`synthesis failed: ${err.message}`, true);
  } finally {
    if (state.request === controller) state.request = null;
  }
}

// uint16 little-endian ids from the server -> Uint16Array(s) of H * W.
function splitIds(buffer, count) {
  const all = new Uint16Array(buffer);
  const n = state.W * state.H;
  if (all.length !== n * count) throw new Error(`expected ${n * count} ids, got ${all.length}`);
  return Array.from({ length: count }, (_, k) => all.slice(k * n, (k + 1) * n));
}

async function openLabelFile(file) {
  const encoding = $("encoding").value;
  const resp = await fetch(`/api/labels?encoding=${encoding}`, { method: "POST", body: file });
  if (!resp.ok) return showStatus(`${file.name}: ${await errorText(resp)}`, true);
  const [labels] = splitIds(await resp.arrayBuffer(), 1);
  setLabels(labels, null);
  showStatus(`opened ${file.name}`);
}

// A validation example: random, or number `index` (the console / tests).
async function randomMap(index) {
  const query = Number.isInteger(index) ? `?index=${index}` : "";
  const resp = await fetch(`/api/validation_map${query}`);
  if (!resp.ok) return showStatus(await errorText(resp), true);
  const withInstance = resp.headers.get("X-Instance") === "True";
  const [labels, inst] = splitIds(await resp.arrayBuffer(), withInstance ? 2 : 1);
  if (inst) for (let i = 0; i < inst.length; i++) inst[i] += state.info.num_classes;
  setLabels(labels, inst || null);
  showStatus(`validation example ${resp.headers.get("X-Index")}: ${resp.headers.get("X-Name")}`);
}

async function uploadStyle(file) {
  const resp = await fetch("/api/style", { method: "POST", body: file });
  if (!resp.ok) return showStatus(`${file.name}: ${await errorText(resp)}`, true);
  state.styleId = (await resp.json()).style;
  $("style-thumb").src = URL.createObjectURL(file);
  $("style-preview").hidden = false;
  showStatus(`style image ${file.name}`);
  scheduleSynthesis();
}

function download(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

// ------------------------------------------------------------------ start-up

function bindControls() {
  for (const b of document.querySelectorAll(".tool")) b.addEventListener("click", () => setTool(b.dataset.tool));
  $("size").addEventListener("input", () => setSize(Number($("size").value)));
  $("undo").addEventListener("click", () => restore(state.undo, state.redo));
  $("redo").addEventListener("click", () => restore(state.redo, state.undo));
  $("clear").addEventListener("click", clearAll);
  $("open").addEventListener("change", (ev) => {
    if (ev.target.files[0]) openLabelFile(ev.target.files[0]);
    ev.target.value = "";
  });
  $("random").addEventListener("click", () => randomMap());
  $("download-labels").addEventListener("click", async () => {
    const png = await encodeGreyPNG(state.labels, state.W, state.H, labelBits());
    download(new Blob([png], { type: "image/png" }), "labels.png");
  });
  $("download-photo").addEventListener("click", () => {
    if (state.photoBlob) download(state.photoBlob, "photo.png");
  });
  $("seed").addEventListener("change", scheduleSynthesis);
  $("new-style").addEventListener("click", () => {
    $("seed").value = String(Math.floor(Math.random() * 2147483647));
    scheduleSynthesis();
  });
  $("style").addEventListener("change", (ev) => {
    if (ev.target.files[0]) uploadStyle(ev.target.files[0]);
    ev.target.value = "";
  });
  $("style-clear").addEventListener("click", () => {
    state.styleId = "";
    $("style-preview").hidden = true;
    scheduleSynthesis();
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.target.tagName === "INPUT" && ev.target.type !== "range") return;
    const key = ev.key.toLowerCase();
    if ((ev.ctrlKey || ev.metaKey) && key === "z") {
      ev.preventDefault();
      if (ev.shiftKey) restore(state.redo, state.undo);
      else restore(state.undo, state.redo);
    } else if ((ev.ctrlKey || ev.metaKey) && key === "y") {
      ev.preventDefault();
      restore(state.redo, state.undo);
    } else if (key === "b") setTool("brush");
    else if (key === "f") setTool("fill");
    else if (key === "e") setTool("eraser");
    else if (key === "[") setSize(state.size - 1);
    else if (key === "]") setSize(state.size + 1);
  });
}

async function init() {
  const resp = await fetch("/api/info");
  const info = await resp.json();
  state.info = info;
  state.W = info.width;
  state.H = info.height;
  state.lut = new Uint8Array(info.palette.flat());
  const canvas = $("canvas");
  canvas.width = info.width;
  canvas.height = info.height;
  $("photo").style.aspectRatio = `${info.width} / ${info.height}`;
  state.image = canvas.getContext("2d").createImageData(info.width, info.height);
  const parts = [
    `${info.generator === "spade" ? info.norm.toUpperCase() : info.generator}`,
    info.use_icpe ? "ICPE" : "",
    info.use_vae ? "VAE" : "",
    info.use_instance ? "instances" : "",
    `${info.dataset}, ${info.num_classes} classes, ${info.width}x${info.height}`,
    info.workdir,
  ];
  $("model-info").textContent = parts.filter(Boolean).join(" · ");
  $("vae-controls").hidden = !info.use_vae;
  $("style-upload").hidden = !info.has_encoder;
  $("instance-controls").hidden = !info.use_instance;
  $("random").disabled = !info.has_validation;
  $("tool-eraser").title = `Eraser (E): paints ${info.class_names[eraseClass()]}`;
  $("size").max = String(Math.max(8, Math.round(Math.max(info.width, info.height) / 4)));
  setSize(Math.max(2, Math.round(info.width / 16)));
  buildPalette();
  selectClass(0);
  bindControls();
  setupPointer();
  state.labels = new Uint16Array(info.width * info.height);
  if (info.use_instance) state.instance = new Uint16Array(info.width * info.height);
  if (info.has_validation) await randomMap();
  else clearAll();
  state.undo = [];
  updateButtons();
}

window.paint = { state, encodeGreyPNG, randomMap }; // for tests and the console
init().catch((err) => showStatus(`start-up failed: ${err.message}`, true));
