"""MNIST and Fashion-MNIST for aejax: `offline` prepares them for tfds without network, `splits`
reads train/validation/test arrays, `batching` shuffles, batches and pads them in pure JAX/numpy."""
