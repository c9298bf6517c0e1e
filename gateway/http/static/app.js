// Operator page: polls /status and draws the PBXs, live calls, pools and wallets; the
// tenant console (console.js) hears each /status document as a "gateway-status" event.
// No framework, no build step. Data is written with textContent only.
"use strict";

const REFRESH_MS = 3000;
const token = new URLSearchParams(window.location.search).get("token");

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function num(value) {
  // Amounts arrive as decimal strings; parse only to size bars, show the strings.
  const n = Number.parseFloat(value);
  return Number.isFinite(n) ? n : 0;
}

function pct(part, whole) {
  return whole > 0 ? Math.max(0, Math.min(100, (100 * part) / whole)) : 0;
}

function money(value, currency) {
  const n = num(value);
  return `${n.toFixed(2)} ${currency || ""}`.trim();
}

function duration(seconds) {
  const s = Math.round(num(seconds));
  const m = Math.floor(s / 60);
  return `${m}:${String(s % 60).padStart(2, "0")}`;
}

function gauge({ label, detail, used, reserved, capacity, kind, data }) {
  const bar = el("div", {
    class: `bar ${kind || ""}`,
    role: "meter",
    "aria-label": label,
    "aria-valuemin": "0",
    "aria-valuemax": String(capacity),
    "aria-valuenow": String(used + reserved),
  },
  el("span", { class: "used", style: `width:${pct(used, capacity)}%` }),
  el("span", { class: "reserved", style: `width:${pct(reserved, capacity)}%` }));
  return el("div", { class: "gauge", ...data },
    el("div", { class: "label" }, el("span", {}, label), el("span", {}, detail)), bar);
}

function poolGauge(pool) {
  const cap = num(pool.capacity_minutes);
  return gauge({
    label: `Pool ${pool.country}`,
    detail: `${pool.used_minutes} used + ${pool.reserved_minutes} reserved / ` +
            `${pool.capacity_minutes} min (${pool.remaining_minutes} left)`,
    used: num(pool.used_minutes), reserved: num(pool.reserved_minutes), capacity: cap,
    kind: "pool", data: { "data-pool": pool.country, "data-capacity": pool.capacity_minutes },
  });
}

function addonGauge(addon) {
  return gauge({
    label: `Intl. ${addon.user_id}`,
    detail: `${addon.used_minutes} + ${addon.reserved_minutes} / ${addon.capacity_minutes} min`,
    used: num(addon.used_minutes), reserved: num(addon.reserved_minutes),
    capacity: num(addon.capacity_minutes), kind: "addon",
    data: { "data-addon": addon.user_id },
  });
}

function walletGauge(wallet, currency) {
  const balance = num(wallet.balance);
  const ar = wallet.auto_recharge || {};
  // The wallet has no capacity: scale it to the larger of the balance and what
  // auto-recharge would bring it to, so an empty wallet shows an empty bar.
  const scale = Math.max(balance, num(ar.threshold) + num(ar.amount), 1);
  const low = ar.enabled ? num(wallet.available) < num(ar.threshold) : balance <= 0;
  return gauge({
    label: "Wallet",
    detail: `${money(wallet.available, currency)} available ` +
            `(${money(wallet.reserved, currency)} reserved)`,
    used: num(wallet.available), reserved: num(wallet.reserved), capacity: scale,
    kind: `wallet${low ? " low" : ""}`, data: { "data-wallet": wallet.balance },
  });
}

function renderTenant(t) {
  const ar = t.wallet.auto_recharge || {};
  const recharge = ar.enabled
    ? `auto-recharge ${money(ar.amount, t.currency)} below ${money(ar.threshold, t.currency)}` +
      ` (${ar.recharges_this_month}/${ar.monthly_cap} this month)`
    : "auto-recharge off";
  const card = el("article", { class: "tenant", "data-tenant": t.tenant_id },
    el("h3", {}, t.name || t.tenant_id),
    el("div", { class: "sub" }, `${t.tenant_id} · ${t.country} · ${t.month.slice(0, 7)} · ` +
                                `${t.timezone} · ${recharge}`));
  if (!t.pools.length) card.append(el("div", { class: "muted" }, "No Calling Plan pool."));
  t.pools.forEach((p) => card.append(poolGauge(p)));
  (t.international_addon || []).forEach((a) => card.append(addonGauge(a)));
  card.append(walletGauge(t.wallet, t.currency));
  card.append(el("div", { class: "legend" }, el("i", { class: "u" }), "minutes used",
                 el("i", { class: "r" }), "reserved", el("i", { class: "a" }),
                 "credits available"));
  return card;
}

function renderCalls(calls) {
  const body = document.querySelector("#calls tbody");
  body.replaceChildren(...calls.map((c) => el("tr", { "data-call": c.call_id },
    el("td", {}, c.direction), el("td", {}, c.tenant_id || ""), el("td", {}, c.caller),
    el("td", {}, c.destination), el("td", {}, c.route || ""), el("td", {}, c.pbx || ""),
    el("td", {}, c.state),
    el("td", { class: "num" }, duration(c.talk_seconds)),
    el("td", { class: "num" }, c.funded_seconds === null ? "unlimited" : duration(c.funded_seconds)),
    el("td", {}, c.source || "—"))));
  document.getElementById("live-count").textContent = `(${calls.length})`;
  document.getElementById("no-calls").hidden = calls.length > 0;
  document.getElementById("calls").hidden = calls.length === 0;
}

function clock(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "";
}

function stateTag(state, reason) {
  // A coloured dot and the state's word; the reason shows on hover.
  return el("span", { class: `state ${state || "unknown"}`, title: reason || state },
            (state || "unknown").replace(/_/g, " "));
}

const RECONCILE_COUNTS = ["adopted", "settled", "released", "estimated", "expired",
                          "kept", "forgotten"];

function reconcileSummary(rec) {
  const counts = RECONCILE_COUNTS.filter((k) => num(rec[k]) > 0).map((k) => `${rec[k]} ${k}`);
  return `${clock(rec.at)} · ${counts.length ? counts.join(", ") : "nothing to do"}`;
}

function renderPbx(name, p, generatedAt) {
  // A PBX another process owns is on standby here: that process follows its calls,
  // renews them and reconciles it, so no AMI link, calls or reconciliation is expected.
  const standby = !p.owned;
  const rec = p.last_reconcile;
  const owner = p.owned
    ? [el("strong", {}, "this process"),
       p.owner ? el("span", { class: "muted" }, ` (${p.owner})`) : null]
    : [p.owner ? p.owner : el("span", { class: "muted" }, "nobody yet")];
  if (p.lease_error) {
    owner.push(el("div", { class: "warn", title: p.lease_error }, `lease: ${p.lease_error}`));
  }
  let until = el("span", { class: "muted" }, "no lease");
  if (p.lease_expires_at) {
    const expired = new Date(p.lease_expires_at) <= new Date(generatedAt);
    until = el("span", { class: expired ? "muted" : null },
      `${expired ? "expired " : ""}${clock(p.lease_expires_at)}`,
      p.generation ? el("span", { class: "muted", title: "lease generation: +1 at each new owner" },
                        ` · gen ${p.generation}`) : null);
  }
  const ami = p.ami || {};
  const recCell = rec ? reconcileSummary(rec)
    : el("span", { class: "muted" }, standby ? "by its owner" : "not yet");
  const cdrCell = rec && rec.cdr_table ? stateTag(rec.cdr_table, rec.cdr_table_reason)
    : el("span", { class: "muted" }, standby ? "checked by its owner" : "not checked yet");
  return el("tr", { "data-pbx": name, "data-owned": String(Boolean(p.owned)),
                    class: standby ? "standby" : null },
    el("td", {}, el("strong", {}, name),
       standby ? el("span", { class: "tag" }, "standby") : null),
    el("td", {}, ...owner), el("td", {}, until),
    el("td", {}, stateTag(ami.state, ami.reason || ami.last_error)),
    el("td", { class: "num" }, p.live_calls), el("td", {}, recCell), el("td", {}, cdrCell));
}

function renderPbxes(doc) {
  const entries = Object.entries(doc.pbxes || {});
  document.querySelector("#pbxes tbody").replaceChildren(
    ...entries.map(([name, p]) => renderPbx(name, p, doc.generated_at)));
  const owned = entries.filter(([, p]) => p.owned).length;
  document.getElementById("pbx-count").textContent =
    entries.length ? `(${owned} of ${entries.length} owned here)` : "";
  document.getElementById("no-pbxes").hidden = entries.length > 0;
  document.getElementById("pbxes").hidden = entries.length === 0;
}

function renderHeader(doc) {
  const ready = document.getElementById("ready");
  ready.textContent = doc.ready ? "ready" : "not ready";
  ready.className = `pill ${doc.ready ? "ok" : "bad"}`;
  document.getElementById("components").replaceChildren(
    ...Object.entries(doc.components).map(([name, c]) =>
      el("li", { class: c.state, title: c.reason || c.state }, name)));
  document.getElementById("updated").textContent =
    `updated ${new Date(doc.generated_at).toLocaleTimeString()}`;
}

function renderDecisions(rows) {
  document.querySelector("#decisions tbody").replaceChildren(...rows.map((r) =>
    el("tr", {}, el("td", {}, r.direction), el("td", {}, r.decision),
       el("td", {}, r.reason), el("td", { class: "num" }, r.count))));
}

function renderReconcile(rec) {
  const list = document.getElementById("reconcile");
  const pairs = rec ? Object.entries(rec) : [["", "not yet"]];
  list.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function showProblem(text) {
  const p = document.getElementById("problem");
  p.textContent = text || "";
  p.hidden = !text;
}

async function refresh() {
  try {
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const response = await fetch("/status", { headers, cache: "no-store" });
    if (response.status === 401) {
      showProblem("This gateway needs a read token: open the page as /?token=<read_token>.");
      return;
    }
    if (!response.ok) throw new Error(`/status answered ${response.status}`);
    const doc = await response.json();
    renderHeader(doc);
    renderPbxes(doc);
    renderCalls(doc.live_calls);
    document.getElementById("tenants").replaceChildren(...doc.tenants.map(renderTenant));
    renderDecisions(doc.decisions);
    renderReconcile(doc.last_reconcile);
    showProblem(doc.tenants_error ? `Tenants: ${doc.tenants_error.message}` : "");
    document.dispatchEvent(new CustomEvent("gateway-status", { detail: doc }));
  } catch (err) {
    showProblem(`Cannot read /status: ${err.message}`);
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
