// The coordinator's live page: polls the REST API about once a second with the read token as a bearer.
// The token comes from the URL fragment (#token=...), which is then removed from the address bar, or from
// the form; it is kept in sessionStorage and never put in a URL, the page's text or a log.
"use strict";

const TOKEN_KEY = "zerowire.readToken";
const POLL_MS = 1000;
const STALE_BEATS = 3; // values from a heartbeat older than this many intervals are greyed out
const LATE_MS = 3000; // no answer from the coordinator for this long: everything shown is greyed out
const REQUEST_MS = 4000; // a request unanswered this long has failed
const EVENTS_SHOWN = 20;
const EVENT_PAGE = 500;
const SVG = "http://www.w3.org/2000/svg";

class Refused extends Error {}

const page = {
  token: null,
  timer: null,
  generation: 0, // bumped by every (re)start: an older loop's answers are dropped
  lastOk: 0,
  eventsAfter: 0,
  events: [],
};

const $ = (id) => document.getElementById(id);

function takeToken() {
  const fragment = new URLSearchParams(window.location.hash.replace(/^#/, ""));
  const given = fragment.get("token");
  if (given !== null) {
    history.replaceState(null, "", window.location.pathname + window.location.search);
    if (given) sessionStorage.setItem(TOKEN_KEY, given);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

async function api(path) {
  const response = await fetch(path, {
    headers: { Authorization: `Bearer ${page.token}` },
    cache: "no-store",
    signal: AbortSignal.timeout(REQUEST_MS),
  });
  if (response.status === 401 || response.status === 403) {
    throw new Refused(`the coordinator refused this token (${response.status}): enter the read token`);
  }
  if (!response.ok) throw new Error(`${path} answered ${response.status}`);
  return response.json();
}

// -- formatting -------------------------------------------------------------------------------------------
function seconds(value, digits = 3) {
  return value === null || value === undefined ? "–" : `${value.toFixed(digits)} s`;
}

function number(value, digits = 1) {
  return value === null || value === undefined ? "–" : value.toFixed(digits);
}

function bytes(n) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
}

function clock(unix) {
  return new Date(unix * 1000).toLocaleTimeString([], { hour12: false });
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

// -- the parts of the page --------------------------------------------------------------------------------
function showJob(status) {
  const job = status.job || {};
  $("job-id").textContent = job.job_id ?? "–";
  $("job-model").textContent = job.model ? `${job.model} on ${job.dataset}` : "–";
  $("epoch").textContent = status.epoch;
  $("phase").textContent = status.state;
  $("world-size").textContent = status.world_size;
  $("step").textContent = job.steps ? `${status.step} / ${job.steps}` : status.step;
  // the step and the phase come from the workers' reports: as old as the freshest live member's values
  const current = status.workers.some(
    (w) => w.state === "alive" && !w.restored && w.values_age_s <= staleAfter(status),
  );
  for (const id of ["step", "phase"]) {
    $(id).classList.toggle("stale", !current);
    $(id).title = current ? "" : "from values no live worker has refreshed lately";
  }
}

function staleAfter(status) {
  return STALE_BEATS * status.heartbeat_interval_s;
}

function workerRow(w, status, slowest) {
  const tr = document.createElement("tr");
  tr.dataset.workerId = w.worker_id;
  const stale = w.restored || w.values_age_s > staleAfter(status);
  if (stale) {
    tr.classList.add("stale");
    tr.title = w.restored
      ? `values from before the coordinator restarted, ${w.values_age_s.toFixed(1)} s old`
      : `values from a heartbeat ${w.values_age_s.toFixed(1)} s old`;
  }
  if (w.state !== "alive") tr.classList.add("gone");
  const age = `${w.values_age_s.toFixed(1)} s${w.restored ? " (before restart)" : ""}`;
  const lanes = Object.entries(w.bytes_by_lane || {})
    .map(([lane, n]) => `${lane} ${bytes(n)}`)
    .join(" · ");
  const cells = [
    ["worker", w.worker_id],
    ["host", w.host_id === w.host ? w.host : `${w.host_id} (${w.host})`],
    ["rank", w.rank ?? "–", "num"],
    ["state", w.state === "alive" ? w.worker_state : w.state],
    ["age", age, "num"],
    ["committed", w.committed_step < 0 ? "–" : w.committed_step, "num"],
    ["compute", seconds(w.compute_s), "num"],
    ["comm", seconds(w.comm_s), "num"],
    ["data-wait", seconds(w.data_wait_s), "num"],
    ["images", number(w.samples_per_s), "num"],
    ["lanes", lanes || "–"],
    ["straggler", w.straggler_ratio == null ? "–" : `${w.straggler_ratio.toFixed(2)}×`, "num"],
  ];
  for (const [col, text, cls] of cells) {
    const td = el("td", text, cls);
    td.dataset.col = col;
    if (col === "straggler" && w.straggler_ratio && slowest > 1) {
      const bar = el("span", null, "bar");
      bar.style.width = `${Math.round((30 * (w.straggler_ratio - 1)) / (slowest - 1))}px`;
      td.append(bar);
    }
    tr.append(td);
  }
  return tr;
}

function showWorkers(status) {
  const slowest = Math.max(1, ...status.workers.map((w) => w.straggler_ratio || 1));
  $("workers").tBodies[0].replaceChildren(...status.workers.map((w) => workerRow(w, status, slowest)));
  $("restored-note").hidden = !status.workers.some((w) => w.restored);
}

function showDiagnosis(found) {
  const box = $("diagnosis");
  const suspected = found.suspects.length > 0;
  box.className = suspected ? "alert" : "";
  const children = [];
  if (suspected) {
    const lead = el("p");
    lead.append(el("strong", "Hang suspected: "), found.summary);
    const list = el("ul");
    for (const s of found.suspects) {
      list.append(el("li", `${s.worker_id} (rank ${s.rank}, ${s.host}): ${s.reason}`));
    }
    children.push(lead, list);
  } else {
    children.push(el("p", `Diagnosis: ${found.summary}`));
  }
  box.replaceChildren(...children);
}

function axisLabel(x, y, text, anchor) {
  const t = document.createElementNS(SVG, "text");
  t.setAttribute("x", x);
  t.setAttribute("y", y);
  t.setAttribute("text-anchor", anchor);
  t.textContent = text;
  return t;
}

function drawChart(svg, points, value, format, dots) {
  const W = 480;
  const H = 220;
  const L = 52;
  const R = 12;
  const T = 12;
  const B = 30;
  const shown = points.filter((p) => value(p) !== null && value(p) !== undefined);
  svg.dataset.points = String(shown.length);
  const nodes = [];
  const axis = document.createElementNS(SVG, "polyline");
  axis.setAttribute("class", "axis");
  axis.setAttribute("points", `${L},${T} ${L},${H - B} ${W - R},${H - B}`);
  nodes.push(axis);
  if (shown.length === 0) {
    nodes.push(axisLabel(W / 2, H / 2, "no points yet", "middle"));
    svg.replaceChildren(...nodes);
    return;
  }
  const xs = shown.map((p) => p.step);
  const ys = shown.map(value);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y1 === y0) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  const sx = (x) => L + ((x - x0) / Math.max(1, x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  const line = document.createElementNS(SVG, "polyline");
  const coords = shown.map((p) => `${sx(p.step).toFixed(1)},${sy(value(p)).toFixed(1)}`);
  line.setAttribute("points", coords.join(" "));
  nodes.push(line);
  if (dots) {
    for (const p of shown) {
      const c = document.createElementNS(SVG, "circle");
      c.setAttribute("cx", sx(p.step).toFixed(1));
      c.setAttribute("cy", sy(value(p)).toFixed(1));
      c.setAttribute("r", "3");
      nodes.push(c);
    }
  }
  nodes.push(
    axisLabel(L - 6, T + 4, format(y1), "end"),
    axisLabel(L - 6, H - B, format(y0), "end"),
    axisLabel(L, H - B + 16, `step ${x0}`, "start"),
    axisLabel(W - R, H - B + 16, `step ${x1}`, "end"),
  );
  svg.replaceChildren(...nodes);
}

function showHistory(history) {
  drawChart($("loss-chart"), history.loss, (p) => p.loss, (v) => v.toFixed(3), false);
  drawChart($("accuracy-chart"), history.eval, (p) => p.test_accuracy, (v) => `${(100 * v).toFixed(1)}%`, true);
  const rows = history.formations.map((f) => {
    const tr = document.createElement("tr");
    const mode = f.modes.length > 1 ? `${f.mode} (${f.modes.join(", ")})` : f.mode;
    for (const [text, cls] of [
      [f.epoch, "num"],
      [mode],
      [f.resumed_at, "num"],
      [f.steps_lost, "num"],
      [seconds(f.seconds, 2), "num"],
      [f.workers, "num"],
    ]) {
      tr.append(el("td", text, cls));
    }
    return tr;
  });
  $("formations").tBodies[0].replaceChildren(...rows.reverse());
}

async function fetchEvents(generation) {
  for (let page_ = 0; page_ < 5; page_ += 1) {
    const got = await api(`events?after=${page.eventsAfter}&limit=${EVENT_PAGE}`);
    if (generation !== page.generation) return;
    page.events = page.events.concat(got.events).slice(-EVENTS_SHOWN);
    page.eventsAfter = got.last_id;
    if (got.events.length < EVENT_PAGE) break;
  }
}

function showEvents(now) {
  const items = page.events
    .slice()
    .reverse()
    .map((e) => {
      const li = el("li");
      li.append(
        el("span", `${clock(e.time)} (${Math.max(0, now - e.time).toFixed(0)} s ago)`, "when"),
        el("span", e.kind, "kind"),
        e.reason,
      );
      return li;
    });
  $("events").replaceChildren(...items);
}

// -- the loop -------------------------------------------------------------------------------------------
function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function freshness() {
  const line = $("freshness");
  if (!page.lastOk) {
    line.textContent = "";
    return;
  }
  const late = Date.now() - page.lastOk;
  const offline = late > LATE_MS;
  $("data").classList.toggle("offline", offline);
  line.classList.toggle("late", offline);
  line.textContent = offline
    ? `no answer from the coordinator for ${(late / 1000).toFixed(0)} s: what is shown is old`
    : `updated ${clock(page.lastOk / 1000)}`;
}

function askForToken(message) {
  clearTimeout(page.timer);
  page.generation += 1;
  page.token = null;
  page.lastOk = 0;
  sessionStorage.removeItem(TOKEN_KEY);
  $("data").hidden = true;
  $("workers").tBodies[0].replaceChildren();
  $("formations").tBodies[0].replaceChildren();
  $("events").replaceChildren();
  $("diagnosis").replaceChildren();
  page.events = [];
  page.eventsAfter = 0;
  freshness();
  showError(message);
  $("login").hidden = false;
  $("token-input").focus();
}

async function refresh(generation) {
  try {
    const [status, diagnosis, history] = await Promise.all([
      api("cluster/status"),
      api("cluster/diagnosis"),
      api("cluster/history"),
    ]);
    await fetchEvents(generation);
    if (generation !== page.generation) return;
    showJob(status);
    showWorkers(status);
    showDiagnosis(diagnosis);
    showHistory(history);
    showEvents(status.now);
    page.lastOk = Date.now();
    $("data").hidden = false;
    showError(null);
  } catch (err) {
    if (generation !== page.generation) return;
    if (err instanceof Refused) {
      askForToken(err.message);
      return;
    }
    showError(`cannot read the coordinator: ${err.message}`);
  }
  freshness();
  page.timer = setTimeout(() => refresh(generation), POLL_MS);
}

function start(token) {
  clearTimeout(page.timer);
  page.generation += 1;
  page.token = token;
  page.events = [];
  page.eventsAfter = 0;
  $("login").hidden = true;
  refresh(page.generation);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("token-input");
    const token = input.value.trim();
    input.value = "";
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    showError(null);
    start(token);
  });
  setInterval(freshness, 500);
  window.addEventListener("hashchange", () => {
    // an address with another token pasted into this tab: take it (and clear it from the address bar)
    if (!new URLSearchParams(window.location.hash.replace(/^#/, "")).has("token")) return;
    const given = takeToken();
    if (given) start(given);
  });
  const token = takeToken();
  if (token) start(token);
  else askForToken(null);
});
