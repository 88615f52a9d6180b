// The live dashboard: polls /v1/admin/dashboard (and /metrics, when the server has it) once a
// second and draws each live sale. Rates come from the difference between successive polls.
"use strict";

const TOKEN_KEY = "flashsale.admin-token";
const POLL_MS = 1000;
// No poll may hang the page: a server that does not answer within this is reported as such.
const FETCH_TIMEOUT_MS = 5000;
// Rates are taken over the last few polls, so one late poll does not make the figure jump.
const RATE_WINDOW = 5;
const SPARK_POINTS = 120;
const ORDER_ROUTE = "/v1/sales/{sale_id}/orders";

// --- Prometheus text format ------------------------------------------------------------------

// One sample line: name, optional {labels}, value, optional timestamp.
const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$/;
const LABEL = /\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?/y;

function parseLabels(text) {
  const labels = {};
  LABEL.lastIndex = 0;
  while (LABEL.lastIndex < text.length) {
    const at = LABEL.lastIndex;
    const match = LABEL.exec(text);
    if (match === null) {
      if (text.slice(at).trim() === "") break;
      throw new Error("bad labels: " + text);
    }
    labels[match[1]] = match[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
  }
  return labels;
}

function parseValue(text) {
  if (text === "+Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  return Number(text);
}

// [{name, labels, value}] of every sample; comments and blank lines are skipped, and a line
// that is not a sample is ignored rather than failing the whole page.
function parseMetrics(text) {
  const samples = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) continue;
    const match = SAMPLE.exec(line);
    if (match === null) continue;
    let labels;
    try {
      labels = match[2] ? parseLabels(match[2]) : {};
    } catch (_) {
      continue;
    }
    samples.push({ name: match[1], labels, value: parseValue(match[3]) });
  }
  return samples;
}

function matches(labels, wanted) {
  return Object.entries(wanted).every(([k, v]) => labels[k] === v);
}

// Cumulative bucket counts of a histogram by upper bound, summed over the series that match
// (a histogram may also be split by, say, status).
function histogramBuckets(samples, name, wanted) {
  const buckets = new Map();
  for (const s of samples) {
    if (s.name !== name + "_bucket" || !matches(s.labels, wanted)) continue;
    const le = parseValue(s.labels.le);
    buckets.set(le, (buckets.get(le) || 0) + s.value);
  }
  return buckets;
}

function counterSum(samples, name, wanted) {
  let total = null;
  for (const s of samples) {
    if (s.name === name && matches(s.labels, wanted)) total = (total || 0) + s.value;
  }
  return total;
}

// The q-quantile of the observations made between two readings of a histogram's buckets, as
// Prometheus's histogram_quantile estimates it: linear within the bucket the rank falls in,
// and the highest finite bound when it falls in +Inf. null when nothing was observed.
function quantileBetween(before, after, q) {
  const bounds = [...after.keys()].sort((a, b) => a - b);
  const counts = bounds.map((le) => after.get(le) - (before.get(le) || 0));
  const total = counts.length ? counts[counts.length - 1] : 0;
  if (!(total > 0)) return null;
  const rank = q * total;
  for (let i = 0; i < bounds.length; i++) {
    if (counts[i] < rank) continue;
    if (bounds[i] === Infinity) return i > 0 ? bounds[i - 1] : null;
    const lower = i > 0 ? bounds[i - 1] : 0;
    const below = i > 0 ? counts[i - 1] : 0;
    const inBucket = counts[i] - below;
    return inBucket > 0 ? lower + ((bounds[i] - lower) * (rank - below)) / inBucket : bounds[i];
  }
  return null;
}

// --- formatting -------------------------------------------------------------------------------

function seconds(s) {
  if (s === null || !isFinite(s)) return "–";
  if (s < 1) return Math.round(s * 1000) + " ms";
  if (s < 120) return s.toFixed(1) + " s";
  if (s < 7200) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  return (s / 3600).toFixed(1) + " h";
}

function perSecond(rate) {
  return rate === null ? "–" : rate.toFixed(1) + "/s";
}

// --- state and drawing ------------------------------------------------------------------------

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  timer: null,
  // Bumped when the token changes: a poll still in flight for the old one draws nothing.
  generation: 0,
  sales: new Map(), // sale id -> {history: [{t, taken, available}], firstOrderMs, soldOutMs, ...}
  metrics: null, // {t, buckets, accepted} of the previous /metrics reading
};

const $ = (id) => document.getElementById(id);

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = message === "";
}

async function fetchWithin(url) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
  try {
    return await fetch(url, {
      headers: { Authorization: "Bearer " + state.token },
      cache: "no-store",
      signal: abort.signal,
    });
  } finally {
    clearTimeout(timer);
  }
}

function track(sale, nowMs) {
  let seen = state.sales.get(sale.sale_id);
  if (seen === undefined) {
    // Seen already taken from: the first order came before the page, at the opening at best.
    seen = { history: [], firstOrderMs: sale.taken > 0 ? sale.start_ms : null, soldOutMs: null,
             soldOutBeforePage: sale.available === 0 && sale.taken > 0 };
    state.sales.set(sale.sale_id, seen);
  }
  const last = seen.history[seen.history.length - 1];
  if (seen.firstOrderMs === null && sale.taken > 0) seen.firstOrderMs = last ? last.t : nowMs;
  if (sale.available === 0 && seen.soldOutMs === null && !seen.soldOutBeforePage) {
    seen.soldOutMs = nowMs;
  }
  if (sale.available > 0) { seen.soldOutMs = null; seen.soldOutBeforePage = false; }
  seen.history.push({ t: nowMs, taken: sale.taken, available: sale.available });
  if (seen.history.length > SPARK_POINTS) seen.history.shift();
  return seen;
}

function takenRate(history) {
  const window = history.slice(-RATE_WINDOW);
  if (window.length < 2) return null;
  const first = window[0], last = window[window.length - 1];
  const dt = (last.t - first.t) / 1000;
  return dt > 0 ? (last.taken - first.taken) / dt : null;
}

function sellOut(sale, seen, rate) {
  if (sale.available === 0) {
    if (seen.soldOutMs !== null && seen.firstOrderMs !== null) {
      return ["Sold out in", seconds((seen.soldOutMs - seen.firstOrderMs) / 1000)];
    }
    return ["Sold out", "yes"];
  }
  if (rate !== null && rate > 0) return ["Sells out in (at this rate)", seconds(sale.available / rate)];
  return ["Time to sell out", "–"];
}

function card(id) {
  let section = document.querySelector(`section.sale[data-sale-id="${CSS.escape(id)}"]`);
  if (section === null) {
    section = $("sale-template").content.firstElementChild.cloneNode(true);
    section.dataset.saleId = id;
    $("sales").appendChild(section);
  }
  return section;
}

function drawSale(sale, nowMs) {
  const seen = track(sale, nowMs);
  const section = card(sale.sale_id);
  const put = (field, text) => { section.querySelector(`[data-field="${field}"]`).textContent = text; };
  const rate = takenRate(seen.history);
  const [label, value] = sellOut(sale, seen, rate);
  put("name", sale.name);
  put("id", sale.sale_id);
  put("phase", sale.phase);
  section.querySelector(".phase").className = "phase " + sale.phase;
  put("available", String(sale.available));
  put("held", String(sale.held));
  put("sold", String(sale.sold));
  put("initial", String(sale.initial));
  put("rate", perSecond(rate));
  put("sellout-label", label);
  put("sellout", value);
  put("outbox", `${sale.outbox_length} (${sale.outbox_pending})`);
  put("lag", seconds(sale.ledger_lag_ms / 1000));
  put("holds-due", String(sale.holds_due));
  put("failed", String(sale.payments_failed));
  put("refunds", String(sale.refunds_owed));
  put("cancels", String(sale.cancels_owed));
  const whole = Math.max(sale.initial, sale.available + sale.taken, 1);
  for (const part of ["sold", "held", "withdrawn"]) {
    section.querySelector(".bar ." + part).style.width = (100 * sale[part]) / whole + "%";
  }
  const points = seen.history.map((h, i) =>
    `${(240 * i) / (SPARK_POINTS - 1)},${40 - (38 * h.available) / whole - 1}`);
  section.querySelector("svg.spark polyline").setAttribute("points", points.join(" "));
}

function drawDashboard(body) {
  $("server-time").textContent = new Date(body.server_time_ms).toISOString().slice(11, 19) + "Z";
  const live = new Set(body.sales.map((s) => s.sale_id));
  for (const section of document.querySelectorAll("section.sale")) {
    if (!live.has(section.dataset.saleId)) section.remove();
  }
  for (const sale of body.sales) drawSale(sale, body.server_time_ms);
  if (body.sales.length === 0) $("status").textContent = "No live sales.";
  else $("status").textContent = `Watching ${body.sales.length} live sale(s), every second.`;
}

async function pollMetrics() {
  let response;
  try {
    response = await fetchWithin("/metrics");
  } catch (_) {
    return "/metrics did not answer";
  }
  if (!response.ok) {
    state.metrics = null;
    $("route-p99").textContent = "n/a";
    $("order-rate").textContent = "n/a";
    return response.status === 404
      ? "This server has no /metrics: latency and order rate are n/a."
      : `/metrics answered ${response.status}: latency and order rate are n/a.`;
  }
  const samples = parseMetrics(await response.text());
  const now = { t: performance.now(),
    buckets: histogramBuckets(samples, "flashsale_http_request_duration_seconds",
      { route: ORDER_ROUTE, method: "POST" }),
    accepted: counterSum(samples, "flashsale_orders_total", { outcome: "accepted" }) };
  const before = state.metrics;
  state.metrics = now;
  if (before === null) return "Read /metrics once; rates need a second reading.";
  const p99 = quantileBetween(before.buckets, now.buckets, 0.99);
  $("route-p99").textContent = p99 === null ? "no orders" : seconds(p99);
  const dt = (now.t - before.t) / 1000;
  const rate = now.accepted === null || before.accepted === null || dt <= 0
    ? null : (now.accepted - before.accepted) / dt;
  $("order-rate").textContent = rate === null ? "n/a" : perSecond(rate);
  return "Latency and order rate: from /metrics, over the last second.";
}

async function poll() {
  state.timer = null;
  if (state.token === "") return;
  const generation = state.generation;
  let response;
  try {
    response = await fetchWithin("/v1/admin/dashboard");
  } catch (_) {
    if (generation !== state.generation) return;
    showError("The server did not answer; retrying.");
    return schedule();
  }
  if (generation !== state.generation) return;
  if (response.status === 401 || response.status === 403) {
    let code = "";
    try { code = (await response.json()).code || ""; } catch (_) { /* not problem+json */ }
    showError(`The server refused this token (${response.status} ${code}). Enter an admin ` +
      "token or an API key allowed to read sales (sales:read).");
    $("status").textContent = "Not watching.";
    return; // No retry with a credential that was refused: wait for another one.
  }
  if (!response.ok) {
    showError(`The dashboard answered ${response.status}; retrying.`);
    return schedule();
  }
  const body = await response.json();
  if (generation !== state.generation) return;
  showError("");
  drawDashboard(body);
  const note = await pollMetrics();
  if (generation !== state.generation) return;
  $("metrics-note").textContent = note;
  schedule();
}

function schedule() {
  if (state.timer === null && state.token !== "") state.timer = setTimeout(poll, POLL_MS);
}

function restart() {
  if (state.timer !== null) clearTimeout(state.timer);
  state.timer = null;
  state.generation += 1;
  state.sales.clear();
  state.metrics = null;
  for (const section of document.querySelectorAll("section.sale")) section.remove();
  poll();
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token").value.trim();
  $("token").value = "";
  sessionStorage.setItem(TOKEN_KEY, state.token);
  $("status").textContent = "Connecting…";
  restart();
});

$("forget").addEventListener("click", () => {
  state.token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  showError("");
  restart();
  $("status").textContent = "Enter the admin token to start.";
});

// For the browser test, which checks the parser and the quantile on known inputs.
window.flashsaleDashboard = { parseMetrics, histogramBuckets, counterSum, quantileBetween };

if (state.token !== "") restart();
