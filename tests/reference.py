"""Dense float64 oracle: the full (T*k)-dimensional Gaussian by plain linear algebra (NumPy)."""

from __future__ import annotations

import numpy as np


def _along_time(x, n):
    x = np.asarray(x, np.float64)
    return np.broadcast_to(x, (n,) + x.shape[1:])


def prior_joint(m0, P0, A, b, Q, T):
    """Mean ``[T*k]`` and covariance ``[T*k, T*k]`` of one LDS prior sequence.

    Stacked: ``(I − 𝔸) z = β + e`` with ``𝔸`` the sub-diagonal blocks ``A_t``,
    ``β = [m0, b_2, …, b_T]`` and ``e ~ N(0, blockdiag(P0, Q_2, …, Q_T))``.
    """
    k = len(m0)
    A, b, Q = _along_time(A, T - 1), _along_time(b, T - 1), _along_time(Q, T - 1)
    L = np.eye(T * k)
    D = np.zeros((T * k, T * k))
    beta = np.zeros(T * k)
    beta[:k] = m0
    D[:k, :k] = P0
    for t in range(1, T):
        s = slice(t * k, (t + 1) * k)
        L[s, (t - 1) * k : t * k] = -A[t - 1]
        beta[s] = b[t - 1]
        D[s, s] = Q[t - 1]
    Linv = np.linalg.inv(L)
    return Linv @ beta, Linv @ D @ Linv.T


def condition_joint(mean, cov, y, R, H, mask, k):
    """Condition a joint Gaussian on ``N(y_t; H_t z_t, R_t)`` at masked-in steps.

    Returns the posterior mean, covariance and ``log N(y; 𝐇 mean, 𝐇 cov 𝐇ᵀ + R)``.
    """
    T, d = y.shape
    H = _along_time(H, T)
    rows = [t for t in range(T) if mask[t]]
    if not rows:
        return mean, cov, 0.0
    Hbig = np.zeros((len(rows) * d, T * k))
    Rbig = np.zeros((len(rows) * d, len(rows) * d))
    ybig = np.zeros(len(rows) * d)
    for i, t in enumerate(rows):
        Hbig[i * d : (i + 1) * d, t * k : (t + 1) * k] = H[t]
        Rbig[i * d : (i + 1) * d, i * d : (i + 1) * d] = R[t]
        ybig[i * d : (i + 1) * d] = y[t]
    S = Hbig @ cov @ Hbig.T + Rbig
    K = np.linalg.solve(S, Hbig @ cov).T
    post_mean = mean + K @ (ybig - Hbig @ mean)
    post_cov = cov - K @ S @ K.T
    post_cov = 0.5 * (post_cov + post_cov.T)
    return post_mean, post_cov, mvn_log_prob(ybig, Hbig @ mean, S)


def mvn_log_prob(x, mean, cov):
    n = len(mean)
    r = x - mean
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (n * np.log(2 * np.pi) + logdet + r @ np.linalg.solve(cov, r))


def mvn_entropy(cov):
    n = cov.shape[0]
    return 0.5 * (n * np.log(2 * np.pi * np.e) + np.linalg.slogdet(cov)[1])


def mvn_kl(mq, Cq, mp, Cp):
    n = len(mq)
    r = mp - mq
    return 0.5 * (
        np.trace(np.linalg.solve(Cp, Cq))
        + r @ np.linalg.solve(Cp, r)
        - n
        + np.linalg.slogdet(Cp)[1]
        - np.linalg.slogdet(Cq)[1]
    )


def expected_log_prob(mq, Cq, mp, Cp):
    """``E_{N(mq, Cq)}[log N(z; mp, Cp)]``."""
    return mvn_log_prob(mq, mp, Cp) - 0.5 * np.trace(np.linalg.solve(Cp, Cq))


def blocks(mean, cov, T, k):
    """Per-step means ``[T, k]``, covariances ``[T, k, k]`` and ``Cov(z_{t+1}, z_t)``."""
    means = mean.reshape(T, k)
    covs = np.stack([cov[t * k : (t + 1) * k, t * k : (t + 1) * k] for t in range(T)])
    cross = np.array(
        [cov[(t + 1) * k : (t + 2) * k, t * k : (t + 1) * k] for t in range(T - 1)]
    ).reshape(T - 1, k, k)
    return means, covs, cross


def kl_to_prior_information(m0, P0, A, b, Q, y, R, H, mask, against=None):
    """``KL(q ‖ p)`` and ``H(q)`` for ``q = p`` conditioned on ``N(y_t; H_t z_t, R_t)``,
    in information form: ``Λ_q = Λ_p + blockdiag(H_tᵀ R_t⁻¹ H_t)``. ``against``: another
    prior's ``(m0, P0, A, b, Q)``, for ``KL(q ‖ against)`` instead.

    Written with ``jax.numpy`` (differentiable, for gradients in float64). Unlike
    :func:`condition_joint` it never subtracts a covariance from another, so it stays
    exact where a potential is many orders of magnitude more (or less) precise than the
    prior along an axis: Cholesky factors of such graded matrices keep their digits.
    ``R [T, d, d]``, ``H [T, d, k]``, ``mask [T]``.
    """
    import jax.numpy as jnp
    from jax.scipy.linalg import cho_solve

    T, k = y.shape[0], len(m0)
    mean_p, cov_p = prior_joint(m0, P0, A, b, Q, T)
    lam_p = np.linalg.inv(cov_p)
    lam_p = 0.5 * (lam_p + lam_p.T)
    blocks_lam, blocks_h = [], []
    for t in range(T):
        r_inv_h = jnp.linalg.solve(R[t], H[t])
        on = 1.0 if mask[t] else 0.0
        blocks_lam.append(on * H[t].T @ r_inv_h)
        blocks_h.append(on * r_inv_h.T @ y[t])
    lam_phi = jnp.zeros((T * k, T * k))
    for t in range(T):
        lam_phi = lam_phi.at[t * k : (t + 1) * k, t * k : (t + 1) * k].set(blocks_lam[t])
    lam_q = lam_p + lam_phi
    chol_q = jnp.linalg.cholesky(lam_q)
    cov_q = cho_solve((chol_q, True), jnp.eye(T * k))
    mean_q = cho_solve((chol_q, True), lam_p @ mean_p + jnp.concatenate(blocks_h))
    if against is not None:
        mean_p, cov_p = prior_joint(*against, T)
        lam_p = np.linalg.inv(cov_p)
        lam_p = 0.5 * (lam_p + lam_p.T)
    r = mean_q - mean_p
    logdet_q = 2 * jnp.sum(jnp.log(jnp.diagonal(chol_q)))
    logdet_p = np.linalg.slogdet(lam_p)[1]
    n = T * k
    kl = 0.5 * (jnp.trace(lam_p @ cov_q) + r @ lam_p @ r - n + logdet_q - logdet_p)
    entropy = 0.5 * (n * np.log(2 * np.pi * np.e) - logdet_q)
    return kl, entropy


def prior_information(m0, P0, A, b, Q, T):
    """Precision ``[T*k, T*k]`` and information vector ``[T*k]`` of one LDS prior sequence.

    ``Λ = (I − 𝔸)ᵀ D⁻¹ (I − 𝔸)`` and ``h = (I − 𝔸)ᵀ D⁻¹ β`` in the notation of
    :func:`prior_joint`. Written with ``jax.numpy``, so that it can be differentiated
    (``A``, ``b``, ``Q`` with a time axis of ``T − 1``).
    """
    import jax.numpy as jnp

    k = m0.shape[-1]
    L = jnp.eye(T * k)
    D_inv = jnp.zeros((T * k, T * k)).at[:k, :k].set(jnp.linalg.inv(P0))
    beta = jnp.zeros(T * k).at[:k].set(m0)
    for t in range(1, T):
        s = slice(t * k, (t + 1) * k)
        L = L.at[s, (t - 1) * k : t * k].set(-A[t - 1])
        D_inv = D_inv.at[s, s].set(jnp.linalg.inv(Q[t - 1]))
        beta = beta.at[s].set(b[t - 1])
    return L.T @ D_inv @ L, L.T @ D_inv @ beta
