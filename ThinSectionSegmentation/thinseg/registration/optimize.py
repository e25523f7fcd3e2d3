"""A small L-BFGS minimiser in plain numpy.

scipy's L-BFGS-B calls threaded BLAS for every tiny vector operation; on a busy 2-core machine
that costs ~10 ms per iteration, more than the objective itself. Refinement has 4 to ~250
parameters in units of about one QEMSCAN pixel, so a plain two-loop L-BFGS with a backtracking
(Armijo) line search is all it needs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def lbfgs(
    fun: Callable[[np.ndarray], tuple[float, np.ndarray]],
    x0: np.ndarray,
    *,
    max_iter: int = 40,
    memory: int = 8,
    gtol: float = 1e-8,
    ftol: float = 1e-10,
    first_step: float = 1.0,
) -> tuple[np.ndarray, float, int]:
    """Minimise fun (value, gradient) from x0; returns (x, value, evaluations).

    first_step: length of the first move (parameter units), before curvature is known.
    """
    x = np.asarray(x0, dtype=np.float64).copy()
    f, g = fun(x)
    evaluations = 1
    s_hist: list[np.ndarray] = []
    y_hist: list[np.ndarray] = []
    for _ in range(max_iter):
        if float(np.abs(g).max()) < gtol:
            break
        d = -_two_loop(g, s_hist, y_hist, first_step)
        slope = float(g @ d)
        if slope >= 0:  # not a descent direction: restart from steepest descent
            s_hist.clear()
            y_hist.clear()
            d = -g * (first_step / max(float(np.linalg.norm(g)), 1e-300))
            slope = float(g @ d)
        t = 1.0
        while True:
            x_new = x + t * d
            f_new, g_new = fun(x_new)
            evaluations += 1
            if f_new <= f + 1e-4 * t * slope:
                break
            t *= 0.5
            if t < 1e-6:
                return x, f, evaluations
        s, y = x_new - x, g_new - g
        if float(s @ y) > 1e-12:
            s_hist.append(s)
            y_hist.append(y)
            if len(s_hist) > memory:
                s_hist.pop(0)
                y_hist.pop(0)
        converged = f - f_new <= ftol * max(1.0, abs(f))
        x, f, g = x_new, f_new, g_new
        if converged:
            break
    return x, f, evaluations


def _two_loop(g: np.ndarray, s_hist: list[np.ndarray], y_hist: list[np.ndarray], first_step: float) -> np.ndarray:
    """H g for the L-BFGS inverse-Hessian estimate H (scaled identity before any curvature)."""
    if not s_hist:
        return g * (first_step / max(float(np.linalg.norm(g)), 1e-300))
    q = g.copy()
    coeffs = []
    for s, y in zip(reversed(s_hist), reversed(y_hist)):
        rho = 1.0 / float(y @ s)
        a = rho * float(s @ q)
        q -= a * y
        coeffs.append((rho, a))
    s, y = s_hist[-1], y_hist[-1]
    r = q * (float(s @ y) / float(y @ y))
    for (s, y), (rho, a) in zip(zip(s_hist, y_hist), reversed(coeffs)):
        b = rho * float(y @ r)
        r += s * (a - b)
    return r
