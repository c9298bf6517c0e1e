"""The operator console in headless Chromium (driven over the DevTools protocol), with
data the real rater produced against PostgreSQL: two weeks of calls of every kind.

Checked: the DOM the page's scripts drew (the pool's burn-down chart with its used line,
forecast line and capacity; the forecast table; the wallet history; the call log and its
filters; the alert and webhook panels), screenshots that are not blank and show the
chart's colours, and an accessibility pass: every control labelled, every chart and
table named, text contrast of at least 4.5:1 (3:1 for large text), and the keyboard's
focus order, each focused control visibly outlined, a filter applied from the keyboard.

Screenshots are kept in ``test-output/console-page/`` at the top of the checkout
(git-ignored; CI keeps the folder as an artefact), or in $GATEWAY_TEST_OUTPUT."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import pathlib
from zoneinfo import ZoneInfo

import pytest

from gateway.http.openapi import document
from tests.support.browser import headless_page
from tests.support.gateway import READ, running_gateway
from tests.support.png import colours, png_rows
from tests.support.tenant import TENANT
from tests.support.traffic import month_of_traffic

pytestmark = pytest.mark.db

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUTPUT = pathlib.Path(os.environ.get("GATEWAY_TEST_OUTPUT") or ROOT / "test-output") \
    / "console-page"
TORONTO = ZoneInfo("America/Toronto")
# the console looks at the month on 17 November, 12:00 in Toronto
NOW = dt.datetime(2026, 11, 17, 17, 0, tzinfo=dt.UTC)

# An accessibility audit run in the page: labels, names, contrast (WCAG 2 relative
# luminance), in the spirit of axe's rules of the same names.
AUDIT = r"""
(() => {
  const problems = [];
  const visible = (e) => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== "hidden";
  const name = (e) => {
    if (e.getAttribute("aria-label")) return e.getAttribute("aria-label");
    const by = e.getAttribute("aria-labelledby");
    if (by) return by.split(/\s+/).map((id) => (document.getElementById(id) || {}).textContent || "").join(" ").trim();
    if (e.labels && e.labels.length) return [...e.labels].map((l) => l.textContent).join(" ").trim();
    if (e.tagName === "BUTTON" || e.tagName === "A") return e.textContent.trim();
    return "";
  };
  if (!document.documentElement.lang) problems.push("html without lang");
  for (const e of document.querySelectorAll("input, select, button, a[href], textarea")) {
    if (!name(e)) problems.push(`no label: ${e.outerHTML.slice(0, 80)}`);
  }
  for (const e of document.querySelectorAll("svg")) {
    if (e.getAttribute("role") !== "img" || !name(e)) problems.push(`unnamed chart: ${e.outerHTML.slice(0, 80)}`);
  }
  for (const t of document.querySelectorAll("table")) {
    if (visible(t) && !name(t) && !t.caption) problems.push(`unnamed table: ${t.id}`);
    for (const th of t.querySelectorAll("thead th")) {
      if (!th.getAttribute("scope") && t.closest("#console")) problems.push(`th without scope in ${t.id}`);
    }
  }
  const rgb = (c) => { const m = c.match(/[\d.]+/g); return m ? m.map(Number) : [0, 0, 0, 0]; };
  const lum = ([r, g, b]) => {
    const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = (e) => {
    for (let n = e; n && n.nodeType === 1; n = n.parentElement) {
      const c = rgb(getComputedStyle(n).backgroundColor);
      if (c.length < 4 || c[3] > 0) return c;
    }
    return [255, 255, 255, 1];
  };
  let checked = 0;
  for (const e of document.querySelectorAll("body *")) {
    const own = [...e.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    if (!own || !visible(e) || ["TITLE", "DESC", "SCRIPT", "STYLE", "OPTION"].includes(e.tagName.toUpperCase())) continue;
    if (e.closest(".skip") && e.getBoundingClientRect().bottom < 0) continue;  // shown on focus
    const style = getComputedStyle(e);
    const fg = rgb(e instanceof SVGElement ? style.fill : style.color);
    const bg = background(e instanceof SVGElement ? e.ownerSVGElement || e : e);
    const [a, b] = [lum(fg), lum(bg)].sort((x, y) => y - x);
    const ratio = (a + 0.05) / (b + 0.05);
    const size = parseFloat(style.fontSize);
    const large = size >= 24 || (size >= 18.66 && Number(style.fontWeight) >= 700);
    checked += 1;
    if (ratio < (large ? 3 : 4.5)) {
      problems.push(`contrast ${ratio.toFixed(2)} of "${e.textContent.trim().slice(0, 30)}" (${e.tagName}.${e.getAttribute("class")})`);
    }
  }
  return { problems, checked };
})()
"""

FOCUSED = """(() => { const e = document.activeElement;
  const region = e.tagName === "ARTICLE" ? e.getAttribute("aria-labelledby") : null;
  return { id: region ? `region:${region}` : e.id || e.textContent.trim(), tag: e.tagName,
           outline: getComputedStyle(e).outlineStyle,
           outlineWidth: getComputedStyle(e).outlineWidth }; })()"""


async def test_operator_console(admin, rater, clock, views, database_url, tmp_path):
    traffic = await month_of_traffic(admin, rater, clock, calls=160, domestic_minutes=150,
                                     first=dt.datetime(2026, 11, 2, 14, tzinfo=dt.UTC),
                                     days=14)
    for call_id in traffic.open_calls:
        await rater.release(call_id)
    clock.now = NOW
    forecast = await views.forecast(TENANT)
    pool = next(a for a in forecast.accounts if a.account == "pool")
    assert pool.status == "runs_out", pool  # a chart with a run-out day in the month
    wallet = await views.wallet(TENANT)
    all_calls = await views.calls(TENANT, None, 100)
    alice_rejected = await views.calls(TENANT, None, 100, user_id="alice",
                                       decision="REJECT")
    bob_out = await views.calls(TENANT, None, 100, user_id="bob", direction="outbound")
    day = dt.date(2026, 11, 10)
    on_day = await views.calls(TENANT, None, 100, first_day=day, last_day=day)
    assert alice_rejected and bob_out and on_day and len(all_calls) == 100

    OUTPUT.mkdir(parents=True, exist_ok=True)
    async with running_gateway(database_url) as gw, \
            headless_page(str(tmp_path / "profile")) as page:
        gw.views.clock = lambda: NOW
        base = f"http://127.0.0.1:{gw.http_port}"
        await page.goto(f"{base}/?token={READ}#tenant={TENANT}")
        await page.wait_for(f"document.getElementById('console').dataset.loaded === '{TENANT}'"
                            " && document.querySelector('#alerts').dataset.state"
                            " && document.querySelector('#deliveries').dataset.state")

        # ---- the burn-down chart: used so far, forecast, capacity, run-out day
        chart = await page.evaluate("""(() => {
          const c = document.querySelector('svg[data-chart="pool-CA"]');
          const pts = (sel) => c.querySelector(sel).getAttribute('points').trim().split(' ').length;
          return { title: c.querySelector('title').textContent,
                   desc: c.querySelector('desc').textContent,
                   used: pts('polyline.used'), forecast: pts('polyline.forecast'),
                   last: c.querySelector('polyline.used').dataset.last,
                   capacity: c.querySelector('line.capacity').dataset.capacity,
                   runout: !!c.querySelector('line.runout'),
                   labels: [...c.querySelectorAll('text')].map((t) => t.textContent) }; })()""")
        assert chart["title"] == "Pool CA: burn-down this month"
        assert chart["capacity"] == "300.00"  # 2 Calling Plan users x 150 minutes
        assert chart["used"] == len(pool.history) and chart["forecast"] == len(pool.projection)
        assert chart["last"] == f"{pool.used / 60:.2f}"
        assert chart["runout"]
        runs_out = pool.runs_out_at.astimezone(TORONTO).strftime("%m-%d %H:%M")
        assert f"runs out {runs_out}" in chart["labels"]
        assert f"Used {pool.used / 60:.2f} of 300.00 minutes" in chart["desc"]

        # ---- the forecast table: a row per pool, add-on and the wallet
        rows = await page.evaluate("""[...document.querySelectorAll('#forecast tbody tr')]
          .map((r) => [r.dataset.account, r.dataset.status, r.dataset.runsOut,
                       r.lastElementChild.textContent])""")
        assert [r[0] for r in rows] == [f"{a.account}-{a.item}" for a in forecast.accounts]
        for (_, status, runs_out_at, text), a in zip(rows, forecast.accounts, strict=True):
            assert status == a.status
            if a.status == "runs_out":
                assert runs_out_at == a.runs_out_at.isoformat().replace("+00:00", "Z") \
                    or dt.datetime.fromisoformat(runs_out_at) == a.runs_out_at
                local = a.runs_out_at.astimezone(TORONTO).strftime("%Y-%m-%d %H:%M")
                assert text == f"runs out {local}"

        # ---- the wallet history: newest first, the balance after each movement
        history = await page.evaluate("""[...document.querySelectorAll('#wallet-history tbody tr')]
          .map((r) => [r.dataset.entry, r.lastElementChild.textContent])""")
        assert len(history) == len(wallet.recent_entries) > 5
        assert history[0][1] == f"{wallet.balance:.2f}"
        assert "charge" in {h[0] for h in history} <= {"charge", "recharge", "topup"}
        assert await page.evaluate("!!document.querySelector('svg[data-chart=\"wallet\"]')")

        # ---- the call log, newest first, and its filters
        logged = await page.evaluate("""[...document.querySelectorAll('#call-log tbody tr')]
          .map((r) => r.dataset.loggedCall)""")
        assert logged == [str(c.id) for c in all_calls]
        users = await page.evaluate(
            "[...document.querySelectorAll('#filter-user option')].map((o) => o.value)")
        assert users == ["", "alice", "bob", "carol", "dave"]

        async def filtered(**values: str) -> list[str]:
            await page.evaluate(
                "(() => { const f = document.getElementById('call-filters'); f.reset();"
                + "".join(f"f.elements['{k}'].value = '{v}';" for k, v in values.items())
                + "document.getElementById('call-log').dataset.query = '';"
                + "f.requestSubmit(); })()")
            await page.wait_for("document.getElementById('call-log').dataset.query"
                                " === callQuery()")
            return await page.evaluate("""[...document.querySelectorAll('#call-log tbody tr')]
              .map((r) => r.dataset.loggedCall)""")

        assert await filtered(user_id="alice", decision="REJECT") == [
            str(c.id) for c in alice_rejected]
        assert await filtered(user_id="bob", direction="outbound") == [
            str(c.id) for c in bob_out]
        assert await filtered(**{"from": day.isoformat(), "to": day.isoformat()}) == [
            str(c.id) for c in on_day]
        shown = await page.evaluate("""[...document.querySelectorAll('#call-log tbody tr')]
          .map((r) => r.firstElementChild.textContent.slice(0, 10))""")
        assert set(shown) == {"2026-11-10"}

        # ---- alerts and webhook deliveries: drawn from their API, or said unavailable
        paths = document()["paths"]
        panels = await page.evaluate("""['alerts', 'deliveries'].map((id) => {
          const p = document.getElementById(id); return [p.dataset.state, p.textContent]; })""")
        for (state, text), path in zip(panels, ("/tenants/{tenant_id}/alerts",
                                                "/webhook-deliveries"), strict=True):
            if path not in paths:
                assert state == "unavailable" and "no such API" in text
            else:  # read with the read token, like the rest of the console
                assert state == "ok", text

        # ---- screenshots: the whole page and the console, with the chart's colours
        await page.evaluate("document.getElementById('call-filters').reset()")
        await page.wait_for("document.getElementById('call-log').dataset.query === callQuery()"
                            " && document.querySelectorAll('#call-log tbody tr').length === 100")
        top = await page.evaluate(
            "document.getElementById('console').getBoundingClientRect().top + window.scrollY")
        await page.evaluate(f"window.scrollTo(0, {int(top)})")
        shot = await page.screenshot(str(OUTPUT / "console.png"))
        await page.evaluate("window.scrollTo(0, 0)")
        full = await page.screenshot(str(OUTPUT / "console-full-page.png"), full_page=True)
        width, height, bpp, png = png_rows(shot)
        assert (width, height) == (1280, 900)
        seen = colours(width, bpp, png, step=1)
        assert len(seen) >= 8 and max(seen.values()) < 0.9 * sum(seen.values())
        # the used line (#2f6fde) and the dashed forecast (#a35f00), a few pixels each
        assert seen.get(bytes((0x2F, 0x6F, 0xDE)), 0) >= 30, "no used line"
        assert seen.get(bytes((0xA3, 0x5F, 0x00)), 0) >= 30, "no forecast line"
        assert png_rows(full)[1] > 900  # the whole page is taller than the window

        # ---- the month's export, downloaded from the button
        downloads = tmp_path / "downloads"
        await page.send("Page.setDownloadBehavior", behavior="allow",
                        downloadPath=str(downloads))
        await page.evaluate("document.getElementById('export-csv').click()")
        saved = downloads / f"{TENANT}-export.csv"
        for _ in range(100):
            if saved.exists() and saved.stat().st_size:
                break
            await asyncio.sleep(0.1)
        exported = saved.read_text().splitlines()
        assert exported[0].startswith("record,call_id,")
        assert sum(1 for line in exported if line.startswith("call,")) == len(
            (await views.month_export(TENANT, dt.date(2026, 11, 1))).calls)

        # ---- accessibility: labels, names, contrast
        audit = await page.evaluate(AUDIT)
        assert audit["problems"] == [], audit["problems"]
        assert audit["checked"] > 300  # the call log's cells among them

        # ---- the keyboard: focus order, visible focus, the skip link, a filter applied
        await page.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
        order = []
        for _ in range(30):  # up to the console's last control
            await page.press("Tab", 9)
            focused = await page.evaluate(FOCUSED)
            assert focused["outline"] != "none" and focused["outlineWidth"] != "0px", focused
            if not order or order[-1] != focused["id"]:
                order.append(focused["id"])  # a date field takes a Tab per part
            if focused["id"] == "Clear":
                break
        # the skip link, then the console's controls in reading order (a date field takes
        # four Tabs: day, month, year and its picker); a panel whose content is wider
        # than it scrolls, which Chromium lets the keyboard reach, is a named region
        controls = [o for o in order if not o.startswith("region:")]
        assert controls == ["Skip to the tenant console", "tenant-select", "export-csv",
                            "filter-user", "filter-direction", "filter-decision",
                            "filter-from", "filter-to", "Apply", "Clear"], order
        assert all(o[len("region:"):].endswith("-title") for o in order
                   if o.startswith("region:")), order
        # a fresh page: the first Tab reaches the skip link, Enter takes focus to the console
        await page.evaluate("window.previous = true")
        await page.send("Page.reload")
        await page.wait_for("!window.previous && document.readyState === 'complete'"
                            " && document.getElementById('call-log').dataset.query")
        await page.press("Tab", 9)
        assert (await page.evaluate(FOCUSED))["id"] == "Skip to the tenant console"
        await page.press("Enter", 13)
        await page.wait_for("document.activeElement.id === 'console'", within=5)
        assert await page.evaluate("window.scrollY") > 100  # scrolled to the console
        # choose alice's rejected calls, then apply with Enter on the Apply button
        await page.evaluate("document.getElementById('filter-user').value = 'alice';"
                            "document.getElementById('filter-decision').value = 'REJECT';"
                            "document.getElementById('filter-to').focus()")
        await page.press("Tab", 9)  # past the date field's parts to Apply
        for _ in range(3):
            if (await page.evaluate(FOCUSED))["id"] == "Apply":
                break
            await page.press("Tab", 9)
        assert (await page.evaluate(FOCUSED))["id"] == "Apply"
        await page.evaluate("document.getElementById('call-log').dataset.query = ''")
        await page.press("Enter", 13)
        await page.wait_for("document.getElementById('call-log').dataset.query"
                            " === callQuery()")
        assert await page.evaluate("""[...document.querySelectorAll('#call-log tbody tr')]
          .map((r) => r.dataset.loggedCall)""") == [str(c.id) for c in alice_rejected]
        assert not [m for m in page.console if m.startswith(("exception", "error"))], \
            page.console
