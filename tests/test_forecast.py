"""The forecast's arithmetic (gateway/rating/forecast.py) on synthetic histories: the
profile by hour of week, the flat rate of a short history, and the edges (nothing
left, nothing used, a horizon first)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from zoneinfo import ZoneInfo

from gateway.rating import forecast as f

TORONTO = ZoneInfo("America/Toronto")
UTC = dt.UTC


def local(y, m, d, h=0, minute=0):
    return dt.datetime(y, m, d, h, minute, tzinfo=TORONTO)


def office_hours(first_day: dt.date, days: int, seconds: int) -> list[f.Burn]:
    """``seconds`` charged in each hour from 09:00 to 17:00, Monday to Friday, local."""
    burns = []
    for i in range(days):
        day = first_day + dt.timedelta(days=i)
        if day.weekday() >= 5:
            continue
        for hour in range(9, 17):
            at = dt.datetime.combine(day, dt.time(hour, 30), tzinfo=TORONTO)
            burns.append(f.Burn(at.astimezone(UTC), Decimal(seconds)))
    return burns


def test_slots_are_local_hours_of_the_week():
    assert f.slot_of(local(2026, 11, 16, 0, 5), TORONTO) == 0  # Monday 00:05
    assert f.slot_of(local(2026, 11, 22, 23, 59), TORONTO) == 167  # Sunday 23:59
    # 14:00 UTC on a Monday is 09:00 in Toronto in November (UTC-5)
    assert f.slot_of(dt.datetime(2026, 11, 16, 14, 0, tzinfo=UTC), TORONTO) == 9


def test_office_hours_profile_runs_out_in_office_hours():
    # four weeks of history across the end of daylight-saving time (1 November 2026)
    now = local(2026, 11, 21, 12)  # a Saturday noon
    burns = office_hours(dt.date(2026, 10, 24), 28, 600)
    rate = f.burn_rate(burns, start=local(2026, 1, 1), now=now, tz=TORONTO)
    assert rate.basis == "hour_of_week"
    assert rate.history == f.HISTORY
    # 600 s in each office hour, nothing at night or at the weekend
    assert rate.per_hour[f.slot_of(local(2026, 11, 16, 9, 30), TORONTO)] == 600
    assert rate.per_hour[f.slot_of(local(2026, 11, 16, 3), TORONTO)] == 0
    assert rate.per_hour[f.slot_of(local(2026, 11, 22, 10), TORONTO)] == 0
    assert rate.per_day == Decimal(600 * 8 * 5) / 7
    # two office days' worth left: gone at Tuesday 17:00, not during the weekend
    out = f.run_out(rate, Decimal(600 * 8 * 2), now=now, horizon=now + dt.timedelta(days=30),
                    tz=TORONTO)
    assert out == local(2026, 11, 24, 17)
    # a flat rate of the same history would say Tuesday 07:12
    flat_hours = Decimal(600 * 8 * 2) / (Decimal(600 * 40) / 168)
    assert now + dt.timedelta(hours=float(flat_hours)) == local(2026, 11, 24, 7, 12)
    # half an hour's use left on Monday at 10:00 -> 10:30
    out = f.run_out(rate, Decimal(300), now=local(2026, 11, 23, 10), tz=TORONTO,
                    horizon=now + dt.timedelta(days=30))
    assert out == local(2026, 11, 23, 10, 30)


def test_a_short_history_gives_a_flat_rate():
    created = local(2026, 11, 18, 12)
    now = local(2026, 11, 21, 12)  # three days
    burns = [f.Burn(local(2026, 11, 19, 10), Decimal("1.50")),
             f.Burn(local(2026, 11, 20, 15), Decimal("1.50")),
             f.Burn(local(2026, 11, 17, 15), Decimal("99"))]  # before the tenant: ignored
    rate = f.burn_rate(burns, start=created, now=now, tz=TORONTO)
    assert rate.basis == "flat"
    assert rate.per_day.quantize(Decimal("0.000001")) == 1
    assert set(rate.per_hour) == {Decimal(3) / 72}
    o = f.outlook(burns, Decimal("5.00"), start=created, now=now,
                  horizon=now + dt.timedelta(days=366), tz=TORONTO)
    assert o.status == "runs_out"
    assert abs(o.runs_out_at - (now + dt.timedelta(days=5))) < dt.timedelta(seconds=1)


def test_history_shorter_than_a_day_counts_as_a_day():
    created = local(2026, 11, 21, 11)
    now = local(2026, 11, 21, 12)  # one hour old, one minute used
    rate = f.burn_rate([f.Burn(local(2026, 11, 21, 11, 30), Decimal(60))], start=created,
                       now=now, tz=TORONTO)
    assert rate.basis == "flat" and rate.per_day == 60


def test_only_the_last_four_weeks_count():
    now = local(2026, 11, 21, 12)
    old = office_hours(dt.date(2026, 9, 1), 30, 6000)  # September: out of the window
    recent = [f.Burn(now - dt.timedelta(days=2), Decimal(2800))]
    rate = f.burn_rate(old + recent, start=local(2026, 1, 1), now=now, tz=TORONTO)
    assert rate.basis == "hour_of_week"
    assert rate.per_day == Decimal(100)  # 2800 / 28 days


def test_edges_nothing_left_nothing_used_horizon_first():
    now = local(2026, 11, 21, 12)
    start = local(2026, 1, 1)
    end_of_month = local(2026, 12, 1)
    burns = office_hours(dt.date(2026, 10, 24), 28, 600)
    empty = f.outlook(burns, Decimal(0), start=start, now=now, horizon=end_of_month,
                      tz=TORONTO)
    assert empty.status == "exhausted" and empty.runs_out_at == now
    idle = f.outlook([], Decimal(600), start=start, now=now, horizon=end_of_month,
                     tz=TORONTO)
    assert idle.status == "no_recent_use" and idle.runs_out_at is None
    assert idle.rate.basis == "none" and idle.rate.per_day == 0
    # 6 office days to the month's end spend 28,800 s; 30,000 s last the month
    lasts = f.outlook(burns, Decimal(30_000), start=start, now=now, horizon=end_of_month,
                      tz=TORONTO)
    assert lasts.status == "lasts" and lasts.runs_out_at is None
    assert f.expected_use(lasts.rate, now=now, until=end_of_month, tz=TORONTO) == 28_800
    tight = f.outlook(burns, Decimal(28_800), start=start, now=now, horizon=end_of_month,
                      tz=TORONTO)
    assert tight.status == "runs_out" and tight.runs_out_at == local(2026, 11, 30, 17)


def test_projection_is_cumulative_by_local_day():
    now = local(2026, 11, 21, 12)
    end_of_month = local(2026, 12, 1)
    burns = office_hours(dt.date(2026, 10, 24), 28, 600)
    rate = f.burn_rate(burns, start=local(2026, 1, 1), now=now, tz=TORONTO)
    points = f.projection(rate, Decimal(1000), now=now, until=end_of_month, tz=TORONTO)
    assert points[0] == (now, Decimal(1000))
    assert points[-1] == (end_of_month.astimezone(UTC), Decimal(1000 + 28_800))
    assert [p[0].astimezone(TORONTO).hour for p in points[1:]] == [0] * 10
    assert len(points) == 11  # now, then the ends of 22 ... 30 November and the month's end
    values = [p[1] for p in points]
    assert values == sorted(values)
    # Monday 23 November ends with one office day more than Sunday
    assert points[3][1] - points[2][1] == 600 * 8
