"""MMD and adversarial batch correction (`diffbio_eqx._integration`)."""

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.test_util import check_grads

from diffbio_eqx._core._train import TrainSettings
from diffbio_eqx._integration._adversarial import (
    BatchCritic,
    CriticSettings,
    batch_wasserstein,
    fit_adversarial_vae,
    gradient_penalty,
    input_jacobian,
    penalty_of_jacobian,
)
from diffbio_eqx._integration._common import corrected_expression
from diffbio_eqx._integration._mmd import (
    TRVAE_BANDWIDTHS,
    batch_mmd_penalty,
    multiscale_rbf_kernel,
    pairwise_batch_mmd,
)
from diffbio_eqx._integration._mmd_vae import fit_mmd_vae
from diffbio_eqx._vae._stage import VAENormalizer, vae_latent, vae_transform


BANDWIDTHS = jnp.asarray(TRVAE_BANDWIDTHS)
pairwise = jax.jit(pairwise_batch_mmd, static_argnames="n_batches")
penalty = jax.jit(batch_mmd_penalty, static_argnames="n_batches")


@ft.partial(jax.jit, static_argnums=(1, 2, 4))
def _two_samples(key, n_a, n_b, shift=0.0, dims=5):
    ka, kb = jr.split(key)
    a = jr.normal(ka, (n_a, dims))
    b = jr.normal(kb, (n_b, dims)) + shift
    return jnp.concatenate([a, b]), jnp.concatenate([jnp.zeros(n_a, jnp.int32), jnp.ones(n_b, jnp.int32)])


def _reference_unbiased_mmd(x, y, bandwidths):
    """The textbook U-statistic with explicit loops over the blocks (numpy, float64)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def k(p, q):
        d = ((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)
        return np.sum([np.exp(-d / (2 * a)) for a in bandwidths], axis=0)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def test_kernel_matches_trvae_formula(getkey):
    x, y = jr.normal(getkey(), (4, 3)), jr.normal(getkey(), (5, 3))
    d = np.asarray(((x[:, None] - y[None]) ** 2).sum(-1))
    expected = sum(np.exp(-d / (2 * a)) for a in TRVAE_BANDWIDTHS)
    np.testing.assert_allclose(multiscale_rbf_kernel(x, y, BANDWIDTHS), expected, rtol=1e-10)


def test_unbiased_mmd_matches_textbook_estimator(getkey):
    x, labels = _two_samples(getkey(), 40, 13, shift=0.7)
    got = pairwise(x, labels, BANDWIDTHS, n_batches=2)
    ref = _reference_unbiased_mmd(x[:40], x[40:], TRVAE_BANDWIDTHS)
    np.testing.assert_allclose(got[0, 1], ref, rtol=1e-9)
    np.testing.assert_allclose(got, got.T)
    assert got[0, 0] == 0.0 and got[1, 1] == 0.0


def test_mmd_near_zero_for_unbalanced_samples_of_one_distribution():
    # Unbiased: the mean over draws is zero (a biased V-statistic would sit at a positive offset that grows
    # as the small batch shrinks).
    draws = jax.jit(jax.vmap(lambda k, shift: penalty(*_two_samples(k, 200, 20, shift), BANDWIDTHS, n_batches=2),
                             in_axes=(0, None)))
    values = np.asarray(draws(jr.split(jr.key(1), 8), 0.0))
    assert abs(float(np.mean(values))) < 0.02
    shifted = np.asarray(draws(jr.split(jr.key(2), 8), 1.0))
    assert float(np.min(shifted)) > 10 * abs(float(np.mean(values)))


def test_mmd_grows_with_the_shift(getkey):
    key = getkey()
    shifts = jnp.asarray([0.0, 0.25, 0.5, 1.0, 2.0])
    values = jax.jit(jax.vmap(lambda s: penalty(*_two_samples(key, 200, 50, s), BANDWIDTHS, n_batches=2)))(shifts)
    assert np.all(np.diff(np.asarray(values)) > 0)


def test_every_pair_counts_and_missing_batches_drop_out(getkey):
    # Three batches, the third shifted: pairs (0, 2) and (1, 2) are large, (0, 1) small; the sum is over all pairs.
    k1, k2, k3 = jr.split(getkey(), 3)
    x = jnp.concatenate([jr.normal(k1, (60, 4)), jr.normal(k2, (20, 4)), jr.normal(k3, (30, 4)) + 1.5])
    labels = jnp.repeat(jnp.arange(3, dtype=jnp.int32), jnp.asarray([60, 20, 30]), total_repeat_length=110)
    pairs = pairwise(x, labels, BANDWIDTHS, n_batches=4)  # batch 3 is absent from this minibatch
    assert float(pairs[0, 2]) > 10 * abs(float(pairs[0, 1])) and float(pairs[1, 2]) > 10 * abs(float(pairs[0, 1]))
    np.testing.assert_array_equal(pairs[3], 0.0)
    np.testing.assert_allclose(penalty(x, labels, BANDWIDTHS, n_batches=4),
                               pairs[0, 1] + pairs[0, 2] + pairs[1, 2], rtol=1e-12)
    # A batch with one cell in the minibatch has no unbiased within-batch term: its pairs are left out.
    lone = labels.at[0].set(3)
    assert float(pairwise(x, lone, BANDWIDTHS, n_batches=4)[3].sum()) == 0.0


def test_mmd_gradients(getkey):
    x, labels = _two_samples(getkey(), 12, 7, shift=0.5, dims=3)
    loss = jax.jit(lambda z: penalty(jnp.asarray(z), labels, BANDWIDTHS[6:14], n_batches=2))
    check_grads(loss, (x,), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)
    # and the bandwidths (a continuous setting): vmap over them agrees with a loop
    sets = jnp.asarray(np.stack([TRVAE_BANDWIDTHS[6:14], 2.0 * np.asarray(TRVAE_BANDWIDTHS[6:14])]))
    vmapped = jax.jit(jax.vmap(lambda b: penalty(x, labels, b, n_batches=2)))(sets)
    looped = jnp.stack([penalty(x, labels, b, n_batches=2) for b in sets])
    np.testing.assert_allclose(vmapped, looped, rtol=1e-12)


# ---- the adversarial critic's pure functions ---------------------------------------------------------------------


def test_batch_wasserstein_weights_batches_equally():
    scores = jnp.asarray([[1.0, 0.0, 5.0], [3.0, 1.0, 5.0], [0.0, 2.0, 1.0], [0.0, 4.0, 7.0], [1.0, 1.0, 1.0]])
    labels = jnp.asarray([0, 0, 1, 1, 1], jnp.int32)  # batch 2 absent
    # head 0: mean over batch 0 (2.0) minus batch 1's mean (1/3); head 1: batch 1 (7/3) minus batch 0 (0.5).
    expected = (2.0 - 1.0 / 3.0) + (7.0 / 3.0 - 0.5)
    np.testing.assert_allclose(batch_wasserstein(scores, labels), expected, rtol=1e-12)
    # Unbalanced sizes do not change it: the same per-batch means from duplicated rows.
    doubled = jnp.concatenate([scores, scores[2:]])
    np.testing.assert_allclose(batch_wasserstein(doubled, jnp.concatenate([labels, labels[2:]])), expected,
                               rtol=1e-12)


def test_gradient_penalty_matches_per_head_gradients(getkey):
    critic = BatchCritic(3, 3, hidden_dims=(8,), key=getkey())
    z, key = jr.normal(getkey(), (6, 3)), getkey()
    perm_key, eps_key = jr.split(key)
    eps = np.asarray(jr.uniform(eps_key, (6, 1), dtype=z.dtype))
    zs = np.asarray(z)
    points = jnp.asarray(eps * zs + (1 - eps) * zs[np.asarray(jr.permutation(perm_key, 6))])
    # reverse mode, one head at a time (the implementation writes the ReLU MLP's Jacobian out)
    per_head = jax.jit(jax.vmap(jax.vmap(jax.grad(lambda v, b: critic(v[None])[0, b]), in_axes=(0, None)),
                                in_axes=(None, 0), out_axes=1))
    norms = np.linalg.norm(np.asarray(per_head(points, jnp.arange(3))), axis=-1)
    np.testing.assert_allclose(eqx.filter_jit(gradient_penalty)(critic, z, key=key), np.mean((norms - 1) ** 2),
                               rtol=1e-8)


def test_written_out_jacobian_and_its_parameter_gradient_match_autodiff(getkey):
    """`input_jacobian` against `jax.jacfwd`, and the penalty's gradient in the critic's weights (what the critic
    step uses) against differentiating the `jacfwd` penalty: two and three hidden layers, 2 and 5 heads."""
    for hidden, n_batches in (((8, 8), 2), ((16, 8, 4), 5)):
        critic = BatchCritic(4, n_batches, hidden_dims=hidden, key=getkey())
        points = jr.normal(getkey(), (7, 4))
        # Each side in one jit: eager, every operation of the Jacobians and their gradients compiles on its own.
        autodiff = eqx.filter_jit(lambda c, p: jax.vmap(jax.jacfwd(lambda v: c(v[None])[0]))(p))(critic, points)
        np.testing.assert_allclose(eqx.filter_jit(input_jacobian)(critic, points), autodiff, rtol=1e-5, atol=1e-7)
        ours = eqx.filter_jit(eqx.filter_grad(lambda c: penalty_of_jacobian(input_jacobian(c, points))))(critic)
        reference = eqx.filter_jit(eqx.filter_grad(
            lambda c: penalty_of_jacobian(jax.vmap(jax.jacfwd(lambda v: c(v[None])[0]))(points))))(critic)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ---- training the correctors (tiny data, shared) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def shifted():
    """150 cells of three types in two unbalanced batches (100 and 50) with a strong gene-wise batch effect."""
    rng = np.random.default_rng(0)
    labels = (np.arange(150) % 3 == 0).astype(np.int32)
    types = rng.integers(0, 3, 150)
    profile, effect = rng.gamma(1.0, 1.0, (3, 40)), np.exp(rng.normal(0.0, 0.8, (2, 40)))
    return rng.poisson(profile[types] * effect[labels] * 5).astype(np.float64), labels


def _vae(n_genes, key):
    return VAENormalizer(n_genes, 2, hidden_dims=(16,), latent_dim=4, key=key)


def _latent_mmd(vae, counts, labels):
    z = vae_latent(vae, counts, labels)
    return float(batch_mmd_penalty(z, jnp.asarray(labels), BANDWIDTHS, n_batches=2))


def test_mmd_vae_lowers_the_batch_discrepancy_and_decodes_into_a_reference(shifted):
    counts, labels = shifted
    settings = TrainSettings(n_epochs=12, batch_size=64, progress=False, validation_fraction=0.0)
    # beta = 0 is the plain VAE's objective (and the same compiled epoch: the weight is a traced context value)
    plain = fit_mmd_vae(_vae(40, jr.key(0)), counts, labels, key=jr.key(1), settings=settings, beta=0.0).model
    fitted = fit_mmd_vae(_vae(40, jr.key(0)), counts, labels, key=jr.key(1), settings=settings, beta=50.0)
    assert np.all(np.isfinite(np.asarray(fitted.train_aux["mmd"])))
    assert _latent_mmd(fitted.model, counts, labels) < 0.5 * _latent_mmd(plain, counts, labels)
    both = [corrected_expression(fitted.model, counts, labels, reference_batch=b) for b in (0, 1)]
    own = vae_transform(fitted.model, counts, labels).normalized
    assert both[0].shape == counts.shape
    np.testing.assert_allclose(np.where(labels[:, None] == 0, both[0], both[1]), own, rtol=1e-5)
    assert not np.allclose(both[0], both[1])  # the decoder is conditioned on the batch


def test_adversarial_training_is_stable_over_twenty_keys(shifted):
    counts, labels = shifted
    settings = TrainSettings(n_epochs=2, batch_size=64, progress=False)
    worst, finite = 0.0, True
    for seed in range(20):
        fitted = fit_adversarial_vae(_vae(40, jr.key(seed)), counts, labels, key=jr.key(100 + seed),
                                     settings=settings, adversarial_weight=10.0, n_epochs_adversarial_warmup=0,
                                     critic=CriticSettings(n_critic=2))
        aux = {name: np.asarray(values) for name, values in fitted.fit.train_aux.items()}
        finite &= bool(np.all(np.isfinite(np.asarray(fitted.fit.train_loss))))
        finite &= all(bool(np.all(np.isfinite(values))) for values in aux.values())
        worst = max(worst, float(np.max(aux["critic_loss_abs_max"])))
    assert finite
    assert worst < 20.0


def test_bad_input_names_the_field(shifted):
    counts, labels = shifted
    one_batch = VAENormalizer(40, 1, hidden_dims=(8,), latent_dim=2, key=jr.key(0))
    with pytest.raises(ValueError, match="vae"):
        fit_mmd_vae(one_batch, counts, None, key=jr.key(0))
    with pytest.raises(ValueError, match="batch_labels"):
        fit_mmd_vae(_vae(40, jr.key(0)), counts, None, key=jr.key(0))
    with pytest.raises(ValueError, match="mmd_on"):
        fit_mmd_vae(_vae(40, jr.key(0)), counts, labels, key=jr.key(0), mmd_on="z")
    with pytest.raises(ValueError, match="beta"):
        fit_mmd_vae(_vae(40, jr.key(0)), counts, labels, key=jr.key(0), beta=-1.0)
    with pytest.raises(ValueError, match="n_critic"):
        fit_adversarial_vae(_vae(40, jr.key(0)), counts, labels, key=jr.key(0), critic=CriticSettings(n_critic=0))
    with pytest.raises(ValueError, match="reference_batch"):
        corrected_expression(_vae(40, jr.key(0)), counts, labels, reference_batch=2)


def test_tl_integrate_writes_the_corrected_embedding_and_expression(shifted):
    import anndata as ad
    import pandas as pd

    import diffbio_eqx as dbx

    counts, labels = shifted  # the shapes and settings of the MMD test above: its compiled epoch is reused
    adata = ad.AnnData(counts.astype(np.float32),
                       obs=pd.DataFrame({"batch": pd.Categorical(np.where(labels == 0, "a", "b"))},
                                        index=pd.Index([f"c{i}" for i in range(len(labels))])))
    settings = TrainSettings(n_epochs=2, batch_size=64, progress=False, validation_fraction=0.0)
    trained = dbx.tl.integrate(adata, "mmd", batch_key="batch", key=jr.key(1), model=_vae(40, jr.key(0)),
                               reference_batch="b", settings=settings, beta=5.0)
    assert adata.obsm["X_diffbio_corrected"].shape == (len(labels), 4)
    assert adata.layers["diffbio_corrected"].shape == counts.shape
    assert adata.uns["diffbio_integrate"]["params"]["reference_batch"] == "b"
    assert trained.n_batches == 2
    with pytest.raises(ValueError, match="method"):
        dbx.tl.integrate(adata, "scvi", batch_key="batch", key=jr.key(1))
    with pytest.raises(ValueError, match="reference_batch"):
        dbx.tl.integrate(adata, "mmd", batch_key="batch", key=jr.key(1), reference_batch="z")


def test_integrate_harmony_uses_the_harmony_model_given():
    """`integrate(method="harmony", model=Harmony(...))` dropped the model and ran `Harmony()`: its settings (here
    theta 0, no diversity penalty) were silently ignored. A VAE model there, or a Harmony for a VAE method, is
    refused."""
    import anndata as ad

    import diffbio_eqx as dbx

    rng = np.random.default_rng(0)
    adata = ad.AnnData(np.zeros((120, 3), np.float32))
    adata.obsm["X_pca"] = (rng.normal(size=(120, 5)) + np.repeat([[0.0], [2.0]], 60, axis=0)).astype(np.float32)
    adata.obs["batch"] = np.repeat(["a", "b"], 60)
    model = dbx.Harmony(theta=0.0, n_clusters=3)
    result = dbx.tl.integrate(adata, "harmony", batch_key="batch", model=model, key=jr.key(0))
    expected = model.run(adata.obsm["X_pca"], np.repeat([0, 1], 60), key=jr.key(0))
    np.testing.assert_allclose(adata.obsm["X_diffbio_corrected"], np.asarray(expected.z_corr), rtol=1e-6)
    assert result.centroids.shape[0] == 3 and adata.uns["diffbio_harmony"]["params"]["theta"] == [0.0]
    with pytest.raises(ValueError, match="model: method='harmony' takes a Harmony"):
        dbx.tl.integrate(adata, "harmony", batch_key="batch", model=_vae(3, jr.key(0)), key=jr.key(0))
    with pytest.raises(ValueError, match="model: a Harmony is for method='harmony'"):
        dbx.tl.integrate(adata, "mmd", batch_key="batch", model=model, key=jr.key(0))
