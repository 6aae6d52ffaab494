// The try-it page: plain JavaScript against the service's own API (no build step, no CDN).
"use strict";

const $ = (id) => document.getElementById(id);
let apiKey = "";

function headers() {
  return apiKey ? { Authorization: "Bearer " + apiKey } : {};
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// Calls the API; resolves to the JSON answer, or throws an Error carrying the service's message.
async function call(method, path, body) {
  let response;
  try {
    response = await fetch(path, { method, body, headers: headers() });
  } catch (e) {
    throw new Error("The service could not be reached (" + e.message + ").");
  }
  if (response.status === 204) return null;
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    data = null;
  }
  if (!response.ok) {
    if (response.status === 401) $("key-section").hidden = false;
    const err = data && data.error;
    const text = err ? err.message + " (" + err.code + ")" : "HTTP " + response.status;
    const wait = response.headers.get("Retry-After");
    throw new Error(text + (wait ? "; try again in " + wait + " s" : ""));
  }
  return data;
}

function form(fields) {
  const data = new FormData();
  for (const [name, value, filename] of fields) {
    if (filename) data.append(name, value, filename);
    else data.append(name, value);
  }
  return data;
}

// --- try a voice ---------------------------------------------------------------------------

function pct(x) {
  return (100 * x).toFixed(1) + " %";
}

function showClassification(c) {
  $("label").textContent = c.label;
  const known = $("known");
  if (c.known === undefined || c.known === null) {
    known.textContent = "";
    $("known-detail").textContent = "";
  } else {
    known.textContent = c.known ? "one of the 9 voices" : "none of the 9 voices";
    known.className = "tag " + (c.known ? "yes" : "no");
    $("known-detail").textContent =
      "Nearest class by embedding: cosine " + c.known_score.toFixed(3) +
      " (one of the 9 at " + c.known_threshold.toFixed(3) + " or more).";
  }
  const list = $("probs");
  list.replaceChildren();
  const entries = Object.entries(c.probabilities).sort((a, b) => b[1] - a[1]);
  for (const [label, p] of entries) {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.className = "bar-label";
    name.textContent = label;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = Math.max(0.5, 100 * p) + "%";
    bar.setAttribute("aria-hidden", "true");
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = pct(p);
    li.append(name, bar, value);
    list.append(li);
  }
}

// A dark-to-bright colour ramp (blue, teal, yellow) for the spectrogram.
function colour(v) {
  const t = v / 255;
  return [Math.round(255 * Math.min(1, Math.max(0, 1.8 * t - 0.6))),
          Math.round(255 * Math.min(1, 1.2 * t)),
          Math.round(255 * Math.min(1, 0.35 + 0.9 * t - 1.1 * t * t))];
}

function drawSpectrogram(s) {
  const bytes = Uint8Array.from(atob(s.values), (ch) => ch.charCodeAt(0));
  const canvas = $("spec");
  canvas.width = s.frames;
  canvas.height = s.n_mels;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(s.frames, s.n_mels);
  for (let m = 0; m < s.n_mels; m++) {
    const row = s.n_mels - 1 - m; // low frequencies at the bottom
    for (let t = 0; t < s.frames; t++) {
      const [r, g, b] = colour(bytes[m * s.frames + t]);
      const k = 4 * (row * s.frames + t);
      image.data[k] = r;
      image.data[k + 1] = g;
      image.data[k + 2] = b;
      image.data[k + 3] = 255;
    }
  }
  ctx.putImageData(image, 0, 0);
  $("spec-caption").textContent =
    "The log-mel spectrogram the network saw: " + s.n_mels + " mel bands, " + s.seconds.toFixed(2) +
    " s" + (s.duration_s > s.seconds + 0.01 ? " (the first window of " + s.duration_s.toFixed(2) + " s)" : "") +
    ", low frequencies at the bottom.";
}

// Runs work() with the panel `out` marked busy; then shows it done, or shows the error.
async function withState(out, work) {
  showError("");
  out.dataset.state = "busy";
  out.setAttribute("aria-busy", "true");
  try {
    await work();
    out.hidden = false;
    out.dataset.state = "done";
  } catch (e) {
    out.dataset.state = "error";
    showError(e.message);
  } finally {
    out.removeAttribute("aria-busy");
  }
}

function analyse(blob, filename) {
  return withState($("result"), async () => {
    const [c, s] = await Promise.all([
      call("POST", "/classify?top_k=9", form([["file", blob, filename]])),
      call("POST", "/spectrogram", form([["file", blob, filename]])),
    ]);
    showClassification(c);
    drawSpectrogram(s);
  });
}

$("file").addEventListener("change", (ev) => {
  const file = ev.target.files[0];
  if (file) analyse(file, file.name);
});

// A record button: the first click starts recording from the microphone, the second stops it and
// hands the recording to onDone(blob, filename).
function recordButton(button, status, onDone) {
  let recorder = null;
  let ticker = null;
  async function startRecording() {
    showError("");
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (e) {
      showError("No microphone: " + e.message);
      return;
    }
    const type = ["audio/webm;codecs=opus", "audio/webm", "audio/ogg;codecs=opus", "audio/mp4"]
      .find((t) => window.MediaRecorder && MediaRecorder.isTypeSupported(t));
    recorder = new MediaRecorder(stream, type ? { mimeType: type } : {});
    const chunks = [];
    const started = performance.now();
    recorder.ondataavailable = (ev) => chunks.push(ev.data);
    recorder.onstop = () => {
      stream.getTracks().forEach((t) => t.stop());
      clearInterval(ticker);
      const mime = recorder.mimeType || "audio/webm";
      const ext = mime.includes("ogg") ? "ogg" : mime.includes("mp4") ? "m4a" : "webm";
      status.textContent = "Recorded " + ((performance.now() - started) / 1000).toFixed(1) + " s";
      recorder = null;
      onDone(new Blob(chunks, { type: mime }), "recording." + ext);
    };
    recorder.start();
    button.textContent = "Stop";
    button.setAttribute("aria-pressed", "true");
    ticker = setInterval(() => {
      const seconds = (performance.now() - started) / 1000;
      status.dataset.seconds = seconds.toFixed(1);
      status.textContent = "Recording… " + seconds.toFixed(1) + " s";
    }, 100);
  }
  button.addEventListener("click", () => {
    if (recorder) {
      recorder.stop();
      button.textContent = "Record";
      button.setAttribute("aria-pressed", "false");
    } else {
      startRecording();
    }
  });
}

recordButton($("record"), $("rec-status"), analyse);

// --- compare -------------------------------------------------------------------------------

$("compare").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  showError("");
  const a = $("clip-a").files[0];
  const b = $("clip-b").files[0];
  const out = $("compare-result");
  out.dataset.state = "busy";
  try {
    const v = await call("POST", "/verify", form([["a", a, a.name], ["b", b, b.name]]));
    $("same").textContent = v.same_speaker ? "Same voice" : "Different voices";
    $("same").className = "verdict " + (v.same_speaker ? "yes" : "no");
    // a cosine: -1..1 on the bar; an adaptive s-norm score: 0..twice the threshold
    const asNorm = v.score_kind === "as-norm";
    const span = asNorm ? Math.max(2 * v.threshold, 1) : 2;
    const toBar = (x) => Math.max(0, Math.min(100, (100 * (asNorm ? x : x + 1)) / span)) + "%";
    $("score-bar").style.width = toBar(v.score);
    $("threshold-mark").style.left = toBar(v.threshold);
    $("score-line").textContent = asNorm
      ? "Score " + v.score.toFixed(2) + " (adaptive s-norm; cosine " + v.cosine.toFixed(3) + "); the same voice at " +
        v.threshold.toFixed(2) + " or more."
      : "Cosine " + v.score.toFixed(3) + "; the same voice at " + v.threshold.toFixed(3) + " or more.";
    out.hidden = false;
    out.dataset.state = "done";
  } catch (e) {
    out.dataset.state = "error";
    showError(e.message);
  }
});

// --- who spoke when ------------------------------------------------------------------------

// Distinct colours for speaker labels (colour-blind-safe order), then hues spread evenly.
const PALETTE = ["#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000"];
function speakerColour(i) {
  return i < PALETTE.length ? PALETTE[i] : "hsl(" + ((i * 137) % 360) + ", 60%, 45%)";
}

let turnEnd = null; // where playback of a clicked turn stops

function drawTimeline(d, blob) {
  const player = $("diarize-audio");
  if (player.dataset.url) URL.revokeObjectURL(player.dataset.url);
  player.dataset.url = URL.createObjectURL(blob);
  player.src = player.dataset.url;
  const names = {};
  const legend = $("diarize-legend");
  legend.replaceChildren();
  d.speakers.forEach((s, i) => {
    names[s.label] = { name: s.match ? s.match.name : s.label, colour: speakerColour(i) };
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = names[s.label].colour;
    li.append(swatch, names[s.label].name + " (" + s.label + "): " + s.speech_seconds.toFixed(1) + " s" +
      (s.match ? ", enrolled, score " + s.match.score.toFixed(2) : ""));
    legend.append(li);
  });
  const line = $("timeline");
  line.replaceChildren();
  for (const seg of d.segments) {
    const turn = document.createElement("button");
    turn.type = "button";
    turn.className = "turn";
    turn.style.left = (100 * seg.start) / d.duration + "%";
    turn.style.width = Math.max(0.3, (100 * (seg.end - seg.start)) / d.duration) + "%";
    turn.style.background = names[seg.speaker].colour;
    turn.dataset.speaker = names[seg.speaker].name;
    turn.dataset.start = seg.start;
    turn.dataset.end = seg.end;
    turn.title = names[seg.speaker].name + ", " + seg.start.toFixed(1) + "–" + seg.end.toFixed(1) + " s";
    turn.setAttribute("aria-label", "Play " + turn.title);
    turn.addEventListener("click", () => {
      turnEnd = seg.end;
      player.currentTime = seg.start;
      player.play().catch((e) => showError("Cannot play: " + e.message));
    });
    line.append(turn);
  }
  $("diarize-summary").textContent = d.segments.length
    ? d.speakers.length + " speakers, " + d.segments.length + " turns in " + d.duration.toFixed(1) + " s. Click a turn to hear it."
    : "No speech found in " + d.duration.toFixed(1) + " s.";
}

$("diarize-audio").addEventListener("timeupdate", (ev) => {
  if (turnEnd !== null && ev.target.currentTime >= turnEnd) {
    ev.target.pause();
    turnEnd = null;
  }
});

function diarize(blob, filename) {
  return withState($("diarize-result"), async () => {
    const named = !$("speakers-section").hidden;
    const d = await call("POST", "/diarize" + (named ? "?identify=true" : ""), form([["file", blob, filename]]));
    drawTimeline(d, blob);
  });
}

$("diarize-file").addEventListener("change", (ev) => {
  const file = ev.target.files[0];
  if (file) diarize(file, file.name);
});

recordButton($("diarize-record"), $("diarize-rec-status"), diarize);

// --- speakers ------------------------------------------------------------------------------

async function listSpeakers() {
  const list = $("speakers");
  const page = await call("GET", "/speakers?limit=100");
  list.replaceChildren();
  if (!page.speakers.length) {
    const li = document.createElement("li");
    li.textContent = "No one enrolled yet.";
    list.append(li);
  }
  for (const s of page.speakers) {
    const li = document.createElement("li");
    li.textContent = s.name + " (" + s.clips + " clips, " + s.seconds.toFixed(1) + " s)" + (s.stale ? ", stale" : "") + " ";
    const del = document.createElement("button");
    del.type = "button";
    del.textContent = "Delete";
    del.setAttribute("aria-label", "Delete " + s.name);
    del.addEventListener("click", async () => {
      try {
        await call("DELETE", "/speakers/" + encodeURIComponent(s.id));
        await listSpeakers();
      } catch (e) {
        showError(e.message);
      }
    });
    li.append(del);
    list.append(li);
  }
}

$("enrol").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  showError("");
  const fields = [["name", $("enrol-name").value]];
  for (const f of $("enrol-files").files) fields.push(["file", f, f.name]);
  try {
    await call("POST", "/speakers", form(fields));
    ev.target.reset();
    await listSpeakers();
  } catch (e) {
    showError(e.message);
  }
});

$("identify").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  showError("");
  const f = $("identify-file").files[0];
  const out = $("identify-result");
  try {
    const r = await call("POST", "/identify", form([["file", f, f.name]]));
    out.textContent = r.speaker
      ? "This is " + r.speaker.name + " (score " + r.speaker.score.toFixed(3) + ", cosine " + r.speaker.cosine.toFixed(3) + ")."
      : "None of the " + r.searched + " enrolled speakers" +
        (r.matches.length ? " (closest: " + r.matches[0].name + ", " + r.matches[0].score.toFixed(3) + ")" : "") + ".";
    out.dataset.state = "done";
  } catch (e) {
    out.dataset.state = "error";
    showError(e.message);
  }
});

// --- start ---------------------------------------------------------------------------------

async function start() {
  try {
    const m = await call("GET", "/v1/model");
    $("model-line").textContent =
      "Model " + m.name + " " + m.version + ": " + m.embedding_size + "-d embeddings, " + m.num_classes + " voice classes.";
    $("key-section").hidden = !apiKey && $("key-section").hidden;
  } catch (e) {
    if (apiKey || $("key-section").hidden) showError(e.message);
    return;
  }
  try {
    await listSpeakers();
    $("speakers-section").hidden = false;
  } catch (e) {
    $("speakers-section").hidden = true; // no speakers store here: the section stays away
  }
  document.body.dataset.ready = "true";
}

$("key-save").addEventListener("click", () => {
  apiKey = $("api-key").value.trim();
  showError("");
  start();
});

start();
