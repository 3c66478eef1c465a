// The fund-monitoring dashboard: renders the snapshots the server streams (server-sent
// events, /api/events) and falls back to polling /api/snapshot. Plain JavaScript, no library
// and nothing fetched from elsewhere: it works without internet. Charts are inline SVG drawn
// here. Amounts arrive as exact fen with the server's yuan text (formatted from integers);
// numbers are used here only to place points on a chart, never to show an amount.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const COLOURS = ["#2e90fa", "#12b76a", "#f79009", "#7a5af8", "#ee46bc", "#06aed4",
                 "#667085", "#b42318", "#344054", "#66c61c"];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function figure(kind, label, amount) {
  return el("div", {class: "figure " + kind},
    el("div", {class: "label"}, label),
    el("div", {class: "value", "data-field": kind}, amount.yuan));
}

function bar(part, whole) {
  const inner = el("div");
  const share = whole > 0 ? Math.min(1, part / whole) : 0;
  inner.style.width = (share * 100).toFixed(1) + "%";
  const outer = el("div", {class: share >= 1 ? "bar full" : "bar"}, inner);
  return outer;
}

// One line chart: the series share a time axis; values in fen (only for the geometry).
function lineChart(times, series, title) {
  const names = Object.keys(series);
  const wrap = el("div", {class: "chart-wrap"}, el("h3", {}, title));
  if (times.length === 0 || names.length === 0) {
    wrap.append(el("p", {class: "muted"}, "no movements yet"));
    return wrap;
  }
  const W = 420, H = 170, L = 78, R = 8, T = 10, B = 22;
  const t0 = times[0], t1 = times[times.length - 1];
  // The axis spans what the lines cover (not from zero), so a day's burn of a large pool shows.
  let top = -Infinity, low = Infinity;
  for (const n of names) for (const v of series[n]) { top = Math.max(top, v); low = Math.min(low, v); }
  if (top === low) low = Math.min(0, low);
  if (top === low) top = low + 1;
  const x = (t) => L + (t1 > t0 ? (t - t0) / (t1 - t0) : 1) * (W - L - R);
  const y = (v) => T + (1 - (v - low) / (top - low)) * (H - T - B);
  const chart = svg("svg", {class: "chart", viewBox: `0 0 ${W} ${H}`,
                            role: "img", "aria-label": title});
  chart.append(svg("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#d9dee7"}));
  chart.append(svg("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#d9dee7"}));
  const topLabel = svg("text", {x: L - 4, y: T + 8, "text-anchor": "end"});
  topLabel.textContent = yuanAxis(top);
  chart.append(topLabel);
  const zero = svg("text", {x: L - 4, y: H - B, "text-anchor": "end"});
  zero.textContent = yuanAxis(low);
  chart.append(zero);
  for (const [i, t] of [[0, t0], [1, t1]]) {
    const label = svg("text", {x: i ? W - R : L, y: H - 6, "text-anchor": i ? "end" : "start"});
    label.textContent = new Date(t).toLocaleString();
    chart.append(label);
  }
  const legend = el("div", {class: "legend"});
  names.forEach((n, i) => {
    const colour = COLOURS[i % COLOURS.length];
    const values = series[n];
    // a step line: a pool's figure holds until its next event
    let d = "";
    values.forEach((v, j) => {
      d += (j === 0 ? `M${x(times[j])},${y(v)}` : `H${x(times[j])}V${y(v)}`);
    });
    d += `H${x(t1)}`;
    chart.append(svg("path", {d, fill: "none", stroke: colour, "stroke-width": 2}));
    const swatch = el("i");
    swatch.style.background = colour;
    legend.append(el("span", {}, swatch, n));
  });
  wrap.append(chart, legend);
  return wrap;
}

// The axis label only: whole yuan from fen, by integer arithmetic on the fen value.
function yuanAxis(fen) {
  const whole = Math.floor(fen / 100);
  return whole.toLocaleString("en-US") + " ¥";
}

function poolCard(p) {
  const card = el("article", {class: "pool", id: "pool-" + p.pool_id, "data-pool": p.pool_id});
  card.append(el("div", {class: "pool-head"},
    el("span", {class: "pool-id", "data-field": "pool_id"}, p.pool_id),
    p.stale ? el("span", {class: "stale", "data-field": "stale"},
                 "stale: the ledger did not answer; last figures shown") : null,
    el("span", {class: "muted"}, `policy ${p.policy_version || "?"} · split ${p.split || "?"} · `
      + `spent ${p.spent_share} of funded · alerts at ${p.thresholds.join(", ") || "none"}`)));
  card.append(el("div", {class: "figures"},
    figure("available", "available", p.available),
    figure("reserved", "reserved", p.reserved),
    figure("spent", "spent", p.spent),
    figure("funded", "funded", p.funded),
    p.scheduled.fen ? figure("scheduled", "scheduled", p.scheduled) : null));

  const grid = el("div", {class: "pool-grid"});
  const sources = el("table", {}, el("thead", {}, el("tr", {},
    el("th", {}, "funding source"), el("th", {class: "n"}, "available"),
    el("th", {class: "n"}, "reserved"), el("th", {class: "n"}, "spent"),
    el("th", {class: "n"}, "funded"))));
  const sb = el("tbody");
  for (const s of p.sources) {
    sb.append(el("tr", {}, el("td", {}, s.source || "(unnamed)"),
      el("td", {class: "n"}, s.available.yuan), el("td", {class: "n"}, s.reserved.yuan),
      el("td", {class: "n"}, s.spent.yuan), el("td", {class: "n"}, s.funded.yuan)));
  }
  sources.append(sb);
  const cats = el("table", {}, el("thead", {}, el("tr", {},
    el("th", {}, "category"), el("th", {class: "n"}, "reserved"), el("th", {class: "n"}, "spent"),
    el("th", {class: "n"}, "sub-budget"))));
  const cb = el("tbody");
  for (const c of p.categories) {
    cb.append(el("tr", {}, el("td", {}, c.name), el("td", {class: "n"}, c.reserved.yuan),
      el("td", {class: "n"}, c.spent.yuan),
      el("td", {class: "n"}, c.sub_budget ? c.sub_budget.yuan : "—")));
  }
  if (p.categories.length === 0) cb.append(el("tr", {}, el("td", {colspan: 4, class: "muted"}, "nothing held or spent yet")));
  cats.append(cb);
  const outcomes = el("table", {}, el("thead", {}, el("tr", {},
    el("th", {}, "reservations by outcome"), el("th", {class: "n"}, "orders"),
    el("th", {class: "n"}, "amount"))));
  const ob = el("tbody");
  for (const o of p.outcomes) {
    ob.append(el("tr", {"data-outcome": o.outcome}, el("td", {}, o.outcome),
      el("td", {class: "n"}, o.count), el("td", {class: "n"}, o.amount ? o.amount.yuan : "")));
  }
  outcomes.append(ob);
  grid.append(el("div", {}, el("h3", {}, "by funding source"), sources,
                 el("h3", {}, "by category"), cats),
              el("div", {}, outcomes));
  card.append(grid);
  if (p.burn_down) {
    const b = p.burn_down;
    // The burn-down starts just before the first subsidy left the pool (the fundings before
    // it would flatten the burn into a line).
    let first = b.available.findIndex((v, j) => j > 0 && v < b.available[j - 1]);
    first = first > 0 ? first - 1 : 0;
    const from = (values) => values.slice(first);
    // One small chart per source, each on its own scale: a small source's burn would be a flat
    // line beside a large one's.
    const burns = el("div", {class: "burns"});
    burns.append(lineChart(from(b.t_ms), {"whole pool": from(b.available)},
                           "burn-down: available, whole pool"));
    for (const [name, values] of Object.entries(b.sources)) {
      burns.append(lineChart(from(b.t_ms), {[name]: from(values)}, "available, " + name));
    }
    burns.append(lineChart(b.t_ms, b.categories, "burn per category: held or spent"));
    card.append(burns);
  }
  return card;
}

// A chart over campaign days (ISO dates, evenly spaced): a line with a dot per day for each
// series, so even a single day shows; values in fen (only for the geometry).
function dayChart(days, series, title) {
  const names = Object.keys(series);
  const wrap = el("div", {class: "chart-wrap"}, el("h3", {}, title));
  if (days.length === 0 || names.length === 0) {
    wrap.append(el("p", {class: "muted"}, "no orders yet"));
    return wrap;
  }
  const W = 420, H = 170, L = 78, R = 14, T = 10, B = 22;
  let top = -Infinity, low = Infinity;
  for (const n of names) for (const v of series[n]) { top = Math.max(top, v); low = Math.min(low, v); }
  if (top === low) low = Math.min(0, low);
  if (top === low) top = low + 1;
  const x = (i) => days.length > 1 ? L + 8 + i * (W - L - R - 8) / (days.length - 1)
                                   : (L + W - R) / 2;
  const y = (v) => T + (1 - (v - low) / (top - low)) * (H - T - B);
  const chart = svg("svg", {class: "chart", viewBox: `0 0 ${W} ${H}`,
                            role: "img", "aria-label": title});
  chart.append(svg("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#d9dee7"}));
  chart.append(svg("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#d9dee7"}));
  for (const [v, at] of [[top, T + 8], [low, H - B]]) {
    const label = svg("text", {x: L - 4, y: at, "text-anchor": "end"});
    label.textContent = yuanAxis(v);
    chart.append(label);
  }
  const ends = days.length > 1 ? [0, days.length - 1] : [0];
  for (const i of ends) {
    const anchor = days.length === 1 ? "middle" : (i ? "end" : "start");
    const label = svg("text", {x: days.length === 1 ? x(i) : (i ? W - R : L), y: H - 6,
                               "text-anchor": anchor});
    label.textContent = days[i];
    chart.append(label);
  }
  const legend = el("div", {class: "legend"});
  names.forEach((n, k) => {
    const colour = COLOURS[k % COLOURS.length];
    const values = series[n];
    const d = values.map((v, i) => `${i ? "L" : "M"}${x(i)},${y(v)}`).join("");
    chart.append(svg("path", {d, fill: "none", stroke: colour, "stroke-width": 2}));
    values.forEach((v, i) => chart.append(
      svg("circle", {cx: x(i), cy: y(v), r: 3.5 - k, fill: colour})));
    const swatch = el("i");
    swatch.style.background = colour;
    legend.append(el("span", {}, swatch, n));
  });
  wrap.append(chart, legend);
  return wrap;
}

// One draft's what-if: the totals, the burn-down per pool (actual against draft, at each day's
// end) and the per-day table.
function whatifCard(w) {
  const card = el("article", {class: "whatif", "data-draft": w.draft});
  card.append(el("div", {class: "pool-head"},
    el("span", {class: "pool-id"}, "draft " + w.draft),
    el("span", {class: "muted"}, `${w.orders} orders so far · actual ${w.actual.yuan} · `
      + `under the draft ${w.draft_subsidy.yuan} · difference `),
    el("span", {"data-field": "difference"}, w.difference.yuan),
    el("span", {class: "muted"}, " · refused "),
    el("span", {"data-field": "refused"}, w.refused)));
  const charts = el("div", {class: "burns"});
  charts.append(dayChart(w.days.map((d) => d.day),
                         {actual: w.days.map((d) => d.actual.fen),
                          ["draft " + w.draft]: w.days.map((d) => d.draft_subsidy.fen)},
                         "subsidy paid per day"));
  for (const b of w.burn_down) {
    charts.append(dayChart(b.days, {actual: b.actual, ["draft " + w.draft]: b.draft},
                           `${b.pool_id}: available at each day's end`));
  }
  card.append(charts);
  const table = el("table", {class: "whatif-days"},
    el("thead", {}, el("tr", {}, el("th", {}, "day"), el("th", {class: "n"}, "orders"),
      el("th", {class: "n"}, "actual"), el("th", {class: "n"}, "draft"),
      el("th", {class: "n"}, "difference"), el("th", {class: "n"}, "refused"))),
    el("tbody", {}, ...w.days.map((d) => el("tr", {"data-day": d.day},
      el("td", {}, d.day), el("td", {class: "n"}, d.orders),
      el("td", {class: "n"}, d.actual.yuan), el("td", {class: "n"}, d.draft_subsidy.yuan),
      el("td", {class: "n"}, d.difference.yuan), el("td", {class: "n"}, d.refused)))));
  card.append(table, el("p", {class: "muted"}, "Not replayed: " + w.not_replayed + "."));
  return card;
}

function render(s) {
  if (s.loading) return;
  const c = s.campaign;
  document.getElementById("campaign").textContent =
    `${c.name || "campaign"} · policy ${c.policy_version || "?"} · today ${c.today} (${c.timezone})`
    + ` · updated ${new Date(s.updated_at).toLocaleTimeString()}`;
  const pools = document.getElementById("pools");
  pools.replaceChildren(...s.pools.map(poolCard));
  if (s.pools.length === 0) pools.append(el("p", {class: "muted"}, "no budget pool funded yet"));

  const claims = document.querySelector("#claims tbody");
  claims.replaceChildren(...s.claims.map((r) => el("tr", {"data-category": r.category},
    el("td", {}, r.name), el("td", {class: "n"}, r.issued),
    el("td", {class: "n"}, r.quota === null ? "—" : r.quota),
    el("td", {class: "bar-cell"}, r.quota ? bar(r.issued, r.quota) : ""))));

  const alerts = document.getElementById("alerts");
  alerts.replaceChildren(...s.alerts.map((a) => el("li", {},
    el("span", {class: "when"}, new Date(a.at).toLocaleString()),
    el("span", {class: "kind"}, a.kind), a.text)));
  if (s.alerts.length === 0) alerts.append(el("li", {class: "muted"}, "no alerts"));

  const lag = document.querySelector("#lag tbody");
  const rows = [];
  for (const svc of s.lag) {
    if (svc.consumers.length === 0) {
      rows.push(el("tr", {}, el("td", {}, svc.service), el("td", {class: "muted"}, "no consumer yet"),
                      el("td", {class: "n"}, ""), el("td", {class: "n"}, "")));
    }
    for (const cons of svc.consumers) {
      rows.push(el("tr", {"data-service": svc.service}, el("td", {}, svc.service),
        el("td", {}, cons.consumer), el("td", {class: "n"}, cons.pending),
        el("td", {class: "n"}, cons.unacked)));
    }
  }
  lag.replaceChildren(...rows);
  document.getElementById("lag-note").textContent = s.lag_note || "";
  const cases = s.cases;
  document.getElementById("cases-count").textContent =
    cases.available ? `(${cases.open} open, ${cases.overdue} overdue)` : "";
  document.querySelector("#cases-table tbody").replaceChildren(...(cases.rows || []).map((c) =>
    el("tr", {"data-case": c.case_id, class: c.overdue ? "overdue" : ""},
      el("td", {}, c.case_id), el("td", {}, c.kind), el("td", {}, c.priority),
      el("td", {}, c.status), el("td", {}, c.deadline + (c.overdue ? " (overdue)" : "")))));
  document.getElementById("cases-note").textContent = cases.note;
  const drafts = s.whatif || [];
  document.getElementById("whatif-drafts").replaceChildren(...drafts.map(whatifCard));
  document.getElementById("whatif-note").textContent = drafts.length ? ""
    : "no policy draft awaiting approval";
  document.getElementById("log").textContent =
    `${s.log.folded} of ${s.log.size} entries read`;
  const errors = document.getElementById("errors");
  errors.hidden = s.errors.length === 0;
  errors.textContent = s.errors.join(" · ");
  document.body.dataset.version = String(s.version);
}

function setStatus(text, kind) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = "status " + kind;
}

async function poll() {
  try {
    const response = await fetch("/api/snapshot", {credentials: "same-origin", cache: "no-store"});
    if (!response.ok) throw new Error(String(response.status));
    render(await response.json());
    setStatus("live (polling)", "live");
  } catch (err) {
    setStatus("cannot reach the dashboard server", "down");
  }
}

function start() {
  if (!("EventSource" in window)) {
    poll();
    setInterval(poll, 3000);
    return;
  }
  const source = new EventSource("/api/events");
  source.onmessage = (event) => { render(JSON.parse(event.data)); setStatus("live", "live"); };
  source.onerror = () => setStatus("reconnecting…", "down");
}

document.addEventListener("DOMContentLoaded", start);
