"""Speed-tuned kernels with the same names and signatures as the reference modules.

* :mod:`bncourse.fast.numpy_bn`: ``batch_norm_forward`` / ``batch_norm_backward`` for NumPy
  (slabs that stay in cache, BLAS row sums, exact float32 centring), used by default by
  :class:`bncourse.numpy_bn.BatchNorm`.

The reference modules (:mod:`bncourse.numpy_bn`, :mod:`bncourse.torch_bn`) are the code that
reads like the book; each fast kernel is tested against its reference over the same suite.
"""
