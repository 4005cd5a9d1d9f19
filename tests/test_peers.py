"""experiments/peers/pytorch.py: the PyTorch twins compute aejax's loss, gradients and Adam update
on the same weights and batch, so the bench compares the same computation. Skipped without torch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

from aejax import models, objectives, step  # noqa: E402
from experiments.peers import pytorch  # noqa: E402

BATCH = 16


def images(shape=(784,), seed=0):
    return np.random.default_rng(seed).uniform(size=(BATCH, *shape)).astype(np.float32)


def twin(model, x):
    """Random parameters of ``model`` and its PyTorch twin holding the same weights.

    Drawn with NumPy at the shapes ``models.init`` gives (found without compiling it: the
    convolutional model's init takes XLA tens of seconds to compile on a busy 2-core machine).
    """
    shapes = jax.eval_shape(lambda x: models.init(model, jax.random.PRNGKey(0), x), x)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.1).astype(np.float32), shapes)
    return params, pytorch.load_flax(pytorch.mirror(model), params)


def aejax_loss(model, params, x, terms):
    """The batch mean of the loss aejax's train step differentiates, and its parts."""
    per_example = jax.jit(step.make_per_example_fn(model, objectives.build("bce", terms)))
    total, parts = per_example(params, {"x": jnp.asarray(x)}, jax.random.PRNGKey(2), 0)
    return float(total.mean()), {k: np.asarray(v) for k, v in parts.items()}


def as_torch_grads(grads):
    """aejax gradients in the twin's layout (``Linear.weight`` is the kernel transposed)."""
    return {f"layers.{layer}.{'weight' if k == 'kernel' else 'bias'}":
            (np.asarray(g).T if k == "kernel" else np.asarray(g))
            for layer, leaves in grads.items() for k, g in leaves.items()}


def test_mlp_loss_gradients_and_adam_step_match():
    model = models.MLPAutoencoder(hidden=(128,), code_size=32)
    x = images()
    params, net = twin(model, x)
    loss_jax, _ = aejax_loss(model, params, x, {})
    value = pytorch.loss(net, torch.from_numpy(x))
    np.testing.assert_allclose(value.item(), loss_jax, rtol=1e-5)

    per_example = step.make_per_example_fn(model, objectives.build("bce", {}))
    mean_loss = lambda p: per_example(p, {"x": jnp.asarray(x)}, jax.random.PRNGKey(2), 0)[0].mean()
    grads = jax.jit(jax.grad(mean_loss))(params)
    value.backward()
    expected = as_torch_grads(grads)
    for name, p in net.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), expected[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)

    # One Adam update from the same gradients: optax's (as the bench's aejax steps) and PyTorch's.
    tx = optax.adam(1e-3, b1=0.9, b2=0.999)
    update = jax.jit(lambda g, p: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))
    after = as_torch_grads(update(grads, params))
    optimizer = pytorch.adam(net, 1e-3)
    for name, p in net.named_parameters():
        p.grad = torch.tensor(expected[name])
    optimizer.step()
    for name, p in net.named_parameters():
        np.testing.assert_allclose(p.detach().numpy(), after[name], rtol=0, atol=1e-7,
                                   err_msg=name)


def test_vae_loss_matches_with_the_same_noise():
    model = models.VAE(hidden=(128,), latent_size=32)
    x = (images() > 0.5).astype(np.float32)  # a binarized batch, as the VAE step trains on
    params, net = twin(model, x)
    objective = objectives.build("bce", {"kl": {"weight": 1.0}})

    @jax.jit
    def loss_and_noise(params, x):
        f = objectives.forward(model, params, x, x, rng=jax.random.PRNGKey(3), step=0)
        total, parts = objective(f)
        # The noise aejax's VAE drew: z = mean + exp(logvar / 2) * noise.
        return total.mean(), parts, (f.code - f.extras["mean"]) * jnp.exp(-0.5 * f.extras["logvar"])

    total, parts, noise = loss_and_noise(params, jnp.asarray(x))
    noise = torch.tensor(np.asarray(noise))
    value = pytorch.loss(net, torch.from_numpy(x), terms={"kl": 1.0}, noise=noise)
    np.testing.assert_allclose(value.item(), float(total), rtol=1e-5)
    _, aux = net(torch.from_numpy(x), noise)
    np.testing.assert_allclose(pytorch.gaussian_kl(aux["mean"], aux["logvar"]).detach().numpy(),
                               np.asarray(parts["kl"]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["rev", "best"])
def test_exact_contractive_penalty_and_loss_match(mode):
    model = models.MLPAutoencoder(hidden=(128,), code_size=32)
    x = images()
    params, net = twin(model, x)
    loss_jax, parts = aejax_loss(model, params, x, {"contractive": {"weight": 0.1, "mode": mode}})
    penalty = pytorch.contractive(net.encode, torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(penalty, parts["contractive"], rtol=1e-4)
    value = pytorch.loss(net, torch.from_numpy(x), terms={"contractive": 0.1})
    np.testing.assert_allclose(value.item(), loss_jax, rtol=1e-5)


def test_contractive_penalty_trains():
    net = pytorch.mirror(models.MLPAutoencoder(hidden=(128,), code_size=32))
    pytorch.contractive(net.encode, torch.from_numpy(images())).sum().backward()
    # With ReLU the Jacobian is W2 diag(relu'(x W1 + b1)) W1: it depends on both kernels only.
    for name in ("encoder_0", "encoder_1"):
        grad = net.layers[name].weight.grad
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize("upsampling", ["nearest", "unpool"])
def test_conv_loss_matches(upsampling):
    model = models.ConvAutoencoder(upsampling=upsampling)
    x = images((28, 28, 1))
    params, net = twin(model, x)
    loss_jax, _ = aejax_loss(model, params, x, {})
    nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(pytorch.loss(net, nchw).item(), loss_jax, rtol=1e-5)


def test_conv_exact_contractive_penalty_and_loss_match():
    # The twin's code is aejax's in NCHW order, its input too: the Jacobian's rows and columns
    # permuted, the same Frobenius norm.
    model = models.ConvAutoencoder()
    x = images((28, 28, 1))[:4]
    params, net = twin(model, x)
    loss_jax, parts = aejax_loss(model, params, x, {"contractive": {"weight": 0.1, "mode": "rev"}})
    nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(pytorch.contractive(net.encode, nchw).detach().numpy(),
                               parts["contractive"], rtol=1e-4)
    np.testing.assert_allclose(pytorch.loss(net, nchw, terms={"contractive": 0.1}).item(),
                               loss_jax, rtol=1e-5)


def test_runner_trains_as_the_loop_orders_batches():
    x_all = images().repeat(4, axis=0)
    net = pytorch.mirror(models.MLPAutoencoder(hidden=(16,), code_size=4))
    run = pytorch.Runner(net, x_all, np.random.default_rng(0).permutation(len(x_all)),
                         batch_size=16, steps_per_call=8)
    first = run.step().item()
    run()
    assert run.count == 9 and run.step().item() < first


def test_mismatched_layers_are_refused():
    params, _ = twin(models.MLPAutoencoder(hidden=(8,), code_size=2), images())
    net = pytorch.mirror(models.MLPAutoencoder(hidden=(8, 4), code_size=2))
    with pytest.raises(ValueError, match="Layers differ"):
        pytorch.load_flax(net, params)
    with pytest.raises(ValueError, match="No PyTorch twin"):
        pytorch.mirror(models.MLPAutoencoder(tied=True))
