"""FP8 training (nanochat/fp8.py), on CPU, where torch._scaled_mm runs too: the tensorwise scaling,
which layers are converted, the FP8 layer's output and gradients against the same products of the
dequantized operands in fp64 (FP8's rounding, nothing else) and against nn.Linear (within FP8's
error), under autocast and the compiler, a model's training loss, and disabled(). The GPU kernels
themselves are bench/gpu_check.py's. CPU's _scaled_mm is a slow reference (some 10 MFLOP/s), so
the shapes are the smallest FP8 takes: 16 rows, 128 features."""

import copy

import pytest
import torch
import torch.nn as nn

from nanochat import fp8
from nanochat.gpt import GPT, GPTConfig

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
MANTISSA_BITS = {E4M3: 3, E5M2: 2}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dequantized(x, dtype):
    q, inverse_scale = fp8.quantize(x, dtype)
    return q.double() * inverse_scale.double()


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_quantize_scales_the_largest_magnitude_to_the_formats_largest(dtype):
    info, bits = torch.finfo(dtype), MANTISSA_BITS[dtype]
    x = randn(64, 64) * torch.logspace(-6, 6, 64)  # columns over 12 decades: normals, subnormals and zeros
    q, inverse_scale = fp8.quantize(x, dtype)
    assert q.dtype == dtype and q.float().abs().max() == info.max
    error = (q.double() * inverse_scale.double() - x.double()).abs()
    scaled = x.abs() / inverse_scale
    normal = scaled >= info.smallest_normal
    assert normal.any() and (~normal).any()
    # rounded to the nearest: half a unit in the last of the mantissa's places (fp32's rounding of
    # the scaling on top), and below the normals half the subnormal spacing
    assert (error[normal] <= x.abs()[normal] * 2.0 ** -(bits + 1) * (1 + 1e-5)).all()
    assert (error[~normal] <= info.smallest_normal * 2.0 ** -(bits + 1) * inverse_scale * (1 + 1e-5)).all()

    # one scale per tensor: far outside the format's range (2^40 is beyond e5m2's 57,344) the
    # same FP8 values come out, the inverse scale carrying the magnitude
    for k in (-40, 40):
        q_k, inverse_k = fp8.quantize(x * 2.0 ** k, dtype)
        assert torch.equal(q_k.view(torch.uint8), q.view(torch.uint8)) and inverse_k == inverse_scale * 2.0 ** k

    zeros, inverse_zeros = fp8.quantize(torch.zeros(4, 4), dtype)
    assert (zeros.float() == 0).all() and torch.isfinite(inverse_zeros)


def test_the_forward_and_both_gradients_are_fp8_matmuls():
    """Output, input gradient and weight gradient: e4m3 inputs and weights, e5m2 output gradients,
    exactly the products of the dequantized operands (up to the sums' rounding), and within FP8's
    error of nn.Linear."""
    linear = nn.Linear(128, 256)
    with torch.no_grad():
        linear.weight.copy_(randn(256, 128, seed=1) * 0.1)
        linear.bias.copy_(randn(256, seed=2))
    layer = fp8.Float8Linear.from_linear(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x, grad = randn(2, 8, 128, seed=3).requires_grad_(), randn(2, 8, 256, seed=4)

    y = layer(x)
    y.backward(grad)
    assert y.dtype == x.grad.dtype == linear.weight.grad.dtype == torch.float32
    x2, g2, w = x.detach().reshape(16, 128), grad.reshape(16, 256), linear.weight.detach()
    fp8_products = {
        "output": dequantized(x2, E4M3) @ dequantized(w, E4M3).T + linear.bias.double(),
        "input gradient": dequantized(g2, E5M2) @ dequantized(w, E4M3),
        "weight gradient": dequantized(g2, E5M2).T @ dequantized(x2, E4M3),
    }
    got = {"output": y.reshape(16, 256), "input gradient": x.grad.reshape(16, 128),
           "weight gradient": linear.weight.grad}
    for name, expected in fp8_products.items():
        torch.testing.assert_close(got[name].double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")

    exact = {"output": x2.double() @ w.double().T + linear.bias.double(), "input gradient": g2.double() @ w.double(),
             "weight gradient": g2.double().T @ x2.double()}
    for name, expected in exact.items():  # about 4% measured, against bf16's 0.3%
        relative = ((got[name].double() - expected).norm() / expected.norm()).item()
        assert relative < 0.1, f"{name}: {relative:.3f} from the exact product"


def test_autocast_sets_the_output_dtype_as_for_nn_linear():
    """Under autocast the output is in the autocast dtype, as nn.Linear's would be; each gradient
    in its parameter's or input's dtype (the optimizer's weights stay fp32)."""
    linear = nn.Linear(128, 128, bias=False)
    layer = fp8.Float8Linear.from_linear(linear)
    x = randn(16, 128).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_plain = layer(x), linear(x)
    assert y.dtype == y_plain.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == linear.weight.grad.dtype == torch.float32


def test_training_needs_whole_multiples_of_16_rows():
    """The weight gradient multiplies over the rows; without gradients any count goes."""
    layer = fp8.Float8Linear.from_linear(nn.Linear(128, 128, bias=False))
    with pytest.raises(ValueError, match="multiple of 16 rows.*got 24"):
        layer(randn(3, 8, 128))
    with torch.no_grad():
        assert layer(randn(3, 8, 128)).shape == (3, 8, 128)


def test_autocast_leaves_the_fp8_matmul_alone():
    """Every dtype of the FP8 matmul is explicit, so autocast changes nothing in it, forward or
    backward (CPU autocast rounded eager _scaled_mm's result otherwise, and not a compiled graph's)."""
    x, weight = randn(16, 128).requires_grad_(), randn(256, 128).requires_grad_()
    results = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            y = fp8._Float8Matmul.apply(x, weight, torch.bfloat16)
            y.float().square().sum().backward()
        results.append((y, x.grad, weight.grad))
        x.grad = weight.grad = None
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_compiled_equals_eager_in_one_graph():
    """Under autocast, as training runs it: the FP8 matmul is one node of the compiler's graph (no
    graph break), and the compiled model's output and gradients are eager's to the bit."""
    model = nn.Sequential(nn.Linear(128, 256, bias=False), nn.ReLU(), nn.Linear(256, 128, bias=False))
    assert fp8.convert_linears(model) == 2
    x = randn(16, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(x)
    eager.float().square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    compiled.float().square().sum().backward()
    assert torch.equal(compiled, eager)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), eager_grads))


def small_gpt():
    """A 1-layer GPT of width 128 whose layers compute something (init_weights zeroes the output
    projections: every block would start as the identity)."""
    config = GPTConfig(sequence_len=64, vocab_size=512, n_layer=1, n_head=2, n_kv_head=1, n_embd=128)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def test_convertible_layers():
    """Multiples of 16, at least 128 wide, never lm_head: in the GPT at width 128 with one key/value
    head of 64, each block's c_q, attention c_proj, c_fc and MLP c_proj."""
    assert fp8.convertible("x", nn.Linear(128, 128)) and fp8.convertible("x", nn.Linear(512, 128))
    assert not fp8.convertible("x", nn.Linear(136, 128)) and not fp8.convertible("x", nn.Linear(128, 120))
    assert not fp8.convertible("x", nn.Linear(128, 64)) and not fp8.convertible("lm_head", nn.Linear(128, 512))
    model = small_gpt()
    params, state = list(model.parameters()), copy.deepcopy(model.state_dict())
    assert fp8.convert_linears(model) == 4
    converted = sorted(name for name, m in model.named_modules() if isinstance(m, fp8.Float8Linear))
    assert converted == [f"transformer.h.0.{layer}" for layer in ("attn.c_proj", "attn.c_q", "mlp.c_fc", "mlp.c_proj")]
    # the optimizer's parameters and the checkpoint's tensors are the model's as before
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert fp8.convert_linears(model) == 0


def test_convert_refuses_a_device_without_fp8():
    model = small_gpt()
    with pytest.raises(ValueError, match="needs a CUDA GPU with FP8.*on cpu"):
        fp8.convert(model)
    assert not any(isinstance(m, fp8.Float8Linear) for m in model.modules())


def test_training_loss_and_disabled():
    """The converted GPT's loss and gradients are within FP8's error of the model's; within
    disabled() its logits and loss are the unconverted model's to the bit, and on leaving (even by
    an exception) FP8's again."""
    plain = small_gpt()
    model = copy.deepcopy(plain)
    fp8.convert_linears(model)
    idx = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    targets = idx.roll(-1, dims=1)

    losses = [m(idx, targets) for m in (plain, model)]
    for loss in losses:
        loss.backward()
    assert abs(losses[1].item() - losses[0].item()) < 0.01 * losses[0].item()
    for (name, p), q in zip(plain.named_parameters(), model.parameters()):  # e5m2's 2 bits, through the layers
        assert ((q.grad - p.grad).norm() / p.grad.norm()).item() < 0.25, name

    with torch.no_grad():
        fp8_logits, plain_logits = model(idx), plain(idx)
        assert not torch.equal(fp8_logits, plain_logits)
        with fp8.disabled(model):
            assert torch.equal(model(idx), plain_logits) and torch.equal(model(idx, targets), plain(idx, targets))
        assert torch.equal(model(idx), fp8_logits)
        with pytest.raises(KeyError), fp8.disabled(model):
            raise KeyError("an evaluation failing")
        assert torch.equal(model(idx), fp8_logits)
