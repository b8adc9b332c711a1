"""Parity with the official PyTorch SPADE / CLADE code (the fixtures of ../shared/fixtures).

Every recorded tensor must be reproduced to a relative error ||ours - ref|| / ||ref|| <= 1e-5
(float32, CPU): eval-mode outputs and every hooked intermediate, the train-mode forward with its
updated spectral-norm vectors and BatchNorm statistics, the VAE encoder, the KL term, the
multiscale discriminator's features and the hinge / feature-matching losses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import Fixture, nchw, rel_err
from flax import nnx

from clade_jax import losses
from clade_jax.convert import from_official, official_name_map
from clade_jax.models import reparameterize

TOL = 1e-5
GENERATOR_FIXTURES = ["spade_tiny", "clade_tiny", "spade_tiny_vae"]


def _capture_forward(model, labels, z):
    def fwd(m, labels, z):
        return m(labels, z=z)

    return nnx.capture(fwd, nnx.Intermediate, method_outputs=nnx.Intermediate)(model, labels, z)


def _captured(inter, name: str) -> np.ndarray:
    node = inter
    for part in name.split("."):
        node = node[part]
    return np.asarray(node["__call__"].value[0])


def _inputs(fx: Fixture):
    labels = jnp.asarray(fx["input/label"], jnp.int32)
    z = jnp.asarray(fx["input/z"]) if fx.options.get("use_vae") else None
    return labels, z


@pytest.mark.parametrize("name", GENERATOR_FIXTURES)
def test_generator_eval_matches_official(name):
    fx = Fixture(name)
    g = from_official(fx.state, fx.options, "G")
    g.eval()
    labels, z = _inputs(fx)
    image, inter = _capture_forward(g, labels, z)
    errors = {"output/image": rel_err(nchw(image), fx["output/image"])}
    inter_keys = fx.keys("inter/")
    assert len(inter_keys) >= 27
    for key in inter_keys:
        ours = _captured(inter, key[len("inter/") :])
        if key == "inter/fc" and g.use_vae:  # flat Linear output: NHWC order here, NCHW there
            ours = ours.reshape(ours.shape[0], g.sh, g.sw, -1)
            ours = nchw(ours).reshape(ours.shape[0], -1)
        errors[key] = rel_err(nchw(ours), fx[key])
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


@pytest.mark.parametrize("name", GENERATOR_FIXTURES)
def test_generator_train_forward_matches_official(name):
    """One train-mode forward: batch statistics, one power iteration, updated buffers."""
    fx = Fixture(name)
    g = from_official(fx.state, fx.options, "G")
    g.train()
    labels, z = _inputs(fx)
    image = nnx.jit(lambda m, labels, z: m(labels, z=z))(g, labels, z)
    errors = {"train/output/image": rel_err(nchw(image), fx["train/output/image"])}
    name_map = official_name_map(g)
    flat = dict(nnx.to_flat_state(nnx.state(g)))
    after = [k for k in fx.keys("train/after/") if not k.endswith("num_batches_tracked")]
    assert after
    for key in after:
        path, _ = name_map[key[len("train/after/") :]]
        errors[key] = rel_err(flat[path][...], fx[key])
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


def test_effective_spectral_weights_match_official():
    """Eval-mode W / sigma with the stored u, v equals the fixture's `eff/` weights, for every
    spectral-normalized convolution of the generator (one `eff/` key each)."""
    from clade_jax.layers import Conv2d

    fx = Fixture("clade_tiny")
    g = from_official(fx.state, fx.options, "G")
    g.eval()
    ours = {
        ".".join(map(str, path)): node
        for path, node in nnx.iter_graph(g)
        if isinstance(node, Conv2d) and node.spectral_norm
    }
    keys = {k[len("eff/") : -len(".weight")] for k in fx.keys("eff/")}
    # 7 residual blocks x (conv_0, conv_1) + the 4 learned shortcuts (up_0..up_3)
    assert len(keys) == 18 and keys == set(ours)
    for name, conv in ours.items():
        w = np.transpose(np.asarray(conv.weight()), (3, 2, 0, 1))
        assert rel_err(w, fx[f"eff/{name}.weight"]) <= TOL, name


def test_encoder_and_kld_match_official(monkeypatch):
    """The encoder's mu / logvar, `reparameterize` (fed the official noise) and the KL term
    weighted by the official lambda_kld (as the converted config and our default give it)."""
    from clade_jax.configs import common
    from clade_jax.convert.workdir import config_from_options
    from clade_jax.models import encoder

    fx = Fixture("spade_tiny_vae")
    enc = Fixture("spade_tiny_vae", prefix="enc/")
    state = {k: v for k, v in enc.state.items() if k != "eps"}  # enc/eps is an input, not state
    e = from_official(state, enc.options, "E")
    e.eval()
    run = nnx.jit(lambda m, x: m(x))
    errors = {}
    for image_key, suffix in (("input/real_image_256", ""), ("input/real_image_64", "_from64")):
        image = jnp.asarray(np.transpose(enc[image_key], (0, 2, 3, 1)))
        mu, logvar = run(e, image)
        errors["mu" + suffix] = rel_err(mu, enc["output/mu" + suffix])
        errors["logvar" + suffix] = rel_err(logvar, enc["output/logvar" + suffix])
    mu, logvar = jnp.asarray(enc["output/mu"]), jnp.asarray(enc["output/logvar"])
    # reparameterize with its N(0, 1) draw replaced by the official one (torch.randn_like)
    official_eps = jnp.asarray(enc["eps"])

    def normal(key, shape, dtype=jnp.float32):
        assert tuple(shape) == official_eps.shape
        return official_eps.astype(dtype)

    monkeypatch.setattr(encoder.jax.random, "normal", normal)
    errors["z"] = rel_err(encoder.reparameterize(mu, logvar, jax.random.key(0)), fx["input/z"])
    monkeypatch.undo()
    lambda_kld = config_from_options(fx.options).loss.lambda_kld
    assert lambda_kld == fx.options["lambda_kld"] == common.get_config().loss.lambda_kld
    errors["KLD_raw"] = rel_err(losses.kld(mu, logvar), fx["loss/KLD_raw"])
    errors["KLD_weighted"] = rel_err(lambda_kld * losses.kld(mu, logvar), fx["loss/KLD_weighted"])
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


def test_reparameterize_uses_the_official_expression():
    mu, logvar = jnp.array([[0.5, -1.0]]), jnp.array([[0.2, -0.4]])
    key = jax.random.key(3)
    eps = jax.random.normal(key, mu.shape)
    np.testing.assert_allclose(reparameterize(mu, logvar, key), eps * jnp.exp(0.5 * logvar) + mu)


def test_discriminator_and_losses_match_official():
    fx = Fixture("d_tiny")
    d = from_official(fx.state, fx.options, "D")
    d.eval()
    labels = jnp.asarray(fx["input/label"], jnp.int32)
    fake = jnp.asarray(np.transpose(fx["input/fake_image"], (0, 2, 3, 1)))
    real = jnp.asarray(np.transpose(fx["input/real_image"], (0, 2, 3, 1)))
    both_labels = jnp.concatenate([labels, labels])
    outs = nnx.jit(lambda m, lab, x: m(lab, x))(d, both_labels, jnp.concatenate([fake, real]))
    errors = {}
    for i, scale in enumerate(outs):
        assert len(scale) == 5
        for j, feat in enumerate(scale):
            errors[f"D{i}/{j}"] = rel_err(nchw(feat), fx[f"output/D{i}/{j}"])
    pred_fake = [[f[:2] for f in scale] for scale in outs]
    pred_real = [[f[2:] for f in scale] for scale in outs]
    errors["D_fake"] = rel_err(losses.hinge_d_fake(pred_fake), fx["loss/D_fake_hinge"][0])
    errors["D_real"] = rel_err(losses.hinge_d_real(pred_real), fx["loss/D_real_hinge"][0])
    errors["G_GAN"] = rel_err(losses.hinge_g(pred_fake), fx["loss/G_GAN_hinge"][0])
    feat = 10.0 * losses.feature_matching(pred_fake, pred_real)
    errors["GAN_Feat"] = rel_err(feat, fx["loss/GAN_Feat"][0])
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


def test_discriminator_input_is_the_official_concatenation():
    fx = Fixture("d_tiny")
    d = from_official(fx.state, fx.options, "D")
    d.eval()
    x = jnp.asarray(np.transpose(fx["input/fake_and_real"], (0, 2, 3, 1)))
    direct = d.forward_input(x)
    np.testing.assert_allclose(nchw(direct[1][4]), fx["output/D1/4"], rtol=1e-4, atol=1e-5)


def test_conversion_reports_every_mismatch():
    fx = Fixture("clade_tiny")
    state = dict(fx.state)
    del state["head_0.conv_0.bias"]
    state["head_0.extra.weight"] = np.zeros(3, np.float32)
    state["fc.weight"] = np.zeros((64, 10, 3, 3), np.float32)
    with pytest.raises(ValueError) as err:
        from_official(state, fx.options, "G")
    message = str(err.value)
    assert "head_0.extra.weight" in message
    assert "head_0.conv_0.bias" in message
    assert "fc.weight" in message and "(64, 10, 3, 3)" in message
