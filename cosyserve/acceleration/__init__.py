"""Acceleration backends, one module each, orchestrated by :mod:`cosyserve.acceleration.apply`.

* :mod:`.onnx_export` — ONNX export of the flow-decoder estimator (and the HiFT conv stack) and
  ONNX Runtime runners that plug into the CFM's estimator slot;
* :mod:`.trt` — TensorRT engines for the estimator (build, cache, context pool, runner);
* :mod:`.jit` — TorchScript files of official model directories, torch.compile / CUDA graphs;
* :mod:`.quant` — dynamic int8 quantisation of the LLM (CPU).

Every module imports its optional dependency lazily and reports a missing one as
:class:`~cosyserve.errors.BackendUnavailableError` with advice.
"""
