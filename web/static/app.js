// The page: talks to the gateway (web/gateway.py) only. Images are integer levels (C, H, W);
// a canvas shows level l of L as round(l * 255 / (L - 1)), one canvas pixel per image pixel
// (CSS scales it up), so what a canvas holds reads back as exactly the streamed levels.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: {}, model: null, running: null, drawn: null, edits: 0, retry: null };

// -- messages and the server's model list ----------------------------------------------------
function say(text, kind = "info") {
  const box = $("message");
  box.textContent = text;
  box.className = kind;
  box.hidden = !text;
}

async function errorOf(response) {
  // The gateway answers every refusal as {"error": one line}; anything else says its status.
  try { return (await response.json()).error || `HTTP ${response.status}`; }
  catch (e) { return `HTTP ${response.status} ${response.statusText}`; }
}

async function loadModels() {
  clearTimeout(state.retry);
  let body;
  try {
    const response = await fetch("/api/models", { cache: "no-store" });
    if (!response.ok) throw new Error(await errorOf(response));
    body = await response.json();
  } catch (e) {
    say(`${e.message} (retrying every 2 s)`, "error");
    $("server").textContent = "no Triton server";
    state.retry = setTimeout(loadModels, 2000);  // the page recovers when the server returns
    return false;
  }
  if (!body.models.length) {
    say("the Triton server serves no PixelRNN model (retrying every 2 s)", "error");
    state.retry = setTimeout(loadModels, 2000);
    return false;
  }
  if ($("message").classList.contains("error")) say("");
  const previous = $("model").value;
  state.models = Object.fromEntries(body.models.map((m) => [m.name, m]));
  $("model").replaceChildren(...body.models.map((m) => new Option(m.name, m.name)));
  if (state.models[previous]) $("model").value = previous;
  $("server").textContent = `Triton at ${body.triton}: ${body.models.length} model(s)`;
  selectModel();
  return true;
}

function selectModel() {
  const m = state.models[$("model").value];
  if (!m) return;
  const [c, h, w] = m.shape;
  const changed = !state.model || state.model.name !== m.name || String(state.model.shape) !== String(m.shape);
  state.model = m;
  const kind = c === 3 ? "RGB" : (m.levels === 2 ? "binary" : "grey");
  const stages = m.stage_rows.length > 1 ? `, ${m.stage_rows.length} scales` : "";
  $("model-info").textContent = `${c}×${h}×${w} ${kind}, ${m.levels ?? "?"} levels${stages}` +
    (m.conditional ? `, ${m.num_classes ?? "?"} classes` : "");
  $("label-field").hidden = !m.conditional;
  if (m.num_classes) $("label").max = m.num_classes - 1;
  $("known").max = h;
  if (changed) {
    $("known").value = Math.floor(h / 2);
    resetDrawing();
    $("samples").replaceChildren();
    $("completions").replaceChildren();
  }
}

// -- canvases ---------------------------------------------------------------------------------
function shade(level, levels) { return Math.round(level * 255 / ((levels || 256) - 1)); }

function scaleFor(h, w) { return Math.max(1, Math.min(8, Math.floor(112 / Math.max(h, w)))); }

function newCanvas(m, cls) {
  const [, h, w] = m.shape;
  const canvas = document.createElement("canvas");
  canvas.width = w; canvas.height = h;
  const s = scaleFor(h, w);
  canvas.style.width = `${w * s}px`;
  canvas.style.height = `${Math.min(h * s, 640)}px`;
  if (cls) canvas.className = cls;
  return canvas;
}

// One streamed row of one image: pixels (C, Ws). A smaller stage (multi-scale's small image,
// Ws < W) is drawn enlarged, each pixel a block, until the full-size rows replace it.
function drawRow(canvas, m, stage, index, pixels) {
  const [c, , w] = m.shape;
  const ws = pixels[0].length, f = Math.max(1, Math.round(w / ws));
  const img = new ImageData(w, f);
  for (let dy = 0; dy < f; dy++) {
    for (let x = 0; x < w; x++) {
      const sx = Math.min(ws - 1, Math.floor(x / f)), o = 4 * (dy * w + x);
      for (let k = 0; k < 3; k++) img.data[o + k] = shade(pixels[c === 3 ? k : 0][sx], m.levels);
      img.data[o + 3] = 255;
    }
  }
  canvas.getContext("2d").putImageData(img, 0, index * f);
}

function figure(canvas, caption = "") {
  const fig = document.createElement("figure");
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  fig.append(canvas, cap);
  return fig;
}

// -- sampling and completion: one stream at a time ----------------------------------------------
// state.running: { controller, received, total } of the stream in flight (rows received of total).
function setRunning(running) {
  state.running = running;
  $("stop").disabled = !running;
  for (const id of ["sample", "complete"]) $(id).disabled = !!running;
}

function stop() {
  const running = state.running;
  if (!running) return;
  running.controller.abort();  // closes the connection: the gateway cancels the Triton sequence, if still running
  setRunning(null);
  // With every row here the sequence had already completed on the server: only its scores were dropped.
  say(running.received < running.total ? "stopped: the server cancelled the sequence"
    : "stopped: the images were already complete; their scores were not waited for");
  $("progress").textContent += " (stopped)";
}

function numberField(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

function commonParams() {
  const m = state.model;
  const params = { model: m.name, temperature: numberField("temperature"), seed: numberField("seed") };
  if (m.conditional) params.label = numberField("label");
  return params;
}

async function run(params, target) {
  const m = state.model;
  stop();
  say("");
  const controller = new AbortController();
  const total = m.stage_rows.reduce((a, b) => a + b, 0);
  const running = { controller, received: 0, total };
  setRunning(running);
  const canvases = [];
  let received = 0, started = performance.now();
  $("bar").max = total; $("bar").value = 0;
  $("progress").textContent = "starting…";
  try {
    const response = await fetch("/api/sample", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(params), signal: controller.signal,
    });
    if (!response.ok) {
      const error = await errorOf(response);
      if (response.status === 503) loadModels();
      throw new Error(error);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      // After Stop, rows already read are dropped: the canvas keeps what was shown at the click.
      if (done || controller.signal.aborted) break;
      buffer += value;
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0 && !controller.signal.aborted) {
        const msg = JSON.parse(buffer.slice(0, nl));
        buffer = buffer.slice(nl + 1);
        if (msg.type === "start") {
          target.replaceChildren();
          for (let i = 0; i < msg.n; i++) {
            const canvas = newCanvas(m, "sample");
            canvases.push(canvas);
            const label = msg.labels ? `class ${msg.labels[i]}` : "";
            target.append(figure(canvas, label));
          }
          started = performance.now();
        } else if (msg.type === "row") {
          msg.pixels.forEach((px, i) => drawRow(canvases[i], m, msg.stage, msg.index, px));
          running.received = ++received;
          const seconds = (performance.now() - started) / 1000;
          const stage = m.stage_rows.length > 1 ? ` (scale ${msg.stage + 1} of ${m.stage_rows.length})` : "";
          $("bar").value = received;
          $("progress").textContent = `row ${received} / ${total}${stage} · ${(received / Math.max(seconds, 1e-3)).toFixed(0)} rows/s`;
        } else if (msg.type === "done") {
          canvases.forEach((canvas, i) => {
            const cap = canvas.nextElementSibling;
            cap.dataset.nll = msg.nll[i];
            cap.dataset.bpd = msg.bpd[i];
            cap.textContent = `${cap.textContent ? cap.textContent + "\n" : ""}${msg.nll[i].toFixed(2)} nats\n${msg.bpd[i].toFixed(4)} bits/dim`;
          });
          $("progress").textContent = `done: ${msg.rows} rows in ${msg.seconds.toFixed(2)} s · ` +
            `${(msg.rows / Math.max(msg.seconds, 1e-3)).toFixed(0)} rows/s`;
        } else if (msg.type === "error") {
          throw new Error(msg.message);
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      say(e.message, "error");
      $("progress").textContent += " (failed)";
    }
  } finally {
    if (state.running === running) setRunning(null);
  }
}

function sample() {
  run({ ...commonParams(), n: numberField("batch") }, $("samples"));
}

function complete() {
  run({ ...commonParams(), n: numberField("k"), image: state.drawn, known_rows: numberField("known") }, $("completions"));
}

// -- the drawing: levels (C, H, W), edited with the mouse or replaced by an upload ----------------
function resetDrawing() {
  const m = state.model;
  const [c, h, w] = m.shape;
  state.drawn = Array.from({ length: c }, () => Array.from({ length: h }, () => new Array(w).fill(0)));
  const old = $("draw"), canvas = newCanvas(m);
  canvas.id = "draw";
  old.replaceWith(canvas);
  bindDrawing(canvas);
  renderDrawing();
  drawingChanged();
}

// The score, heatmap and verdict describe the drawing they were made for: an edit clears them.
function drawingChanged() {
  state.edits++;  // an answer to a score asked before this edit is dropped
  const out = $("draw-score");
  out.textContent = "";
  delete out.dataset.nll;
  delete out.dataset.bpd;
  $("analysis").hidden = true;
}

function renderDrawing() {
  const m = state.model, [c, h, w] = m.shape;
  const img = new ImageData(w, h);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    const o = 4 * (y * w + x);
    for (let k = 0; k < 3; k++) img.data[o + k] = shade(state.drawn[c === 3 ? k : 0][y][x], m.levels);
    img.data[o + 3] = 255;
  }
  $("draw").getContext("2d").putImageData(img, 0, 0);
  const known = Math.max(0, Math.min(h, numberField("known") ?? 0));
  $("known-line").style.top = `${(known / h) * $("draw").getBoundingClientRect().height}px`;
}

function bindDrawing(canvas) {
  let last = null;
  const at = (e) => {
    const r = canvas.getBoundingClientRect(), [, h, w] = state.model.shape;
    return [Math.floor((e.clientX - r.left) / r.width * w), Math.floor((e.clientY - r.top) / r.height * h)];
  };
  const paint = (x, y, erase) => {
    const [c, h, w] = state.model.shape, top = (state.model.levels || 256) - 1;
    const brush = h >= 16 ? 2 : 1;  // a 1-pixel line is thinner than any training digit
    for (let dy = 0; dy < brush; dy++) for (let dx = 0; dx < brush; dx++) {
      const yy = y + dy, xx = x + dx;
      if (yy < 0 || xx < 0 || yy >= h || xx >= w) continue;
      for (let k = 0; k < c; k++) state.drawn[k][yy][xx] = erase ? 0 : top;
    }
  };
  const stroke = (e) => {
    const [x, y] = at(e), erase = e.shiftKey || e.buttons === 2;
    const [x0, y0] = last || [x, y];
    const steps = Math.max(Math.abs(x - x0), Math.abs(y - y0), 1);
    for (let i = 0; i <= steps; i++) paint(Math.round(x0 + (x - x0) * i / steps), Math.round(y0 + (y - y0) * i / steps), erase);
    last = [x, y];
    renderDrawing();
    drawingChanged();
  };
  canvas.addEventListener("pointerdown", (e) => { last = null; canvas.setPointerCapture(e.pointerId); stroke(e); });
  canvas.addEventListener("pointermove", (e) => { if (e.buttons) stroke(e); });
  canvas.addEventListener("pointerup", () => { last = null; });
  canvas.addEventListener("contextmenu", (e) => e.preventDefault());
}

async function upload() {
  const file = $("upload").files[0];
  if (!file) return;
  say("");
  try {
    const response = await fetch(`/api/upload?model=${encodeURIComponent(state.model.name)}`, {
      method: "POST", headers: { "Content-Type": "application/octet-stream" }, body: file,
    });
    if (!response.ok) throw new Error(`upload refused: ${await errorOf(response)}`);
    state.drawn = (await response.json()).image;
    renderDrawing();
    drawingChanged();
  } catch (e) {
    say(e.message, "error");
  } finally {
    $("upload").value = "";  // choosing the same file again uploads it again
  }
}

async function postJson(path, body) {
  const response = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (!response.ok) throw new Error(await errorOf(response));
  return response.json();
}

// Score: the drawing's NLL and its per-pixel map, then the detector's verdict (or why there is none).
async function score() {
  const m = state.model, images = [state.drawn], edits = state.edits;
  const body = { model: m.name, images, per_pixel: true };
  if (m.conditional) body.labels = [numberField("label")];
  say("");
  showVerdict({ detector: null, message: "" });
  try {
    const { nll, bpd, pixel_nll } = await postJson("/api/score", body);
    if (state.edits !== edits || state.model !== m) return;
    const out = $("draw-score");
    out.dataset.nll = nll[0];
    out.dataset.bpd = bpd[0];
    out.textContent = `drawing: ${nll[0].toFixed(2)} nats · ${bpd[0].toFixed(4)} bits/dim`;
    showHeatmap(m, pixel_nll[0]);
    $("analysis").hidden = false;
    const verdict = await postJson("/api/ood", { model: m.name, images });
    if (state.edits === edits && state.model === m) showVerdict(verdict, m);
  } catch (e) {
    say(e.message, "error");
  }
}

// The per-pixel NLL (C, H, W) as runtime/images.py nll_heatmap draws it: summed over channels, on
// a black-red-yellow-white ramp from 0 to the image's largest value, one canvas pixel per pixel.
function showHeatmap(m, pixelNll) {
  const [c, h, w] = m.shape;
  const heat = Array.from({ length: h }, (_, y) => Array.from({ length: w }, (_, x) => {
    let sum = 0;
    for (let k = 0; k < c; k++) sum += pixelNll[k][y][x];
    return sum;
  }));
  const top = heat.flat().reduce((a, b) => Math.max(a, b), 0) || 1;
  const img = new ImageData(w, h);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    const t = Math.min(Math.max(heat[y][x] / top, 0), 1) * 3, o = 4 * (y * w + x);  // a third of the ramp per primary
    for (let k = 0; k < 3; k++) img.data[o + k] = Math.round(Math.min(Math.max(t - k, 0), 1) * 255);
    img.data[o + 3] = 255;
  }
  const canvas = newCanvas(m);
  canvas.id = "heatmap";
  canvas.dataset.top = top;
  canvas.getContext("2d").putImageData(img, 0, 0);
  $("heatmap").replaceWith(canvas);
  $("heat-scale").textContent = `where the model was surprised:\nblack 0 … white ${top.toFixed(2)} nats`;
}

function showVerdict(v, m) {
  const box = $("verdict");
  box.replaceChildren();
  for (const key of Object.keys(box.dataset)) delete box.dataset[key];
  if (!v.detector) {
    if (v.message) box.dataset.verdict = "none";
    box.className = "muted";
    box.textContent = v.message;
    return;
  }
  const t = v.threshold, out = v.ood[0];
  Object.assign(box.dataset, { verdict: out ? "out" : "in", nll: v.nll[0], backgroundNll: v.background_nll[0],
    llr: v.llr[0], complexity: v.complexity[0], threshold: t.value });
  box.className = out ? "out" : "in";
  const head = document.createElement("p");
  head.className = "verdict";
  head.textContent = out ? "out of distribution: unlike the model's training data" : "in distribution: like the model's training data";
  const rows = [
    // A class-conditional model's detector scores p(x) summed over the classes, not the chosen class's.
    [m.conditional ? "NLL under the model, any class" : "NLL under the model", `${v.nll[0].toFixed(2)} nats`],
    ["NLL under the background model", `${v.background_nll[0].toFixed(2)} nats`],
    ["likelihood ratio (the difference)", v.llr[0].toFixed(2)],
    ["complexity score", `${v.complexity[0].toFixed(1)} bits`],
    [`threshold (${t.score})`, `${t.value.toFixed(2)}: ${(100 * t.false_positive_rate).toFixed(0)}% of ` +
      `${t.calibration_images} validation images score above it`],
  ];
  const table = document.createElement("table");
  for (const [name, value] of rows) {
    const tr = table.insertRow();
    tr.insertCell().textContent = name;
    tr.insertCell().textContent = value;
  }
  const from = document.createElement("p");
  from.className = "muted";
  from.textContent = `from ${v.detector}: out of distribution when the ${t.score} is above the threshold`;
  box.append(head, table, from);
}

$("model").addEventListener("change", selectModel);
$("sample").addEventListener("click", sample);
$("stop").addEventListener("click", stop);
$("complete").addEventListener("click", complete);
$("score").addEventListener("click", score);
$("clear").addEventListener("click", resetDrawing);
$("upload").addEventListener("change", upload);
$("known").addEventListener("input", renderDrawing);
loadModels();
