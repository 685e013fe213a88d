"""Speed-tuned kernels with the same names and signatures as the reference modules.

* :mod:`bncourse.fast.numpy_bn`: ``batch_norm_forward`` / ``batch_norm_backward`` for NumPy
  (slabs that stay in cache, BLAS row sums, exact float32 centring), used by default by
  :class:`bncourse.numpy_bn.BatchNorm`.
* :mod:`bncourse.fast.torch_bn`: ``batch_norm_forward`` / ``batch_norm_backward`` for PyTorch
  (a pivot for exact centring, output and gradient written into reused buffers, ``addcmul``
  regrouping of the backward) and ``compiled_kernels`` (the reference fused by torch.compile),
  used by default by :class:`bncourse.torch_bn.BatchNorm2d` and friends
  (:func:`bncourse.torch_bn.use_kernels` picks the reference or the compiled kernels).
* :mod:`bncourse.fast.torch_norm`: the normalization family over cache-sized chunks of rows.

The reference modules (:mod:`bncourse.numpy_bn`, :mod:`bncourse.torch_bn`) are the code that
reads like the book; each fast kernel is tested against its reference over the same suite.
"""
