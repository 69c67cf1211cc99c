"""Split execution: one model per partition of an annotated model, a manifest, and
`PartitionedSession`, which runs them in order with each device's execution provider.

    onnxopt model.onnx -o model.part.onnx --passes partition --devices cuda,cpu --split parts/
    session = onnxopt.PartitionedSession("parts/")
    outputs = session.run(None, {"x": x})

The split is derived from the annotations alone (`onnxopt.partition` on each node, and the
model-level `onnxopt.partition.devices`), so it works on any model the partition pass wrote.
Boundary tensors pass between the sessions as numpy arrays, which is the host round trip a
device boundary costs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.errors import ModelError, UsageError, VerificationError
from onnxopt.graph import Model, export_model, import_model, node_metadata
from onnxopt.io import check_folder_writable

from .plan import node_reads

MANIFEST = "manifest.json"
FORMAT = "onnxopt-split/1"
DEVICES_KEY = "onnxopt.partition.devices"  # model metadata: {device: {"designator":.., "provider":..}}
SETTINGS_KEY = "onnxopt.partition.settings"  # model metadata: the session.layer_assignment_settings value
CPU = "CPUExecutionProvider"


def check_split_dir(path: str) -> None:
    """Refuse a --split folder that holds anything but an earlier split (replaced when written)."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(f"--split path exists and is not a folder: {path}")
        if os.listdir(path) and not os.path.isfile(os.path.join(path, MANIFEST)):
            raise UsageError(f"--split folder is not empty and holds no earlier split: {path}")
    check_folder_writable(path, "--split")


def write_split(model_path: str, out_dir: str, source: str | None = None) -> dict:
    """Write one model per partition of the annotated model at `model_path` into `out_dir`
    (replacing an earlier split there), with the manifest (`source`: the model's name it records).
    Written into a temporary folder beside `out_dir` and renamed, so the folder is complete or
    absent. Returns the manifest."""
    check_split_dir(out_dir)
    from onnxopt import io
    from onnxopt.verify import write_for_runtime

    proto, _ = io.load_model_sized(model_path, keep_external=True)
    m = import_model(proto, base_dir=os.path.dirname(os.path.abspath(model_path)))
    meta = {e.key: e.value for e in m.meta.metadata_props}
    devices = json.loads(meta.get(DEVICES_KEY, "{}"))
    groups: dict[int, list[gs.Node]] = {}
    for node in m.graph.nodes:
        mark = node_metadata(node).get("onnxopt.partition")
        if mark is None or not mark.isdigit():
            raise ModelError(f"node {node.name!r} has no onnxopt.partition annotation: run the partition pass first")
        groups.setdefault(int(mark), []).append(node)
    order = sorted(groups)
    produced_in = {t.name: k for k in order for n in groups[k] for t in n.outputs if t.name}
    readers: dict[str, set[int]] = {}
    for k in order:
        for n in groups[k]:
            for name in node_reads(n):
                readers.setdefault(name, set()).add(k)
    graph_outputs = [t.name for t in m.graph.outputs]
    graph_inputs = {t.name for t in m.graph.inputs}
    for name in graph_outputs:
        if name not in produced_in and name not in graph_inputs:
            raise ModelError(f"graph output {name!r} is a constant no node produces: the split cannot return it")
    tensors = m.graph.tensors()
    _fill_types(model_path, [tensors[name] for name in produced_in if tensors[name].dtype is None])
    parent = os.path.dirname(os.path.abspath(out_dir))
    tmp = tempfile.mkdtemp(prefix=".onnxopt-split-", dir=parent)
    try:
        parts = []
        for k in order:
            nodes = groups[k]
            device = node_metadata(nodes[0]).get("onnxopt.device", "cpu")
            ins = list(dict.fromkeys(name for n in nodes for name in node_reads(n) if produced_in.get(name) != k))
            outs = [t.name for n in nodes for t in n.outputs if t.name and (
                t.name in graph_outputs or readers.get(t.name, set()) - {k})]
            for name in ins:
                if produced_in.get(name, k) > k:
                    raise ModelError(f"partition {k} reads {name!r} from a later partition: the annotations "
                                     "do not describe an order the split can run in")
            sub = gs.Graph(nodes=nodes, inputs=[tensors[n] for n in ins], outputs=[tensors[n] for n in outs],
                           name=f"{m.graph.name or 'graph'}_p{k}", opset=m.graph.opset,
                           import_domains=m.graph.import_domains)
            file = f"p{k}_{device}.onnx"
            part_model = Model(sub, m.meta, m.value_info_names)
            write_for_runtime(export_model(part_model), tmp, file, consume=True)
            info = devices.get(device, {})
            parts.append({"index": k, "device": device, "provider": info.get("provider", CPU), "file": file,
                          "nodes": len(nodes), "inputs": ins, "outputs": outs})
        manifest = {"format": FORMAT, "source": os.path.basename(source or model_path),
                    "inputs": [t.name for t in m.graph.inputs], "outputs": graph_outputs,
                    "session_config": {"session.layer_assignment_settings": meta.get(SETTINGS_KEY, "")},
                    "partitions": parts}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o755)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        tmp = None
        return manifest
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _fill_types(model_path: str, missing: list[gs.Tensor]) -> None:
    """Element types shape inference left unknown (outputs of onnxruntime's own operators), as
    onnxruntime infers them when the tensors are made graph outputs."""
    if not missing:
        return
    import onnxruntime as ort

    proto = onnx.load(model_path, load_external_data=False)
    proto.graph.output.extend(onnx.ValueInfoProto(name=t.name) for t in missing)
    with tempfile.TemporaryDirectory(prefix="onnxopt-") as tmp:
        path = os.path.join(os.path.dirname(os.path.abspath(model_path)), f".{os.path.basename(tmp)}.onnx")
        try:
            onnx.save(proto, path)  # beside the model: its external data paths stay valid
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            opts.log_severity_level = 4
            found = {o.name: o.type for o in ort.InferenceSession(path, opts, providers=[CPU]).get_outputs()}
        finally:
            if os.path.exists(path):
                os.remove(path)
    for t in missing:
        kind = found.get(t.name, "")
        if kind.startswith("tensor("):
            name = {"float": "float32", "double": "float64"}.get(kind[7:-1], kind[7:-1])
            t.dtype = onnx.helper.tensor_dtype_to_np_dtype(getattr(onnx.TensorProto, _enum_name(name)))


def _enum_name(name: str) -> str:
    return {"float32": "FLOAT", "float64": "DOUBLE"}.get(name, name.upper())


def compare_split(folder: str, feeds: list[dict], expected: list[dict], budget: float | None = None,
                  argmax: dict | None = None, min_agreement: float | None = None) -> dict:
    """Run the split on the CPU provider with the reference's session options. Without a budget
    it must give `expected` (the model's outputs) bit for bit. With one (a lossy pass made the
    model, `expected` then being the original's outputs) every output's mean cosine (and the
    argmax agreement of those in `argmax`) must be within `budget` (and `min_agreement`), as the model's own must: a
    float16 model's split cannot match the model bit for
    bit on the CPU, where onnxruntime runs float16 nodes it lacks kernels for in float32 and drops
    the Cast pairs between them, so a tensor skips inside one session the float16 rounding it
    gets at a partition boundary (as it would on a device with float16 kernels). On a miss the
    split is removed and VerificationError raised. Returns {"max_abs_diff"} or {"cosine"}."""
    from onnxopt.verify import compare_samples, reference_options

    try:
        session = PartitionedSession(folder, {p["device"]: CPU for p in _manifest(folder)["partitions"]},
                                     reference_options())
        gots = [dict(zip(session.get_outputs(), session.run(None, feed))) for feed in feeds]
        if budget is not None:
            metrics = compare_samples(expected, gots, "lossy", budget, argmax, min_agreement)
            for m in metrics:
                if not m.ok:
                    raise VerificationError(f"the split in {folder} misses the error budget: {m.name!r} "
                                            f"{m.miss()} (budget {budget}); "
                                            "the split was removed", output=m.name)
            return {"cosine": min(m.cosine for m in metrics)}
        for want, got in zip(expected, gots):
            for name, value in want.items():
                a, b = np.asarray(value), np.asarray(got[name])
                if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"):
                    raise VerificationError(f"the split in {folder} gives a different {name!r} than the model; "
                                            "the split was removed (please report it)", output=name)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return {"max_abs_diff": 0.0}


def _manifest(path: str) -> dict:
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UsageError(f"not a split folder: cannot read {os.path.join(path, MANIFEST)}: {reason}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UsageError(f"{path}: not an {FORMAT} manifest")
    return manifest


class PartitionedSession:
    """Runs a split (the folder `--split` wrote) partition by partition, each with its device's
    execution provider; a provider this onnxruntime lacks falls back to the CPU with a warning.

    providers: {device: provider} overriding the manifest's. sess_options: onnxruntime
    SessionOptions for every partition's session.
    """

    def __init__(self, path: str, providers: dict[str, str] | None = None, sess_options=None):
        import onnxruntime as ort

        self.manifest = _manifest(path)
        available = set(ort.get_available_providers())
        self.parts = self.manifest["partitions"]
        self.sessions = []
        self.providers = []
        missing: dict[str, list[str]] = {}
        for part in self.parts:
            provider = (providers or {}).get(part["device"], part["provider"])
            if provider not in available:
                missing.setdefault(provider, []).append(str(part["index"]))
                provider = CPU
            chain = [provider] if provider == CPU else [provider, CPU]
            self.sessions.append(ort.InferenceSession(os.path.join(path, part["file"]), sess_options,
                                                      providers=chain))
            self.providers.append(provider)
        for provider, parts in missing.items():
            warnings.warn(f"onnxopt: {provider} is not available here: partition{'s' * (len(parts) > 1)} "
                          f"{', '.join(parts)} run{'s' * (len(parts) == 1)} on {CPU}", RuntimeWarning, stacklevel=2)
        self.last_use: dict[str, int] = {}
        for k, part in enumerate(self.parts):
            for name in part["inputs"]:
                self.last_use[name] = k

    def get_inputs(self) -> list[str]:
        return list(self.manifest["inputs"])

    def get_outputs(self) -> list[str]:
        return list(self.manifest["outputs"])

    def run(self, output_names, input_feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = list(output_names or self.manifest["outputs"])
        unknown = [n for n in names if n not in self.manifest["outputs"]]
        if unknown:
            raise UsageError(f"unknown output(s): {', '.join(unknown)}")
        missing = [n for n in self.manifest["inputs"] if n not in input_feed]
        if missing:
            raise UsageError(f"no values for input(s) {', '.join(missing)}")
        values = dict(input_feed)
        for k, (part, session) in enumerate(zip(self.parts, self.sessions)):
            outs = session.run(part["outputs"], {n: values[n] for n in part["inputs"]})
            values.update(zip(part["outputs"], outs))
            for name in part["inputs"]:  # drop what no later partition reads
                if self.last_use.get(name) == k and name not in self.manifest["outputs"]:
                    values.pop(name, None)
        return [values[n] for n in names]
