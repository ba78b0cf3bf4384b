// clipsearch search page: plain JS, no build step. Talks to the JSON API of this server.
"use strict";

const PAGE = 24;
const ORDER = ["category", "kind", "colour", "color", "price", "in_stock", "brand", "pattern", "material", "rating"];
const HIDDEN_FACETS = new Set(["view", "image_path"]);
const COLOURS = {
  red: "#dc1e1e", orange: "#f58c14", yellow: "#f0dc1e", green: "#28aa3c", blue: "#1e46dc",
  purple: "#8228aa", pink: "#f582be", brown: "#78461e", black: "#0f0f0f", white: "#fafafa",
  gray: "#808080", grey: "#808080", navy: "#1f2a5a", beige: "#e8dcc0", teal: "#138086",
};

const $ = (id) => document.getElementById(id);
const state = {
  apiKey: sessionStorage.getItem("clipsearch-api-key") || "",
  facets: {},
  query: null,      // {kind: "text"|"image"|"like", value, label}
  offset: 0,
  seq: 0,           // the latest search; answers to older ones are dropped
  hits: [],
  objectUrls: [],
};

// ------------------------------------------------------------------ API helpers

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.apiKey) h["X-API-Key"] = state.apiKey;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const resp = await fetch(path, opts);
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (resp.status === 401) $("apikey-bar").hidden = false;
  if (!resp.ok) {
    const err = (body && body.error) || {};
    const e = new Error(err.message || `HTTP ${resp.status}`);
    e.code = err.code || "http_error";
    e.status = resp.status;
    throw e;
  }
  return body;
}

// ------------------------------------------------------------------ filters

function quoteString(s) { return "'" + String(s).replace(/'/g, "''") + "'"; }
function quoteColumn(c) { return /^[A-Za-z_][A-Za-z0-9_]*$/.test(c) ? c : "`" + c.replace(/`/g, "``") + "`"; }

function filterExpression() {
  const parts = [];
  document.querySelectorAll("[data-facet]").forEach((el) => {
    const col = quoteColumn(el.dataset.facet);
    const kind = el.dataset.kind;
    if (kind === "select" && el.value) parts.push(`${col} = ${quoteString(el.value)}`);
    if (kind === "swatches") {
      const on = [...el.querySelectorAll("[aria-pressed=true]")].map((b) => quoteString(b.dataset.value));
      if (on.length === 1) parts.push(`${col} = ${on[0]}`);
      if (on.length > 1) parts.push(`${col} in (${on.join(", ")})`);
    }
    if (kind === "min" && el.value !== "") parts.push(`${col} >= ${Number(el.value)}`);
    if (kind === "max" && el.value !== "") parts.push(`${col} <= ${Number(el.value)}`);
    if (kind === "bool" && el.checked) parts.push(col);
  });
  return parts.join(" and ");
}

function titleCase(s) { return s.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase()); }

function renderFacets(columns) {
  const box = $("facets");
  box.innerHTML = "";
  const names = Object.keys(columns)
    .filter((n) => !HIDDEN_FACETS.has(n))
    .sort((a, b) => (ORDER.indexOf(a) + 1 || 99) - (ORDER.indexOf(b) + 1 || 99) || a.localeCompare(b));
  for (const name of names) {
    const f = columns[name];
    if (f.type === "string" && (!f.values || f.values.length < 2)) continue;
    const div = document.createElement("div");
    div.className = "facet";
    const h = document.createElement("h3");
    h.textContent = titleCase(name);
    div.appendChild(h);
    if (f.type === "string" && (name === "colour" || name === "color")) {
      const sw = document.createElement("div");
      sw.className = "swatches";
      sw.dataset.facet = name; sw.dataset.kind = "swatches";
      f.values.forEach((v) => {
        const b = document.createElement("button");
        b.type = "button"; b.className = "swatch"; b.dataset.value = v;
        b.setAttribute("aria-pressed", "false");
        b.innerHTML = `<i style="background:${COLOURS[v.toLowerCase()] || "#ccc"}"></i>`;
        b.appendChild(document.createTextNode(v));
        b.addEventListener("click", () => {
          b.setAttribute("aria-pressed", b.getAttribute("aria-pressed") === "true" ? "false" : "true");
          rerun();
        });
        sw.appendChild(b);
      });
      div.appendChild(sw);
    } else if (f.type === "string") {
      const sel = document.createElement("select");
      sel.dataset.facet = name; sel.dataset.kind = "select";
      sel.setAttribute("aria-label", titleCase(name));
      sel.innerHTML = `<option value="">Any</option>`;
      f.values.forEach((v, i) => {
        const o = document.createElement("option");
        o.value = v; o.textContent = `${v} (${f.counts[i]})`;
        sel.appendChild(o);
      });
      sel.addEventListener("change", rerun);
      div.appendChild(sel);
    } else if (f.type === "number") {
      const r = document.createElement("div");
      r.className = "range";
      for (const [kind, ph] of [["min", Math.floor(f.min)], ["max", Math.ceil(f.max)]]) {
        const inp = document.createElement("input");
        inp.type = "number"; inp.placeholder = ph; inp.step = "any";
        inp.dataset.facet = name; inp.dataset.kind = kind;
        inp.setAttribute("aria-label", `${titleCase(name)} ${kind}`);
        inp.addEventListener("change", rerun);
        r.appendChild(inp);
        if (kind === "min") { const s = document.createElement("span"); s.textContent = "–"; r.appendChild(s); }
      }
      div.appendChild(r);
    } else if (f.type === "bool") {
      const label = document.createElement("label");
      label.className = "check";
      const cb = document.createElement("input");
      cb.type = "checkbox"; cb.dataset.facet = name; cb.dataset.kind = "bool";
      cb.addEventListener("change", rerun);
      label.appendChild(cb);
      label.appendChild(document.createTextNode(name === "in_stock" ? "In stock only" : titleCase(name)));
      div.appendChild(label);
    }
    box.appendChild(div);
  }
  if (!box.children.length) box.innerHTML = `<p class="muted">This index has no filterable columns.</p>`;
}

async function loadFacets() {
  try {
    const body = await api("/facets");
    state.facets = body.columns;
    renderFacets(body.columns);
  } catch (e) {
    $("facets").innerHTML = `<p class="muted">Filters unavailable: ${escapeHtml(e.message)}</p>`;
  }
}

// ------------------------------------------------------------------ search

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

async function runSearch(append) {
  if (!state.query) return;
  if (!append) state.offset = 0;
  const seq = ++state.seq;
  const where = filterExpression();
  const started = performance.now();
  $("error").hidden = true;
  document.body.classList.add("busy");
  try {
    let body;
    if (state.query.kind === "image") {
      const form = new FormData();
      form.append("image", state.query.value, state.query.value.name || "query.jpg");
      form.append("k", String(PAGE));
      form.append("offset", String(state.offset));
      form.append("group_by_doc", "true");
      if (where) form.append("filter", where);
      body = await api("/search/image", { method: "POST", body: form });
    } else {
      const req = { k: PAGE, offset: state.offset, group_by_doc: true };
      if (state.query.kind === "text") req.text = state.query.value;
      else req.like_doc = state.query.value;
      if (where) req.filter = where;
      body = await api("/search", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(req),
      });
    }
    if (seq !== state.seq) return;  // a newer search was started meanwhile
    const roundTrip = performance.now() - started;
    state.hits = append ? state.hits.concat(body.hits) : body.hits;
    renderResults(body, roundTrip, append);
  } catch (e) {
    if (seq === state.seq) showError(e);
  } finally {
    if (seq === state.seq) document.body.classList.remove("busy");
  }
}

function rerun() { if (state.query) runSearch(false); }

function showError(e) {
  const box = $("error");
  box.textContent = e.status === 429 ? "The server is busy right now; try again in a moment." : e.message;
  box.hidden = false;
  if (!state.hits.length) { $("results").innerHTML = ""; $("empty").hidden = true; }
}

function describeQuery() {
  const q = state.query;
  if (q.kind === "text") return `“${escapeHtml(q.value)}”`;
  if (q.kind === "image") return "your photo";
  return `products like <b>${escapeHtml(q.label || q.value)}</b>`;
}

function renderResults(body, roundTrip, append) {
  const grid = $("results");
  if (!append) { revokeUrls(); grid.innerHTML = ""; }
  body.hits.forEach((hit) => grid.appendChild(card(hit)));
  const n = state.hits.length;
  const filtered = body.total_matches != null ? ` · ${body.total_matches} match the filters` : "";
  $("summary").innerHTML = n
    ? `<b>${n}</b> result${n === 1 ? "" : "s"} for ${describeQuery()} in <b id="took">${Math.round(roundTrip)} ms</b>` +
      ` <span class="muted">(server ${body.took_ms.toFixed(1)} ms · index v${body.index_version}${filtered})</span>`
    : "";
  $("empty").hidden = n > 0;
  if (!n) $("empty-text").innerHTML = `No products match ${describeQuery()}${filterExpression() ? " with these filters" : ""}.`;
  $("pager").hidden = body.hits.length < PAGE;
  state.offset += body.hits.length;
}

function card(hit) {
  const m = hit.metadata || {};
  const el = document.createElement("article");
  el.className = "card";
  el.dataset.docId = hit.doc_id;
  const title = m.title || m.name || m.caption || hit.text || hit.doc_id;
  const sub = [m.brand, m.colour || m.color, m.category].filter(Boolean).join(" · ");
  const price = typeof m.price === "number" ? `$${m.price.toFixed(2)}` : "";
  el.innerHTML = `
    <div class="thumb"></div>
    <div class="card-body">
      <div class="title"></div>
      <div class="meta"></div>
      <div class="row">
        <span class="price">${escapeHtml(price)}</span>
        ${m.in_stock === false ? '<span class="badge">out of stock</span>' : ""}
        <span class="score" title="similarity">${hit.score.toFixed(3)}</span>
      </div>
      <button type="button" class="more-like">More like this</button>
    </div>`;
  el.querySelector(".title").textContent = title;
  el.querySelector(".meta").textContent = sub;
  const thumb = el.querySelector(".thumb");
  if (hit.image_url) {
    const img = document.createElement("img");
    img.alt = title; img.loading = "lazy";
    setImage(img, hit.image_url, thumb);
    thumb.appendChild(img);
  } else {
    thumb.innerHTML = `<div class="noimg">${escapeHtml(hit.text || "no image")}</div>`;
  }
  el.querySelector(".more-like").addEventListener("click", () => {
    state.query = { kind: "like", value: hit.doc_id, label: title };
    clearImageChip();
    $("q").value = "";
    runSearch(false);
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

function useImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    showError(new Error("That file is not an image; drop a JPEG, PNG or WebP photo."));
    return;
  }
  state.query = { kind: "image", value: file };
  $("query-image-preview").src = URL.createObjectURL(file);
  $("query-image").hidden = false;
  $("q").value = "";
  runSearch(false);
}

function clearImageChip() { $("query-image").hidden = true; $("file").value = ""; }

// ------------------------------------------------------------------ wiring

async function loadHealth() {
  const pill = $("index-status");
  try {
    const h = await fetch("/health").then((r) => r.json());
    if (h.status === "ok") {
      pill.textContent = `index v${h.index_version} · ${h.rows.toLocaleString()} rows`;
      pill.classList.add("ok");
    } else {
      pill.textContent = "index loading…";
      setTimeout(init, 1000);
      return false;
    }
  } catch (e) { pill.textContent = "server unreachable"; return false; }
  return true;
}

async function init() {
  if (await loadHealth()) await loadFacets();
}

$("search-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("q").value.trim();
  if (!text) {
    if (state.query && state.query.kind !== "text") { runSearch(false); return; }
    showError(new Error("Type what you are looking for, or add a photo."));
    return;
  }
  clearImageChip();
  state.query = { kind: "text", value: text };
  runSearch(false);
});
$("upload").addEventListener("click", () => $("file").click());
$("file").addEventListener("change", (ev) => useImage(ev.target.files[0]));
$("query-image-clear").addEventListener("click", () => { clearImageChip(); state.query = null; });
$("more").addEventListener("click", () => runSearch(true));
$("clear-filters").addEventListener("click", () => { renderFacets(state.facets); rerun(); });
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
init();
