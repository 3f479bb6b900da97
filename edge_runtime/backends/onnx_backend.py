"""The onnxruntime backend: a method's dense parts in ONNX Runtime, the rest in PyTorch.

``load(bundle_dir, device="cpu", ...)`` builds the bundle's model (as the torch backend
does) and swaps its dense parts (``Method.dense_parts``) for :class:`OrtPart` modules that
call onnxruntime sessions on the ONNX files ``edge-deploy --target onnx`` wrote into the
bundle. Everything else (data-dependent grouping, interpolation, scoring, smoothing) stays
the model's own torch code, so no scoring logic is duplicated and the torch backend's
preprocessing, timing per stage and batching are reused (:class:`OnnxDetector` extends
``TorchDetector``).

Execution providers: "cpu" -> CPUExecutionProvider; "cuda" -> CUDAExecutionProvider
(then CPU as ONNX Runtime's fallback for unsupported nodes) when the installed
onnxruntime has it, else BackendUnavailable. The torch parts run on the CPU in both
cases; with CUDA the dense parts' inputs and outputs cross host <-> device memory on
every call (ONNX Runtime copies numpy inputs itself).

A bundle whose ONNX export was made from other weights is refused
(``edge_runtime.bundle.export_is_current``): re-run ``edge-deploy``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_runtime.backends.engine_keys import part_specs, set_part
from edge_runtime.backends.torch_backend import TorchDetector
from edge_runtime.bundle import WEIGHTS, build_model, bundle_file, export_is_current, load_bundle, method_of
from edge_runtime.errors import BackendUnavailable, BundleError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class OrtPart(nn.Module):
    """Tensor-in / tensor-out stand-in for one dense part, backed by an onnxruntime session.

    batch_one: the ONNX graph has a static batch of 1; a batch of B is run as B calls and
    concatenated. Inputs are converted to float32 numpy (a no-copy view for contiguous CPU
    float32 tensors); the output comes back as a tensor on the first input's device.
    """

    def __init__(self, session, batch_one: bool):
        super().__init__()
        self.session = session
        self.batch_one = batch_one
        self.input_names = [i.name for i in session.get_inputs()]
        out = session.get_outputs()[0]
        self.output_name = out.name
        self.out_dim = out.shape[-1]

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        """The part's forward: same arguments and result shape as the torch module it replaces."""
        if self.batch_one and xs[0].shape[0] != 1:
            return torch.cat([self(*(x[i:i + 1] for x in xs)) for i in range(xs[0].shape[0])])
        if xs[0].shape[0] == 0:  # no valid pixels: an empty batch never reaches the session
            return xs[0].new_zeros(0, self.out_dim)
        feeds = {name: x.detach().to("cpu", torch.float32).contiguous().numpy()
                 for name, x in zip(self.input_names, xs)}
        out = self.session.run([self.output_name], feeds)[0]
        return torch.from_numpy(np.ascontiguousarray(out)).to(xs[0].device)


class OnnxDetector(TorchDetector):
    """TorchDetector whose model's dense parts are ``OrtPart`` modules; name
    "onnxruntime-cpu" or "onnxruntime-cuda"."""

    def __init__(self, model, manifest: dict, provider: str):
        super().__init__(model, manifest, torch.device("cpu"), "fp32")
        self.name = f"onnxruntime-{provider}"


def onnx_entry(manifest: dict, bundle_dir: Path) -> dict:
    """The bundle's ONNX export entry, checked: present, made from the current weights.
    Raises BackendUnavailable naming what is missing or stale and the command that fixes it."""
    entry = (manifest.get("engines") or {}).get("onnx")
    fix = f"run: edge-deploy --model {bundle_dir} --target onnx"
    if not entry:
        raise BackendUnavailable(f"{bundle_dir}: bundle has no ONNX export; {fix}")
    current = manifest["files"][WEIGHTS]["sha256"]
    if not export_is_current(manifest, entry):
        raise BackendUnavailable(f"{bundle_dir}: the ONNX export was made from other weights "
                                 f"({str(entry.get('weights_sha256'))[:12]}... vs {current[:12]}...); {fix}")
    method = method_of(manifest)
    wanted = part_specs(method, method.config_from_dict(manifest["config"]))
    missing = sorted(set(wanted) - set(entry.get("parts", {})))
    if missing:
        raise BundleError(f"{bundle_dir}: ONNX export lacks parts {missing}; {fix}")
    return entry


def load(bundle_dir: str | Path, device: str = "cpu", verify: bool = True, threads: int | None = None,
         spin: bool = False, **options) -> OnnxDetector:
    """Load a bundle with an ONNX export behind onnxruntime.

    device: "cpu" or "cuda" (CUDAExecutionProvider). options: the method's scoring
    options, as in the torch backend. verify: check every bundle file's sha256 (the ONNX
    files are listed in the manifest, so they are checked too). threads: intra-op threads
    per session (default: onnxruntime's, one per core). spin: let idle onnxruntime threads
    busy-wait between runs (onnxruntime's default; off here because the torch stages run
    in between on the same cores).
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailable(f"onnxruntime is not installed ({exc}); pip install 'edge-runtime[onnx]'") from None
    kind = torch.device(device).type
    if kind not in PROVIDERS:
        raise BackendUnavailable(f"device {device!r}: the onnxruntime backend runs on cpu or cuda")
    available = ort.get_available_providers()
    if PROVIDERS[kind] not in available:
        raise BackendUnavailable(f"onnxruntime {ort.__version__} has no {PROVIDERS[kind]} "
                                 f"(available: {', '.join(available)})")
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir, verify=verify)
    entry = onnx_entry(bundle.manifest, bundle_dir)
    model = build_model(bundle)
    method = method_of(bundle.manifest)
    method.apply_options(model, method.check_options({k: v for k, v in options.items() if v is not None}))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
    if not spin:
        # idle ORT threads otherwise busy-wait after each run and slow the torch stages between
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [PROVIDERS[kind]] + (["CPUExecutionProvider"] if kind == "cuda" else [])
    for path, part in entry["parts"].items():
        file = bundle_file(bundle_dir, bundle.manifest, part["file"])
        if not file.is_file():
            raise BundleError(f"{file}: ONNX file listed in the manifest is missing")
        session = ort.InferenceSession(str(file), sess_options=opts, providers=providers)
        set_part(model, path, OrtPart(session, part["batch_one"]))
    return OnnxDetector(model, bundle.manifest, kind)
