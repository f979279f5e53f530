"""``GET /mpsd/``: a one-file status page over ``/mpsd/status`` for an operator's browser.

Self-contained on purpose: mpsd runs on GPU hosts that often reach no CDN, and a page with no
external assets, no build step and no framework keeps working (and reviewable) as one string.
The page polls the JSON every 2 s and renders it with ``textContent`` only, because fault
reasons carry raw log lines that must never be interpreted as HTML. Fields the JSON does not
have (older or newer daemons) are shown as a dash or left out, never an error.
"""

from __future__ import annotations

from aiohttp import web

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mpsd status</title>
<style>
:root { --fg:#1d2330; --muted:#667085; --line:#e4e7ec; --bg:#f6f7f9; --card:#fff;
  --ok:#12805c; --warn:#b54708; --bad:#c01048; --idle:#667085; --info:#175cd3; }
* { box-sizing:border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
  color:var(--fg); background:var(--bg); }
header { padding:14px 24px; background:#101828; color:#fff; display:flex; gap:18px;
  align-items:baseline; flex-wrap:wrap; }
header h1 { margin:0; font-size:18px; }
#summary { font-weight:600; }
#mode, #updated { color:#d0d5dd; font-size:12px; }
#error { display:none; margin:12px 24px 0; padding:8px 12px; border-radius:6px;
  background:#fef3f2; color:var(--bad); border:1px solid #fecdca; }
main { padding:16px 24px; display:grid; gap:16px;
  grid-template-columns:repeat(auto-fill, minmax(540px, 1fr)); }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px;
  padding:14px 16px; }
.g-failed { border-left:4px solid var(--bad); } .g-recovering, .g-backoff, .g-starting {
  border-left:4px solid var(--warn); }
.card h2 { margin:0; font-size:16px; display:flex; gap:10px; align-items:center; flex-wrap:wrap; }
.dev { color:var(--muted); font-weight:400; font-size:12px; font-family:ui-monospace, monospace; }
.badge { display:inline-block; padding:1px 9px; border-radius:999px; color:#fff; font-size:12px;
  font-weight:600; text-transform:uppercase; letter-spacing:.03em; background:var(--idle); }
.s-running { background:var(--ok); } .s-starting, .s-backoff { background:var(--warn); }
.s-recovering { background:#dc6803; } .s-failed { background:var(--bad); }
.s-stopped, .s-stopping { background:var(--idle); }
.reason { margin:6px 0 0; color:var(--muted); word-break:break-word; }
.facts { display:flex; gap:6px 18px; flex-wrap:wrap; margin:8px 0; font-size:13px; }
.facts b { font-weight:600; }
table { width:100%; border-collapse:collapse; margin-top:8px; font-size:13px; }
th { text-align:left; color:var(--muted); font-weight:500; border-bottom:1px solid var(--line);
  padding:4px 6px; }
td { border-bottom:1px solid var(--line); padding:4px 6px; vertical-align:top; }
td.mono { font-family:ui-monospace, monospace; font-size:12px; white-space:nowrap; }
.dot { display:inline-block; width:9px; height:9px; border-radius:50%; margin-right:5px;
  background:var(--bad); } .dot.on { background:var(--ok); }
.bar { position:relative; width:130px; height:14px; background:#eef0f3; border-radius:4px;
  overflow:hidden; display:inline-block; vertical-align:middle; }
.bar > span { position:absolute; left:0; top:0; bottom:0; background:var(--info); }
.bar-n { margin-left:6px; font-variant-numeric:tabular-nums; }
h3 { margin:12px 0 2px; font-size:13px; color:var(--muted); font-weight:600; }
.none { color:var(--muted); font-style:italic; }
</style>
</head>
<body>
<header><h1>mpsd</h1><span id="summary">loading…</span><span id="mode"></span>
<span id="updated"></span></header>
<div id="error"></div>
<main id="groups"></main>
<script>
"use strict";
const STATUS_URL = location.pathname.endsWith("/") ? "status" : location.pathname + "/status";
const INTERVAL_MS = 2000;

function el(tag, props, ...kids) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") node.className = v; else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v);
  }
  for (const kid of kids) {
    if (kid === null || kid === undefined) continue;
    node.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return node;
}
const dash = (v) => (v === null || v === undefined || v === "" ? "\\u2013" : v);
function ago(epoch) {
  if (typeof epoch !== "number") return dash(null);
  let s = Math.max(0, Math.round(Date.now() / 1000 - epoch));
  const parts = [];
  for (const [unit, n] of [["d", 86400], ["h", 3600], ["m", 60]]) {
    if (s >= n) { parts.push(Math.floor(s / n) + unit); s %= n; }
  }
  if (parts.length < 2) parts.push(s + "s");
  return parts.slice(0, 2).join(" ") + " ago";
}
const CLOCK = {month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
  second: "2-digit"};
const clock = (epoch) => typeof epoch === "number"
  ? new Date(epoch * 1000).toLocaleString(undefined, CLOCK) : dash(null);
const secs = (v) =>
  typeof v === "number" ? (v < 10 ? v.toFixed(2) : v.toFixed(1)) + " s" : dash(v);
function fact(label, value) { return el("span", {}, label + ": ", el("b", {}, dash(value))); }

function capOf(data, groups) {
  const cap = data.cap ?? data.max_inflight_per_engine
    ?? (data.proxy || {}).max_inflight_per_engine;
  if (typeof cap === "number" && cap > 0) return cap;
  let most = 1;
  for (const g of groups) for (const e of g.engines || []) most = Math.max(most, e.inflight || 0);
  return most;
}

function engineTable(engines, cap) {
  if (!engines.length) return el("p", {class: "none"}, "no engines");
  const rows = engines.map((e) => {
    const n = Number(e.inflight) || 0;
    const pct = Math.min(100, (100 * n) / cap);
    return el("tr", {class: "engine"},
      el("td", {class: "mono"}, dash(e.key)), el("td", {}, dash(e.model)),
      el("td", {class: "mono"}, dash(e.pid)), el("td", {class: "mono"}, dash(e.port)),
      el("td", {}, el("span", {class: "dot" + (e.ready ? " on" : "")}),
         e.ready ? "ready" : "not ready"),
      el("td", {}, el("span", {class: "bar", title: n + " in flight"},
                      el("span", {style: "width:" + pct + "%"})),
         el("span", {class: "bar-n"}, n)));
  });
  return el("table", {},
    el("thead", {}, el("tr", {}, ...["engine", "model", "pid", "port", "ready", "in flight"]
      .map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows));
}

function recoveryFacts(g) {
  // Recovery times may arrive as {phase: seconds} under any "recover…" key; show what is there.
  const out = [];
  for (const [key, value] of Object.entries(g)) {
    if (!/recover/i.test(key)) continue;
    if (value && typeof value === "object" && !Array.isArray(value)) {
      for (const [phase, s] of Object.entries(value)) out.push(fact(key + " " + phase, secs(s)));
    } else if (value !== null && value !== undefined) {
      out.push(fact(key, typeof value === "number" ? secs(value) : value));
    }
  }
  return out;
}

function historyTable(history) {
  if (!history.length) return el("p", {class: "none"}, "no restarts");
  const known = new Set(["at", "signal", "reason", "engine"]);
  const rows = history.slice().reverse().map((h) => {
    const extra = Object.entries(h).filter(([k]) => !known.has(k))
      .map(([k, v]) => k + "=" + (typeof v === "number" ? secs(v) : JSON.stringify(v))).join(" ");
    return el("tr", {class: "restart"},
      el("td", {}, clock(h.at)), el("td", {class: "mono"}, dash(h.signal)),
      el("td", {class: "mono"}, dash(h.engine)),
      el("td", {}, dash(h.reason), extra ? " (" + extra + ")" : ""));
  });
  return el("table", {},
    el("thead", {}, el("tr", {},
      ...["when", "signal", "engine", "reason"].map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows));
}

function groupCard(g, cap) {
  const state = String(g.state || "unknown").toLowerCase();
  const mps = g.mps;
  const facts = [fact("since", ago(g.since)), fact("restarts in window", g.restarts_in_window)];
  if (mps) {
    facts.push(fact("MPS pid", mps.pid));
    const status = mps.status ?? mps.server_status;  // not sent by every daemon version
    if (status !== undefined) facts.push(fact("MPS status", status));
    if (mps.clients !== undefined) facts.push(fact("MPS clients", mps.clients));
  } else if (mps === null) {
    facts.push(fact("MPS", "off"));
  }
  facts.push(...recoveryFacts(g));
  if (mps) facts.push(...recoveryFacts(mps));
  return el("section", {class: "card group g-" + state, "data-gpu": dash(g.gpu)},
    el("h2", {}, el("span", {class: "gpu-name"}, dash(g.gpu)),
       el("span", {class: "badge state s-" + state}, state),
       el("span", {class: "dev"}, "device " + dash(g.device) + " · " + dash(g.uuid))),
    el("p", {class: "reason"}, dash(g.reason)),
    el("div", {class: "facts"}, ...facts),
    el("h3", {}, "Engines"), engineTable(g.engines || [], cap),
    el("h3", {}, "Restart history"), historyTable(g.history || []));
}

function render(data) {
  const groups = Array.isArray(data.groups) ? data.groups : [];
  document.getElementById("summary").textContent = dash(data.status);
  const mode = data.mps || {};
  document.getElementById("mode").textContent =
    mode.reason || ("MPS " + (mode.enabled ? "on" : "off"));
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  const cap = capOf(data, groups);
  document.getElementById("groups").replaceChildren(...groups.map((g) => groupCard(g, cap)));
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message
    ? "Cannot read " + STATUS_URL + ": " + message + " (showing the last data)" : "";
  box.style.display = message ? "block" : "none";
}

async function tick() {
  try {
    const response = await fetch(STATUS_URL,
      {cache: "no-store", headers: {Accept: "application/json"}});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    showError(null);
  } catch (err) {
    showError(err && err.message ? err.message : String(err));
  } finally {
    setTimeout(tick, INTERVAL_MS);
  }
}
tick();
</script>
</body>
</html>
"""

_BODY = PAGE.encode()
_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Cache-Control": "no-store",
    # Inline script and style only, fetches to this origin only: nothing else can load.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
}


async def status_page_handler(request: web.BaseRequest) -> web.Response:
    """Serve the page (register it on ``GET /mpsd/``; it fetches ``/mpsd/status`` itself)."""
    return web.Response(body=_BODY, headers=_HEADERS)
