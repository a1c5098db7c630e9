"""Texts the panel shows: what the server serves, how training goes. Pure functions of /info/."""

from __future__ import annotations


def connection_summary(info: dict, models: list[str]) -> str:
    """ "Connected: models msa (3D), msa_2d (2D); backbone lite_medsam; adapters X (sha256 abc...)". """
    names = []
    for name in models:
        model = info["models"].get(name, {})
        names.append(f"{name} ({model.get('dimension', '?')}D)")
    msa = info.get("msa") or {}
    parts = [f"models {', '.join(names)}"]
    if msa.get("backbone"):
        parts.append(f"backbone {msa['backbone']}" + (" (3D depth branch)" if msa.get("three_d") else ""))
    if msa.get("adapters"):
        sha = msa.get("adapters_sha256") or ""
        parts.append(f"adapters {msa['adapters']}" + (f" (sha256 {sha[:12]})" if sha else ""))
    elif "adapters" in msa:
        parts.append("no adapters (backbone alone)")
    strategies = ", ".join(info.get("strategies", {}))
    if strategies:
        parts.append(f"strategies {strategies}")
    return "Connected: " + "; ".join(parts)


def train_progress(stats: dict) -> tuple[int, str]:
    """train_stats of the `msa` trainer -> (percent 0..100, one line)."""
    if not stats:
        return 0, "not trained yet"
    status = str(stats.get("status", "?"))
    step, total = stats.get("step"), stats.get("total_steps")
    percent = 100 if status == "DONE" else int(100 * step / total) if step is not None and total else 0
    parts = [status]
    if step is not None:
        parts.append(f"step {step}" + (f"/{total}" if total else ""))
    record = stats.get("best") if isinstance(stats.get("best"), dict) else stats
    scores = [f"{label} Dice {record[key]:.3f}" for key, label in (("dice_click1", "1-click"), ("dice_box", "box"))
              if isinstance(record.get(key), (int, float))]
    if scores:
        parts.append(("best " if record is not stats else "") + ", ".join(scores))
    if stats.get("error"):
        parts.append(str(stats["error"])[:200])
    return max(0, min(percent, 100)), ", ".join(parts)


# In a slice view with the MSA effect active. Keys the Segment Editor already takes (digits,
# Escape, Space, Z, Y, Q, W, I, comma, period) are left to it.
SHORTCUTS = (
    ("Left click", "positive point (inside the structure)"),
    ("Ctrl + left click, or right click", "negative point (outside it)"),
    ("Shift + left drag", "box on this slice"),
    ("Drag a point or the box", "moves it; the segment updates"),
    ("T", "toggle 2D (this slice, msa_2d) / 3D (propagate, msa)"),
    ("P", "propagate through the volume now (3D, all prompts)"),
    ("C", "clear the segment's points and box (the segment stays)"),
    ("Z / Y (Ctrl+Z / Ctrl+Y)", "undo / redo: each update is one step"),
)


def shortcuts_html() -> str:
    rows = "".join(f"<tr><td><b>{keys}</b></td><td>{action}</td></tr>" for keys, action in SHORTCUTS)
    return f"<table cellspacing='4'>{rows}</table>"
