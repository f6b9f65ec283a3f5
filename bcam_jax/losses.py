"""Training objectives. Cross-entropy for now; the Batch-CAM terms build on it."""
import jax
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels, computed in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype('float32'), labels)
