// The clipworks search page: plain DOM code, no dependencies. Text from the server is only ever set as
// textContent, never parsed as HTML (results carry user data: captions, keys, metadata).
//
// A query is one object: what to search with (text, an indexed key, an image URL or an uploaded file) plus the
// options (collection, filter, safe search, k). It lives in the address bar as search params (q, key, url,
// describe, collection, filter, safe, k), so a URL is shareable and back/forward restore earlier queries. An
// upload cannot go into a URL: its history entry keeps an id of the File held in this tab.
"use strict";

const $ = (id) => document.getElementById(id);
const DEFAULT_K = 12;
const MAX_UPLOADS = 20; // uploads kept for back/forward

const page = {
  health: null,
  collections: [], // from /api/collections ([] on a server without it)
  query: null, // the query whose results are shown
  shown: new Set(), // keys of the results shown, so "load more" never repeats one
  next: 0, // the offset "load more" asks for
  seq: 0, // the latest request: answers to older ones are dropped
  uploads: new Map(), // upload id -> File
  preview: null, // the object URL of the previewed upload
  cards: new WeakMap(), // result card -> the query and result it shows
};

// ---- messages -------------------------------------------------------------------------------------------------

function oneLine(text) {
  return String(text).replace(/\s+/g, " ").trim();
}

function setMessage(text, isError) {
  const el = $("message");
  el.textContent = oneLine(text);
  el.title = el.textContent; // the whole line, when it is cut to the page's width
  el.className = isError ? "error" : "";
}

function errorText(body, status) {
  const error = body && body.error;
  if (typeof error === "string" && error) return error;
  if (error && typeof error.message === "string") return error.message; // the OpenAI-shaped /v1 errors
  return "the server answered HTTP " + status;
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
  if (!response.ok) throw new Error(errorText(body, response.status));
  if (body === null) throw new Error("the server answered something that is not JSON");
  return body;
}

// ---- options and the address bar ------------------------------------------------------------------------------

function collectionInfo(name) {
  return page.collections.find((c) => c.name === name) || null;
}

function defaultCollection() {
  const c = page.collections.find((c) => c.default) || page.collections[0];
  return c ? c.name : "";
}

function kValue() {
  const k = parseInt($("k").value, 10);
  return Number.isFinite(k) && k > 0 ? k : DEFAULT_K;
}

/** The options set in the form, to go with a new query. */
function formOptions() {
  return { collection: $("collection").value || defaultCollection(), filter: $("filter").value.trim(),
           safe: $("safe").checked, k: kValue() };
}

function toParams(q) {
  const params = new URLSearchParams();
  if (q.kind === "text") params.set("q", q.text);
  if (q.kind === "key") params.set("key", q.key);
  if (q.kind === "url") params.set("url", q.url);
  if (q.kind && q.describe) params.set("describe", "1");
  if (q.collection && (page.collections.length > 1 || q.collection !== defaultCollection())) {
    params.set("collection", q.collection);
  }
  if (q.filter) params.set("filter", q.filter);
  if (!q.safe) params.set("safe", "0");
  if (q.k !== DEFAULT_K) params.set("k", String(q.k));
  return params;
}

function fromLocation() {
  const params = new URLSearchParams(location.search);
  const state = history.state || {};
  const k = parseInt(params.get("k"), 10);
  const q = { kind: null, collection: params.get("collection") || defaultCollection(),
              filter: params.get("filter") || "", safe: params.get("safe") !== "0",
              k: Number.isFinite(k) && k > 0 ? k : DEFAULT_K, describe: params.get("describe") === "1" };
  if (params.get("q")) Object.assign(q, { kind: "text", text: params.get("q") });
  else if (params.get("key")) Object.assign(q, { kind: "key", key: params.get("key") });
  else if (params.get("url")) Object.assign(q, { kind: "url", url: params.get("url") });
  else if (state.upload && page.uploads.has(state.upload)) {
    Object.assign(q, { kind: "file", upload: state.upload, name: page.uploads.get(state.upload).name });
  }
  return q;
}

/** Puts `q` in the address bar: a new history entry, unless it is the entry already shown. */
function remember(q) {
  const search = toParams(q).toString();
  const url = location.pathname + (search ? "?" + search : "");
  const state = q.kind === "file" ? { upload: q.upload } : {};
  const current = history.state || {};
  if (url === location.pathname + location.search && state.upload === current.upload) {
    history.replaceState(state, "", url);
  } else {
    history.pushState(state, "", url);
  }
}

// ---- the query shown in the form ------------------------------------------------------------------------------

function showOptions(q) {
  if (q.collection && collectionInfo(q.collection)) $("collection").value = q.collection;
  $("filter").value = q.filter;
  $("safe").checked = q.safe;
  $("k").value = String(q.k);
  describeCollection();
}

function clearPreview() {
  if (page.preview) URL.revokeObjectURL(page.preview);
  page.preview = null;
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
}

/** The text box holds a text query; an image query shows as a chip (with a preview) and empties the text box. */
function showQuery(q) {
  const chip = $("query-chip");
  clearPreview();
  if (q.kind !== "file") $("image").value = ""; // the file chooser names only the file being searched with
  if (!q.kind || q.kind === "text") {
    chip.hidden = true;
    $("query").value = q.kind ? q.text : "";
    $("query").placeholder = "describe an image, or drop / paste one";
    return;
  }
  $("query").value = "";
  $("query").placeholder = "searching by this image; type to search by text instead";
  chip.hidden = false;
  let label = q.name;
  if (q.kind === "key") {
    label = q.key;
    $("preview").src = q.image || imageUrl(q.key, q.collection);
    $("preview").hidden = false;
  } else if (q.kind === "file") {
    page.preview = URL.createObjectURL(page.uploads.get(q.upload));
    $("preview").src = page.preview;
    $("preview").hidden = false;
  } else if (q.kind === "url") {
    label = q.url; // a page policy of img-src 'self' keeps other sites' images out: no preview
  }
  $("chip-label").textContent = (q.describe ? "captions for " : "like ") + label;
  chip.title = $("chip-label").textContent;
}

function imageUrl(key, collection) {
  const url = "/api/image/" + encodeURIComponent(key); // as the server writes them: no collection= for the default
  return collection && collection !== defaultCollection() ? url + "?collection=" + encodeURIComponent(collection) : url;
}

function describeCollection() {
  const h = page.health;
  if (!h) return;
  const c = collectionInfo($("collection").value);
  const images = c ? c.images : h.images;
  const captions = c ? c.captions : h.captions;
  const noun = c && c.modality === "text" ? " captions" : " images";
  const parts = ["model " + (c ? c.model : h.model), images === null ? "no collection to search" : images + noun];
  if (captions !== null && captions !== undefined) parts.push(captions + " captions");
  $("status").textContent = parts.join(" · ");
  $("image-captions").hidden = captions === null || captions === undefined;
  const columns = c && c.columns ? Object.keys(c.columns) : null; // null: a server that does not say
  const none = columns !== null && columns.length === 0;
  $("filter").disabled = none && !$("filter").value;
  $("filter").placeholder = none ? "no columns to filter on"
    : "e.g. " + (columns ? exampleFilter(c.columns) : "aesthetic>=5;source=laion");
  $("filter").title = columns && columns.length
    ? "conditions separated by ; on the columns " + columns.join(", ") + " (=, !=, <, <=, >, >=; a|b for any of)"
    : "conditions separated by ;, e.g. aesthetic>=5;source=laion";
}

function exampleFilter(columns) {
  const parts = Object.entries(columns).slice(0, 2).map(([name, kind]) =>
    kind === "number" ? name + ">=5" : kind === "bool" ? name + "=false" : name + "=…");
  return parts.join(";");
}

// ---- searching ------------------------------------------------------------------------------------------------

function imageSource(q) {
  if (q.kind === "key") return { key: q.key };
  if (q.kind === "url") return { url: q.url };
  const file = page.uploads.get(q.upload);
  return { file: file };
}

function request(q, offset) {
  if (q.kind === "text") {
    const body = { query: q.text, k: q.k, safe: q.safe };
    if (q.collection) body.collection = q.collection;
    if (q.filter) body.filters = q.filter;
    if (offset) body.offset = offset;
    return ["/api/search/text", { method: "POST", headers: { "Content-Type": "application/json" },
                                  body: JSON.stringify(body) }];
  }
  const form = new FormData();
  for (const [name, value] of Object.entries(imageSource(q))) form.append(name, value);
  form.append("k", String(q.k));
  if (q.collection) form.append("collection", q.collection);
  if (offset) form.append("offset", String(offset));
  if (q.describe) return ["/api/search/image-to-text", { method: "POST", body: form }];
  if (q.filter) form.append("filters", q.filter);
  form.append("safe", q.safe ? "true" : "false");
  return ["/api/search/image", { method: "POST", body: form }];
}

function label(q) {
  if (q.kind === "text") return "for “" + q.text + "”";
  const what = q.kind === "key" ? q.key : q.kind === "url" ? q.url : q.name;
  return (q.describe ? "describing " : "like ") + what;
}

function busy(on) {
  for (const b of document.querySelectorAll("button")) b.disabled = on;
}

/** Runs `q`: a new search (`push` puts it in the address bar), or the next page of the shown one (`more`). */
async function execute(q, { push = true, more = false, focus = false } = {}) {
  const seq = ++page.seq;
  if (!more) {
    page.query = q;
    showOptions(q);
    showQuery(q);
    if (push) remember(q);
  }
  const offset = more ? page.next : 0;
  $("results").classList.toggle("stale", !more); // the old results stay, dimmed, until the new ones come
  busy(true);
  setMessage(more ? "loading more…" : "searching…", false);
  try {
    const body = await call(...request(q, offset));
    if (seq !== page.seq) return;
    render(q, body, more);
    if (focus) focusResult(0);
  } catch (err) {
    if (seq !== page.seq) return;
    if (!more) clearResults();
    setMessage(err.message, true);
  } finally {
    if (seq === page.seq) {
      busy(false);
      $("results").classList.remove("stale");
    }
  }
}

function clearResults() {
  $("results").replaceChildren();
  $("results").classList.remove("stale");
  page.shown = new Set();
  page.next = 0;
  $("more").hidden = true;
}

function render(q, body, more) {
  if (!more) clearResults();
  const results = Array.isArray(body.results) ? body.results : [];
  const offset = typeof body.offset === "number" ? body.offset : 0;
  for (const r of results) {
    if (page.shown.has(r.key)) continue;
    page.shown.add(r.key);
    $("results").append(card(q, r));
  }
  page.next = offset + results.length;
  $("more").hidden = !(body.more === true && results.length > 0);
  const n = page.shown.size;
  setMessage((n ? n + (n === 1 ? " result " : " results ") : "no results ") + label(q), false);
}

function card(q, r) {
  const item = document.createElement("li");
  item.className = "result" + (r.image ? "" : " text-only");
  item.dataset.key = r.key;
  item.tabIndex = 0;
  item.title = q.describe ? "search for this caption" : "find images like this one";
  if (r.image) {
    const img = document.createElement("img");
    img.src = r.image;
    img.alt = r.caption || r.key;
    img.loading = "lazy";
    item.append(img);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  const top = document.createElement("div");
  top.className = "top";
  top.append(span("score", Number(r.score).toFixed(3)));
  if (typeof r.aesthetic === "number") {
    const a = span("aesthetic", "aesthetic " + r.aesthetic.toFixed(2));
    a.title = "LAION aesthetic score";
    top.append(a);
  }
  meta.append(top);
  if (r.caption) meta.append(div("caption", r.caption));
  meta.append(div("key", r.key));
  const extra = Object.entries(r.metadata || {}).filter(([name]) => name !== "aesthetic");
  if (extra.length) {
    const list = div("metadata", "");
    for (const [name, value] of extra.slice(0, 6)) {
      list.append(div("field", name + ": " + (value === null ? "–" : String(value))));
    }
    meta.append(list);
  }
  if (r.full_image) {
    const link = document.createElement("a");
    link.className = "full";
    link.href = r.full_image;
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    link.textContent = "full image ↗";
    meta.append(link);
  }
  item.append(meta);
  page.cards.set(item, { q: q, r: r });
  item.addEventListener("click", (event) => {
    if (event.target.closest("a")) return; // the full-image link opens the image
    openResult(q, r, false);
  });
  return item;
}

function span(className, text) {
  const el = document.createElement("span");
  el.className = className;
  el.textContent = text;
  return el;
}

function div(className, text) {
  const el = document.createElement("div");
  el.className = className;
  el.textContent = text;
  return el;
}

/** A click (or Enter) on a result: images like it, or, for a caption describing the query image, a text search. */
function openResult(q, r, byKeyboard) {
  const options = { collection: q.collection, filter: q.filter, safe: q.safe, k: q.k };
  if (q.describe) {
    if (r.caption) execute({ ...options, kind: "text", text: r.caption }, { focus: byKeyboard });
    return;
  }
  execute({ ...options, kind: "key", key: r.key, image: r.image || null }, { focus: byKeyboard });
}

// ---- what starts a search -------------------------------------------------------------------------------------

function submit(event) {
  event.preventDefault();
  const options = formOptions();
  const text = $("query").value.trim();
  const url = $("url").value.trim();
  if (document.activeElement === $("url") && url) {
    execute({ ...options, kind: "url", url: url });
  } else if (text) {
    execute({ ...options, kind: "text", text: text });
  } else if (page.query && page.query.kind && page.query.kind !== "text") {
    execute({ ...page.query, ...options }); // the image query again, with the options as they are now
  } else if (url && !$("url-field").hidden) {
    execute({ ...options, kind: "url", url: url });
  } else {
    setMessage("type what to look for, or drop, paste or choose an image", true);
  }
}

function searchFile(file) {
  const id = "u" + Date.now() + "-" + Math.random().toString(36).slice(2, 8);
  page.uploads.set(id, file);
  if (page.uploads.size > MAX_UPLOADS) page.uploads.delete(page.uploads.keys().next().value); // the oldest
  execute({ ...formOptions(), kind: "file", upload: id, name: file.name || "pasted image" });
}

function imageFile(transfer) {
  if (!transfer) return null;
  for (const file of transfer.files || []) {
    if (file.type.startsWith("image/")) return file;
  }
  for (const item of transfer.items || []) {
    if (item.kind === "file" && item.type.startsWith("image/")) return item.getAsFile();
  }
  return null;
}

function onPaste(event) {
  const file = imageFile(event.clipboardData);
  if (!file) return; // text pastes into the focused field as usual
  event.preventDefault();
  searchFile(file);
}

function carriesFiles(event) {
  return event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
}

function onDrop(event) {
  event.preventDefault();
  $("drop-hint").hidden = true;
  const file = imageFile(event.dataTransfer);
  if (file) {
    searchFile(file);
    return;
  }
  const link = event.dataTransfer && event.dataTransfer.getData("text/uri-list").split("\n")[0].trim();
  if (link && page.health && page.health.allow_urls) {
    execute({ ...formOptions(), kind: "url", url: link });
  } else {
    setMessage("drop an image file (PNG, JPEG, WebP, …) to search with it", true);
  }
}

function describeImage() {
  const q = page.query;
  if (!q || !q.kind || q.kind === "text") {
    setMessage("drop, paste or choose an image first", true);
    return;
  }
  execute({ ...q, ...formOptions(), describe: true });
}

function clearAll() {
  page.seq++; // an answer still under way is not shown
  busy(false);
  const q = { ...formOptions(), kind: null };
  page.query = null;
  showQuery(q);
  $("url").value = "";
  $("image").value = "";
  clearResults();
  setMessage("", false);
  remember(q);
  $("query").focus();
}

// ---- keyboard -------------------------------------------------------------------------------------------------

function cards() {
  return Array.from(document.querySelectorAll("#results li.result"));
}

function focusResult(i) {
  const all = cards();
  if (all.length) all[Math.max(0, Math.min(i, all.length - 1))].focus();
}

function columns(all) {
  const top = all[0].offsetTop;
  const n = all.findIndex((c) => c.offsetTop !== top);
  return n === -1 ? all.length : n;
}

function onResultKey(event) {
  const item = event.target.closest("li.result");
  if (!item || event.target !== item) return; // keys on the full-image link act as on any link
  const all = cards();
  const i = all.indexOf(item);
  const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns(all), ArrowUp: -columns(all) }[event.key];
  if (step !== undefined) {
    event.preventDefault();
    if (i + step < 0 && event.key === "ArrowUp") $("query").focus();
    else focusResult(i + step);
  } else if (event.key === "Home" || event.key === "End") {
    event.preventDefault();
    focusResult(event.key === "Home" ? 0 : all.length - 1);
  } else if (event.key === "Enter" || event.key === " ") {
    event.preventDefault();
    const entry = page.cards.get(item);
    if (entry) openResult(entry.q, entry.r, true);
  }
}

function onKey(event) {
  if (event.key === "Escape" && !event.defaultPrevented) {
    if (document.activeElement && document.activeElement.tagName === "SELECT") return;
    event.preventDefault();
    clearAll();
  } else if (event.key === "ArrowDown" && event.target === $("query") && cards().length) {
    event.preventDefault();
    focusResult(0);
  }
}

// ---- start ----------------------------------------------------------------------------------------------------

async function loadServer() {
  try {
    page.health = await call("/api/health");
    $("k").max = String(page.health.max_k);
    $("url-field").hidden = !page.health.allow_urls;
    $("safe-field").hidden = page.health.safety === false; // a server without a safety filter hides nothing
  } catch (err) {
    $("status").textContent = "server unavailable: " + oneLine(err.message);
    return false;
  }
  try {
    const body = await call("/api/collections");
    page.collections = Array.isArray(body.collections) ? body.collections : [];
  } catch (err) {
    page.collections = []; // a server with one index and no collections API
  }
  const select = $("collection");
  select.replaceChildren();
  for (const c of page.collections) {
    const option = document.createElement("option");
    option.value = c.name;
    option.textContent = c.name + " (" + c.images + ")";
    select.append(option);
  }
  select.value = defaultCollection();
  $("collection-field").hidden = page.collections.length < 2;
  describeCollection();
  return true;
}

function restore() {
  const q = fromLocation();
  if (q.kind) {
    execute(q, { push: false });
  } else {
    page.seq++;
    page.query = null;
    showOptions(q);
    showQuery(q);
    clearResults();
    setMessage("", false);
  }
}

function rerun() {
  const q = page.query;
  if (!q || !q.kind) return;
  const options = formOptions();
  if (q.kind === "key" && options.collection !== q.collection) {
    clearAll(); // a key names an item of the collection it came from
    return;
  }
  execute({ ...q, ...options });
}

document.addEventListener("DOMContentLoaded", async () => {
  $("search-form").addEventListener("submit", submit);
  $("chip-clear").addEventListener("click", clearAll);
  $("image").addEventListener("change", () => {
    if ($("image").files[0]) searchFile($("image").files[0]);
  });
  $("image-captions").addEventListener("click", describeImage);
  $("more").addEventListener("click", () => page.query && execute(page.query, { more: true }));
  $("collection").addEventListener("change", () => {
    describeCollection();
    rerun();
  });
  $("safe").addEventListener("change", rerun);
  $("preview").addEventListener("error", () => { $("preview").hidden = true; });
  $("results").addEventListener("keydown", onResultKey);
  document.addEventListener("keydown", onKey);
  document.addEventListener("paste", onPaste);
  let dragging = 0; // dragenter/dragleave pairs of the elements under the pointer: 0 when it left the page
  document.addEventListener("dragenter", (event) => {
    dragging++;
    if (carriesFiles(event)) $("drop-hint").hidden = false;
  });
  document.addEventListener("dragover", (event) => {
    event.preventDefault(); // without it the browser opens the dropped file instead of handing it over
    if (carriesFiles(event)) $("drop-hint").hidden = false;
  });
  document.addEventListener("dragleave", () => {
    dragging = Math.max(0, dragging - 1);
    if (!dragging) $("drop-hint").hidden = true;
  });
  document.addEventListener("drop", () => { dragging = 0; }, true);
  document.addEventListener("drop", onDrop);
  window.addEventListener("popstate", restore);
  if (await loadServer()) restore();
});
