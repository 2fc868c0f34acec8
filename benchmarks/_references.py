"""Adaptors that let a reference tool run in this environment, shared by the benchmarks and the tests (one copy)."""

import numpy as np


def paste_bio_pairwise(xa, xb, ca, cb, alpha=0.1):
    """paste-bio 1.4.0's pairwise_align (its defaults) on arrays, with POT >= 0.9.5's extra line-search argument
    dropped (paste-bio's inner line search takes five; newer `ot.optim.cg` passes six)."""
    import anndata as ad
    import ot
    import paste

    cg = ot.optim.cg

    def cg_compat(a, b, m, reg, f, df, g0, line_search, **kwargs):
        def search(cost, g, delta, mi, cost_g, *extra, **kw):
            return line_search(cost, g, delta, mi, cost_g, **kw)
        return cg(a, b, m, reg, f, df, g0, search, **kwargs)

    sa, sb = ad.AnnData(np.asarray(xa, np.float64)), ad.AnnData(np.asarray(xb, np.float64))
    sa.obsm["spatial"], sb.obsm["spatial"] = np.asarray(ca, np.float64), np.asarray(cb, np.float64)
    ot.optim.cg = cg_compat
    try:
        return paste.pairwise_align(sa, sb, alpha=alpha, gpu_verbose=False)
    finally:
        ot.optim.cg = cg
