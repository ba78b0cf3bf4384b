// clipsearch search page: plain JS, no build step. Talks to the JSON API of this server.
//
// Every search is one POST /search (text, photo, "more like this", or a photo refined
// with words as composed terms) with group_by_doc (one card per product) and facets:
// the counts beside the results are per product, for this query and these filters. A
// column with a selection gets its counts from a second request without its own
// selection (so "red (4)" still says what adding red would give). A photo goes up as
// multipart (POST /search/image: the file's bytes, not a third more as base64), with the
// same options as form fields. When the index can match words (GET /info), a mode
// selector offers Smart (hybrid, the server's default), Words (lexical) and Looks
// (vector), and each card can explain itself ("Why this result").
"use strict";

// Products per page (?per_page=N in the address, 1..200).
const PAGE = Math.min(200, Math.max(1, Number(new URLSearchParams(location.search).get("per_page")) || 24));
const MAX_OFFSET = 800;          // the server's largest offset: max_page_depth - max_k (defaults)
const ORDER = ["category", "kind", "colour", "color", "price", "rating", "in_stock", "brand", "pattern", "material"];
const HIDDEN_FACETS = new Set(["view", "image_path", "title", "name", "caption", "description", "sku"]);
const MAX_MENU = 30;             // string columns with more distinct values are not menus
const COLOURS = {
  red: "#dc1e1e", orange: "#f58c14", yellow: "#f0dc1e", green: "#28aa3c", blue: "#1e46dc",
  purple: "#8228aa", pink: "#f582be", brown: "#78461e", black: "#0f0f0f", white: "#fafafa",
  gray: "#808080", grey: "#808080", navy: "#1f2a5a", beige: "#e8dcc0", teal: "#138086",
};

const $ = (id) => document.getElementById(id);
const state = {
  apiKey: sessionStorage.getItem("clipsearch-api-key") || "",
  columns: {},       // GET /facets: name -> {type, values, counts, min, max}
  facetNames: [],    // columns offered as filters, in display order
  counts: null,      // the last search's facets: name -> [{value, count, min, max}]
  selected: {},      // name -> Map(key -> {label, clause})
  query: null,       // {kind: "text"|"image"|"like"|"refine", text, image, like, label, base}
  sort: "",
  mode: "",          // "" = the server's default (hybrid with words), "lexical", "vector"
  info: null,        // GET /info: the index's modalities and their search modes
  offset: 0,
  seq: 0,            // the latest search; answers to older ones are dropped
  hits: [],
  total: null,       // products counted by the last answer
  scope: null,       // "relevant" | "filter"
  cutoff: null,      // relevance cutoff the server used for the last answer
  cutoffs: {},       // query modality ("text" / "image") -> the server's last cutoff
  offline: false,
  showWeak: false,   // also list hits below the relevance cutoff
  objectUrls: [],
};

// ------------------------------------------------------------------ API helpers

class Offline extends Error {}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.apiKey) h["X-API-Key"] = state.apiKey;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  let resp;
  try {
    resp = await fetch(path, opts);
  } catch (e) {
    setOffline(true);
    throw new Offline("offline");
  }
  setOffline(false);
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (resp.status === 401) $("apikey-bar").hidden = false;
  if (!resp.ok) {
    const err = (body && body.error) || {};
    const e = new Error(err.message || `The server answered ${resp.status}.`);
    e.code = err.code || "http_error";
    e.status = resp.status;
    throw e;
  }
  return body;
}

function postSearch(req) {
  if (req.photo) return postPhoto(req);
  return api("/search", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(req),
  });
}

// A photo query as multipart: the file itself plus every option as a form field
// (lists repeated, objects as JSON), validated by the server like the JSON body.
function postPhoto(req) {
  const form = new FormData();
  form.append("image", req.photo, req.photo.name || "photo");
  for (const [name, value] of Object.entries(req)) {
    if (name === "photo" || value == null) continue;
    if (Array.isArray(value)) value.forEach((v) => form.append(name, String(v)));
    else if (typeof value === "object") form.append(name, JSON.stringify(value));
    else form.append(name, String(value));
  }
  return api("/search/image", { method: "POST", body: form });
}

// ------------------------------------------------------------------ offline state

let healthTimer = null;

function setOffline(off) {
  if (off === state.offline) return;
  state.offline = off;
  const pill = $("index-status");
  pill.classList.toggle("down", off);
  pill.classList.toggle("ok", !off);
  const banner = $("offline");
  document.body.classList.toggle("stale", off && state.hits.length > 0);
  if (off) {
    pill.textContent = "offline";
    banner.textContent = state.hits.length
      ? "Can’t reach the search server. The results below may be out of date; this page retries on its own."
      : "Can’t reach the search server. This page retries on its own.";
    banner.hidden = false;
    clearInterval(healthTimer);
    healthTimer = setInterval(async () => {
      if (await loadHealth()) {
        clearInterval(healthTimer);
        if (!Object.keys(state.columns).length) await Promise.all([loadFacets(), loadInfo()]);
        rerun();
      }
    }, 3000);
  } else {
    banner.hidden = true;
    pill.textContent = "online";
    loadHealth();
  }
}

// ------------------------------------------------------------------ filters

function quoteString(s) { return "'" + String(s).replace(/'/g, "''") + "'"; }
function quoteColumn(c) { return /^[A-Za-z_][A-Za-z0-9_]*$/.test(c) ? c : "`" + c.replace(/`/g, "``") + "`"; }
function titleCase(s) { return s.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase()); }
function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function fmt(x, cents) { return Number.isInteger(x) ? String(x) : cents ? x.toFixed(2) : String(Math.round(x * 100) / 100); }
function money(col) { return col === "price" || col === "cost"; }

// The filter expression of the current selection, leaving out column ``except``.
function filterExpression(except) {
  const parts = [];
  for (const name of state.facetNames) {
    if (name === except) continue;
    const sel = state.selected[name];
    if (!sel || !sel.size) continue;
    const clauses = [...sel.values()].map((s) => s.clause);
    parts.push(clauses.length === 1 ? clauses[0] : "(" + clauses.join(" or ") + ")");
  }
  return parts.join(" and ");
}

function clauseFor(name, entry) {
  const col = quoteColumn(name);
  const f = state.columns[name];
  if (f.type === "bool") return entry.value ? col : `not ${col}`;
  if (f.type === "number") {
    // Ranges are [min, max), the column's last one [min, max] (see retrieval/facets.py).
    return `(${col} >= ${entry.min} and ${col} ${entry.last ? "<=" : "<"} ${entry.max})`;
  }
  return `${col} = ${quoteString(entry.value)}`;
}

function entryKey(name, entry) {
  return state.columns[name].type === "number" ? `${entry.min}|${entry.max}` : String(entry.value);
}

function entryLabel(name, entry) {
  const f = state.columns[name];
  if (f.type === "bool") return name === "in_stock" ? (entry.value ? "In stock" : "Out of stock") : `${titleCase(name)}: ${entry.value ? "yes" : "no"}`;
  if (f.type === "number") {
    const pre = money(name) ? "$" : "";
    return `${pre}${fmt(entry.min, pre)} – ${pre}${fmt(entry.max, pre)}`;
  }
  return String(entry.value);
}

function toggle(name, entry, on) {
  const sel = state.selected[name] || (state.selected[name] = new Map());
  const key = entryKey(name, entry);
  if (on) sel.set(key, { label: entryLabel(name, entry), clause: clauseFor(name, entry), entry });
  else sel.delete(key);
  state.offset = 0;
  renderChips();
  if (state.query) runSearch(false);
  else renderFacets();
}

function clearFilters() {
  state.selected = {};
  renderChips();
  if (state.query) runSearch(false); else renderFacets();
}

function activeCount() {
  return Object.values(state.selected).reduce((n, s) => n + s.size, 0);
}

function renderChips() {
  const box = $("chips");
  box.innerHTML = "";
  if (state.scope === "relevant" && state.total === 0 && activeCount() === 0) {
    box.innerHTML = `<p class="muted small">Filters count the products that match; nothing matches this search well.</p>`;
    return;
  }
  for (const name of state.facetNames) {
    const sel = state.selected[name];
    if (!sel) continue;
    for (const [key, s] of sel) {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button"; b.className = "chip";
      b.dataset.facet = name; b.dataset.key = key;
      b.setAttribute("aria-label", `Remove filter ${titleCase(name)}: ${s.label}`);
      b.innerHTML = `<span class="chip-col">${escapeHtml(titleCase(name))}:</span> ${escapeHtml(s.label)} <span aria-hidden="true" class="chip-close">×</span>`;
      b.addEventListener("click", () => toggle(name, s.entry, false));
      li.appendChild(b);
      box.appendChild(li);
    }
  }
  const n = activeCount();
  box.hidden = n === 0;
  $("clear-filters").hidden = n === 0;
}

// The entries to show for a column: the last answer's counts (per product, this query)
// or, before any search, the catalog-wide counts of GET /facets. Selected entries stay.
function entriesFor(name) {
  const f = state.columns[name];
  let list;
  if (state.counts && state.counts[name]) {
    list = state.counts[name].map((v) => ({ value: v.value, count: v.count, min: v.min, max: v.max, last: v.max != null && v.max >= f.max }));
  } else if (f.type === "string") {
    list = f.values.map((v, i) => ({ value: v, count: f.counts[i] }));
  } else if (f.type === "bool") {
    list = [{ value: true, count: null }];
  } else {
    list = [];
  }
  if (f.type === "bool") {
    // One box: "In stock (n)", n = products whose value is true.
    const yes = list.find((e) => e.value === true);
    list = [{ value: true, count: yes ? yes.count : state.counts ? 0 : null }];
  }
  const sel = state.selected[name];
  if (sel) {
    const have = new Set(list.map((e) => entryKey(name, e)));
    for (const [key, s] of sel) if (!have.has(key)) list.push(Object.assign({}, s.entry, { count: 0 }));
  }
  return list;
}

function renderFacets() {
  const box = $("facets");
  // Re-rendering must not throw keyboard users out of the panel: remember the box.
  const active = document.activeElement;
  const focused = active && active.closest && active.closest("#facets") && active.dataset.facet
    ? [active.dataset.facet, active.dataset.value] : null;
  box.innerHTML = "";
  for (const name of state.facetNames) {
    const f = state.columns[name];
    const entries = entriesFor(name);
    const sel = state.selected[name] || new Map();
    const fs = document.createElement("fieldset");
    fs.className = "facet";
    fs.dataset.facet = name;
    const legend = document.createElement("legend");
    legend.textContent = titleCase(name);
    fs.appendChild(legend);
    if (!entries.length) {
      const p = document.createElement("p");
      p.className = "muted small";
      p.textContent = "None in these results";
      fs.appendChild(p);
    }
    const swatch = f.type === "string" && (name === "colour" || name === "color");
    const list = document.createElement("div");
    list.className = swatch ? "swatches" : "options";
    entries.forEach((e, i) => {
      const key = entryKey(name, e);
      const id = `f-${name}-${i}`.replace(/[^A-Za-z0-9_-]/g, "_");
      const label = document.createElement("label");
      label.className = swatch ? "swatch" : "option";
      const cb = document.createElement("input");
      cb.type = "checkbox"; cb.id = id;
      cb.checked = sel.has(key);
      cb.dataset.facet = name; cb.dataset.value = key;
      cb.disabled = e.count === 0 && !cb.checked;
      cb.addEventListener("change", () => toggle(name, e, cb.checked));
      label.appendChild(cb);
      if (swatch) {
        const dot = document.createElement("i");
        dot.style.background = COLOURS[String(e.value).toLowerCase()] || "#ccc";
        dot.setAttribute("aria-hidden", "true");
        label.appendChild(dot);
      }
      const text = document.createElement("span");
      text.className = "option-label";
      text.textContent = entryLabel(name, e);
      label.appendChild(text);
      if (e.count != null) {
        const c = document.createElement("span");
        c.className = "count";
        c.textContent = e.count.toLocaleString();
        c.setAttribute("aria-label", `${e.count} product${e.count === 1 ? "" : "s"}`);
        label.appendChild(c);
      }
      list.appendChild(label);
    });
    fs.appendChild(list);
    box.appendChild(fs);
  }
  if (!state.facetNames.length) box.innerHTML = `<p class="muted">This index has no filterable columns.</p>`;
  if (focused) {
    const again = [...box.querySelectorAll("input[data-facet]")].find((el) => el.dataset.facet === focused[0] && el.dataset.value === focused[1]);
    if (again) again.focus();
  }
}

function chooseFacets(columns) {
  return Object.keys(columns)
    .filter((n) => !HIDDEN_FACETS.has(n))
    .filter((n) => {
      const f = columns[n];
      if (f.type === "string") return f.values && f.values.length >= 2 && f.values.length <= MAX_MENU;
      return f.type === "bool" || f.type === "number";
    })
    .sort((a, b) => (ORDER.indexOf(a) + 1 || 99) - (ORDER.indexOf(b) + 1 || 99) || a.localeCompare(b));
}

function renderSortOptions(columns) {
  const sel = $("sort");
  const opts = [["", "Relevance"]];
  if (columns.price && columns.price.type === "number") opts.push(["price:asc", "Price: low to high"], ["price:desc", "Price: high to low"]);
  const dates = Object.keys(columns).filter((n) => columns[n].type === "date");
  const newest = dates.find((n) => /created|added|date|updated|published/.test(n)) || dates[0];
  if (newest) opts.push([`${newest}:desc`, "Newest"]);
  if (columns.rating && columns.rating.type === "number") opts.push(["rating:desc", "Rating"]);
  sel.innerHTML = "";
  for (const [v, label] of opts) {
    const o = document.createElement("option");
    o.value = v; o.textContent = label;
    sel.appendChild(o);
  }
  sel.value = state.sort;
}

async function loadFacets() {
  try {
    const body = await api("/facets");
    state.columns = body.columns;
    state.facetNames = chooseFacets(body.columns);
    renderSortOptions(body.columns);
    renderFacets();
  } catch (e) {
    if (!(e instanceof Offline)) $("facets").innerHTML = `<p class="muted">Filters unavailable: ${escapeHtml(e.message)}</p>`;
  }
}

// ------------------------------------------------------------------ search

function queryFields(q) {
  if (q.kind === "text") return { text: q.text };
  if (q.kind === "image") return { photo: q.file };
  if (q.kind === "like") return { like_doc: q.like };
  // "refine": the photo (or product) plus words: "like this, but blue".
  if (q.base.kind === "image") return { photo: q.base.file, text: q.text };
  return { terms: [{ like_doc: q.base.like }, { text: q.text }] };
}

// ------------------------------------------------------------------ search modes

const MODES = [
  // [value sent as `mode` ("" = the server's default), label, what it does]
  ["", "Smart", "Words and looks combined (hybrid search): brands, product codes and descriptions"],
  ["lexical", "Words", "Exact words only (lexical search): brand names, product codes, titles"],
  ["vector", "Looks", "Visual similarity only (vector search): what the products look like"],
];

function hasWords(q) { return q && (q.kind === "text" || q.kind === "refine"); }

// The search modes the rows this page searches offer (GET /info); [] when unknown.
function offeredModes() {
  const info = state.info;
  if (!info) return [];
  const m = info.modalities[info.default_modality];
  return m ? m.modes : [];
}

function renderModes() {
  const box = $("mode");
  const offered = offeredModes();
  const words = offered.includes("lexical");
  // Without a lexical part there is nothing to choose: the control stays hidden and says why.
  box.hidden = !words;
  box.dataset.reason = words ? "" : "This index cannot match words (no lexical index): searches compare looks only.";
  if (!words) { state.mode = ""; return; }
  const applies = !state.query || hasWords(state.query);
  box.querySelectorAll("input").forEach((el) => {
    el.checked = el.value === state.mode;
    el.disabled = !applies;
  });
  box.title = applies ? "" : "Search modes apply to searches with words; a photo is matched by its looks.";
  box.classList.toggle("off", !applies);
}

function buildModes() {
  const box = $("mode");
  box.innerHTML = `<span class="mode-label" id="mode-label">Match</span>`;
  for (const [value, label, what] of MODES) {
    const lab = document.createElement("label");
    lab.className = "mode-opt";
    lab.title = what;
    const input = document.createElement("input");
    input.type = "radio"; input.name = "mode"; input.value = value;
    input.setAttribute("aria-describedby", `mode-desc-${value || "smart"}`);
    input.addEventListener("change", () => { if (input.checked) { state.mode = value; rerun(); } });
    const span = document.createElement("span");
    span.textContent = label;
    const desc = document.createElement("span");
    desc.className = "visually-hidden"; desc.id = `mode-desc-${value || "smart"}`;
    desc.textContent = what;
    lab.append(input, span, desc);
    box.appendChild(lab);
  }
}

async function loadInfo() {
  try {
    state.info = await api("/info");
  } catch (e) {
    state.info = null;  // an older server: no selector, the server's defaults
  }
  renderModes();
}

function queryModality(q) {
  return q.kind === "text" ? "text" : "image";  // what the server calibrates a cutoff for
}

function searchBody(offset, where, facets) {
  const req = Object.assign({ k: PAGE, offset, group_by_doc: true }, queryFields(state.query));
  if (where) req.filter = where;
  const mode = hasWords(state.query) && offeredModes().includes("lexical") ? state.mode : "";
  if (mode) req.mode = mode;
  if (state.sort) {
    req.sort = state.sort;
    // Sort the relevant products only (not the whole catalogue by price). The cutoff is
    // a cosine: Words mode returns word matches only and needs none (its scores are BM25).
    const cutoff = state.cutoffs[queryModality(state.query)];
    if (cutoff != null && mode !== "lexical") req.min_score = cutoff;
  }
  if (facets && facets.length) req.facets = facets;
  const q = state.query;
  if (q.kind === "refine" && q.base.kind === "like") {
    // like_doc leaves its own product out; a refined one must too.
    const self = `doc_id != ${quoteString(q.base.like)}`;
    req.filter = req.filter ? `${req.filter} and ${self}` : self;
  }
  return req;
}

async function runSearch(append) {
  if (!state.query) return;
  renderModes();
  if (!append) { state.offset = 0; state.showWeak = false; }
  const seq = ++state.seq;
  const where = filterExpression(null);
  $("error").hidden = true;
  document.body.classList.add("busy");
  $("results").setAttribute("aria-busy", "true");
  try {
    const countable = state.facetNames.filter((n) => state.columns[n].type !== "date");
    const main = postSearch(searchBody(state.offset, where, append ? [] : countable));
    // Columns with a selection: their counts without their own selection.
    const own = append ? [] : state.facetNames.filter((n) => state.selected[n] && state.selected[n].size);
    const side = own.map((n) => {
      const req = searchBody(0, filterExpression(n), [n]);
      req.k = 1;
      return postSearch(req).then((b) => [n, b.facets[n]], () => [n, null]);
    });
    const body = await main;
    const extra = await Promise.all(side);
    if (seq !== state.seq) return;  // a newer search was started meanwhile
    if (!append) {
      state.counts = Object.assign({}, body.facets || {});
      for (const [n, values] of extra) if (values) state.counts[n] = values;
      state.total = body.total_products != null ? body.total_products : null;
      state.scope = body.facets_scope || null;
      state.cutoff = body.relevance_cutoff != null ? body.relevance_cutoff : null;
      if (state.cutoff != null && !state.sort) state.cutoffs[queryModality(state.query)] = state.cutoff;
      renderFacets();
    }
    state.hits = append ? state.hits.concat(body.hits) : body.hits;
    renderResults(body, append);
  } catch (e) {
    if (seq === state.seq) showError(e);
  } finally {
    if (seq === state.seq) {
      document.body.classList.remove("busy");
      $("results").setAttribute("aria-busy", "false");
    }
  }
}

function rerun() { if (state.query) runSearch(false); }

function showError(e) {
  if (e instanceof Offline) return;  // the offline banner says it
  const box = $("error");
  box.textContent = e.status === 429 ? "The server is busy right now; try again in a moment." : e.message;
  box.hidden = false;
  if (!state.hits.length) { $("results").innerHTML = ""; $("empty").hidden = true; }
}

function describeQuery(html) {
  const q = state.query;
  const esc = html ? escapeHtml : (s) => s;
  const b = (s) => (html ? `<b>${s}</b>` : s);
  if (q.kind === "text") return `“${esc(q.text)}”`;
  if (q.kind === "image") return "your photo";
  if (q.kind === "like") return `products like ${b(esc(q.label || q.like))}`;
  const base = q.base.kind === "image" ? "your photo" : b(esc(q.base.label || q.base.like));
  return `${base}, but “${esc(q.text)}”`;
}

function renderResults(body, append, keep) {
  const grid = $("results");
  const before = grid.children.length;
  // Paging and "weaker matches" keep the cards already shown (no image reloads).
  const old = new Map();
  if (append || keep) for (const el of grid.children) old.set(el.dataset.key, el);
  else revokeUrls();
  grid.innerHTML = "";
  state.offset += body.hits.length;
  const all = state.hits;
  const relevant = all.filter(isRelevant);
  const weak = all.length - relevant.length;
  // Below the cutoff a product is not a match: listed only on request, or when nothing
  // reaches it ("no good match": the closest products, marked weak).
  const noGood = state.cutoff != null && all.length > 0 && relevant.length === 0;
  const shown = state.showWeak || noGood ? all : relevant;
  shown.forEach((hit) => grid.appendChild(old.get(`${hit.doc_id}|${hit.row_id}`) || card(hit)));
  const n = shown.length;
  const filtered = activeCount() > 0;
  // Facets count products whose looks reach the cutoff; products holding every query
  // word (a SKU, a brand) are matches too, so never claim fewer than are listed.
  const total = state.total != null && state.scope === "relevant" ? Math.max(state.total, relevant.length) : state.total;
  let summary;
  if (!all.length) summary = "";
  else if (noGood) summary = `No good match for ${describeQuery(true)}${filtered ? " with these filters" : ""}`;
  else if (state.scope === "relevant" && total != null) summary = `<b>${total.toLocaleString()}</b> product${total === 1 ? "" : "s"} match ${describeQuery(true)}${filtered ? " with these filters" : ""}`;
  else if (total != null) summary = `Best matches for ${describeQuery(true)} among <b>${total.toLocaleString()}</b> product${total === 1 ? "" : "s"}${filtered ? " matching these filters" : ""}`;
  else summary = `Best matches for ${describeQuery(true)}`;
  $("summary").innerHTML = summary;
  $("notice").hidden = !noGood;
  if (noGood) $("notice").textContent = "Nothing in the catalogue is a confident match; these are the closest products. Try other words, a clearer photo, or fewer filters.";
  $("empty").hidden = all.length > 0;
  $("empty-clear").hidden = !(all.length === 0 && filtered);
  $("empty-hint").hidden = all.length === 0 && state.query != null;
  if (!all.length) $("empty-text").innerHTML = `No products match ${describeQuery(true)}${filtered ? " with these filters" : ""}.`;
  // Paging ends: a short page, every counted product shown, the server's depth limit,
  // or (relevant results only) the first product below the cutoff.
  const limit = total != null && (state.scope !== "relevant" || !(state.showWeak || noGood)) ? Math.min(total, MAX_OFFSET + 1) : MAX_OFFSET + 1;
  const full = body.hits.length === PAGE && state.offset < limit;
  const more = full && (state.showWeak || noGood || weak === 0);
  $("pager").hidden = all.length === 0;
  $("more").hidden = !more;
  $("weaker").hidden = !(weak > 0 && !state.showWeak && !noGood);
  $("page-status").textContent = more
    ? `Showing ${n.toLocaleString()}${total != null && !(state.scope === "relevant" && state.showWeak) ? ` of ${total.toLocaleString()}` : ""}`
    : `Showing all ${n.toLocaleString()} ${state.scope === "relevant" && !state.showWeak && !noGood ? "matching product" : "result"}${n === 1 ? "" : "s"}`;
  if (append && grid.children[before]) grid.children[before].querySelector("button").focus();
}

// A hit holding every word of the query (a brand, a product code) is a match even when
// its photo does not look like the words: CLIP cannot read names or codes.
function allWords(hit) { return Boolean(hit.explain && hit.explain.all_words); }
function isRelevant(hit) { return hit.relevant !== false || allWords(hit); }

function relevanceBadge(hit) {
  if (hit.relevant === true) return hit.rank === 1 ? "Best match" : "Good match";
  if (hit.relevant === false) return allWords(hit) ? "Matches your words" : "Weak match";
  return "";
}

// "Why this result": the scores behind the rank, for the curious (closed by default).
function explainBox(hit) {
  const x = hit.explain;
  if (!x) return null;
  const num = (v, d) => (typeof v === "number" ? v.toFixed(d) : "–");
  const side = (e, d) => (e ? `${num(e.score, d)} · ${e.rank != null ? `#${e.rank}` : "not listed"}` : "no match");
  // Words mode ranks by BM25 alone and encodes no query: no looks score to show.
  const rows = [
    ["Looks", "Vector search: cosine similarity and rank in the vector list",
      x.mode === "lexical" && !x.vector ? "not used" : side(x.vector, 3)],
    ["Words", "Lexical search: BM25 score and rank in the word list",
      x.mode === "vector" ? "not used" : side(x.lexical, 2)],
    ["Combined", "Fused score that orders the results",
      x.fusion !== "none" ? `${num(x.fused, 4)} (${x.fusion === "rrf" ? "RRF" : "weighted"})`
        : x.mode === "lexical" ? "words only" : "looks only"],
  ];
  if (x.all_words) rows.push(["All words", "The product's text holds every word of the query: ranked first", "yes"]);
  const det = document.createElement("details");
  det.className = "why";
  const sum = document.createElement("summary");
  sum.textContent = "Why this result";
  const panel = document.createElement("div");
  panel.className = "why-panel";
  const dl = document.createElement("dl");
  for (const [k, what, v] of rows) {
    const dt = document.createElement("dt"); dt.textContent = k; dt.title = what;
    const dd = document.createElement("dd"); dd.textContent = v;
    dl.append(dt, dd);
  }
  const mode = document.createElement("p");
  mode.className = "why-mode";
  mode.textContent = `Mode: ${x.mode === "hybrid" ? "Smart" : x.mode === "lexical" ? "Words" : "Looks"} (${x.mode})`;
  panel.append(dl, mode);
  det.append(sum, panel);
  return det;
}

function card(hit) {
  const m = hit.metadata || {};
  const el = document.createElement("article");
  el.className = "card";
  el.dataset.docId = hit.doc_id;
  el.dataset.key = `${hit.doc_id}|${hit.row_id}`;
  if (!isRelevant(hit)) el.classList.add("weak");
  const title = m.title || m.name || m.caption || hit.text || hit.doc_id;
  const sub = [m.brand, m.colour || m.color, m.category].filter(Boolean).join(" · ");
  const price = typeof m.price === "number" ? `$${m.price.toFixed(2)}` : "";
  const rating = typeof m.rating === "number" ? `★ ${m.rating.toFixed(1)}` : "";
  const badge = relevanceBadge(hit);
  el.innerHTML = `
    <div class="thumb"></div>
    <div class="card-body">
      <h3 class="title"></h3>
      <div class="meta"></div>
      <div class="row">
        <span class="price">${escapeHtml(price)}</span>
        ${rating ? `<span class="rating">${escapeHtml(rating)}</span>` : ""}
        ${m.in_stock === false ? '<span class="badge">out of stock</span>' : ""}
      </div>
      ${badge ? `<span class="match ${isRelevant(hit) ? "good" : "weak"}">${badge}</span>` : ""}
      <div class="actions">
        <button type="button" class="more-like">More like this</button>
        <button type="button" class="refine">Refine…</button>
      </div>
    </div>`;
  el.querySelector(".title").textContent = title;
  const why = explainBox(hit);
  if (why) el.querySelector(".actions").before(why);
  el.querySelector(".meta").textContent = sub;
  el.querySelector(".more-like").setAttribute("aria-label", `More like ${title}`);
  el.querySelector(".refine").setAttribute("aria-label", `Refine ${title} with words`);
  const thumb = el.querySelector(".thumb");
  if (hit.image_url) {
    const img = document.createElement("img");
    img.alt = title; img.loading = "lazy";
    setImage(img, hit.image_url, thumb);
    thumb.appendChild(img);
  } else {
    thumb.innerHTML = `<div class="noimg">${escapeHtml(hit.text || "no image")}</div>`;
  }
  const like = { kind: "like", like: hit.doc_id, label: title, thumb: hit.image_url };
  el.querySelector(".more-like").addEventListener("click", () => {
    state.query = like;
    showQueryImage(hit.image_url, `Photo of ${title}`);
    $("q").value = "";
    runSearch(false);
    window.scrollTo({ top: 0, behavior: "smooth" });
  });
  el.querySelector(".refine").addEventListener("click", () => {
    state.query = like;
    showQueryImage(hit.image_url, `Photo of ${title}`);
    $("q").value = "";
    $("q").focus();
    window.scrollTo({ top: 0, behavior: "smooth" });
  });
  return el;
}

function setImage(img, url, thumb) {
  img.onerror = () => { thumb.innerHTML = `<div class="noimg">image unavailable</div>`; };
  if (!state.apiKey) { img.src = url; return; }
  // <img> cannot send headers: fetch with the key and show a blob URL instead.
  fetch(url, { headers: headers() })
    .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(r.status))))
    .then((b) => { const u = URL.createObjectURL(b); state.objectUrls.push(u); img.src = u; })
    .catch(() => img.onerror());
}

function revokeUrls() { state.objectUrls.forEach((u) => URL.revokeObjectURL(u)); state.objectUrls = []; }

// ------------------------------------------------------------------ image input

function showQueryImage(src, alt) {
  $("query-image-preview").src = src || "";
  $("query-image-preview").alt = alt || "";
  $("query-image").hidden = !src;
  $("q").placeholder = src ? "Refine with words, e.g. “but blue”" : "Describe a product, e.g. “red striped shirt”, or add a photo";
}

function useImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    showError(new Error("That file is not an image; add a JPEG, PNG or WebP photo."));
    return;
  }
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(file);
  state.query = { kind: "image", file, label: file.name };
  showQueryImage(state.previewUrl, "Your photo");
  $("q").value = "";
  runSearch(false);
}

function clearImage() {
  showQueryImage(null);
  $("file").value = "";
  const q = state.query;
  if (!q) return;
  if (q.kind === "refine") { state.query = { kind: "text", text: q.text }; rerun(); return; }
  if (q.kind !== "text") state.query = null;
}

// ------------------------------------------------------------------ wiring

async function loadHealth() {
  const pill = $("index-status");
  try {
    const resp = await fetch("/health");
    const h = await resp.json();
    setOffline(false);
    if (resp.ok && h.status === "ok") {
      pill.textContent = `index v${h.index_version} · ${h.rows.toLocaleString()} rows`;
      pill.classList.add("ok");
      pill.classList.remove("down");
      return true;
    }
    pill.textContent = "index loading…";
    pill.classList.remove("ok");
    setTimeout(init, 1000);
    return false;
  } catch (e) {
    setOffline(true);
    return false;
  }
}

async function init() {
  if (await loadHealth()) await Promise.all([loadFacets(), loadInfo()]);
}

$("search-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("q").value.trim();
  const q = state.query;
  const base = q && (q.kind === "image" || q.kind === "like") ? q : q && q.kind === "refine" ? q.base : null;
  if (!text) {
    if (base) { state.query = base; runSearch(false); return; }
    showError(new Error("Type what you are looking for, or add a photo."));
    return;
  }
  state.query = base && !$("query-image").hidden ? { kind: "refine", base, text } : { kind: "text", text };
  if (state.query.kind === "text") showQueryImage(null);
  runSearch(false);
});
$("upload").addEventListener("click", () => $("file").click());
$("file").addEventListener("change", (ev) => useImage(ev.target.files[0]));
$("query-image-clear").addEventListener("click", () => { clearImage(); $("q").focus(); });
$("more").addEventListener("click", () => runSearch(true));
$("weaker").addEventListener("click", () => {
  state.showWeak = true;
  renderResults({ hits: [] }, false, true);
});
$("clear-filters").addEventListener("click", clearFilters);
$("empty-clear").addEventListener("click", clearFilters);
$("sort").addEventListener("change", () => { state.sort = $("sort").value; rerun(); });
$("apikey-save").addEventListener("click", () => {
  state.apiKey = $("apikey").value.trim();
  sessionStorage.setItem("clipsearch-api-key", state.apiKey);
  $("apikey-bar").hidden = true;
  init();
  rerun();
});

let dragDepth = 0;
window.addEventListener("dragenter", (ev) => { ev.preventDefault(); dragDepth++; $("drop-overlay").hidden = false; });
window.addEventListener("dragleave", () => { dragDepth = Math.max(0, dragDepth - 1); if (!dragDepth) $("drop-overlay").hidden = true; });
window.addEventListener("dragover", (ev) => ev.preventDefault());
window.addEventListener("drop", (ev) => {
  ev.preventDefault(); dragDepth = 0; $("drop-overlay").hidden = true;
  const file = ev.dataTransfer && ev.dataTransfer.files[0];
  if (file) useImage(file);
});

$("filters-toggle").addEventListener("click", () => {
  const aside = document.querySelector(".filters");
  const open = aside.classList.toggle("open");
  $("filters-toggle").setAttribute("aria-expanded", String(open));
});

$("empty").hidden = false;
buildModes();
init();
