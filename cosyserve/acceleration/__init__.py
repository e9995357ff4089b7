"""Acceleration: the plans and the launcher that falls back through them (:mod:`.launcher`), what a
plan does to a loaded model's parts (:mod:`.apply`, through the ``AccelTargets`` its family names),
the FP16 guard (:mod:`.fp16`), and one module per accelerator:

* :mod:`.onnx_export` — ONNX export of the flow-decoder estimator (and the HiFT conv stack) and
  ONNX Runtime runners that plug into the CFM's estimator slot;
* :mod:`.trt` — TensorRT engines for the estimator (build, cache, context pool, runner);
* :mod:`.jit` — TorchScript files of official model directories, torch.compile / CUDA graphs;
* :mod:`.quant` — dynamic int8 quantisation of the LLM and the flow estimator (CPU).

Every module imports its optional dependency lazily and reports a missing one as
:class:`~cosyserve.errors.AcceleratorUnavailableError` with advice.
"""
