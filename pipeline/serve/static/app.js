// The search page: queries go to /api/search, thumbnails come from /api/thumb/ID (the server
// reads the objects; the browser never sees the store). URL state: ?id=N or ?uri=U (and k);
// an upload is kept in history.state, so back/forward replay every search.
"use strict";

const $ = (id) => document.getElementById(id);
let shownIndexId = null;
let uploadUrl = null; // object URL of the last uploaded image, for the query preview

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function kValue() {
  return $("k-select").value;
}

function formatStatus(s) {
  const built = s.built_at ? new Date(s.built_at).toISOString().replace("T", " ").slice(0, 16) + " UTC" : "unknown";
  const parts = [
    `${s.ntotal.toLocaleString("en-US")} images`,
    `index ${s.index_id}`,
    `model ${s.model || "unknown"}`,
    `table v${s.table_version ?? "?"}`,
    `built ${built}`,
  ];
  if (!s.can_embed_uploads) parts.push("uploads off (no encoder recorded)");
  return parts.join(" · ");
}

async function getJson(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (e) {
    throw new Error(`The server did not answer (${e.message}). Is sparse-embed serve still running?`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    body = null;
  }
  if (!response.ok) {
    throw new Error((body && body.error) || `The server answered ${response.status} ${response.statusText}`);
  }
  return body;
}

async function refreshStatus() {
  const el = $("status");
  try {
    const s = await getJson("/api/status");
    el.textContent = formatStatus(s) + (s.reload_error ? ` · newer index not loaded: ${s.reload_error}` : "");
    el.classList.toggle("stale", Boolean(s.reload_error));
    shownIndexId = s.index_id;
  } catch (e) {
    el.textContent = `Status unavailable: ${e.message}`;
    el.classList.add("stale");
  }
}

function card(hit) {
  const li = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "card";
  button.dataset.id = String(hit.image_id);
  button.title = `search by image_id ${hit.image_id}`;
  const img = document.createElement("img");
  img.loading = "lazy";
  img.alt = hit.uri || `image_id ${hit.image_id}`;
  img.src = `/api/thumb/${hit.image_id}`;
  img.addEventListener("error", () => {
    const missing = document.createElement("div");
    missing.className = "missing";
    missing.textContent = "thumbnail unavailable";
    img.replaceWith(missing);
  });
  const meta = document.createElement("div");
  meta.className = "meta";
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = `#${hit.rank} · id ${hit.image_id}`;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(4);
  const uri = document.createElement("span");
  uri.className = "uri";
  uri.textContent = hit.uri || "";
  uri.title = hit.uri || "";
  meta.append(rank, score, uri);
  button.append(img, meta);
  button.addEventListener("click", () => search({ image_id: hit.image_id }, true));
  li.append(button);
  return li;
}

function render(body, preview) {
  const grid = $("grid");
  grid.replaceChildren(...body.results.map(card));
  grid.dataset.query = body.query.kind === "upload" ? "upload" : String(body.query.image_id);
  $("hint").hidden = true;
  $("query").hidden = false;
  $("query-image").src = preview || `/api/thumb/${body.query.image_id}`;
  $("query-text").textContent = body.query.kind === "upload"
    ? `uploaded image (${body.query.bytes.toLocaleString("en-US")} bytes)`
    : `image_id ${body.query.image_id} · ${body.query.uri || ""}`;
  $("query-meta").textContent = `${body.results.length} results from index ${body.index_id} ` +
    `(model ${body.model}, table v${body.table_version}) in ${Math.round(body.seconds * 1000)} ms`;
  if (body.index_id !== shownIndexId) refreshStatus();
}

function urlFor(params) {
  const q = new URLSearchParams();
  if (params.image_id !== undefined) q.set("id", String(params.image_id));
  if (params.uri !== undefined) q.set("uri", params.uri);
  q.set("k", kValue());
  return `?${q}`;
}

async function search(params, push) {
  showError("");
  $("grid").classList.add("busy");
  try {
    const body = await getJson("/api/search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...params, k: Number(kValue()) }),
    });
    render(body);
    if (push) history.pushState({ params }, "", urlFor(params));
    window.scrollTo(0, 0);
  } catch (e) {
    showError(e.message);
  } finally {
    $("grid").classList.remove("busy");
  }
}

async function searchUpload(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showError(`"${file.name}" is not an image (${file.type || "unknown type"}): choose a JPEG, PNG, WebP, GIF, TIFF, BMP or AVIF file.`);
    return;
  }
  showError("");
  $("grid").classList.add("busy");
  const form = new FormData();
  form.append("image", file, file.name || "pasted-image");
  form.append("k", kValue());
  try {
    const body = await getJson("/api/search", { method: "POST", body: form });
    if (uploadUrl) URL.revokeObjectURL(uploadUrl);
    uploadUrl = URL.createObjectURL(file);
    render(body, uploadUrl);
    history.pushState({ upload: body, preview: uploadUrl }, "", `?upload=${encodeURIComponent(file.name || "pasted")}`);
  } catch (e) {
    showError(e.message);
  } finally {
    $("grid").classList.remove("busy");
  }
}

function fromLocation(state) {
  const q = new URLSearchParams(location.search);
  if (q.has("k")) $("k-select").value = q.get("k");
  if (q.has("id")) {
    $("id-input").value = q.get("id");
    search({ image_id: q.get("id") }, false);
  } else if (q.has("uri")) {
    search({ uri: q.get("uri") }, false);
  } else if (state && state.upload) {
    showError("");
    render(state.upload, state.preview);
  } else if (q.has("upload")) {
    showError("That search was an uploaded image, which is not kept across reloads: upload it again.");
  } else {
    showError("");
    $("grid").replaceChildren();
    $("query").hidden = true;
    $("hint").hidden = false;
  }
}

function wire() {
  const zone = $("dropzone");
  $("file-input").addEventListener("change", (e) => searchUpload(e.target.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    document.addEventListener(name, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    document.addEventListener(name, () => zone.classList.remove("over"));
  }
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) searchUpload(file);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) searchUpload(item.getAsFile());
  });
  $("id-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const id = $("id-input").value.trim();
    if (!/^[0-9]+$/.test(id)) {
      showError(`"${id}" is not an image_id: enter a whole number such as 42, or click a result.`);
      return;
    }
    search({ image_id: id }, true);
  });
  window.addEventListener("popstate", (e) => fromLocation(e.state));
}

wire();
refreshStatus();
setInterval(refreshStatus, 10000); // shows a new index once nightly moves CURRENT
fromLocation(history.state);
