"""experiments/bench.py: each step's own products (what its own limit times) and the physical
checks of its records."""

import glob
import json
import os
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aejax import losses, models, objectives, step
from experiments import bench

B = 256


def train_step_products(model, terms, x, objective=None):
    per_example = step.make_per_example_fn(model, objective or objectives.build("bce", terms))
    tx = optax.adam(1e-3)
    shapes = jax.eval_shape(lambda x: models.init(model, jax.random.PRNGKey(0), x), x)
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    return bench.own_products(step.make_train_step(per_example, tx),
                              step.TrainState.create(params, tx), {"x": x}, jax.random.PRNGKey(0))


def shapes(products):
    return sorted((p.primitive.name, tuple(a.shape for a in p.operands)) for p in products)


def test_a_dense_step_has_its_forward_and_backward_products_and_no_input_gradient():
    x = np.zeros((B, 784), np.float32)
    products = train_step_products(models.MLPAutoencoder(hidden=(128,), code_size=32), {}, x)
    dims = [(784, 128), (128, 32), (32, 128), (128, 784)]
    forward = [((B, i), (i, o)) for i, o in dims]  # X @ W
    kernels = [((B, i), (B, o)) for i, o in dims]  # X.T @ dY
    inputs = [((B, o), (i, o)) for i, o in dims[1:]]  # dY @ W.T, not for the first layer
    assert shapes(products) == sorted(("dot_general", s) for s in forward + kernels + inputs)
    weights = sum(i * o for i, o in dims)
    assert bench.product_flops(products) == 2 * B * (3 * weights - 784 * 128)


def test_products_of_the_same_operands_count_once():
    # The contractive penalty runs the encoder again: XLA computes its products once, and so do
    # the counts. rev mode adds the 5 products of the Jacobian's rows and their gradients, for
    # each group of code units the rows are formed in (on a CPU, by their size).
    x = np.zeros((B, 784), np.float32)
    model = models.MLPAutoencoder(hidden=(128,), code_size=32)
    plain = train_step_products(model, {}, x)
    rev = train_step_products(model, {"contractive": {"weight": 0.1, "mode": "rev"}}, x)
    groups = len(losses.unit_slices(32, 32 * x.size * x.itemsize))
    assert len(plain) == 11 and len(rev) == 11 + 5 * groups
    assert set(shapes(plain)) <= set(shapes(rev))
    # Grouped or not, the rows' products are the same FLOPs.
    one = train_step_products(model, {}, x, objective=objectives.combine({
        "reconstruction": (1.0, objectives.reconstruction("bce")),
        "contractive": (0.1, lambda f: losses.contractive(f.encode, f.x_in, mode="rev",
                                                          unit_groups=1))}))
    assert len(one) == 16
    assert bench.product_flops(rev) == pytest.approx(bench.product_flops(one), rel=1e-12)


def test_a_convolutional_step_has_every_convolution():
    x = np.zeros((B, 28, 28, 1), np.float32)
    products = train_step_products(models.ConvAutoencoder(conv_lowering="xla"), {}, x)
    names = {p.primitive.name for p in products}
    # 7 convolutions forward, 7 kernel gradients, 6 input gradients (not the first layer's).
    assert names == {"conv_general_dilated"} and len(products) == 20
    # The first layer as shifted slices: its convolution and kernel gradient become products;
    # so do the last layer's (one output channel), whose input gradient stays a convolution.
    products = train_step_products(models.ConvAutoencoder(conv_lowering="shifted"), {}, x)
    names = [p.primitive.name for p in products]
    assert names.count("conv_general_dilated") == 16 and names.count("dot_general") == 4


def test_products_in_a_loop_are_refused():
    def fn(w):
        return jax.lax.scan(lambda h, _: (h @ w, None), jnp.ones((4, 4)), None, length=3)[0]

    with pytest.raises(ValueError, match="inside 'scan'"):
        bench.own_products(fn, jnp.ones((4, 4)))


def test_the_limit_computes_every_product_in_turn():
    a, b = jnp.ones((256, 256)), jnp.ones((256, 256))
    one = bench.own_products(lambda a, b: a @ b, a, b)
    twenty = bench.own_products(lambda a, b: [a @ (b + i) for i in range(20)], a, b)
    assert len(twenty) == 20  # different operands: twenty products
    outputs = bench.limit_runner(twenty)()
    assert len(outputs) == 20 and all(o.shape == (256, 256) for o in outputs)
    # Were some of them shared or dropped, twenty would cost about as much as one.
    best = lambda fn: min(timed(fn) for _ in range(5))
    assert best(bench.limit_runner(twenty)) > 5 * best(bench.limit_runner(one))


def timed(fn):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def test_a_step_faster_than_a_reference_in_every_round_is_not_physical():
    times = bench.Timings({"matmul": [1.0] * 3, "step": [2.0] * 3, ("step", "limit"): [1.0] * 3,
                           ("step", "pytorch"): [3.0] * 3})
    check = lambda flops=1e9: bench.against_references(times, "step", flops=flops, matmul_flops=1e9)
    fields = check()
    assert fields["physical"] and fields["fraction_of_own_limit"] == 0.5
    assert fields["fraction_of_roofline"] == 0.5 and fields["ratio_to_pytorch"] == 1.5
    times["step", "limit"] = [2.2, 1.8, 2.2]  # within the noise of its limit: still physical
    assert check()["physical"] and check()["fraction_of_own_limit"] == 1.1
    times["step", "limit"] = [2.2, 2.1, 2.2]  # faster than its own products alone, every round
    assert not check()["physical"]
    times["step", "limit"] = [1.0, 1.0, 1.0]
    assert not check(flops=3e9)["physical"]  # ... or than its FLOPs at the matmul rate


def test_own_limit_ratio_to_pytorch_is_the_twin_over_the_products_alone():
    times = bench.Timings({"matmul": [1.0] * 3, "step": [2.0] * 3, ("step", "limit"): [1.0, 1.2, 0.8],
                           ("step", "pytorch"): [3.0, 3.0, 3.2]})
    fields = bench.against_references(times, "step", flops=1e9, matmul_flops=1e9)
    assert fields["own_limit_ratio_to_pytorch"] == 3.0  # median of 3.0, 2.5, 4.0


def test_a_step_without_a_timed_limit_gets_its_twin_ratio_and_no_physical_verdict():
    times = bench.Timings({"rev": [2.0] * 3, ("rev", "limit"): [1.0, 1.2, 0.8],
                           "pytorch": [3.0, 3.0, 3.2], "conv": [4.0] * 3})
    with_limit = bench.limit_and_twin(times, "rev", "pytorch")
    assert with_limit == {"fraction_of_own_limit": 0.5, "physical": True,
                          "pytorch_steps_per_s": 0.33, "ratio_to_pytorch": 1.5,
                          "own_limit_ratio_to_pytorch": 3.0}
    assert bench.limit_and_twin(times, "conv", "pytorch") == {
        "pytorch_steps_per_s": 0.33, "ratio_to_pytorch": 0.75}


def test_targets_are_computed_from_the_records():
    records = [
        {"name": "pytorch", "version": "x"},
        {"name": "train_step", "fraction_of_own_limit": 0.70, "ratio_to_pytorch": 1.34,
         "own_limit_ratio_to_pytorch": 2.4},
        {"name": "conv_step", "ratio_to_pytorch": 0.4, "own_limit_ratio_to_pytorch": 0.6},
        {"name": "contractive_step", "mode": "rev", "ratio_to_pytorch": 1.2,
         "own_limit_ratio_to_pytorch": 1.8},
        {"name": "contractive_step", "mode": "best", "ratio_to_pytorch": 17.0},
        {"name": "vae_step", "counter_binarization_over_fixed_inputs": 1.16},
    ]
    out = bench.targets(records)
    rows = {(r["record"], r.get("mode"), r["field"]): r for r in out["targets"]}
    assert set(rows) == {("train_step", None, "fraction_of_own_limit"),
                         ("train_step", None, "ratio_to_pytorch"),
                         ("conv_step", None, "ratio_to_pytorch"),
                         ("contractive_step", "rev", "ratio_to_pytorch"),
                         ("contractive_step", "best", "ratio_to_pytorch"),
                         ("vae_step", None, "counter_binarization_over_fixed_inputs")}
    assert rows["train_step", None, "fraction_of_own_limit"]["met"]  # the bar itself meets it
    assert rows["train_step", None, "ratio_to_pytorch"]["bar"] == ">= 1.0"
    conv = rows["conv_step", None, "ratio_to_pytorch"]
    assert conv["bar"] == ">= 1.3" and not conv["met"] and not conv["within_own_limit"]
    rev = rows["contractive_step", "rev", "ratio_to_pytorch"]
    assert not rev["met"] and rev["within_own_limit"]
    assert "within_own_limit" not in rows["contractive_step", "best", "ratio_to_pytorch"]
    vae = rows["vae_step", None, "counter_binarization_over_fixed_inputs"]
    assert vae["bar"] == "<= 1.15" and not vae["met"]
    assert (out["met"], out["of"]) == (3, 6)


def test_a_target_applies_to_every_encoder_of_its_mode():
    # --contractive-only: the exact steps of two encoders, each against the same 1.5 x bar.
    records = [
        {"name": "contractive_step", "mode": "gaussian", "encoder": "deep", "ratio_to_plain": 2.0},
        {"name": "contractive_step", "mode": "dense", "encoder": "deep", "ratio_to_pytorch": 0.9},
        {"name": "contractive_step", "mode": "rev", "encoder": "deep", "ratio_to_pytorch": 1.6},
        {"name": "contractive_step", "mode": "rev", "encoder": "conv", "ratio_to_pytorch": 1.4},
    ]
    out = bench.targets(records)
    rows = {(r["mode"], r["encoder"]): r for r in out["targets"]}
    assert set(rows) == {("dense", "deep"), ("rev", "deep"), ("rev", "conv")}
    assert rows["rev", "deep"]["bar"] == rows["rev", "conv"]["bar"] == ">= 1.5"
    assert rows["rev", "deep"]["met"] and not rows["rev", "conv"]["met"]
    assert rows["dense", "deep"]["bar"] == ">= 1.0" and not rows["dense", "deep"]["met"]
    assert (out["met"], out["of"]) == (1, 3)


AMD = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx fma avx2 bmi2

processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx fma avx2 bmi2
"""
XEON = "model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz\nflags\t: avx avx2 avx512f avx512bw\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes\nCPU part\t: 0xd0c\n"


@pytest.mark.parametrize("text,cores,want", [
    (AMD, 2, "cpu (AMD EPYC, 2 cores, avx2)"),
    (XEON, 8, "cpu (Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz, 8 cores, avx512)"),
    (ARM, 1, "cpu (0xd0c, 1 core, neon)"),
    ("", 4, "cpu (4 cores)"),
])
def test_a_cpu_record_names_the_processor_its_cores_and_its_widest_vector_unit(text, cores, want):
    assert bench.cpu_description(text, cores) == want


def test_records_name_this_machines_device():
    record = bench.emit(name="probe")
    assert record["device"] == bench.device_description()
    if jax.devices()[0].platform == "cpu":
        assert record["device"].startswith("cpu (") and "core" in record["device"]


def test_the_epoch_timing_prints_nothing_but_its_record_on_stdout(monkeypatch, capsys):
    """What the data's first preparation and the loop print goes to stderr: the bench's stdout
    stays JSON lines."""
    from aejax.data import splits as data_splits
    from aejax.runtime import trainer

    data = types.SimpleNamespace(train=(np.zeros((512, 784)),), validation=(np.zeros((64, 784)),))
    seconds = iter([0.0, 5.0, 5.0, 7.0, 7.0, 11.0])  # an untimed run, then 1 and 3 epochs
    monkeypatch.setattr(data_splits, "load", lambda *a, **k: print("preparing ...") or data)
    monkeypatch.setattr(trainer, "train_and_evaluate", lambda *a, **k: print("epoch 1"))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(seconds))
    record = bench.epoch_time(0.1, rounds=1)
    out, err = capsys.readouterr()
    assert out == "" and "preparing ..." in err and "epoch 1" in err
    assert record["train_steps"] == 2 and record["seconds"] == 1.0 and record["physical"]


def test_recorded_runs_name_their_device_and_pass_their_checks():
    root = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "results")
    files = glob.glob(os.path.join(root, "bench_*.jsonl"))
    assert files
    for path in files:
        for line in open(path):
            record = json.loads(line)
            assert record.get("device"), (path, record)
            assert record.get("physical", True), (path, record)


def test_the_iwae_evaluation_record_counts_one_chunk_of_decoder_products():
    x = jax.random.uniform(jax.random.PRNGKey(0), (20, 784))
    run, chunks, chunk, products = bench.iwae_eval_runner(x, num_samples=30, images=20)
    # 2048 rows a chunk on a CPU: 102 samples of 20 images, capped at the 30 asked for.
    assert (chunk, chunks) == (30, 1)
    rows = chunk * 20
    assert [tuple(p.operands[1].shape) for p in products] == [(50, 200), (200, 200), (200, 784)]
    assert bench.product_flops(products) == 2 * rows * (50 * 200 + 200 * 200 + 200 * 784)
    assert np.all(np.isfinite(np.asarray(run())))
