// The tenant console: one tenant's pools with their burn-down charts and forecast, its
// wallet history, its call log with filters, and its alerts and webhook deliveries when
// this gateway has that API. Reads the admin API with the page's token (the read token
// is enough for these reads). Uses el(), num(), money() from app.js. No framework, no
// build step; data is written with textContent only, charts are plain SVG.
"use strict";

const CONSOLE_REFRESH_MS = 15000;
const SVG = "http://www.w3.org/2000/svg";
const consoleState = { tenants: [], tenant: null, api: null, timer: null, loading: false };

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

async function api(path) {
  // Resolves to {status, body}; never throws for an HTTP status.
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(`/api/v1${path}`, { headers, cache: "no-store" });
  let body = null;
  try { body = await response.json(); } catch (err) { body = null; }
  return { status: response.status, body };
}

function apiError(result) {
  const error = (result.body && result.body.error) || {};
  if (result.status === 401) return "needs the admin token or the read token (open the page as /?token=…)";
  if (result.status === 503 && error.code === "ADMIN_API_DISABLED") return "the admin API is disabled on this gateway (no admin_token)";
  return `${error.code || result.status}: ${error.message || "error"}`;
}

function minutes(seconds) {
  return (num(seconds) / 60).toFixed(2);
}

function localParts(iso, tz) {
  const parts = {};
  new Intl.DateTimeFormat("en-GB", {
    timeZone: tz, year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit",
    minute: "2-digit", hourCycle: "h23",
  }).formatToParts(new Date(iso)).forEach((p) => { parts[p.type] = p.value; });
  return parts;
}

function localTime(iso, tz) {
  if (!iso) return "";
  const p = localParts(iso, tz);
  return `${p.year}-${p.month}-${p.day} ${p.hour}:${p.minute}`;
}

// ---- forecast and burn-down charts -------------------------------------------------------

function accountName(a) {
  if (a.account === "pool") return `Pool ${a.item}`;
  if (a.account === "addon") return `Intl. add-on ${a.item}`;
  return `Wallet (${a.item})`;
}

function amount(a, value) {
  if (value === null || value === undefined) return "—";
  return a.unit === "seconds" ? `${minutes(value)} min` : money(value, a.item);
}

function outlook(a, tz) {
  if (a.status === "runs_out") return `runs out ${localTime(a.runs_out_at, tz)}`;
  if (a.status === "exhausted") return "used up";
  if (a.status === "no_recent_use") return "no recent use";
  return a.account === "wallet" ? "lasts over a year" : "lasts the month";
}

function burndown(a, tz) {
  // A pool's month: minutes used so far (solid), the forecast (dashed, held at the
  // capacity once it gets there), the capacity (red), and the run-out day when in the month.
  const W = 560, H = 230, L = 52, R = 16, T = 16, B = 34;
  const cap = num(a.capacity) / 60;
  const hist = a.history.map((p) => [Date.parse(p.at), num(p.value) / 60]);
  const proj = a.projection.map((p) => [Date.parse(p.at), Math.min(num(p.value) / 60, cap)]);
  const t0 = hist[0][0];
  const t1 = proj[proj.length - 1][0];
  const top = Math.max(cap, ...hist.map((p) => p[1]), 1) * 1.08;
  const x = (t) => (L + ((W - L - R) * (t - t0)) / Math.max(t1 - t0, 1)).toFixed(1);
  const y = (v) => (H - B - ((H - B - T) * v) / top).toFixed(1);
  const points = (list) => list.map(([t, v]) => `${x(t)},${y(v)}`).join(" ");
  const id = `chart-${a.account}-${a.item}`.replace(/[^A-Za-z0-9_-]/g, "_");
  const used = num(a.used) / 60;
  const summary = `Used ${used.toFixed(2)} of ${cap.toFixed(2)} minutes, ` +
    `${minutes(a.reserved)} held by calls up now; ${outlook(a, tz)}.`;
  const chart = svg("svg", {
    viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", class: "burndown",
    "aria-labelledby": `${id}-title ${id}-desc`, "data-chart": `${a.account}-${a.item}`,
  },
  svg("title", { id: `${id}-title` }, `${accountName(a)}: burn-down this month`),
  svg("desc", { id: `${id}-desc` }, summary));
  // axes: minutes at 0, half and full capacity; days 1, 8, 15, 22, 29 of the month
  for (const v of [0, cap / 2, cap]) {
    chart.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }),
      svg("text", { x: L - 6, y: Number(y(v)) + 4, class: "axis", "text-anchor": "end" },
        v.toFixed(0)));
  }
  const first = new Date(t0);
  for (const day of [1, 8, 15, 22, 29]) {
    const t = t0 + (day - 1) * 86400000;
    if (t >= t1) continue;
    chart.append(svg("text", { x: x(t), y: H - B + 16, class: "axis", "text-anchor": "middle" },
      `${day}`));
  }
  chart.append(svg("text", { x: L, y: H - 4, class: "axis" },
    `days of ${localParts(first.toISOString(), tz).month}/${localParts(first.toISOString(), tz).year} · minutes`));
  chart.append(svg("line", { x1: L, x2: W - R, y1: y(cap), y2: y(cap), class: "capacity",
                             "data-capacity": cap.toFixed(2) }));
  chart.append(svg("polyline", { points: points(hist), class: "used",
                                 "data-last": used.toFixed(2) }));
  chart.append(svg("polyline", { points: points(proj), class: "forecast",
                                 "data-points": proj.length }));
  if (a.runs_out_at) {
    const t = Date.parse(a.runs_out_at);
    if (t >= t0 && t <= t1) {
      chart.append(svg("line", { x1: x(t), x2: x(t), y1: T, y2: H - B, class: "runout" }));
      const right = Number(x(t)) > W - 150;
      chart.append(svg("text", { x: Number(x(t)) + (right ? -4 : 4), y: T + 10,
                                 class: "axis strong", "text-anchor": right ? "end" : "start" },
        `runs out ${localTime(a.runs_out_at, tz).slice(5)}`));
    }
  }
  const legend = el("div", { class: "legend" },
    el("i", { class: "u" }), "used", el("i", { class: "f" }), "forecast",
    el("i", { class: "c" }), `capacity ${cap.toFixed(2)} min`);
  return el("figure", { class: "chart" }, chart, el("figcaption", {}, summary), legend);
}

function renderForecast(f) {
  const tz = f.timezone;
  document.getElementById("charts").replaceChildren(
    ...f.accounts.filter((a) => a.account === "pool").map((a) => burndown(a, tz)));
  document.querySelector("#forecast tbody").replaceChildren(...f.accounts.map((a) =>
    el("tr", { "data-account": `${a.account}-${a.item}`, "data-status": a.status,
               "data-runs-out": a.runs_out_at || "" },
      el("th", { scope: "row" }, accountName(a)),
      el("td", { class: "num" }, amount(a, a.used)),
      el("td", { class: "num" }, amount(a, a.remaining)),
      el("td", { class: "num" }, amount(a, a.burn_per_day)),
      el("td", {}, a.basis === "hour_of_week" ? "hour of week"
        : a.basis === "flat" ? `flat (${num(a.history_days).toFixed(1)} days)` : "no use"),
      el("td", { class: `outlook ${a.status}` }, outlook(a, tz)))));
}

// ---- wallet history -------------------------------------------------------------------

function renderWallet(w, tz) {
  // recent_entries are newest first; the balance after each is the current balance
  // less what came after it.
  let after = num(w.balance);
  const rows = w.recent_entries.map((e) => {
    const row = { e, after };
    after -= num(e.d_balance);
    return row;
  });
  document.querySelector("#wallet-history tbody").replaceChildren(...rows.map(({ e, after: b }) =>
    el("tr", { "data-entry": e.entry },
      el("td", {}, localTime(e.at, tz)),
      el("td", {}, e.entry === "charge" ? "call charged" : e.entry, e.note && e.entry !== "charge"
        ? el("span", { class: "muted" }, ` · ${e.note}`) : null),
      el("td", { class: "num" }, `${num(e.d_balance) > 0 ? "+" : ""}${num(e.d_balance).toFixed(2)}`),
      el("td", { class: "num" }, b.toFixed(2)))));
  document.getElementById("no-wallet-history").hidden = rows.length > 0;
  document.getElementById("wallet-history").hidden = rows.length === 0;
  // a small step chart of the balance, oldest to newest
  const values = rows.map((r) => r.after).reverse();
  const box = document.getElementById("wallet-chart");
  if (values.length < 2) { box.replaceChildren(); return; }
  const W = 320, H = 70, P = 6;
  const top = Math.max(...values, 1);
  const step = (W - 2 * P) / (values.length - 1);
  const pts = values.map((v, i) => `${(P + i * step).toFixed(1)},${(H - P - ((H - 2 * P) * v) / top).toFixed(1)}`);
  box.replaceChildren(svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
                                   "aria-label": `Wallet balance over its last ${values.length} movements, now ${money(w.balance, w.currency)}`,
                                   class: "sparkline", "data-chart": "wallet" },
    svg("polyline", { points: pts.join(" "), class: "balance" })));
}

// ---- call log ----------------------------------------------------------------------------

function callQuery() {
  const form = document.getElementById("call-filters");
  const query = new URLSearchParams({ limit: "100" });
  for (const [name, value] of new FormData(form).entries()) {
    if (value) query.set(name, value);
  }
  return query.toString();
}

function renderCallLog(calls, tz, currency) {
  document.querySelector("#call-log tbody").replaceChildren(...calls.map((c) =>
    el("tr", { "data-logged-call": c.id, "data-decision": c.decision },
      el("td", {}, localTime(c.authorised_at, tz)), el("td", {}, c.user_id || "—"),
      el("td", {}, c.direction), el("td", {}, c.caller), el("td", {}, c.destination),
      el("td", { class: c.decision === "REJECT" ? "reject" : null }, c.decision),
      el("td", {}, c.reason), el("td", {}, c.state),
      el("td", { class: "num" }, c.billed_seconds === null ? "" : duration(c.billed_seconds)),
      el("td", { class: "num" }, c.charged_amount === null ? "" : money(c.charged_amount, currency)),
      el("td", {}, c.sources.join(" + ") || "—"))));
  document.getElementById("calllog-count").textContent = `(${calls.length}${calls.length === 100 ? "+" : ""})`;
  document.getElementById("no-logged-calls").hidden = calls.length > 0;
  document.getElementById("call-log").hidden = calls.length === 0;
}

let callLogRequest = 0;

async function loadCallLog() {
  // Only the answer to the latest request is drawn: a slow earlier one (a refresh, the
  // filters before they changed) is dropped when it arrives.
  const t = consoleState.tenant;
  if (!t) return;
  const request = ++callLogRequest;
  const query = callQuery();
  const result = await api(`/tenants/${encodeURIComponent(t.tenant_id)}/calls?${query}`);
  if (request !== callLogRequest) return;
  if (result.status !== 200) {
    consoleProblem(`Call log: ${apiError(result)}`);
    return;
  }
  renderCallLog(result.body.calls, t.timezone, t.currency);
  document.getElementById("call-log").dataset.query = query;  // what is shown
}

// ---- alerts and webhook deliveries (when this gateway has that API) -------------------

async function apiPaths() {
  if (consoleState.api === null) {
    try {
      const response = await fetch("/api/v1/openapi.json", { cache: "no-store" });
      consoleState.api = response.ok ? Object.keys((await response.json()).paths || {}) : [];
    } catch (err) {
      consoleState.api = [];
    }
  }
  return consoleState.api;
}

function firstOf(obj, names) {
  for (const n of names) {
    const v = obj[n];
    if (v === undefined || v === null) continue;
    if (typeof v === "object") {  // details: "key value, key value"
      return Object.entries(v).map(([k, x]) => `${k.replace(/_/g, " ")} ${x}`).join(", ");
    }
    return v;
  }
  return "";
}

function listOf(body, names) {
  for (const n of names) if (Array.isArray(body && body[n])) return body[n];
  return Array.isArray(body) ? body : [];
}

function notAvailable(box, text) {
  box.replaceChildren(el("p", { class: "muted unavailable" }, text));
  box.dataset.state = "unavailable";
}

async function renderOptionalPanel(box, template, path, listNames, columns, keep, tz) {
  // ``template``: the path as the API document names it; ``path``: what is asked
  const paths = await apiPaths();
  if (!paths.includes(template)) {
    notAvailable(box, "Not available: this gateway has no such API yet.");
    return;
  }
  const result = await api(path);
  if (result.status !== 200) {
    notAvailable(box, `Not available: ${apiError(result)}.`);
    return;
  }
  const items = listOf(result.body, listNames).filter(keep);
  box.dataset.state = "ok";
  if (!items.length) {
    box.replaceChildren(el("p", { class: "muted" }, "None."));
    return;
  }
  box.replaceChildren(el("table", { "aria-label": box.getAttribute("data-panel") },
    el("thead", {}, el("tr", {}, ...columns.map(([label]) => el("th", { scope: "col" }, label)))),
    el("tbody", {}, ...items.map((item) => el("tr", {},
      ...columns.map(([, names, kind]) => {
        const value = firstOf(item, names);
        return el("td", {}, kind === "time" ? localTime(value, tz) : String(value));
      }))))));
}

async function loadAlertsAndDeliveries(t) {
  const id = encodeURIComponent(t.tenant_id);
  await renderOptionalPanel(document.getElementById("alerts"), "/tenants/{tenant_id}/alerts",
    `/tenants/${id}/alerts`,
    ["alerts", "items"], [["Raised", ["raised_at", "created_at", "at"], "time"],
                          ["Alert", ["kind", "type", "event"]],
                          ["About", ["subject"]],
                          ["State", ["state", "status"]],
                          ["Details", ["message", "summary", "details"]]],
    (a) => !["cleared", "resolved"].includes(a.state || a.status), t.timezone);
  await renderOptionalPanel(document.getElementById("deliveries"), "/webhook-deliveries",
    `/webhook-deliveries?tenant_id=${id}`,
    ["deliveries", "items"], [["Created", ["created_at", "at"], "time"],
                              ["Event", ["event_type", "event", "kind"]],
                              ["State", ["state", "status"]],
                              ["Attempts", ["attempts", "attempt"]],
                              ["Next attempt", ["next_attempt_at"], "time"],
                              ["Last error", ["last_error", "error"]]],
    () => true, t.timezone);
}

// ---- the tenant view ---------------------------------------------------------------------

function consoleProblem(text) {
  const p = document.getElementById("console-problem");
  p.textContent = text || "";
  p.hidden = !text;
}

async function loadUsers(t) {
  const select = document.getElementById("filter-user");
  const result = await api(`/tenants/${encodeURIComponent(t.tenant_id)}/users`);
  const keep = select.value;
  const users = result.status === 200 ? result.body.users : [];
  select.replaceChildren(el("option", { value: "" }, "All users"),
    ...users.map((u) => el("option", { value: u.id }, u.display_name ? `${u.display_name} (${u.id})` : u.id)));
  select.value = users.some((u) => u.id === keep) ? keep : "";
}

async function loadTenant() {
  const t = consoleState.tenant;
  if (!t || consoleState.loading) return;
  consoleState.loading = true;
  try {
    const id = encodeURIComponent(t.tenant_id);
    const [forecast, wallet] = await Promise.all([api(`/tenants/${id}/forecast`),
                                                 api(`/tenants/${id}/wallet`)]);
    if (forecast.status !== 200) {
      consoleProblem(`Tenant console: ${apiError(forecast)}`);
      return;
    }
    consoleProblem("");
    renderForecast(forecast.body);
    if (wallet.status === 200) renderWallet(wallet.body, t.timezone);
    await loadCallLog();
    await loadAlertsAndDeliveries(t);
    document.getElementById("console-updated").textContent =
      `updated ${new Date().toLocaleTimeString()}`;
    document.getElementById("console").dataset.loaded = t.tenant_id;
  } catch (err) {
    consoleProblem(`Tenant console: ${err.message}`);
  } finally {
    consoleState.loading = false;
  }
}

async function chooseTenant(tenantId) {
  const t = consoleState.tenants.find((x) => x.tenant_id === tenantId) || consoleState.tenants[0];
  if (!t) return;
  const changed = !consoleState.tenant || consoleState.tenant.tenant_id !== t.tenant_id;
  consoleState.tenant = t;
  document.getElementById("tenant-select").value = t.tenant_id;
  if (changed) {
    document.getElementById("call-filters").reset();
    await loadUsers(t);
  }
  await loadTenant();
}

function onStatus(event) {
  const doc = event.detail;
  const tenants = (doc.tenants || []).map((t) => ({
    tenant_id: t.tenant_id, name: t.name, timezone: t.timezone, currency: t.currency }));
  const select = document.getElementById("tenant-select");
  const known = consoleState.tenants.map((t) => t.tenant_id).join(" ");
  consoleState.tenants = tenants;
  if (known !== tenants.map((t) => t.tenant_id).join(" ")) {
    select.replaceChildren(...tenants.map((t) => el("option", { value: t.tenant_id },
      `${t.name || t.tenant_id} (${t.tenant_id})`)));
  }
  if (!consoleState.tenant && tenants.length) {
    const wanted = new URLSearchParams(window.location.hash.slice(1)).get("tenant");
    chooseTenant(wanted);
  }
}

async function downloadExport() {
  const t = consoleState.tenant;
  if (!t) return;
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(`/api/v1/tenants/${encodeURIComponent(t.tenant_id)}/export.csv`,
                               { headers, cache: "no-store" });
  if (!response.ok) {
    consoleProblem(`Export: ${response.status}`);
    return;
  }
  const link = el("a", { href: URL.createObjectURL(await response.blob()),
                         download: `${t.tenant_id}-export.csv` });
  document.body.append(link);
  link.click();
  link.remove();
}

document.addEventListener("gateway-status", onStatus);
document.getElementById("tenant-select").addEventListener("change", (e) => {
  window.location.hash = `tenant=${encodeURIComponent(e.target.value)}`;
  chooseTenant(e.target.value);
});
document.getElementById("call-filters").addEventListener("submit", (e) => {
  e.preventDefault();
  loadCallLog();
});
document.getElementById("call-filters").addEventListener("reset", () => {
  setTimeout(loadCallLog, 0);  // after the form has cleared its fields
});
document.getElementById("export-csv").addEventListener("click", downloadExport);
consoleState.timer = setInterval(loadTenant, CONSOLE_REFRESH_MS);
