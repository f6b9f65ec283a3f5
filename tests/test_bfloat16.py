"""The bfloat16 train step computes in bfloat16: an audit of its lowered StableHLO.

StableHLO is the program before any backend sees it, so this CPU test audits what a GPU runs.
The models use `conv_lowering='xla'` (what 'auto' picks on a GPU or TPU). Every convolution
must take and give bfloat16. A float32 matrix product is allowed only where the models and
losses say so: the heads compute in at least float32 (`cam.at_least_float32`), and so do the
class CAMs, their upsampling to the prototypes and the losses on them. All of those carry the
class axis, so every float32 product must have a dimension of size NUM_CLASSES.
"""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

from bcam_jax import steps
from bcam_jax.models import get_model
from bcam_jax.objective import Objective

NUM_CLASSES = 10  # no other dimension of these programs is 10
MODELS = [
  ('resnet18', {'width': 8}, 28),
  ('convnext_v2_tiny', {'drop_path_rate': 0.0}, 28),
]
_OP = re.compile(r'stablehlo\.(convolution|dot_general)\b.*:\s*\((.*)\)\s*->\s*(.*)$')
_TENSOR = re.compile(r'tensor<([0-9x]*)(bf16|f16|f32|f64)>')


def _products(name, options, side, kind):
  """[(op, [(shape, dtype) of operands and result])] of the bfloat16 train step."""
  model = get_model(name, NUM_CLASSES, conv_lowering='xla', dtype=jnp.bfloat16, **options)
  tx = optax.sgd(0.1)
  state = jax.eval_shape(steps.make_init_fn(model, tx, 0, side))  # as train.py builds it
  step = steps.make_train_step(
    model,
    tx,
    lambda count: 0.1,
    Objective(kind=kind, num_classes=NUM_CLASSES, prototype_size=side),
    mean=0.5,
    std=0.25,
    dtype=jnp.bfloat16,
    image_size=side,
    seed=0,
  )
  text = (
    jax.jit(step)
    .lower(
      state,
      jax.ShapeDtypeStruct((4, side, side, 1), jnp.uint8),
      jax.ShapeDtypeStruct((4,), jnp.int32),
      jax.ShapeDtypeStruct((NUM_CLASSES, side, side), jnp.float32),
    )
    .as_text()
  )
  found = []
  for line in text.splitlines():
    match = _OP.search(line)
    if match:
      tensors = _TENSOR.findall(match.group(2) + ' ' + match.group(3))
      found.append(
        (match.group(1), [(tuple(map(int, filter(None, s.split('x')))), t) for s, t in tensors])
      )
  return found


@pytest.mark.parametrize('kind', ['ce', 'bcpl'])
@pytest.mark.parametrize('name,options,side', MODELS, ids=[m[0] for m in MODELS])
def test_convolutions_run_in_bfloat16_and_float32_products_carry_the_class_axis(
  name, options, side, kind
):
  products = _products(name, options, side, kind)
  convolutions = [tensors for op, tensors in products if op == 'convolution']
  assert convolutions, 'no convolution found: the audit would check nothing'
  for tensors in convolutions:
    assert [t for _, t in tensors] == ['bf16'] * 3, tensors
  dots = [tensors for op, tensors in products if op == 'dot_general']
  assert dots
  for tensors in dots:
    dtypes = {t for _, t in tensors}
    assert dtypes in ({'bf16'}, {'f32'}), tensors  # no mixed-precision product
    if dtypes == {'f32'}:
      assert any(NUM_CLASSES in shape for shape, _ in tensors), tensors
