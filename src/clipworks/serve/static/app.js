// The clipworks search page: plain DOM code, no dependencies. Text from the server is only ever set as
// textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

function setMessage(text, isError) {
  const el = $("message");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

function busy(on) {
  for (const b of document.querySelectorAll("button")) b.disabled = on;
}

async function call(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error("the server cannot be reached");
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) {
    throw new Error((body && body.error) || "HTTP " + response.status);
  }
  return body;
}

function kValue() {
  const k = parseInt($("k").value, 10);
  return Number.isFinite(k) && k > 0 ? k : 12;
}

function renderResults(results, label) {
  const list = $("results");
  list.replaceChildren();
  for (const r of results) {
    const item = document.createElement("li");
    item.className = "result" + (r.image ? "" : " text-only");
    item.dataset.key = r.key;
    if (r.image) {
      const img = document.createElement("img");
      img.src = r.image;
      img.alt = r.caption || r.key;
      img.loading = "lazy";
      img.title = "find images like this one";
      img.addEventListener("click", () => searchByKey(r.key));
      item.append(img);
    }
    const meta = document.createElement("div");
    meta.className = "meta";
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = r.score.toFixed(3);
    meta.append(score);
    if (r.caption) {
      const caption = document.createElement("div");
      caption.className = "caption";
      caption.textContent = r.caption;
      meta.append(caption);
    }
    const key = document.createElement("div");
    key.className = "key";
    key.textContent = r.key;
    meta.append(key);
    item.append(meta);
    list.append(item);
  }
  setMessage(results.length ? results.length + " results " + label : "no results " + label, false);
}

async function run(path, options, label) {
  busy(true);
  setMessage("searching…", false);
  try {
    const body = await call(path, options);
    renderResults(body.results, label);
  } catch (err) {
    $("results").replaceChildren();
    setMessage(err.message, true);
  } finally {
    busy(false);
  }
}

function searchText(event) {
  event.preventDefault();
  const query = $("query").value.trim();
  if (!query) return;
  const body = JSON.stringify({ query: query, k: kValue() });
  run("/api/search/text", { method: "POST", headers: { "Content-Type": "application/json" }, body: body },
      "for “" + query + "”");
}

function imageForm(extra) {
  const form = new FormData();
  form.append("k", String(kValue()));
  for (const [name, value] of Object.entries(extra)) form.append(name, value);
  return form;
}

function searchImage(path, label) {
  const file = $("image").files[0];
  if (!file) {
    setMessage("choose an image first", true);
    return;
  }
  run(path, { method: "POST", body: imageForm({ file: file }) }, label + " " + file.name);
}

function searchByKey(key) {
  run("/api/search/image", { method: "POST", body: imageForm({ key: key }) }, "like " + key);
}

async function showStatus() {
  try {
    const h = await call("/api/health");
    const captions = h.captions === null ? "" : " · " + h.captions + " captions";
    $("status").textContent = "model " + h.model + " · " + h.images + " images" + captions;
    $("k").max = String(h.max_k);
    $("image-captions").hidden = h.captions === null;
  } catch (err) {
    $("status").textContent = "server unavailable: " + err.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("text-form").addEventListener("submit", searchText);
  $("image-form").addEventListener("submit", (event) => {
    event.preventDefault();
    searchImage("/api/search/image", "like");
  });
  $("image-captions").addEventListener("click", () => searchImage("/api/search/image-to-text", "describing"));
  showStatus();
});
