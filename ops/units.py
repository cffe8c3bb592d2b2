"""Human-readable sizes and rates for reports and error messages."""

from __future__ import annotations

_UNITS = ("B", "KB", "MB", "GB", "TB", "PB")


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (decimal units, as disk vendors and `df -H` use)."""
    value = float(n)
    unit = _UNITS[0]
    for unit in _UNITS[:-1]:
        if abs(value) < 1000:
            break
        value /= 1000
    else:
        unit = _UNITS[-1]
    return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"


def format_rate(nbytes: float, seconds: float) -> str:
    return f"{format_bytes(nbytes / seconds)}/s" if seconds > 0 else "-"
