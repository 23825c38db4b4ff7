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


def cslt_pack24_by_threads(values, mask):
    """cuSPARSELt's packed 2:4 buffer, made the way PyTorch's packer makes it: thread by thread.

    A plain-Python run of the program in PyTorch's ``SparseSemiStructuredPack.h`` /
    ``SparseSemiStructuredTile.cu`` (``_sparse_semi_structured_tile`` with ``use_cutlass=False``):
    a warp owns a 32x64 tile, its 32 lanes ``(tx, ty)`` (lane id ``tx + 4*ty``) an 8x8 tile each; a
    lane builds 4-bit codes per group of 4 for the top and bottom halves of its tile (bytes by row,
    left group in the low nibble), exchanges bytes and 16-bit lines with its neighbours through two
    ``shfl_xor`` steps, and writes 32-bit words at ``MetadataCuSparseLt._get_meta_offset``. The
    shuffles are run as lookups into the other lanes' values. No closed formula is used, so it is
    an independent reference for `sparsetrain.ops.cslt_layout`.

    Args:
        values: rows (lists) of numbers, the masked matrix ``X~``.
        mask: rows of bools, exactly two True per group of 4.

    Returns:
        ``(packed_values, meta_words)``: the kept values row by row (a flat list), and the metadata
        as a flat list of unsigned 16-bit ints.
    """
    rows, cols = len(mask), len(mask[0])
    assert rows % 128 == 0 and cols % 128 == 0

    def code(r, c0):  # the kept positions of the group at (r, c0..c0+3), as PyTorch's pack_4x4 writes them
        kept = [i for i in range(4) if mask[r][c0 + i]]
        assert len(kept) == 2
        return kept[0] | (kept[1] << 2)

    packed = [values[r][c] for r in range(rows) for c in range(cols) if mask[r][c]]
    meta = [None] * (rows * cols // 16)
    words_per_tile = 32 * 32 // 16

    def offset(warp_row, thread_row, warp_col, thread_col):
        o = (warp_row // 128) * (words_per_tile * 8) + (warp_col // 64) * (words_per_tile * 8) * (rows // 128)
        o += (((warp_row + thread_row) % 128) // 32) * words_per_tile
        o += (((warp_col + thread_col) % 64) // 32) * (words_per_tile * 4)
        o += (warp_row % 32) * 2 + ((thread_row % 32) // 16) * 4 + ((thread_col % 32) // 16) * 2
        return o

    byte = lambda v, k: (v >> (8 * k)) & 0xFF  # noqa: E731
    for wx in range(0, rows, 32):
        for wy in range(0, cols, 64):
            lanes = [(tx, ty) for ty in range(8) for tx in range(4)]
            halves = {}
            for tx, ty in lanes:
                x0, y0 = wx + 8 * tx, wy + 8 * ty
                ab = cd = 0
                for r in range(4):
                    ab |= (code(x0 + r, y0) | code(x0 + r, y0 + 4) << 4) << (8 * r)
                    cd |= (code(x0 + 4 + r, y0) | code(x0 + 4 + r, y0 + 4) << 4) << (8 * r)
                halves[(tx, ty)] = (ab, cd)
            for half in range(2):  # meta_ab, then meta_cd (written 32 words further on)
                v = {lane: halves[lane][half] for lane in lanes}
                left = {lane: int(lane[1] % 2 == 0) for lane in lanes}
                bottom = {lane: lane[0] % 2 for lane in lanes}
                sent0 = {lane: (byte(v[lane], left[lane]), byte(v[lane], left[lane] + 2)) for lane in lanes}
                lines = {}
                for tx, ty in lanes:  # first shuffle: xor 4 in the lane id, the lane of ty ^ 1
                    tl, got = left[(tx, ty)], sent0[(tx, ty ^ 1)]
                    line0 = (byte(v[(tx, ty)], 1 - tl) << ((1 - tl) * 8)) | (got[0] << (tl * 8))
                    line1 = (byte(v[(tx, ty)], 3 - tl) << ((1 - tl) * 8)) | (got[1] << (tl * 8))
                    lines[(tx, ty)] = (line0 & 0xFFFF, line1 & 0xFFFF)
                sent1 = {lane: lines[lane][0] if bottom[lane] else lines[lane][1] for lane in lanes}
                for tx, ty in lanes:  # second shuffle: xor 1, the lane of tx ^ 1
                    got = sent1[(tx ^ 1, ty)]
                    line0, line1 = lines[(tx, ty)]
                    word = (got | line1 << 16) if bottom[(tx, ty)] else (got << 16 | line0)
                    at = offset(wx, 8 * tx, wy, 8 * ty) + 32 * half + 2 * 4 * ((1 - left[(tx, ty)]) + 2 * bottom[(tx, ty)])
                    meta[at], meta[at + 1] = word & 0xFFFF, word >> 16  # a little-endian 32-bit store
    assert None not in meta
    return packed, meta
