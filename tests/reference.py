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
