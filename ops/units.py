"""Human-readable sizes and rates for reports and error messages."""

from __future__ import annotations

_UNITS = ("B", "KB", "MB", "GB", "TB", "PB")


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (decimal units, as disk vendors and `df -H` use)."""
    value, unit = float(n), 0
    while abs(value) >= 1000 and unit < len(_UNITS) - 1:
        value /= 1000
        unit += 1
    return f"{int(value)} B" if unit == 0 else f"{value:.1f} {_UNITS[unit]}"


def format_rate(nbytes: float, seconds: float) -> str:
    return f"{format_bytes(nbytes / seconds)}/s" if seconds > 0 else "-"
