"""Building blocks shared by every transformer in the model: attention, MLP, LayerNorm, Dense.

Every parameter carries logical axis names, so that the sharding rules in the config (a table of
logical -> mesh axes) decide how it is laid out and no model code changes with the parallelism:

  embed  model width on the input side of a kernel      mlp    FFN hidden / output side of d->d
  heads  attention heads                                kv     per-head width
  vocab  vocabulary                                     slots  memory slots
  patch  pixels of a patch (p*p*3)                      gla    alignment embedding width
  classes  outputs of a classification head
Activations are constrained with ('batch', 'length', 'embed').
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
INIT_STD = 0.02  # normal(0.02) for dense and embedding weights, zero bias [M3AE]


def normal(axes: Sequence[Optional[str]], std: float = INIT_STD):
  return nn.with_logical_partitioning(nn.initializers.normal(std), tuple(axes))


def zeros(axes: Sequence[Optional[str]]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(axes))


def ones(axes: Sequence[Optional[str]]):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), tuple(axes))


def constrain(x, axes=("batch", "length", "embed")):
  """Activation sharding hint; a no-op outside a mesh with logical axis rules."""
  return nn.with_logical_constraint(x, axes)


def quick_gelu(x):
  """CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu(x):
  """BERT's exact (erf) GELU, 0.5 x (1 + erf(x / sqrt 2)). (nn.gelu(approximate=False) is the same
  function written with erfc, which XLA:CPU evaluates ~2.5x slower; they differ by <= 5e-7.)"""
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.5**0.5, x.dtype)))


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


def Dense(features: int, axes: Sequence[Optional[str]], dtype: Dtype, name: Optional[str] = None,
          use_bias: bool = True):
  """nn.Dense with logically named kernel [in, out] and bias [out], normal(0.02) / zeros init."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=normal(axes),
                  bias_init=zeros(axes[-1:]), name=name)


def LayerNorm(eps: float, dtype: Dtype, name: Optional[str] = None):
  return nn.LayerNorm(epsilon=eps, dtype=dtype, scale_init=ones(("embed",)), bias_init=zeros(
      ("embed",)), name=name)


class HeadsIn(nn.Module):
  """x [..., D] -> [..., heads, head_dim]; kernel [D, H, Dh] ('embed', 'heads', 'kv').

  (nn.DenseGeneral initialises its kernel flattened, which breaks 3-D logical constraints.)
  """
  heads: int
  head_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", normal(("embed", "heads", "kv")),
                        (x.shape[-1], self.heads, self.head_dim))
    bias = self.param("bias", zeros(("heads", "kv")), (self.heads, self.head_dim))
    return jnp.einsum("...d,dhk->...hk", x.astype(self.dtype), kernel.astype(self.dtype)) + \
        bias.astype(self.dtype)


class HeadsOut(nn.Module):
  """x [..., H, Dh] -> [..., features]; kernel [H, Dh, D] ('heads', 'kv', 'embed')."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", normal(("heads", "kv", "embed")), (*x.shape[-2:], self.features))
    bias = self.param("bias", zeros(("embed",)), (self.features,))
    return jnp.einsum("...hk,hkd->...d", x.astype(self.dtype), kernel.astype(self.dtype)) + \
        bias.astype(self.dtype)


class Attention(nn.Module):
  """Multi-head attention of queries x [B, T, D] over context y [B, S, D].

  mask: bool, broadcastable to [B, heads, T, S], True where attention is allowed.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0  # on the attention probabilities (BERT); 0 lets XLA/cuDNN fuse attention

  @nn.compact
  def __call__(self, x, y, mask=None, deterministic: bool = True):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads

    proj = lambda name: HeadsIn(self.num_heads, head_dim, self.dtype, name=name)

    q = proj("query")(x)  # [B, T, H, Dh]
    k = proj("key")(y)  # [B, S, H, Dh]
    v = proj("value")(y)  # [B, S, H, Dh]
    if self.dropout > 0.0 and not deterministic:
      logits = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
      if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
      probs = nn.Dropout(self.dropout)(probs, deterministic=False)
      out = jnp.einsum("bhts,bshd->bthd", probs, v)  # [B, T, H, Dh]
    else:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask)  # [B, T, H, Dh]
    return HeadsOut(width, self.dtype, name="out")(out)  # [B, T, D]


class Mlp(nn.Module):
  """Dense -> activation -> Dense, width -> hidden -> width."""
  hidden: int
  activation: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    h = Dense(self.hidden, ("embed", "mlp"), self.dtype, name="fc1")(x)  # [B, T, F]
    h = ACTIVATIONS[self.activation](h)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return Dense(width, ("mlp", "embed"), self.dtype, name="fc2")(h)  # [B, T, D]


class PreLNBlock(nn.Module):
  """Pre-LN transformer block (CLIP ViT, MAE decoder): x + attn(ln(x)); x + mlp(ln(x))."""
  num_heads: int
  mlp_dim: int
  activation: str = "quick_gelu"
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  scan_carry: bool = False  # return (x, None), the body shape nn.scan wants (`stack`)

  @nn.compact
  def __call__(self, x, mask=None, deterministic: bool = True):
    h = LayerNorm(self.eps, self.dtype, name="ln_1")(x)
    x = x + Attention(self.num_heads, self.dtype, name="attn")(h, h, mask, deterministic)
    h = LayerNorm(self.eps, self.dtype, name="ln_2")(x)
    x = x + Mlp(self.mlp_dim, self.activation, self.dtype, name="mlp")(h)
    x = constrain(x)
    return (x, None) if self.scan_carry else x


class PostLNBlock(nn.Module):
  """Post-LN (BERT) block; with `cross` also attends to a second stream (M3AE's BertCrossLayer).

  x = LN(x + self_attn(x)); [x = LN(x + cross_attn(x, y))]; x = LN(x + mlp(x)).
  """
  num_heads: int
  mlp_dim: int
  cross: bool = False
  dropout: float = 0.1
  attn_dropout: float = 0.0
  eps: float = 1e-12
  dtype: Dtype = jnp.float32
  scan_carry: bool = False  # return (x, None), the body shape nn.scan wants (`stack`)

  @nn.compact
  def __call__(self, x, mask=None, y=None, y_mask=None, deterministic: bool = True):
    drop = lambda h: nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = Attention(self.num_heads, self.dtype, self.attn_dropout, name="attn")(x, x, mask,
                                                                              deterministic)
    x = LayerNorm(self.eps, self.dtype, name="attn_ln")(x + drop(h))
    if self.cross:
      h = Attention(self.num_heads, self.dtype, self.attn_dropout, name="cross_attn")(x, y, y_mask,
                                                                                      deterministic)
      x = LayerNorm(self.eps, self.dtype, name="cross_ln")(x + drop(h))
    h = Mlp(self.mlp_dim, "gelu", self.dtype, name="mlp")(x)
    x = LayerNorm(self.eps, self.dtype, name="mlp_ln")(x + drop(h))
    x = constrain(x)
    return (x, None) if self.scan_carry else x


# Rematerialisation policies (config `model.remat`): what a transformer block keeps for the backward
# pass; everything else is recomputed. 'none' keeps everything (no remat).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the block inputs
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_no_batch":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls
}


def remat(block: type, policy: str, deterministic_argnum: int, prevent_cse: bool = True) -> type:
  """`block` (a Module class), or the same class wrapped in nn.remat with the named policy.

  deterministic_argnum: position of the `deterministic` argument of __call__ (self = 0), which is a
  Python bool and must stay static.
  """
  if policy not in REMAT_POLICIES:
    raise ValueError(f"model.remat must be one of {sorted(REMAT_POLICIES)}, got {policy!r}")
  if policy == "none":
    return block
  return nn.remat(block, policy=REMAT_POLICIES[policy], static_argnums=(deterministic_argnum,),
                  prevent_cse=prevent_cse)


def scanned_name(prefix: str) -> str:
  """The submodule that holds a scanned stack: 'block_' -> 'blocks', 'layer_' -> 'layers'."""
  return prefix.rstrip("_") + "s"


def stack(block: type, num: int, *, scan: bool, remat_policy: str, deterministic_argnum: int,
          prefix: str, **kwargs):
  """`num` blocks of one class, applied in sequence: returns f(x, *args) -> x.

  Call it inside a compact method. Unrolled (scan=False) the blocks are submodules
  `{prefix}{i}`; scanned (model.scan) they are one submodule `scanned_name(prefix)` run by nn.scan, its
  parameters stacked on a leading 'layers' axis of size `num` ([num, ...] per leaf). The scanned
  form is compiled once instead of `num` times (compile time on large models); both compute the
  same function, and `models.mpma.scanned_params` / `unrolled_params` convert between the layouts.
  """
  if not scan:
    cls = remat(block, remat_policy, deterministic_argnum)
    blocks = [cls(**kwargs, name=f"{prefix}{i}") for i in range(num)]

    def unrolled(x, *args):
      for b in blocks:
        x = b(x, *args)
      return x

    return unrolled
  # Inside a scan the loop already keeps each step's inputs apart: CSE prevention is not needed.
  cls = remat(block, remat_policy, deterministic_argnum, prevent_cse=False)
  scanned = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                    in_axes=nn.broadcast, length=num,
                    metadata_params={nn.PARTITION_NAME: "layers"})(**kwargs, scan_carry=True,
                                                                   name=scanned_name(prefix))
  return lambda x, *args: scanned(x, *args)[0]


def key_mask(valid):
  """[B, S] validity of keys -> bool attention mask [B, 1, 1, S]."""
  return valid.astype(bool)[:, None, None, :]
