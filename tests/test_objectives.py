"""Tests of aejax.objectives: forward passes, terms against direct loss calls, combine and build."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from aejax import losses, models, objectives


@pytest.fixture(autouse=True)
def x64():
    """Every test computes in float64 (parameters are cast); the flag is restored afterwards."""
    with jax.enable_x64(True):
        yield


def key(seed):
    """A typed key of the "rbg" PRNG: the code under test only passes keys to jax.random and flax,
    and threefry programs take seconds each to compile on the shared CPU runners."""
    return jax.random.key(seed, impl="rbg")


def rand(seed, shape, low=0.0, high=1.0):
    return np.random.default_rng(seed).uniform(low, high, size=shape)


def mlp(**kwargs):
    options = dict(input_shape=(12,), hidden=(7,), code_size=5, activation="tanh",
                   code_activation="sigmoid")
    return models.MLPAutoencoder(**{**options, **kwargs})


def init64(model, x, seed=0):
    """float64 parameters, every one (biases included) perturbed away from its initial value."""
    params = jax.jit(lambda rng, x: models.init(model, rng, x))(key(seed), x)
    r = np.random.default_rng(seed + 100)
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)
                                              + 0.3 * r.normal(size=a.shape)), params)


@functools.lru_cache(maxsize=None)
def _jitted_forward(model, objective):
    @jax.jit
    def go(params, x, x_in, step, mask, rng):
        f = objectives.forward(model, params, x, x_in, rng=rng, step=step, mask=mask)
        out = f._replace(model=None)  # a module is not a JAX value; put back by run()
        return out if objective is None else (out, objective(f))

    return go


def run(model, params, x, x_in=None, *, objective=None, step=0, mask=None, rng=None):
    """``forward`` (and ``objective`` of it) under jit, compiled once per model and objective."""
    x_in = x if x_in is None else x_in
    out = _jitted_forward(model, objective)(params, x, x_in, jnp.asarray(step), mask,
                                            key(1) if rng is None else rng)
    if objective is None:
        return out._replace(model=model)
    return out[0]._replace(model=model), out[1]


def fd_frobenius(encode_fn, x, eps=1e-5):
    """``||d encode / dx||_F^2`` per example from central differences, float64."""
    x = np.asarray(x, np.float64)
    b, d = x.shape[0], x[0].size
    basis = eps * np.eye(d).reshape((d, 1) + x.shape[1:])
    stack = lambda s: jnp.asarray((x[None] + s * basis).reshape((d * b,) + x.shape[1:]))
    jac = (np.asarray(encode_fn(stack(1.0))) - np.asarray(encode_fn(stack(-1.0)))) / (2 * eps)
    return (jac.reshape(d, b, -1) ** 2).sum(axis=(0, 2))


def np_mlp(params, x):
    """NumPy forward pass of ``mlp()``: (hidden_0, code, decoder_hidden_0, logits)."""
    p = jax.tree.map(np.asarray, params)
    h0 = np.tanh(x @ p["encoder_0"]["kernel"] + p["encoder_0"]["bias"])
    code = special.expit(h0 @ p["encoder_1"]["kernel"] + p["encoder_1"]["bias"])
    d0 = np.tanh(code @ p["decoder_0"]["kernel"] + p["decoder_0"]["bias"])
    logits = d0 @ p["decoder_1"]["kernel"] + p["decoder_1"]["bias"]
    return h0, code, d0, logits


def np_kl_sparsity(a, rho):
    rho_hat = a.mean(axis=0)
    return np.sum(rho * np.log(rho / rho_hat) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat)))


@pytest.fixture(scope="module")
def setup():
    with jax.enable_x64(True):
        model = mlp()
        x = rand(0, (6, 12))
        x_in = np.clip(x + 0.2 * np.random.default_rng(1).normal(size=x.shape), 0, 1)
        return model, init64(model, jnp.asarray(x)), x, x_in


# --------------------------------------------------------------------------- forward


def test_forward_collects_named_activations(setup):
    model, params, x, x_in = setup
    f = run(model, params, jnp.asarray(x), jnp.asarray(x_in))
    h0, code, d0, logits = np_mlp(params, x_in)
    assert sorted(f.activations) == ["code", "decoder_hidden_0", "hidden_0"]
    np.testing.assert_allclose(f.activations["hidden_0"], h0, rtol=1e-12)
    np.testing.assert_allclose(f.activations["code"], code, rtol=1e-12)
    np.testing.assert_allclose(f.activations["decoder_hidden_0"], d0, rtol=1e-12)
    np.testing.assert_allclose(f.code, code, rtol=1e-12)
    np.testing.assert_allclose(f.logits, logits, rtol=1e-12)
    np.testing.assert_array_equal(f.x, x)
    np.testing.assert_array_equal(f.x_in, x_in)
    np.testing.assert_array_equal(f.mask, np.ones(6))
    assert f.step == 0 and f.extras == {}
    np.testing.assert_allclose(f.encode(jnp.asarray(x_in)), code, rtol=1e-12)


def test_forward_of_conv():
    conv = models.ConvAutoencoder(features=(2, 2, 2))
    x = jnp.asarray(rand(2, (2, 28, 28, 1)))
    params = init64(conv, x)
    f = run(conv, params, x)
    assert sorted(f.activations) == ["code", "hidden_0", "hidden_1", "hidden_2"]
    assert f.activations["hidden_0"].shape == (2, 28, 28, 2) and f.code.shape == (2, 32)
    np.testing.assert_allclose(f.code, conv.apply({"params": params}, x, method=conv.encode),
                               rtol=1e-12)


def test_forward_of_vae():
    vae = models.VAE(input_shape=(12,), hidden=(7,), latent_size=3, likelihood="gaussian")
    x = jnp.asarray(rand(3, (4, 12)))
    # models.init would draw its sample from a threefry key: slow to compile here, and unused.
    params = jax.jit(lambda k, x: vae.init({"params": k, "sample": k}, x))(key(0), x)["params"]
    params = {**jax.tree.map(lambda a: a.astype(jnp.float64), params),
              "log_scale": jnp.asarray(-0.4)}
    rng = key(5)
    f = run(vae, params, x, rng=rng)
    mean, logvar = vae.apply({"params": params}, x, method=vae.posterior)
    # The sample is the model's own draw from the "sample" stream, fed the model's half of the
    # split key.
    direct = vae.apply({"params": params}, x, rngs={"sample": jax.random.split(rng)[0]})[1]
    np.testing.assert_allclose(f.code, direct["code"], rtol=1e-12)
    assert not np.allclose(f.code, mean)
    np.testing.assert_allclose(f.extras["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(f.extras["logvar"], logvar, rtol=1e-12)
    np.testing.assert_allclose(f.extras["log_scale"], params["log_scale"], rtol=0)
    np.testing.assert_allclose(f.encode(x), mean, rtol=1e-12)
    kl = objectives.gaussian_kl()(f)
    np.testing.assert_allclose(kl, losses.gaussian_kl(mean, logvar), rtol=1e-12)
    nll = objectives.reconstruction("gaussian")(f)
    np.testing.assert_allclose(
        nll, losses.gaussian_nll(f.logits, x, log_scale=params["log_scale"]), rtol=1e-12)


# --------------------------------------------------------------------------- terms and combine


def test_reconstruction_kinds_match_direct_formulas(setup):
    model, params, x, x_in = setup
    f = run(model, params, jnp.asarray(x), jnp.asarray(x_in))
    logits = np_mlp(params, x_in)[3]
    p = special.expit(logits)
    expected = {
        "bce": -(x * np.log(p) + (1 - x) * np.log1p(-p)).sum(axis=1),
        "mse": ((p - x) ** 2).mean(axis=1),
        "mse_linear": ((logits - x) ** 2).mean(axis=1),
        "gaussian": (0.5 * (x - logits) ** 2 + 0.5 * math.log(2 * math.pi)).sum(axis=1),
    }
    for kind, value in expected.items():
        np.testing.assert_allclose(objectives.reconstruction(kind)(f), value, rtol=1e-10,
                                   err_msg=kind)
    with pytest.raises(ValueError, match=r"Unknown reconstruction 'hinge'; choose one of"):
        objectives.reconstruction("hinge")


def test_combine_total_is_the_weighted_sum_of_exact_parts(setup):
    model, params, x, x_in = setup
    mask = jnp.asarray([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    weights = {"rec": 1.0, "l1": 0.3, "sparse": 0.2, "cae": 0.05}
    objective = objectives.combine({
        "rec": (weights["rec"], objectives.reconstruction("bce")),
        "l1": (weights["l1"], objectives.l1_activity("hidden_0")),
        "sparse": (weights["sparse"], objectives.kl_sparsity("code", rho=0.1)),
        "cae": (weights["cae"], objectives.contractive(mode="rev")),
    })
    f, (total, parts) = run(model, params, jnp.asarray(x), jnp.asarray(x_in), objective=objective,
                            mask=mask)
    h0, code, _, logits = np_mlp(params, x_in)
    encode_np = lambda z: jnp.asarray(np_mlp(params, np.asarray(z))[1])
    expected = {
        "rec": losses.bce_with_logits(jnp.asarray(logits), jnp.asarray(x)),
        "l1": np.abs(h0).sum(axis=1),
        "sparse": np.full(6, np_kl_sparsity(code[:4], 0.1)),  # the padded rows do not count
        "cae": fd_frobenius(encode_np, x_in),
    }
    assert sorted(parts) == sorted(expected)
    for name, value in expected.items():
        assert parts[name].shape == (6,)
        np.testing.assert_allclose(parts[name], value, rtol=1e-6 if name == "cae" else 1e-12,
                                   err_msg=name)
    np.testing.assert_allclose(total, sum(weights[k] * parts[k] for k in weights), rtol=1e-14)
    # The reconstruction is scored against the clean x, not the corrupted model input.
    assert np.all(np.abs(np.asarray(parts["rec"] - losses.bce_with_logits(f.logits,
                                                                          jnp.asarray(x_in)))) > 1e-3)


def test_scheduled_weight_scales_with_step(setup):
    model, params, x, _ = setup
    warmup = objectives.linear_warmup(2.0, 10)
    np.testing.assert_allclose([warmup(jnp.asarray(s)) for s in (0, 5, 10, 20)], [0, 1, 2, 2],
                               rtol=1e-7)
    np.testing.assert_allclose(objectives.linear_warmup(2.0, 0)(jnp.asarray(3)), 2.0)
    manual = objectives.combine({"rec": (1.0, objectives.reconstruction("bce")),
                                 "l1": (warmup, objectives.l1_activity("code"))})
    built = objectives.build("bce", {"l1": {"weight": 2.0, "warmup_steps": 10}})
    for step, w in ((0, 0.0), (5, 1.0), (10, 2.0), (25, 2.0)):
        for objective in (manual, built):
            _, (total, parts) = run(model, params, jnp.asarray(x), objective=objective, step=step)
            rec = parts.get("rec", parts.get("reconstruction"))
            np.testing.assert_allclose(total, rec + w * parts["l1"], rtol=1e-6, err_msg=str(step))
            assert np.all(np.asarray(parts["l1"]) > 0.1)


def test_build_equals_the_hand_written_objective(setup):
    model, params, x, x_in = setup
    built = objectives.build("mse", {"l1": {"weight": 0.3, "layer": "hidden_0"},
                                     "contractive": {"weight": 0.1, "mode": "fwd"}})
    _, (total, parts) = run(model, params, jnp.asarray(x), jnp.asarray(x_in), objective=built)
    assert sorted(parts) == ["contractive", "l1", "reconstruction"]
    h0, _, _, logits = np_mlp(params, x_in)
    np.testing.assert_allclose(parts["reconstruction"], ((special.expit(logits) - x) ** 2).mean(1),
                               rtol=1e-12)
    np.testing.assert_allclose(parts["l1"], np.abs(h0).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(total, parts["reconstruction"] + 0.3 * parts["l1"]
                               + 0.1 * parts["contractive"], rtol=1e-14)


@pytest.mark.parametrize("weight", [-0.5, float("nan"), float("inf")])
def test_invalid_weights_raise(weight):
    rec = objectives.reconstruction("bce")
    with pytest.raises(ValueError, match=r"Term 'l1' has weight .*; weights must be finite and >= 0"):
        objectives.combine({"rec": (1.0, rec), "l1": (weight, objectives.l1_activity())})
    with pytest.raises(ValueError, match=r"Loss term 'l1' has weight .*; weights must be finite"):
        objectives.build("bce", {"l1": {"weight": weight}})


def test_build_and_combine_errors():
    with pytest.raises(ValueError, match="an objective needs at least one term"):
        objectives.combine({})
    with pytest.raises(ValueError, match=r"Unknown loss term 'dropout'; choose from \['codebook', "
                                         r".*'contractive', .*'kl', 'kl_sparsity', 'l1', .*'mmd'"):
        objectives.build("bce", {"dropout": {"weight": 0.1}})
    with pytest.raises(ValueError, match=r"Loss term 'l1' got unknown options \['rho'\]"):
        objectives.build("bce", {"l1": {"weight": 0.1, "rho": 0.05}})
    with pytest.raises(ValueError, match=r"Unknown contractive mode 'exact'; choose one of"):
        objectives.build("bce", {"contractive": {"mode": "exact"}})
    with pytest.raises(ValueError, match=r"kl_sparsity: rho must lie in \(0, 1\), got 1.5"):
        objectives.build("bce", {"kl_sparsity": {"rho": 1.5}})
    with pytest.raises(ValueError, match="Unknown reconstruction 'l2'"):
        objectives.build("l2", {})


def test_l1_on_unknown_layer_lists_available_names(setup):
    model, params, x, _ = setup
    f = run(model, params, jnp.asarray(x))
    with pytest.raises(ValueError, match=r"No activations named 'hidden_5' in MLPAutoencoder; "
                                         r"available: \['code', 'decoder_hidden_0', 'hidden_0'\]"):
        objectives.l1_activity("hidden_5")(f)


def test_kl_term_needs_a_vae(setup):
    model, params, x, _ = setup
    f = run(model, params, jnp.asarray(x))
    with pytest.raises(ValueError, match="The 'kl' term needs a VAE; MLPAutoencoder has no posterior"):
        objectives.gaussian_kl()(f)
    with pytest.raises(ValueError, match=r"The 'kl' term needs a stochastic encoder .*"
                                         "MLPAutoencoder has none"):
        objectives.check_compatible(model, params, jnp.asarray(x), {"kl": {"weight": 1.0}})
    vae = models.VAE(input_shape=(12,), hidden=(7,), latent_size=3)
    objectives.check_compatible(vae, init64(vae, jnp.asarray(x)), jnp.asarray(x),
                                {"kl": {"weight": 1.0}})  # no error


def test_check_compatible_kl_sparsity_needs_sigmoid_units():
    x = jnp.asarray(rand(8, (6, 12)))

    def check(model, terms):
        objectives.check_compatible(model, init64(model, x), x, terms)

    with pytest.raises(ValueError, match=r"kl_sparsity needs sigmoid units .* layer 'code' of "
                                         r"MLPAutoencoder has values in \[-"):
        check(mlp(code_activation="linear"), {"kl_sparsity": {}})
    with pytest.raises(ValueError, match=r"kl_sparsity needs sigmoid units .* layer 'hidden_0' of "
                                         r"MLPAutoencoder has values in \[-"):  # tanh units
        check(mlp(), {"kl_sparsity": {"layer": "hidden_0"}})
    with pytest.raises(ValueError, match="kl_sparsity: no activations named 'hidden_7'"):
        check(mlp(), {"kl_sparsity": {"layer": "hidden_7"}})
    check(mlp(), {"kl_sparsity": {"weight": 0.1}})  # sigmoid code: fine
    check(mlp(activation="sigmoid"), {"kl_sparsity": {"layer": "hidden_0"}})


def test_masked_mean_ignores_padded_rows():
    values = jnp.asarray([1.0, 2.0, 6.0, 1e6, -3e5])
    mask = jnp.asarray([1.0, 1.0, 1.0, 0.0, 0.0])
    assert float(jax.jit(objectives.masked_mean)(values, mask)) == 3.0
    assert float(objectives.masked_mean(values, jnp.ones(5))) == pytest.approx(np.mean(values))
    assert float(objectives.masked_mean(values, jnp.zeros(5))) == 0.0  # no division by zero


# --------------------------------------------------------------------------- contractive term


def test_contractive_modes_agree_on_mlp(setup):
    model, params, x, x_in = setup
    expected = fd_frobenius(lambda z: jnp.asarray(np_mlp(params, np.asarray(z))[1]), x_in)
    terms = {m: objectives.contractive(mode=m) for m in ("best", "dense", "fwd", "rev", "auto")}
    terms["dense_chunked"] = objectives.contractive(mode="dense", chunk_size=4)
    terms["estimate"] = objectives.contractive(mode="estimate", num_probes=3)
    f, values = run(model, params, jnp.asarray(x), jnp.asarray(x_in),
                    objective=lambda f: {m: t(f) for m, t in terms.items()})
    for m in ("best", "dense", "fwd", "rev", "auto", "dense_chunked"):
        np.testing.assert_allclose(values[m], expected, rtol=1e-6, err_msg=m)
        np.testing.assert_allclose(values[m], values["rev"], rtol=1e-12, err_msg=m)
    # The estimate draws its probes from the forward's rng.
    np.testing.assert_allclose(values["estimate"], losses.contractive(
        f.encode, f.x_in, mode="estimate", num_probes=3, rng=f.rng), rtol=1e-12)
    assert not np.allclose(values["estimate"], expected, rtol=1e-3)


@pytest.fixture
def spies(monkeypatch):
    calls = []
    for name in ("contractive_sigmoid", "contractive_one_hidden", "contractive_dense_input",
                 "contractive"):
        original = getattr(losses, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(losses, name, spy)
    return calls


def test_contractive_best_uses_the_sigmoid_closed_form_for_one_layer(spies):
    model = mlp(hidden=())
    x = jnp.asarray(rand(4, (5, 12)))
    params = init64(model, x)
    f = run(model, params, x)
    best = objectives.contractive(mode="best")(f)
    assert spies == ["contractive_sigmoid"]
    rev = objectives.contractive(mode="rev")(f)
    assert spies[-1] == "contractive"
    np.testing.assert_allclose(best, rev, rtol=1e-12)
    np.testing.assert_allclose(objectives.contractive(mode="sigmoid")(f), rev, rtol=1e-12)
    np.testing.assert_allclose(best, fd_frobenius(f.encode, x), rtol=1e-6)


def test_contractive_best_uses_dense_otherwise(spies, setup):
    model, params, x, _ = setup
    f = run(model, params, jnp.asarray(x))
    objectives.contractive(mode="best")(f)
    assert spies == ["contractive_dense_input"]
    linear_code = mlp(hidden=(), code_activation="linear")
    f = run(linear_code, init64(linear_code, jnp.asarray(x)), jnp.asarray(x))
    objectives.contractive(mode="best")(f)
    assert spies[1:] == ["contractive_dense_input"]
    with pytest.raises(ValueError, match="closed form of a one-layer sigmoid encoder"):
        objectives.contractive(mode="sigmoid")(f)


def test_contractive_best_uses_the_quadratic_form_for_one_hidden_layer_and_linear_code(spies):
    model = mlp(code_activation="linear")
    x = jnp.asarray(rand(7, (5, 12)))
    params = init64(model, x)
    f, best = run(model, params, x, objective=objectives.contractive(mode="best"))
    assert spies == ["contractive_one_hidden"]
    np.testing.assert_allclose(best, fd_frobenius(f.encode, x), rtol=1e-6)
    terms = {m: objectives.contractive(mode=m) for m in ("one_hidden", "dense", "rev")}
    _, values = run(model, params, x, objective=lambda f: {m: t(f) for m, t in terms.items()})
    for mode, value in values.items():
        np.testing.assert_allclose(value, best, rtol=1e-12, err_msg=mode)
    sigmoid_code = mlp()
    f = run(sigmoid_code, init64(sigmoid_code, x), x)
    with pytest.raises(ValueError, match="'one_hidden' needs an encoder with one hidden layer "
                                         "and a linear code"):
        objectives.contractive(mode="one_hidden")(f)


def test_contractive_on_conv_model():
    model = models.ConvAutoencoder(features=(2, 2, 2))
    x = jnp.asarray(rand(5, (2, 28, 28, 1)))
    params = init64(model, x)
    f, (auto, best) = run(model, params, x, objective=lambda f: (
        objectives.contractive(mode="auto")(f), objectives.contractive(mode="best")(f)))
    encode = lambda z: model.apply({"params": params}, z, method=model.encode)
    direct = jax.jit(lambda z: losses.contractive(encode, z, mode="fwd"))(x)
    assert np.all(np.asarray(direct) > 0)
    np.testing.assert_allclose(auto, direct, rtol=1e-10)
    np.testing.assert_allclose(best, direct, rtol=1e-10)
    for mode in ("dense", "sigmoid", "one_hidden"):
        with pytest.raises(ValueError, match=rf"contractive mode '{mode}' needs the encoder's "
                                             "dense layers, which ConvAutoencoder does not offer"):
            objectives.contractive(mode=mode)(f)


# --------------------------------------------------------------------------- tied weights


def test_tied_weights_equal_untied_with_transposed_kernels_and_share_gradients():
    tied, untied = mlp(tied=True), mlp()
    x = jnp.asarray(rand(6, (4, 12)))
    p_tied = init64(tied, x)
    assert sorted(p_tied) == ["decoder_0_bias", "decoder_1_bias", "encoder_0", "encoder_1"]
    p_untied = {"encoder_0": p_tied["encoder_0"], "encoder_1": p_tied["encoder_1"],
                "decoder_0": {"kernel": p_tied["encoder_1"]["kernel"].T,
                              "bias": p_tied["decoder_0_bias"]},
                "decoder_1": {"kernel": p_tied["encoder_0"]["kernel"].T,
                              "bias": p_tied["decoder_1_bias"]}}
    reference = jax.eval_shape(lambda: models.init(untied, key(0), x))
    assert (jax.tree.map(jnp.shape, p_untied) == jax.tree.map(jnp.shape, reference))

    out_tied = jax.jit(tied.apply)({"params": p_tied}, x)
    out_untied = jax.jit(untied.apply)({"params": p_untied}, x)
    np.testing.assert_allclose(out_tied[0], out_untied[0], rtol=1e-12)
    np.testing.assert_allclose(out_tied[1]["code"], out_untied[1]["code"], rtol=1e-12)

    loss = lambda model: jax.jit(jax.grad(lambda p: losses.bce_with_logits(
        model.apply({"params": p}, x)[0], x).sum()))
    g_tied, g_untied = loss(tied)(p_tied), loss(untied)(p_untied)
    for i, j in ((0, 1), (1, 0)):  # encoder_i is used transposed by decoder_j
        dec_grad = np.asarray(g_untied[f"decoder_{j}"]["kernel"]).T
        assert np.abs(dec_grad).max() > 1e-3  # the decoder path does contribute
        np.testing.assert_allclose(g_tied[f"encoder_{i}"]["kernel"],
                                   g_untied[f"encoder_{i}"]["kernel"] + dec_grad, rtol=1e-10,
                                   atol=1e-14)
        np.testing.assert_allclose(g_tied[f"encoder_{i}"]["bias"], g_untied[f"encoder_{i}"]["bias"],
                                   rtol=1e-10)
        np.testing.assert_allclose(g_tied[f"decoder_{i}_bias"], g_untied[f"decoder_{i}"]["bias"],
                                   rtol=1e-10)


def test_contractive_best_takes_the_generic_path_when_the_first_layer_widens(spies):
    """The Gram matrix of a first layer wider than its input costs more than one VJP per code
    unit (measured: 23.4 x against 17.7 x the plain step on 784-1000-500-250-30)."""
    model = mlp(hidden=(20, 9), code_activation="linear")  # 12 inputs -> 20 units
    x = jnp.asarray(rand(3, (5, 12)))
    params = init64(model, x)
    f, best = run(model, params, x, objective=objectives.contractive(mode="best"))
    assert spies == ["contractive"]
    _, dense = run(model, params, x, objective=objectives.contractive(mode="dense"))
    np.testing.assert_allclose(best, dense, rtol=1e-12)
    np.testing.assert_allclose(best, fd_frobenius(f.encode, x), rtol=1e-6)
