"""The largest value (batch size, depth) whose measure fits a budget, every probe a real measurement."""


def largest_fitting(measure, budget: float, known: dict, start: int = 1, cap: int | None = None, max_growth: float = 4):
    """Largest integer v >= start with measure(v) <= budget, for a measure that grows with v.

    Each guess is a real measurement. Guesses interpolate linearly between the nearest points
    measured so far (``known`` seeds them; ``start`` is probed when none of them fits), extrapolate
    at most ``max_growth`` times the largest fitting value while no point is over budget (the first
    extrapolation, from one point, draws the line through the origin: for a measure with a fixed part,
    such as memory, it undershoots, so that guess fits), and fall back to bisection whenever interpolation did
    not halve the bracket. Returns (v, capped): v = 0 when even ``start`` does not fit; capped = True
    when ``cap`` itself fits.
    """
    points = dict(known)

    def probe(v):
        if v not in points:
            points[v] = measure(v)
        return points[v]

    if all(m > budget for m in points.values()) and probe(start) > budget:
        return 0, False
    bisect_next = False
    while True:
        lo = max(v for v, m in points.items() if m <= budget)
        over = [v for v, m in points.items() if m > budget]
        hi = min(over) if over else None
        if cap is not None and lo >= cap:
            return cap, True
        if hi is not None and hi - lo <= 1:
            return lo, False
        below = sorted(v for v in points if v <= lo)
        if hi is None:
            v0 = below[-2] if len(below) > 1 else 0
            m0 = points[v0] if v0 else 0.0
            slope = (points[lo] - m0) / (lo - v0)
            guess = min(lo + (budget - points[lo]) / max(slope, 1e-9), max_growth * lo)
            upper = int(max_growth * lo) + 1
            if cap is not None:
                guess, upper = min(guess, cap), cap + 1
        elif bisect_next:
            guess, upper = (lo + hi) / 2, hi
        else:
            guess = lo + (budget - points[lo]) * (hi - lo) / (points[hi] - points[lo])
            upper = hi
        guess = min(max(int(guess), lo + 1), upper - 1)
        width = (hi - lo) if hi is not None else None
        probe(guess)
        new_lo = max(v for v, m in points.items() if m <= budget)
        new_hi = min((v for v, m in points.items() if m > budget), default=None)
        bisect_next = width is not None and new_hi is not None and (new_hi - new_lo) * 2 > width
