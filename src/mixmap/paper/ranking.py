"""Plain sentences that rank the methods in RESULTS.md (who is best, where vae-gmm stands)."""

from __future__ import annotations

import math


def not_best(m: str, v: float, best: str, vb: float) -> str:
    """How far ``m`` (score ``v``) is from the best method ``best`` (score ``vb``); a
    difference within 2% is called a tie."""
    if abs(v - vb) <= 0.02 * abs(vb):
        return f"{m} ties with it ({v:.3f} vs {vb:.3f}, within 2%)."
    return f"{m} does **not** win: {v:.3f} vs {best} {vb:.3f} ({100 * (v / vb - 1):+.0f}%)."


def rank_sentences(models: dict, key: str, label: str, lower: bool,
                   unfit: set | None = None) -> str:
    """One Markdown bullet per model and parameter: the best method by ``models[model][method]
    [param][key]`` (``lower``: smaller is better) and vae-gmm's distance to it. (model, method)
    pairs in ``unfit`` are left out of the ranking, with a bullet that says why."""
    lines = []
    unfit = unfit or set()
    for model, per in models.items():
        dropped = [m for m in per if (model, m) in unfit]
        if dropped:
            lines.append(f"- {model}: {', '.join(dropped)} left out of the ranking: its residual "
                         f"is over 1.5× that of lsq (repro-goodness-of-fit), so its maps do not "
                         f"explain the data and their {label} means nothing.")
        methods = [m for m in per if (model, m) not in unfit]
        params = [p for p in per[methods[0]] if key in per[methods[0]][p]] if methods else []
        for p in params:
            vals = {m: per[m][p][key] for m in methods
                    if per[m].get(p, {}).get(key) is not None
                    and math.isfinite(per[m][p][key])}
            if not vals:
                continue
            best = (min if lower else max)(vals, key=lambda m: vals[m])
            line = f"- {model} {p}: best {label} {best} ({vals[best]:.3f})"
            if "vae-gmm" in vals and best != "vae-gmm":
                line += "; " + not_best("vae-gmm", vals["vae-gmm"], best, vals[best])
            lines.append(line.rstrip(".") + ".")
    return "\n".join(lines)


__all__ = ["not_best", "rank_sentences"]
