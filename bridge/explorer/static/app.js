// The Explorer page: server-sent events from the bridge's memory, no library, no build step.
"use strict";

(function () {
  const MAX_ROWS = 200;
  const $ = (id) => document.getElementById(id);
  let rows = [];        // newest first: [time, event, entity, realm, message_id]
  let held = [];        // rows that arrived while paused, newest first
  let paused = false;
  let rates = [];       // [[second, count], ...] oldest first
  let catalog = [];
  let dropped = 0;

  function pattern() {
    return $("filter").value.trim();
  }

  function keep(row) {
    const p = pattern();
    return p === "" || topicMatches(p, row[1]);
  }

  function fmtTime(t) {
    const d = new Date(t * 1000);
    return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
  }

  function rowElement(row) {
    const tr = document.createElement("tr");
    tr.dataset.event = row[1];
    const cells = [fmtTime(row[0]), row[1], row[2], row[3], row[4]];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 1) td.className = "ev";
      if (i === 4) { td.className = "mid"; td.title = text; }
      tr.appendChild(td);
    });
    return tr;
  }

  function render() {
    const body = $("events");
    const frag = document.createDocumentFragment();
    let n = 0;
    for (const row of rows) {
      if (!keep(row)) continue;
      frag.appendChild(rowElement(row));
      if (++n >= MAX_ROWS) break;
    }
    body.replaceChildren(frag);
    showCount(n);
  }

  function showCount(n) {
    const p = pattern();
    let text = p ? `${n} of the last ${rows.length} events match ${p}.` : "";
    if (paused) text += ` Paused: ${held.length} new events held.`;
    if (dropped) text += ` ${dropped} rows skipped because this page fell behind.`;
    $("shown").textContent = text;
  }

  function addRows(newRows) {
    // newRows arrive oldest first
    const fresh = newRows.slice().reverse();
    if (paused) {
      held = fresh.concat(held).slice(0, MAX_ROWS * 5);
      showCount($("events").rows.length);
      return;
    }
    rows = fresh.concat(rows).slice(0, MAX_ROWS * 5);
    const body = $("events");
    const frag = document.createDocumentFragment();
    for (const row of fresh) if (keep(row)) frag.appendChild(rowElement(row));
    body.insertBefore(frag, body.firstChild);
    while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
    showCount(body.rows.length);
  }

  function setStatus(s) {
    $("rate").textContent = s.rate.toFixed(1);
    $("spool").textContent = String(s.spool.depth) + (s.spool.full ? " (full)" : "");
    $("broker").textContent = s.broker.connected ? "connected" : "down";
    $("broker").className = s.broker.connected ? "ok" : "bad";
    if (!s.broker.connected && s.broker.error) $("broker").title = s.broker.error;
    $("ready").textContent = s.ready ? "yes" : "no";
    $("ready").className = s.ready ? "ok" : "bad";
    $("reasons").textContent = s.reasons.join("; ");
    const body = $("realms");
    const frag = document.createDocumentFragment();
    for (const r of s.realms) {
      const tr = document.createElement("tr");
      tr.dataset.realm = r.label;
      const vals = [
        [r.label, ""],
        [r.connected ? "connected" : "disconnected", r.connected ? "ok" : "bad"],
        [r.subscribed ? "subscribed" : "not subscribed", r.subscribed ? "ok" : "bad"],
        [r.role, r.role === "leader" ? "ok" : ""],
      ];
      vals.forEach(([text, cls], i) => {
        const td = document.createElement(i === 0 ? "th" : "td");
        if (i === 0) td.scope = "row";
        td.textContent = text;
        if (cls) td.className = cls;
        if (i === 2) td.dataset.subscription = r.subscribed ? "subscribed" : "not-subscribed";
        tr.appendChild(td);
      });
      frag.appendChild(tr);
    }
    if (!s.realms.length) {
      const tr = document.createElement("tr");
      tr.innerHTML = "<td colspan=\"4\">no realm configured</td>";
      frag.appendChild(tr);
    }
    body.replaceChildren(frag);
  }

  function addRate(point) {
    if (!point) return;
    if (rates.length && rates[rates.length - 1][0] >= point[0]) return;
    const last = rates.length ? rates[rates.length - 1][0] : point[0] - 1;
    for (let s = last + 1; s < point[0]; s++) rates.push([s, 0]);
    rates.push(point);
    rates = rates.slice(-300);
    drawChart();
  }

  function drawChart() {
    const pts = rates.slice(-300);
    const peak = Math.max(1, ...pts.map((p) => p[1]));
    const w = 300, h = 80;
    const step = pts.length > 1 ? w / (pts.length - 1) : w;
    const coords = pts.map((p, i) => `${(i * step).toFixed(1)},${(h - 2 - (p[1] / peak) * (h - 6)).toFixed(1)}`);
    $("chart-line").setAttribute("points", coords.join(" "));
    $("chart-peak").textContent = String(Math.max(0, ...pts.map((p) => p[1])));
  }

  function showMatches() {
    const p = $("pattern").value.trim();
    const list = $("pattern-matches");
    const frag = document.createDocumentFragment();
    const hits = catalog.filter((e) => p !== "" && e.candidates.some((name) => topicMatches(p, name)));
    for (const e of hits) {
      const li = document.createElement("li");
      const code = document.createElement("code");
      code.textContent = e.name;
      li.appendChild(code);
      li.appendChild(document.createTextNode(" — " + e.description + (e.infobip ? " (Infobip)" : "")));
      li.dataset.event = e.name;
      frag.appendChild(li);
    }
    list.replaceChildren(frag);
    $("pattern-count").textContent = p === "" ? "Type a pattern." :
      `${hits.length} of ${catalog.length} documented events match ${p}.`;
  }

  function live(text, cls) {
    $("live").textContent = text;
    $("live").className = "pill " + cls;
  }

  function connect() {
    const es = new EventSource("/explorer/events");
    es.addEventListener("open", () => live("live", "ok"));
    es.addEventListener("error", () => live("reconnecting…", "bad"));
    es.addEventListener("hello", (m) => {
      const d = JSON.parse(m.data);
      setStatus(d.status);
      rates = d.rates;
      drawChart();
      rows = d.recent.slice().reverse();
      held = [];
      render();
    });
    es.addEventListener("rows", (m) => {
      const d = JSON.parse(m.data);
      dropped += d.dropped;
      addRows(d.rows);
    });
    es.addEventListener("status", (m) => {
      const d = JSON.parse(m.data);
      setStatus(d.status);
      addRate(d.last);
    });
  }

  function init() {
    for (const id of ["controls", "pattern-form"]) $(id).addEventListener("submit", (e) => e.preventDefault());
    $("filter").addEventListener("input", render);
    $("pause").addEventListener("click", () => {
      paused = !paused;
      $("pause").textContent = paused ? "Resume" : "Pause";
      $("pause").setAttribute("aria-pressed", String(paused));
      if (!paused) {
        rows = held.concat(rows).slice(0, MAX_ROWS * 5);
        held = [];
        render();
      } else {
        showCount($("events").rows.length);
      }
    });
    $("clear").addEventListener("click", () => { rows = []; held = []; dropped = 0; render(); });
    $("pattern").addEventListener("input", showMatches);
    fetch("/explorer/catalog.json").then((r) => r.json()).then((c) => { catalog = c; showMatches(); });
    connect();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
