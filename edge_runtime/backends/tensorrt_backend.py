"""The TensorRT backend: a method's dense parts as TensorRT engines, the rest in PyTorch (CUDA).

``load(bundle_dir, device="cuda", precision="fp16", ...)`` builds the bundle's model on
the GPU and swaps its dense parts (``Method.dense_parts``) for :class:`TrtPart` modules
that run the serialized engines ``edge-deploy --target tensorrt`` built into the bundle
(``engines/tensorrt/<key>/*.plan``). Data-dependent steps, interpolation, scoring and
smoothing stay the model's torch code on the same GPU,
so no scoring code is duplicated. Engine I/O is float32 (FP16 is internal to the
engine); tensors are passed by device pointer (``set_tensor_address``) and run with
``execute_async_v3`` on torch's current CUDA stream: no host copies.

Engines are tied to the GPU model (compute capability) and the TensorRT version: the
cache key (``engine_keys``) covers both plus precision and input shapes. When no cached
engine matches this machine, ``load`` raises BackendUnavailable saying which engine
exists and why it does not apply, and the command that rebuilds it. ``tensorrt`` is
imported lazily; without it, or without a CUDA device, BackendUnavailable says which is
missing.

Written against the TensorRT 10 Python API (``IExecutionContext.set_input_shape``,
``set_tensor_address``, ``execute_async_v3``; ``ICudaEngine.num_io_tensors`` /
``get_tensor_name`` / ``get_tensor_mode``). Not executed in this repository's CI (no GPU).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edge_runtime.backends.engine_keys import DYNAMIC, EngineTarget, find_engine, part_specs, set_part
from edge_runtime.backends.torch_backend import TorchDetector
from edge_runtime.bundle import build_model, bundle_file, export_is_current, load_bundle, method_of
from edge_runtime.errors import BackendUnavailable, BundleError

PRECISIONS = ("fp16", "fp32")


def import_tensorrt():
    """The ``tensorrt`` module; BackendUnavailable with the install hint when absent."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(f"TensorRT is not installed ({exc}); on a GPU station: "
                                 "pip install 'edge-runtime[tensorrt]' (TensorRT 10.x)") from None
    return tensorrt


def cuda_problem() -> str | None:
    """None when torch sees a CUDA device, else a sentence saying why not."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (no CUDA support)"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"


def trt_input_shapes(method, cfg) -> dict:
    """Engine input shapes per part stem: static dims as ints, a dynamic dimension as an
    optimisation profile [min 1, opt max/2, max] (max = the part's ``dynamic_max``; larger
    inputs, e.g. batches, are run in chunks of max)."""
    out = {}
    for spec in part_specs(method, cfg).values():
        top = max(1, int(spec["dynamic_max"]))
        out[spec["stem"]] = {name: [[1, max(1, top // 2), top] if d == DYNAMIC else d for d in shape]
                             for name, shape in spec["inputs"]}
    return out


def current_target(method, cfg, precision: str, device: torch.device, tensorrt_version: str) -> EngineTarget:
    """The EngineTarget (cache key fields) of this GPU + TensorRT for ``cfg`` at ``precision``."""
    major, minor = torch.cuda.get_device_capability(device)
    return EngineTarget(gpu_name=torch.cuda.get_device_name(device), compute_capability=f"{major}.{minor}",
                        tensorrt_version=tensorrt_version, precision=precision,
                        input_shapes=trt_input_shapes(method, cfg))


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32, "INT64": torch.int64}


class TrtPart(nn.Module):
    """Tensor-in / tensor-out stand-in for one dense part, backed by a TensorRT engine.

    input_names: the engine's inputs in the replaced module's argument order.
    batch_one: static batch-1 engine; a batch of B runs as B calls, concatenated.
    max_n: largest dynamic first dimension of the profile (mappers); larger inputs are
    run in chunks. Inputs must be CUDA tensors; they are made contiguous float32.
    """

    def __init__(self, engine, input_names: list[str], batch_one: bool, max_n: int | None):
        super().__init__()
        trt = import_tensorrt()
        self.engine = engine
        self.context = engine.create_execution_context()
        self.input_names = input_names
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(outputs) != 1 or sorted(set(names) - set(outputs)) != sorted(input_names):
            raise BundleError(f"engine tensors {names} do not match the expected inputs {input_names} + one output")
        self.output_name = outputs[0]
        self.output_dtype = _TORCH_DTYPES[engine.get_tensor_dtype(self.output_name).name]
        self.batch_one = batch_one
        self.max_n = max_n

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        """The part's forward: same arguments and result shape as the torch module it replaces."""
        n = xs[0].shape[0]
        if self.batch_one and n != 1:
            return torch.cat([self(*(x[i:i + 1] for x in xs)) for i in range(n)])
        if self.max_n is not None and n > self.max_n:
            return torch.cat([self(*(x[s:s + self.max_n] for x in xs)) for s in range(0, n, self.max_n)])
        if n == 0:  # no valid pixels: TensorRT profiles start at 1
            return xs[0].new_zeros(0, self.engine.get_tensor_shape(self.output_name)[-1])
        inputs = [x.detach().to(torch.float32).contiguous() for x in xs]  # kept alive until the run ends
        for name, x in zip(self.input_names, inputs):
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype,
                          device=inputs[0].device)
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        stream = torch.cuda.current_stream(inputs[0].device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.output_name!r} failed (see the TensorRT log)")
        return out.float()


class TensorRTDetector(TorchDetector):
    """TorchDetector (CUDA, no autocast) whose dense parts are ``TrtPart`` engines;
    name "tensorrt-cuda-fp16" / "tensorrt-cuda-fp32"."""

    def __init__(self, model, manifest: dict, device: torch.device, precision: str, engine_key: str):
        super().__init__(model, manifest, device, "fp32")  # torch parts stay fp32
        self.name = f"tensorrt-cuda-{precision}"
        self.engine_precision = precision
        self.engine_key = engine_key


def rebuild_hint(bundle_dir: Path, precision: str) -> str:
    """The command that (re)builds engines for this machine."""
    return f"edge-deploy --model {bundle_dir} --target tensorrt --precision {precision}"


def load(bundle_dir: str | Path, device: str = "cuda", precision: str = "fp16", verify: bool = True,
         **options) -> TensorRTDetector:
    """Load a bundle behind TensorRT engines cached for this GPU and TensorRT version.

    precision: "fp16" (default) or "fp32" engines. options: the method's scoring options.
    verify: check every bundle file's sha256 (engine files included).
    Raises BackendUnavailable (TensorRT or CUDA missing, no matching engine: with the
    reason and the rebuild command).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt = import_tensorrt()
    problem = cuda_problem()
    if problem:
        raise BackendUnavailable(f"TensorRT needs a CUDA GPU: {problem}")
    dev = torch.device(device)
    if dev.type != "cuda":
        raise BackendUnavailable(f"device {device!r}: the TensorRT backend runs on cuda only")
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir, verify=verify)
    model = build_model(bundle)
    method = method_of(bundle.manifest)
    cfg = method.config_from_dict(bundle.manifest["config"])
    method.apply_options(model, method.check_options({k: v for k, v in options.items() if v is not None}))
    target = current_target(method, cfg, precision, dev, trt.__version__)
    entry, reasons = find_engine(bundle.manifest.get("engines") or {}, target)
    if entry is None:
        raise BackendUnavailable(f"{bundle_dir}: no TensorRT engine for {target.gpu_name} (sm "
                                 f"{target.compute_capability}), TensorRT {target.tensorrt_version}, {precision}: "
                                 + " | ".join(reasons)
                                 + f". Rebuild on this machine: {rebuild_hint(bundle_dir, precision)}")
    if not export_is_current(bundle.manifest, entry):
        raise BackendUnavailable(f"{bundle_dir}: the cached TensorRT engine was built from other weights; "
                                 f"rebuild: {rebuild_hint(bundle_dir, precision)}")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    for path, spec in part_specs(method, cfg).items():
        max_n = max(1, int(spec["dynamic_max"]))
        file = bundle_file(bundle_dir, bundle.manifest, entry["parts"][path]["file"])
        engine = runtime.deserialize_cuda_engine(file.read_bytes())
        if engine is None:
            raise BackendUnavailable(f"{file}: TensorRT {trt.__version__} could not deserialize this engine; "
                                     f"rebuild: {rebuild_hint(bundle_dir, precision)}")
        names = [name for name, _ in spec["inputs"]]
        set_part(model, path, TrtPart(engine, names, spec["batch_one"], None if spec["batch_one"] else max_n))
    return TensorRTDetector(model.to(dev), bundle.manifest, dev, precision, entry["key"])
