// facegate try-it page. Plain script, no build step, no dependencies.
//
// Security rules this file keeps: the key lives only in the password field (never in
// browser storage or a URL); every value from a response reaches the page through
// textContent or a numeric style, never as markup; requests go to this origin only
// (the CSP says so too).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);

  const form = $("form");
  const keyInput = $("key");
  const fileInput = $("file");
  const drop = $("drop");
  const statusLine = $("status");
  const button = $("analyze");

  let picked = null; // the File to analyze
  let previewUrl = null; // its blob: URL
  let inFlight = null; // AbortController of the running request

  // --- small DOM helpers -------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function humanize(label) {
    return String(label).replace(/_/g, " ");
  }

  function pct(value) {
    return Math.round(Math.max(0, Math.min(1, value)) * 100) + "%";
  }

  // A bar for a 0..1 value; the width is set through the CSSOM, which the CSP allows.
  function bar(fraction, text) {
    const wrap = el("span", "bar-wrap");
    const track = el("span", "bar");
    const fill = el("span", "bar-fill");
    fill.style.width = pct(fraction);
    track.appendChild(fill);
    wrap.appendChild(track);
    wrap.appendChild(el("span", "bar-text", text));
    return wrap;
  }

  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 90) return s + " s";
    const m = Math.round(s / 60);
    if (m < 90) return m + " min";
    const h = Math.floor(s / 3600);
    if (h < 48) return h + " h " + Math.round((s % 3600) / 60) + " min";
    return Math.round(s / 86400) + " days";
  }

  // --- picking a file ----------------------------------------------------------------

  function pick(file) {
    if (!file) return;
    picked = file;
    $("file-name").textContent = file.name + " (" + Math.round(file.size / 1024) + " KiB)";
    if (keyInput.value.trim()) analyze();
    else {
      statusLine.textContent = "Enter your tenant key, then press Analyze.";
      keyInput.focus();
    }
  }

  fileInput.addEventListener("change", () => pick(fileInput.files && fileInput.files[0]));

  // The shipped public-domain portrait, so the first try needs no picture of your own.
  $("sample").addEventListener("click", async () => {
    hide($("error"));
    try {
      const response = await fetch("try/sample.jpg", { credentials: "omit", referrerPolicy: "no-referrer" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const blob = await response.blob();
      pick(new File([blob], "sample.jpg", { type: "image/jpeg" }));
    } catch (_) {
      showError({ title: "No sample", detail: "The sample photo could not be loaded from this facegate." });
    }
  });

  ["dragenter", "dragover"].forEach((type) =>
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    }),
  );
  ["dragleave", "dragend"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const files = event.dataTransfer && event.dataTransfer.files;
    if (files && files.length) pick(files[0]);
  });
  // A file dropped next to the zone must not navigate away (and lose the key).
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    analyze();
  });

  // --- the request -------------------------------------------------------------------

  // Hash first: the file's SHA-256 (WebCrypto), so an image facegate already analyzed is answered by
  // GET /v1/faces/analyses/{sha256} without uploading it. crypto.subtle exists only in a secure context
  // (https, or http on localhost / 127.0.0.1): elsewhere this is null and the page simply uploads.
  async function sha256Hex(file) {
    const subtle = window.isSecureContext && window.crypto && window.crypto.subtle;
    if (!subtle) return null;
    try {
      const digest = await subtle.digest("SHA-256", await file.arrayBuffer());
      return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
    } catch (_) {
      return null;
    }
  }

  async function analyze() {
    const key = keyInput.value.trim();
    hide($("error"));
    if (!key) return showError({ title: "No key", detail: "Enter your tenant key (it starts with fg_)." });
    if (!picked) return showError({ title: "No image", detail: "Drop or pick a JPEG, PNG or BMP image." });
    if (inFlight) inFlight.abort();
    const controller = new AbortController();
    inFlight = controller;
    const file = picked;
    const noCache = $("no-cache").checked;
    const query = $("landmarks").checked ? "?landmarks=true" : "";
    const headers = { Authorization: "Bearer " + key, Accept: "application/json" };
    statusLine.textContent = "Analyzing " + file.name + "…";
    button.disabled = true;
    let response = null;
    let fromLookup = false;
    let data = null;
    try {
      const sha = noCache ? null : await sha256Hex(file); // "Force a fresh analysis" never looks up
      if (sha) {
        const found = await fetch("v1/faces/analyses/" + sha + query, {
          headers,
          signal: controller.signal,
          credentials: "omit",
          cache: "no-store", // an answer fetched with a key stays out of the browser's cache
          referrerPolicy: "no-referrer",
        });
        if (found.status !== 404) {
          response = found;
          fromLookup = found.ok;
        }
      }
      if (!response) {
        const body = new FormData();
        body.append("image", file, file.name);
        if (noCache) headers["X-Facegate-Force"] = "1";
        response = await fetch("v1/faces/analyze" + query, {
          method: "POST",
          body,
          headers,
          signal: controller.signal,
          credentials: "omit",
          // No `cache: "no-store"`/`"reload"`: pointless here (facegate ignores Cache-Control:
          // no-cache; a fresh analysis is X-Facegate-Force, for tenants allowed to force).
          referrerPolicy: "no-referrer",
        });
      }
      const text = await response.text();
      try {
        data = JSON.parse(text);
      } catch (_) {
        data = null;
      }
    } catch (error) {
      if (controller.signal.aborted) return;
      statusLine.textContent = "";
      return showError({ title: "facegate could not be reached", detail: "The request did not get an answer." });
    } finally {
      if (inFlight === controller) {
        inFlight = null;
        button.disabled = false;
      }
    }
    if (!response.ok) {
      statusLine.textContent = "";
      return showError(problemOf(response, data));
    }
    if (!data || data.schema_version !== "1") {
      statusLine.textContent = "";
      return showError({ title: "Unexpected answer", detail: "The answer is not a v1 analysis." });
    }
    statusLine.textContent = "";
    render(response, data, file, fromLookup);
  }

  function problemOf(response, data) {
    const problem = data && typeof data === "object" ? data : {};
    return {
      title: typeof problem.title === "string" ? problem.title : "HTTP " + response.status,
      detail: typeof problem.detail === "string" ? problem.detail : "facegate refused the request.",
      code: typeof problem.code === "string" ? problem.code : null,
      status: response.status,
      requestId: response.headers.get("X-Request-ID"),
      retryAfter: response.headers.get("Retry-After"),
      quota: response,
    };
  }

  function hide(node) {
    node.hidden = true;
  }

  function showError(problem) {
    $("error-title").textContent = problem.title;
    let detail = problem.detail;
    if (problem.retryAfter) detail += " Retry in " + duration(Number(problem.retryAfter)) + ".";
    $("error-detail").textContent = detail;
    $("error-code").textContent = problem.code ? "code " + problem.code + (problem.status ? " (" + problem.status + ")" : "") : "";
    $("error-request").textContent = problem.requestId ? "· request id " + problem.requestId : "";
    $("error").hidden = false;
    $("result").hidden = true;
    const quota = $("error-quota");
    quota.replaceChildren();
    if (problem.quota) showQuota(problem.quota.headers, quota);
  }

  // --- rendering an analysis ---------------------------------------------------------

  function render(response, data, file, fromLookup) {
    $("result").hidden = false;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    $("preview").src = previewUrl;

    const faces = Array.isArray(data.faces) ? data.faces : [];
    drawBoxes(faces, data.image);
    $("face-count").textContent = faces.length ? String(faces.length) : "none found";
    const img = data.image || {};
    $("image-info").textContent =
      img.width + " × " + img.height + " px · " + String(img.format).toUpperCase() + " · " + Math.round(img.bytes / 1024) + " KiB";
    const src = data.source || {};
    $("source").textContent =
      (src.provider === "simulator" ? "simulator (sandbox: simulated answers, no credits)" : String(src.provider)) +
      (src.upstream_shape ? " · " + src.upstream_shape + " shape" : "") +
      (src.analyzed_at ? " · analyzed " + String(src.analyzed_at).replace(/\.\d+/, "").replace("T", " ") : "");
    showCache(response.headers.get("Cache-Status"), src, fromLookup);
    showQuota(response.headers, $("quota"));
    $("request-id").textContent = response.headers.get("X-Request-ID") || data.request_id || "";

    const cards = $("faces");
    cards.replaceChildren();
    faces.forEach((face, i) => cards.appendChild(faceCard(face, i)));
    $("raw").textContent = JSON.stringify(data, null, 2);
  }

  function drawBoxes(faces, image) {
    const layer = $("boxes");
    layer.replaceChildren();
    const w = image && image.width;
    const h = image && image.height;
    if (!w || !h) return;
    // Percentages of the image's own pixels: the boxes follow the image however it is scaled.
    const at = (v, total) => (v / total) * 100 + "%";
    faces.forEach((face, i) => {
      const b = face.box;
      const box = el("div", "face-box c" + (i % 6));
      box.style.left = at(b.x, w);
      box.style.top = at(b.y, h);
      box.style.width = at(b.width, w);
      box.style.height = at(b.height, h);
      box.appendChild(el("span", "face-num", i + 1));
      layer.appendChild(box);
      (face.landmarks || []).forEach((p) => {
        const dot = el("div", "landmark c" + (i % 6));
        dot.style.left = at(p.x, w);
        dot.style.top = at(p.y, h);
        layer.appendChild(dot);
      });
    });
  }

  function showCache(header, source, fromLookup) {
    const out = $("cache-status");
    out.replaceChildren();
    let word = source && source.cached ? "hit (no credit spent)" : "miss (a billable call)";
    if (header) {
      const parts = header.split(";").map((s) => s.trim());
      if (parts.includes("hit")) word = "hit (no credit spent)";
      else if (parts.includes("collapsed")) word = "collapsed onto an identical request in flight";
      else if (parts.includes("fwd=request")) word = "skipped on request (a billable call)";
    }
    if (fromLookup) word = "hit, found by the image's SHA-256: the image was not uploaded (no credit spent)";
    out.appendChild(el("span", null, word));
    if (header) out.appendChild(el("code", "header", header));
  }

  // RateLimit / RateLimit-Policy (IETF draft): `"daily";r=999;t=54675, ...`
  function parseList(value) {
    const out = {};
    if (!value) return out;
    value.split(",").forEach((member) => {
      const m = /^\s*"([^"\\]*)"\s*(.*)$/.exec(member);
      if (!m) return;
      const params = {};
      m[2].split(";").forEach((p) => {
        const kv = /^\s*([A-Za-z][\w.*-]*)\s*=\s*([^\s]+)\s*$/.exec(p);
        if (kv) params[kv[1]] = Number(kv[2]);
      });
      out[m[1]] = params;
    });
    return out;
  }

  function showQuota(headers, out) {
    out.replaceChildren();
    const state = parseList(headers.get("RateLimit"));
    const policy = parseList(headers.get("RateLimit-Policy"));
    const names = Object.keys(state);
    if (!names.length) {
      if (out.id === "quota") out.textContent = "not reported";
      return;
    }
    const list = el("ul", "quota-list");
    names.forEach((name) => {
      const s = state[name];
      const q = policy[name] && policy[name].q;
      const item = el("li", "quota-item");
      const text = name + ": " + s.r + (q ? " of " + q : "") + " left, " + (name === "burst" ? "refills" : "resets") + " in " + duration(s.t);
      if (q) item.appendChild(bar(s.r / q, text));
      else item.textContent = text;
      list.appendChild(item);
    });
    out.appendChild(list);
  }

  // --- the attribute table -----------------------------------------------------------

  const ATTRIBUTES = [
    ["Gender", (f) => f.gender],
    ["Emotion", (f) => f.emotion],
    ["Expression", (f) => f.expression],
    ["Glasses", (f) => f.eyes && f.eyes.glasses],
    ["Eyes", (f) => f.eyes && f.eyes.open],
    ["Eyelids", (f) => f.eyes && f.eyes.eyelid],
    ["Eye size", (f) => f.eyes && f.eyes.size],
    ["Mouth", (f) => f.mouth && f.mouth.open],
    ["Mask", (f) => f.mask],
    ["Moustache", (f) => f.moustache],
    ["Hat", (f) => f.hat && f.hat.style],
    ["Hat colour", (f) => f.hat && f.hat.color],
    ["Hair length", (f) => f.hair && f.hair.length],
    ["Bangs", (f) => f.hair && f.hair.bangs],
    ["Hair colour", (f) => f.hair && f.hair.color],
    ["Eyebrow density", (f) => f.eyebrows && f.eyebrows.density],
    ["Eyebrow curve", (f) => f.eyebrows && f.eyebrows.curve],
    ["Eyebrow length", (f) => f.eyebrows && f.eyebrows.length],
    ["Nose", (f) => f.nose],
    ["Face shape", (f) => f.face_shape],
    ["Skin", (f) => f.skin],
  ];

  const QUALITY = ["score", "blur", "illumination", "pose", "noise", "glasses", "mask", "fnf"];

  function row(tbody, name, value) {
    const tr = el("tr");
    tr.appendChild(el("th", null, name));
    const td = el("td");
    if (value instanceof Node) td.appendChild(value);
    else td.textContent = String(value);
    tr.appendChild(td);
    tbody.appendChild(tr);
  }

  function attribute(a) {
    const label = humanize(a.label);
    if (typeof a.confidence === "number") return bar(a.confidence, label + " · " + pct(a.confidence));
    return el("span", null, label);
  }

  function faceCard(face, i) {
    const card = el("section", "face c" + (i % 6));
    card.appendChild(el("h3", null, "Face " + (i + 1)));
    const table = el("table", "face-table");
    const tbody = el("tbody");
    const b = face.box;
    row(tbody, "Box", "x " + b.x + ", y " + b.y + " · " + b.width + " × " + b.height + " px");
    if (typeof face.detection_confidence === "number")
      row(tbody, "Detection", bar(face.detection_confidence, pct(face.detection_confidence)));
    if (face.age !== null && face.age !== undefined) row(tbody, "Age", face.age);
    ATTRIBUTES.forEach(([name, get]) => {
      const a = get(face);
      if (a) row(tbody, name, attribute(a));
    });
    if (typeof face.beauty === "number") row(tbody, "Beauty", bar(face.beauty / 100, face.beauty + " / 100"));
    if (typeof face.smile === "number") row(tbody, "Smile", bar(face.smile / 100, face.smile + " / 100"));
    if (face.head_pose) {
      const p = face.head_pose;
      row(tbody, "Head pose", "pitch " + p.pitch + "°, yaw " + p.yaw + "°, roll " + p.roll + "°");
    }
    if (face.quality) {
      QUALITY.forEach((k) => {
        const v = face.quality[k];
        if (typeof v === "number") row(tbody, "Quality: " + k, bar(v / 100, String(Math.round(v))));
      });
    }
    if (Array.isArray(face.landmarks)) row(tbody, "Landmarks", face.landmarks.length + " points (dots on the image)");
    table.appendChild(tbody);
    card.appendChild(table);
    return card;
  }
})();
