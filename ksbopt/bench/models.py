"""Flax NNX models of the benchmark tasks (Flax layout: the output unit is the last axis).

Names of submodules are part of the contract with :mod:`ksbopt.bench.tasks`, whose symmetry
declarations select parameters by these paths (``conv1/kernel``, ``head/bias``, ...).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["CNN1D", "MLP", "DeepMLP", "DigitsCNN", "ResNet1D", "TransformerLM"]

# PyTorch's BatchNorm momentum 0.1 (the convention of the NLD and MNIST-1D code) is Flax's 0.9.
BN_MOMENTUM = 0.9


def _activation(linear: bool):
    """ReLU, or the identity for ``linear=True``.

    ``model(x, linear=True)`` is the network with every ReLU replaced by the identity: run on
    squared weights and an all-ones input, its summed output is the squared l2 path norm that
    Path-SGD needs (Neyshabur et al. 2015, https://arxiv.org/abs/1506.02617).
    """
    return (lambda h: h) if linear else jax.nn.relu


class CNN1D(nnx.Module):
    """MNIST-1D's published CNN: three strided 1-D convolutions, ReLU, a linear head.

    With ``batchnorm=True`` every convolution is followed by BatchNorm (and has no bias, which
    BatchNorm would remove anyway), so each output channel of ``conv{i}/kernel`` is a scale
    group.
    """

    def __init__(self, channels: int = 25, *, batchnorm: bool, length: int = 40, rngs: nnx.Rngs):
        self.batchnorm = batchnorm
        specs = [(1, 5), (channels, 3), (channels, 3)]
        n = length
        for i, (cin, k) in enumerate(specs, start=1):
            conv = nnx.Conv(
                cin,
                channels,
                kernel_size=(k,),
                strides=2,
                padding=1,
                use_bias=not batchnorm,
                rngs=rngs,
            )
            setattr(self, f"conv{i}", conv)
            if batchnorm:
                setattr(self, f"bn{i}", nnx.BatchNorm(channels, momentum=BN_MOMENTUM, rngs=rngs))
            n = (n + 2 - k) // 2 + 1
        self.head = nnx.Linear(channels * n, 10, rngs=rngs)

    def __call__(self, x, *, linear: bool = False):
        act = _activation(linear)
        h = x[..., None]
        for i in (1, 2, 3):
            h = getattr(self, f"conv{i}")(h)
            if self.batchnorm:
                h = getattr(self, f"bn{i}")(h)
            h = act(h)
        return self.head(h.reshape(h.shape[0], -1))


class ResNet1D(nnx.Module):
    r"""A ResNet for 1-D signals, with BatchNorm or without normalisation.

    A stride-2 stem convolution, then ``len(widths)`` stages of ``blocks`` basic blocks
    (two width-3 convolutions) at half the length each, a global average pool and a linear head.
    A stage that changes the width pools by two and zero-pads the new channels of the shortcut
    (He et al. 2016, option A, https://arxiv.org/abs/1512.03385), so the network has no
    projection shortcuts and its symmetries are those of the convolutions:

    - ``batchnorm=True``: every convolution has no bias and is followed by BatchNorm,
      :math:`y = \mathrm{relu}(x + \mathrm{BN}(W_b * \mathrm{relu}(\mathrm{BN}(W_a * x))))`,
      so each output channel of every kernel is a scale group.
    - ``batchnorm=False``: :math:`y = \mathrm{relu}(x + W_b * \mathrm{relu}(W_a * x + a) + b)`;
      each hidden channel of a block (output ``c`` of ``W_a``, ``a``; input ``c`` of ``W_b``)
      has a positive rescale symmetry. The residual stream has none (the identity shortcut
      breaks it). ``W_b`` starts at He variance divided by the number of blocks, so the signal
      stays O(1) through the identity shortcuts at initialisation (the rule of Fixup, Zhang et
      al. 2019, https://arxiv.org/abs/1901.09321, with a Gaussian instead of zeros).

    Submodule paths: ``stem``, ``s{i}b{j}a`` / ``s{i}b{j}b`` (convolutions; ``..._bn`` their
    BatchNorms), ``head``.

    Example:
      >>> from flax import nnx
      >>> net = ResNet1D((8, 16), blocks=1, batchnorm=True, rngs=nnx.Rngs(0))
      >>> net(jnp.ones((2, 40))).shape
      (2, 10)
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (32, 64, 128),
        *,
        blocks: int = 2,
        batchnorm: bool,
        n_out: int = 10,
        rngs: nnx.Rngs,
    ):
        self.batchnorm = batchnorm
        self.widths = tuple(widths)
        self.blocks = blocks
        he = nnx.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
        last = nnx.initializers.variance_scaling(
            2.0 / (len(widths) * blocks), "fan_in", "truncated_normal"
        )

        def conv(name, cin, cout, k, stride, init):
            setattr(
                self,
                name,
                nnx.Conv(
                    cin,
                    cout,
                    kernel_size=(k,),
                    strides=stride,
                    padding="SAME",
                    use_bias=not batchnorm,
                    kernel_init=init,
                    rngs=rngs,
                ),
            )
            if batchnorm:
                setattr(self, f"{name}_bn", nnx.BatchNorm(cout, momentum=BN_MOMENTUM, rngs=rngs))

        conv("stem", 1, widths[0], 5, 2, he)
        for i, w in enumerate(widths):  # the shortcut is padded to w channels before block 0
            for j in range(blocks):
                conv(f"s{i}b{j}a", w, w, 3, 1, he)
                conv(f"s{i}b{j}b", w, w, 3, 1, he if batchnorm else last)
        self.head = nnx.Linear(widths[-1], n_out, rngs=rngs)

    def _conv(self, name, h):
        h = getattr(self, name)(h)
        return getattr(self, f"{name}_bn")(h) if self.batchnorm else h

    def __call__(self, x):
        h = jax.nn.relu(self._conv("stem", x[..., None]))
        for i, w in enumerate(self.widths):
            if i:  # halve the length; zero-pad the shortcut's new channels
                n, t, c = h.shape
                h = h.reshape(n, t // 2, 2, c).mean(axis=2)
                h = jnp.pad(h, ((0, 0), (0, 0), (0, w - c)))
            for j in range(self.blocks):
                r = jax.nn.relu(self._conv(f"s{i}b{j}a", h))
                h = jax.nn.relu(h + self._conv(f"s{i}b{j}b", r))
        return self.head(h.mean(axis=1))


class MLP(nnx.Module):
    """MNIST-1D's published MLP (40-100-100-10, ReLU), optionally with LayerNorm.

    With ``layernorm=True`` each hidden Dense is followed by LayerNorm: the whole of
    ``fc{i}/kernel`` and ``fc{i}/bias`` is one scale group.
    """

    def __init__(
        self,
        in_dim: int = 40,
        hidden: int = 100,
        depth: int = 2,
        *,
        layernorm: bool,
        n_out: int = 10,
        rngs: nnx.Rngs,
    ):
        self.layernorm = layernorm
        self.depth = depth
        dims = [in_dim] + [hidden] * depth
        for i in range(depth):
            setattr(self, f"fc{i + 1}", nnx.Linear(dims[i], dims[i + 1], rngs=rngs))
            if layernorm:
                setattr(self, f"ln{i + 1}", nnx.LayerNorm(dims[i + 1], rngs=rngs))
        self.head = nnx.Linear(hidden, n_out, rngs=rngs)

    def __call__(self, x, *, linear: bool = False):
        act = _activation(linear)
        h = x.reshape(x.shape[0], -1)
        for i in range(1, self.depth + 1):
            h = getattr(self, f"fc{i}")(h)
            if self.layernorm:
                h = getattr(self, f"ln{i}")(h)
            h = act(h)
        return self.head(h)


class DigitsCNN(nnx.Module):
    """A small 2-D CNN for 8x8 digits: 3x3 conv, 3x3 stride-2 conv, linear head."""

    def __init__(self, c1: int = 16, c2: int = 32, *, batchnorm: bool, rngs: nnx.Rngs):
        self.batchnorm = batchnorm
        self.conv1 = nnx.Conv(1, c1, kernel_size=(3, 3), use_bias=not batchnorm, rngs=rngs)
        self.conv2 = nnx.Conv(
            c1, c2, kernel_size=(3, 3), strides=2, use_bias=not batchnorm, rngs=rngs
        )
        if batchnorm:
            self.bn1 = nnx.BatchNorm(c1, momentum=BN_MOMENTUM, rngs=rngs)
            self.bn2 = nnx.BatchNorm(c2, momentum=BN_MOMENTUM, rngs=rngs)
        self.head = nnx.Linear(4 * 4 * c2, 10, rngs=rngs)

    def __call__(self, x, *, linear: bool = False):
        act = _activation(linear)
        h = self.conv1(x)
        if self.batchnorm:
            h = self.bn1(h)
        h = self.conv2(act(h))
        if self.batchnorm:
            h = self.bn2(h)
        h = act(h)
        return self.head(h.reshape(h.shape[0], -1))


class DeepMLP(nnx.Module):
    """A deep ReLU (``relu=True``) or deep linear network without normalisation.

    The linear version has no biases, so consecutive kernels form a GL(width) symmetry; the ReLU
    version has a rescale symmetry per hidden unit.
    """

    def __init__(
        self, in_dim: int, out_dim: int, width: int, depth: int, *, relu: bool, rngs: nnx.Rngs
    ):
        self.relu = relu
        self.depth = depth
        dims = [in_dim] + [width] * (depth - 1) + [out_dim]
        for i in range(depth):
            setattr(self, f"fc{i + 1}", nnx.Linear(dims[i], dims[i + 1], use_bias=relu, rngs=rngs))

    def __call__(self, x, *, linear: bool = False):
        h = x
        for i in range(1, self.depth + 1):
            h = getattr(self, f"fc{i}")(h)
            if self.relu and not linear and i < self.depth:
                h = jax.nn.relu(h)
        return h


class Block(nnx.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, d: int, heads: int, *, qk_norm: bool, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            heads, d, normalize_qk=qk_norm, decode=False, deterministic=True, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
        self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class TransformerLM(nnx.Module):
    """Byte-level causal pre-LayerNorm Transformer, optionally with QK-normalisation.

    With ``qk_norm=True`` Flax applies a LayerNorm over the head dimension to queries and keys,
    which makes each head's slice of ``attn/query`` and ``attn/key`` (kernel and bias) a scale
    group.
    """

    def __init__(
        self,
        *,
        d: int,
        layers: int,
        heads: int,
        seq_len: int,
        qk_norm: bool,
        rngs: nnx.Rngs,
        vocab: int = 256,
    ):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Embed(seq_len, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, qk_norm=qk_norm, rngs=rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens):
        t = tokens.shape[-1]
        x = self.embed(tokens) + self.pos(jnp.arange(t))
        mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))
