// kitepipe dashboard: /api/history once, then /api/live (server-sent
// events, a status snapshot every second). No dependencies.
"use strict";

const HOUR = 3600;
const history = {}; // kite -> [{t, rps, bin, bout, open}]
let lastStatus = null;

function fmtBytes(n) {
  if (n == null || isNaN(n)) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? Math.round(n) : n.toFixed(1)) + " " + units[i];
}
function fmtNum(n) {
  if (n == null || isNaN(n)) return "-";
  if (n >= 100) return Math.round(n).toLocaleString("en");
  return (Math.round(n * 10) / 10).toString();
}
function fmtAge(seconds) {
  if (seconds == null) return "-";
  if (seconds < 60) return seconds + "s";
  if (seconds < 3600) return Math.floor(seconds / 60) + "m";
  if (seconds < 86400) return Math.floor(seconds / 3600) + "h " + Math.floor(seconds % 3600 / 60) + "m";
  return Math.floor(seconds / 86400) + "d " + Math.floor(seconds % 86400 / 3600) + "h";
}
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}
function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit", second: "2-digit"});
}

function addSamples(kite, samples) {
  const ring = history[kite] || (history[kite] = []);
  for (const s of samples) {
    if (ring.length && ring[ring.length - 1].t >= s.t) continue;
    ring.push(s);
  }
  const cutoff = (ring.length ? ring[ring.length - 1].t : 0) - HOUR;
  while (ring.length && ring[0].t < cutoff) ring.shift();
}

// Draws series (arrays of {t, v}) as lines over the last hour.
function draw(canvas, series, colors, fill) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 360, h = canvas.clientHeight || 70;
  canvas.width = w * ratio; canvas.height = h * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, w, h);
  let max = 0, tMax = 0, tFirst = Infinity, points = 0;
  for (const s of series) for (const p of s) {
    max = Math.max(max, p.v); tMax = Math.max(tMax, p.t); tFirst = Math.min(tFirst, p.t); points++;
  }
  // The x axis spans the history there is, up to an hour.
  const span = Math.min(HOUR, Math.max(10, tMax - tFirst));
  const tMin = tMax - span;
  max = max > 0 ? max * 1.15 : 1;
  g.strokeStyle = "#263049"; g.lineWidth = 1;
  for (let i = 1; i < 4; i++) { const y = Math.round(h * i / 4) + .5; g.beginPath(); g.moveTo(0, y); g.lineTo(w, y); g.stroke(); }
  series.forEach((s, i) => {
    if (!s.length) return;
    const x = t => (t - tMin) / span * w, y = v => h - 2 - v / max * (h - 6);
    g.beginPath();
    s.forEach((p, j) => j ? g.lineTo(x(p.t), y(p.v)) : g.moveTo(x(p.t), y(p.v)));
    g.strokeStyle = colors[i]; g.lineWidth = 1.6; g.stroke();
    if (fill) {
      g.lineTo(x(s[s.length - 1].t), h); g.lineTo(x(s[0].t), h); g.closePath();
      g.globalAlpha = .15; g.fillStyle = colors[i]; g.fill(); g.globalAlpha = 1;
    }
  });
  canvas.dataset.points = String(points);
  canvas.dataset.span = String(span);
  canvas.dataset.max = String(max);
}

function chart(name, title, legend) {
  const canvas = el("canvas", {"data-chart": name, "data-points": "0"});
  return el("div", {class: "chart"}, el("div", {class: "title"}, el("span", {}, title), legend), canvas);
}

function kiteCard(kite) {
  const card = el("div", {class: "card kite", "data-kite": kite.name},
    el("h3", {}, el("span", {class: "name"}, kite.name + (kite.port ? ":" + kite.port : "")),
      el("span", {class: "pill proto"}, kite.proto), el("span", {class: "pill state"}, "")),
    el("div", {class: "meta"}, ""),
    el("div", {class: "nums"},
      el("div", {}, el("span", {}, "requests"), el("b", {class: "requests"}, "-")),
      el("div", {}, el("span", {}, "req/s"), el("b", {class: "rps"}, "-")),
      el("div", {}, el("span", {}, "open"), el("b", {class: "open"}, "-")),
      el("div", {}, el("span", {}, "in / out"), el("b", {class: "bytes"}, "-"))),
    chart("rps", "requests/s", el("span", {class: "legend-rps"}, "● req/s")),
    chart("bytes", "bytes/s", el("span", {}, el("span", {class: "legend-in"}, "● in "), el("span", {class: "legend-out"}, "● out"))),
    chart("open", "open connections", el("span", {class: "legend-open"}, "● open")));
  return card;
}

function renderKites(status) {
  const box = document.getElementById("kites");
  const kites = status.kites || [];
  if (!kites.length) { if (!box.querySelector(".empty")) box.replaceChildren(el("p", {class: "empty"}, "No kites yet.")); return; }
  box.querySelector(".empty")?.remove();
  const seen = new Set();
  for (const kite of kites) {
    const key = kite.name;
    seen.add(key);
    let card = [...box.children].find(c => c.dataset.kite === key);
    if (!card) { card = kiteCard(kite); box.append(card); }
    const state = card.querySelector(".state");
    state.textContent = kite.online ? "online" : "offline";
    state.className = "pill state " + (kite.online ? "online" : "offline");
    card.querySelector(".meta").textContent = kite.backends && kite.backends.length
      ? "served by " + kite.backends.join(", ") : "no connector serving it";
    const t = kite.totals || {};
    const ring = history[key] || [];
    const last = ring[ring.length - 1] || {};
    card.querySelector(".requests").textContent = fmtNum(t.requests);
    card.querySelector(".rps").textContent = fmtNum(last.rps || 0);
    card.querySelector(".open").textContent = fmtNum(t.open);
    card.querySelector(".bytes").textContent = fmtBytes(t.bytes_in) + " / " + fmtBytes(t.bytes_out);
    draw(card.querySelector('[data-chart="rps"]'), [ring.map(s => ({t: s.t, v: s.rps}))], ["#5aa9ff"], true);
    draw(card.querySelector('[data-chart="bytes"]'), [ring.map(s => ({t: s.t, v: s.bin})), ring.map(s => ({t: s.t, v: s.bout}))], ["#43d39e", "#ffb547"], false);
    draw(card.querySelector('[data-chart="open"]'), [ring.map(s => ({t: s.t, v: s.open}))], ["#c38bff"], true);
  }
  for (const card of [...box.children]) if (card.dataset.kite && !seen.has(card.dataset.kite)) card.remove();
}

function renderLog(id, notes, render) {
  const list = document.getElementById(id);
  if (!notes || !notes.length) { list.replaceChildren(el("li", {class: "empty"}, "None.")); return; }
  list.replaceChildren(...notes.slice().reverse().map(render));
}

function render(status) {
  lastStatus = status;
  document.getElementById("role").textContent = status.role || "?";
  document.getElementById("node").textContent = status.node || "";
  document.getElementById("version").textContent = "v" + (status.version || "?");
  document.getElementById("uptime").textContent = fmtAge(status.uptime_s);
  document.title = "kitepipe · " + (status.node || "");
  for (const [kite, samples] of Object.entries(status.latest || {})) addSamples(kite, samples);
  const kites = status.kites || [];
  document.getElementById("kites-online").textContent = kites.filter(k => k.online).length + " / " + kites.length;
  let rps = 0, bin = 0, bout = 0, open = 0, requests = 0;
  for (const k of kites) {
    const ring = history[k.name] || [];
    const last = ring[ring.length - 1];
    if (last) { rps += last.rps; bin += last.bin; bout += last.bout; }
    open += (k.totals && k.totals.open) || 0;
    requests += (k.totals && k.totals.requests) || 0;
  }
  document.getElementById("total-rps").textContent = fmtNum(rps);
  document.getElementById("total-in").textContent = fmtBytes(bin);
  document.getElementById("total-out").textContent = fmtBytes(bout);
  document.getElementById("total-open").textContent = fmtNum(open);
  document.getElementById("total-requests").textContent = fmtNum(requests);
  renderKites(status);
  const now = status.now || 0;
  const tbody = document.querySelector("#links tbody");
  const links = status.links || [];
  tbody.replaceChildren(...(links.length ? links.map(l => el("tr", {"data-node": l.node},
    el("td", {}, l.node),
    el("td", {class: l.up ? "ok" : "bad"}, l.up ? "up" : "down"),
    el("td", {}, l.rtt_ms == null ? "-" : l.rtt_ms.toFixed(1) + " ms"),
    el("td", {}, String(l.reconnects)),
    el("td", {}, l.last_heartbeat ? fmtAge(now - l.last_heartbeat) + " ago" : "-")))
    : [el("tr", {}, el("td", {colspan: "5", class: "empty"}, "No links."))]));
  document.getElementById("listeners").replaceChildren(...(status.listeners || []).map(l =>
    el("li", {}, el("b", {}, l.addr), " ", el("span", {class: "dim"}, (l.roles || []).join(" + ")))));
  renderLog("errors", status.errors, n => el("li", {}, el("span", {class: "t"}, clock(n.t)), el("b", {}, n.who), " ", n.what));
  renderLog("activity", status.activity, n => el("li", {},
    el("span", {class: "t"}, clock(n.t)), el("span", {class: n.outcome === "ok" ? "ok" : "bad"}, n.outcome), " ",
    el("b", {}, n.who), " ", n.what, el("span", {class: "dim"}, " · " + n.ms + " ms")));
}

function setLive(on) {
  document.getElementById("live-dot").className = "dot" + (on ? " on" : "");
  document.getElementById("live-text").textContent = on ? "live" : "reconnecting…";
}

async function start() {
  try {
    const res = await fetch("api/history", {credentials: "same-origin"});
    if (res.ok) {
      const body = await res.json();
      for (const [kite, samples] of Object.entries(body.kites || {})) addSamples(kite, samples);
    }
    const status = await fetch("api/status", {credentials: "same-origin"});
    if (status.ok) render(await status.json());
  } catch (err) { setLive(false); }
  // ?refresh=poll: fetch a snapshot every second instead of keeping an
  // event stream open (for renderers that wait for the network to go
  // idle, like headless Chromium's virtual time).
  if (new URLSearchParams(location.search).get("refresh") === "poll") {
    setLive(true);
    setInterval(async () => {
      try {
        const res = await fetch("api/status", {credentials: "same-origin"});
        if (res.ok) render(await res.json()); else setLive(false);
      } catch (err) { setLive(false); }
    }, 1000);
    return;
  }
  const live = new EventSource("api/live");
  live.onopen = () => setLive(true);
  live.onerror = () => setLive(false);
  live.onmessage = msg => { setLive(true); render(JSON.parse(msg.data)); };
  window.addEventListener("resize", () => lastStatus && renderKites(lastStatus));
}
start();
