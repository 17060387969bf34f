"""Template helpers of the console: the user's role, percentages, durations."""

from __future__ import annotations

from django import template

from robots.roles import can_operate, is_admin, role_of

register = template.Library()


@register.simple_tag
def user_role(user) -> str:
    return role_of(user) if getattr(user, "is_authenticated", False) else ""


@register.filter(name="can_operate")
def can_operate_filter(user) -> bool:
    return bool(getattr(user, "is_authenticated", False) and can_operate(user))


@register.filter(name="is_admin")
def is_admin_filter(user) -> bool:
    return bool(getattr(user, "is_authenticated", False) and is_admin(user))


@register.filter
def pct(value, digits: int = 0) -> str:
    """0.734 -> '73%'; None -> '–'."""
    if value is None or value == "":
        return "–"
    return f"{float(value) * 100:.{int(digits)}f}%"


@register.filter
def seconds(value) -> str:
    """A duration in seconds, short: '42 s', '3.5 min', '1.2 h'."""
    if value is None:
        return "–"
    value = float(value)
    if value < 90:
        return f"{value:.0f} s"
    if value < 5400:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


@register.filter
def when(value, fmt: str = "Y-m-d H:i") -> str:
    """A timestamp as ``<time>``: the server renders it in UTC, labelled; frontend/pages/localtime.js rewrites it in
    the browser's time zone (labelled too), so tables and the live console show the same clock."""
    import datetime as dt

    from django.utils import timezone
    from django.utils.dateformat import format as date_format
    from django.utils.html import format_html

    if not value:
        return "–"
    utc = timezone.localtime(value, dt.timezone.utc) if timezone.is_aware(value) else value
    return format_html('<time datetime="{}" data-format="{}">{} UTC</time>', utc.isoformat().replace("+00:00", "Z"),
                       fmt, date_format(utc, fmt))
