"""Plain-Python references the tests compare against (loops over groups, no torch)."""

import math


def loop_mask(rows, n, m):
    """Keep the n largest |w| per group; on ties the lowest index wins (a selection loop)."""
    out = []
    for row in rows:
        mrow = []
        for g in range(0, len(row), m):
            grp = [abs(v) for v in row[g : g + m]]
            kept = set()
            for _ in range(n):
                best = None
                for i, a in enumerate(grp):
                    if i not in kept and (best is None or a > grp[best]):
                        best = i
                kept.add(best)
            mrow += [i in kept for i in range(m)]
        out.append(mrow)
    return out


def loop_soft(rows, n, m):
    out = []
    for row in rows:
        orow = []
        for g in range(0, len(row), m):
            grp = row[g : g + m]
            t = sorted(abs(v) for v in grp)[m - n - 1]
            orow += [math.copysign(max(abs(v) - t, 0.0), v) if v != 0 else 0.0 for v in grp]
        out.append(orow)
    return out


def exact_mvue_probabilities(a):
    """Water-filling: p_i = min(1, c a_i), sum p = min(2, non-zeros), in float64."""
    p = [0.0] * 4
    free = [i for i in range(4) if a[i] > 0]
    budget = min(2.0, float(len(free)))
    while free and budget > 0:
        c = budget / sum(a[i] for i in free)
        over = [i for i in free if c * a[i] >= 1.0]
        if not over:
            for i in free:
                p[i] = c * a[i]
            break
        for i in over:
            p[i] = 1.0
            free.remove(i)
            budget -= 1.0
    return p
