"""Running a trained classifier: the device and precision, logits for a loader's batches, and the
fast CPU paths: PlainEncoder (the encoder in a few torch calls, no transformers import), int8
dense layers, and the ONNX files export.py writes, with the record that says which to trust.
"""
import functools
import hmac
import os
import secrets
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import ModelError, read_json, sha256_of
from folders import STANDARD_HEADS, read_info

# ----------------------------------------------------------------------------- device and precision

def choose_device(name):
    """torch.device for --device (auto: cuda when torch sees a GPU); one line when unavailable."""
    if name == "xla":
        try:
            import torch_xla.core.xla_model as xm
        except ImportError:
            raise ModelError("--device xla needs torch-xla: pip install torch==2.9.0 "
                             "torch-xla==2.9.0 (in its own environment; see README)") from None
        return xm.xla_device()
    # auto: a GPU when torch sees one; --device cpu keeps a GPU machine's run on the CPU
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA GPU is visible to torch")
    if name == "cuda":
        # float32 matmuls in TF32 (10-bit mantissa, float32's range) on GPUs that have it (A100
        # and later): several times faster, and what autocast leaves in float32 is rarely
        # sensitive to it; older GPUs ignore the setting
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    return torch.device(name)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtypes


def auto_precision(device):
    """(--precision, why) for --precision auto on device: bf16 where the GPU has bfloat16 units
    (compute capability 8.0 and up: A100, H100), fp16 with loss scaling on 7.x (V100, Colab's
    T4: fp16 tensor cores, no bfloat16 units), float32 elsewhere."""
    if device.type != "cuda":
        return "fp32", f"{device.type} (autocast is for GPUs here)"
    # torch.cuda.is_bf16_supported() also says True on 7.x, where bf16 is emulated: slower than
    # float32, and without SDPA's memory-efficient kernel (attention then stores length^2)
    major, minor = torch.cuda.get_device_capability(device)
    gpu = f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"
    if major >= 8:
        return "bf16", f"{gpu}: bfloat16 units"
    if major == 7:
        return "fp16", f"{gpu}: fp16 tensor cores, no bfloat16 units; loss scaling on"
    return "fp32", f"{gpu}: no tensor cores"


def predict_logits(model, loader, device, autocast_dtype=None):
    """Logits for every item of loader's dataset, in dataset order, whatever the batch order."""
    logits = None
    # inference_mode is a little faster than no_grad, but XLA tensors do not support it
    autocast = torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                              enabled=autocast_dtype is not None)
    with torch.inference_mode(device.type != "xla"), torch.no_grad(), autocast:
        for batch in loader:
            out = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            # float32 on the host whatever the autocast dtype, so scores never depend on the
            # precision's rounding of logits
            out = out.float().cpu().numpy()
            if logits is None:
                logits = np.zeros((len(loader.dataset), out.shape[1]), dtype="float32")
            # Batches come longest first; each row goes back to its text's place in the dataset
            logits[batch["index"].numpy()] = out
    return logits


# ------------------------------------------------------------------------------- the fast CPU paths

gelu_tanh = functools.partial(F.gelu, approximate="tanh")  # what gelu_new computes
PLAIN_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": gelu_tanh,
                     "gelu_pytorch_tanh": gelu_tanh}


class PlainEncoder(nn.Module):
    """The BERT / RoBERTa / ELECTRA encoder as a few torch calls on the checkpoint's tensors.
    predict.py runs it because importing transformers' modeling code costs 3.6 s on a 2-core CPU,
    more than a whole answer should take; tests/test_model.py checks it against transformers."""

    def __init__(self, config, weights):
        super().__init__()
        self.config, self.w = SimpleNamespace(**config), weights
        self.act = PLAIN_ACTIVATIONS[self.config.hidden_act]
        # every dense layer by name, as a callable that quantize_int8 may swap for Int8Linear
        self.linears = {name[:-len(".weight")]: functools.partial(
            F.linear, weight=w, bias=weights[name[:-len("weight")] + "bias"])
            for name, w in weights.items() if w.dim() == 2 and "embeddings." not in name}

    @staticmethod
    def supports(config):
        return (config.get("model_type") in STANDARD_HEADS
                and config.get("position_embedding_type", "absolute") == "absolute"
                and config.get("hidden_act") in PLAIN_ACTIVATIONS)

    def layer_norm(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.w[name + ".weight"], self.w[name + ".bias"],
                            self.config.layer_norm_eps)

    def embed(self, input_ids):
        c, w = self.config, self.w
        if c.model_type in ("roberta", "xlm-roberta"):  # positions count from pad_token_id + 1
            real = input_ids.ne(c.pad_token_id).long()
            positions = real.cumsum(1) * real + c.pad_token_id
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (w["embeddings.word_embeddings.weight"][input_ids]
             + w["embeddings.position_embeddings.weight"][positions]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = self.layer_norm(x, "embeddings.LayerNorm")
        return self.linears["embeddings_project"](x) if "embeddings_project.weight" in w else x

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        batch, length, heads = *input_ids.shape, self.config.num_attention_heads
        keep = attention_mask.bool()[:, None, None, :]  # every query looks at real tokens only
        for i in range(self.config.num_hidden_layers):
            layer = f"encoder.layer.{i}."
            q, k, v = (self.linears[layer + "attention.self." + name](x)
                       .view(batch, length, heads, -1).transpose(1, 2)
                       for name in ("query", "key", "value"))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            a = self.linears[layer + "attention.output.dense"](
                a.transpose(1, 2).reshape(batch, length, -1))
            x = self.layer_norm(x + a, layer + "attention.output.LayerNorm")
            h = self.act(self.linears[layer + "intermediate.dense"](x))
            h = self.linears[layer + "output.dense"](h)
            x = self.layer_norm(x + h, layer + "output.LayerNorm")
        return SimpleNamespace(last_hidden_state=x)


WEIGHT_LEVELS = 63  # an int8 weight's largest magnitude (Int8Linear says why not 127)


class Int8Linear(nn.Module):
    """A dense layer in int8 (dynamic quantization): the weight rounded once to 7 bits with one
    scale per output row, each input row (a token) rounded to int8 with its own scale as it
    comes, an int8 x int8 -> int32 matrix product (4x the float32 rate on CPUs with VNNI), then
    back to float. Per-row input scales keep the promise of the heads: a text's numbers never
    depend on its batch-mates (one scale for the whole batch would let a loud batch-mate coarsen
    every other text's rounding; torch.ao's quantize_dynamic does that, and is deprecated).
    What can still move is float32's own noise (1e-6: attention over a padded batch sums in
    another order) pushing a value across a rounding boundary, one step of an int8 scale, which
    later layers carry on: 92% of texts get the very same logits alone and in a batch, the rest
    move by less than INT8_TOLERANCE (with one scale per tensor every text moves)."""

    def __init__(self, weight, bias):
        super().__init__()
        weight = weight.detach().float()
        # 7-bit weights (-63..63), as onnxruntime's reduce_range: CPUs without VNNI multiply
        # uint8 x int8 pairs into a 16-bit sum that saturates past 32,767, and 2 x 255 x 63 stays
        # below it, so the exported graph computes the same numbers on every CPU
        self.register_buffer("scale", weight.abs().amax(1).clamp_min(1e-8) / WEIGHT_LEVELS)
        # stored (in, out), as torch._int_mm wants its second operand
        self.register_buffer("weight", (weight / self.scale[:, None]).round().to(torch.int8)
                             .t().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1]).float()
        # Each token's own scale, from its largest input: a loud batch-mate cannot coarsen its
        # rounding
        scale = rows.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
        y = torch._int_mm((rows / scale).round().to(torch.int8), self.weight).float()
        # Back to float: the int32 sums times the token's scale and the output row's scale
        y = y * scale * self.scale
        return (y if self.bias is None else y + self.bias).view(*x.shape[:-1], -1)


def quantize_int8(model):
    """The model with every dense layer of its encoder and head in int8 (Int8Linear); in place."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child.weight, child.bias))
    # PlainEncoder keeps its weights as tensors, not nn.Linear modules: its dense layers are swapped
    # by name
    if isinstance(model.backbone, PlainEncoder):
        w = model.backbone.w
        model.backbone.linears = {name: Int8Linear(w[name + ".weight"], w[name + ".bias"])
                                  for name in model.backbone.linears}
    return model


# ------------------------------------------------------------------------------------ int8 and ONNX
# export.py checks a checkpoint in int8 on labelled texts and may write it as ONNX; it records
# what it did in export.json beside the weights. predict.py's --quantize int8 and --onnx read that
# record: int8 only for a model it did not cost more than INT8_MAX_LOSS points, ONNX files only as
# export.py wrote them for these very weights (an ONNX file is a program for onnxruntime to run).

EXPORT_RECORD = "export.json"
ONNX_FILES = {"float32": "model.onnx", "int8": "model-int8.onnx"}
INT8_MAX_LOSS = 0.5  # points of accuracy (macro-F1 when multi-label) that int8 may cost
# how far a text's int8 logits may move with its batch-mates or under onnxruntime (Int8Linear
# says why; measured on MiniLM, 5,000 SST-2 texts: 0.05 and 0.12 at most, most texts not at all)
INT8_TOLERANCE = 0.25
STANDARD_DOMAINS = ("", "ai.onnx")  # ONNX's own operators; anything else is a custom operator


def read_export_record(folder, flag):
    """export.json of folder, written for the model.safetensors that is there now."""
    read_info(folder)  # a folder that is not a checkpoint says so first
    path = os.path.join(folder, EXPORT_RECORD)
    if not os.path.isfile(path):
        onnx = " --onnx" if flag == "--onnx" else ""
        raise ModelError(f"{flag}: {folder} has not been exported; run: python export.py "
                         f"--model_dir {folder} --file LABELLED_FILE{onnx}")
    try:
        record = read_json(path)
    except (ValueError, RecursionError) as e:
        raise ModelError(f"{path}: not JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(record, dict) or not isinstance(record.get("int8"), dict):
        raise ModelError(f"{path}: not a record written by export.py")
    # A record is about the weights it was measured on: new weights (a later epoch) need a new
    # export
    if record.get("weights_sha256") != sha256_of(os.path.join(folder, "model.safetensors")):
        raise ModelError(f"{flag}: {path} was written for other weights than "
                         f"{folder}/model.safetensors; run export.py again")
    return record


def cpu_kind():
    """What decides int8's speed on this CPU: torch's kernel level (AVX2, AVX512, ...) and the
    int8 dot-product units, VNNI (vpdpbusd: 4 products a lane in one instruction) and AMX."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:  # not Linux: the kernel level alone
        flags = []
    return {"capability": torch.backends.cpu.get_cpu_capability(),
            "vnni": "avx512_vnni" in flags or "avx_vnni" in flags, "amx": "amx_int8" in flags}


def cpu_name(kind):
    """'AVX2, no VNNI', 'AVX512, VNNI, AMX': what a message names a CPU by."""
    return ", ".join([kind.get("capability", "?"), "VNNI" if kind.get("vnni") else "no VNNI"]
                     + ["AMX"] * bool(kind.get("amx")))


def int8_speedup(rows=128, width=384, repeats=7):
    """float32's time over int8's for one dense layer of a small BERT (rows x width x 4 width),
    the best of a few tries each: 15 ms on a 2-core CPU. Below 1, int8 is slower here (without VNNI
    torch._int_mm took 48x float32's time)."""
    torch.manual_seed(0)
    dense = nn.Linear(width, 4 * width)
    int8, x = Int8Linear(dense.weight, dense.bias), torch.randn(rows, width)

    def best(layer):
        times = []
        with torch.inference_mode():
            for _ in range(repeats):
                start = time.perf_counter()
                layer(x)
                times.append(time.perf_counter() - start)
        return min(times[1:])  # the first call pays for the kernels' set-up
    return best(dense) / best(int8)


def check_int8(folder, onnx=False):
    """One line unless export.py found int8 within INT8_MAX_LOSS points of float32 here, and no
    slower: on the CPU kind the record names its measured speed decides, on another kind a small
    int8 product timed now (int8 is fast on some CPUs and a trap on others)."""
    path = os.path.join(folder, EXPORT_RECORD)
    record = read_export_record(folder, "--quantize int8")
    check = record["int8"]
    if onnx:  # the int8 ONNX file's own score and speed (older records hold neither)
        entry = record.get("onnx", {}).get(ONNX_FILES["int8"])
        if not isinstance(entry, dict):
            raise ModelError(f"--onnx --quantize int8: export.py wrote no {ONNX_FILES['int8']} "
                             f"in {folder} (int8 cost too much there, or it ran without --onnx)")
        check = {**{k: v for k, v in check.items() if k not in ("refused", "speedup")}, **entry}
    if check.get("refused"):
        raise ModelError(f"--quantize int8: {check['refused']}")
    if not all(isinstance(check.get(k), (int, float)) for k in ("float32", "int8")):
        raise ModelError(f"{path}: int8 holds no float32 and int8 scores")
    loss = 100 * (check["float32"] - check["int8"])
    if not loss <= INT8_MAX_LOSS:
        raise ModelError(f"--quantize int8: int8 costs this model {loss:.2f} points of "
                         f"{check.get('metric')} on {check.get('file')} (more than "
                         f"{INT8_MAX_LOSS}); it stays float32")
    here = cpu_kind()
    if record.get("cpu") == here:
        speedup = check.get("speedup")
    elif onnx:  # onnxruntime's int8 kernels are fast on AVX2 and VNNI alike
        return
    else:
        speedup = int8_speedup()
    if isinstance(speedup, (int, float)) and speedup < 1 and not check.get("keep_slower"):
        raise ModelError(f"--quantize int8: {slower_line(speedup, here)}; it stays float32")


def slower_line(speedup, kind):
    return f"int8 is {1 / speedup:.1f}x slower than float32 on this CPU ({cpu_name(kind)})"


def subgraphs(node):
    for attribute in node.attribute:
        yield from ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs)


def tensors_of(graph):
    """Every tensor an ONNX graph holds: initializers and attribute values, subgraphs included."""
    yield from graph.initializer
    # a sparse tensor's values and indices are both tensors, either may point outside the folder
    yield from (t for sparse in graph.sparse_initializer for t in (sparse.values, sparse.indices))
    for node in graph.node:
        for attribute in node.attribute:
            yield from ([attribute.t] if attribute.HasField("t") else []) + list(attribute.tensors)
        for subgraph in subgraphs(node):
            yield from tensors_of(subgraph)


def domains_of(graph):
    for node in graph.node:
        yield node.domain
        for subgraph in subgraphs(node):
            yield from domains_of(subgraph)


def check_onnx_file(path, num_labels):
    """An ONNX file as data: standard operators only, any external data in its own folder, the
    inputs and output predict.py gives and reads. Returns nothing; one line when it fails."""
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and others: the file is not an ONNX model
        raise ModelError(f"{path}: not an ONNX model ({str(e).splitlines()[0]})") from None
    domains = {o.domain for o in model.opset_import} | set(domains_of(model.graph))
    custom = sorted(domains - set(STANDARD_DOMAINS)) or (["local functions"] if model.functions
                                                          else [])
    # A custom domain needs an operator library loaded beside onnxruntime, and this exporter
    # writes no local functions: either means the file is not ours
    if custom:
        raise ModelError(f"{path}: uses operators outside ONNX's own ({', '.join(custom)})")
    folder = os.path.realpath(os.path.dirname(path))
    for tensor in tensors_of(model.graph):
        # Tensors stored in other files must stay in the folder: "../../etc/passwd" is not a weight
        for entry in tensor.external_data:
            if entry.key == "location" and os.path.dirname(os.path.realpath(
                    os.path.join(folder, entry.value))) != folder:
                raise ModelError(f"{path}: tensor {tensor.name} has its data outside the folder "
                                 f"({entry.value})")
    inputs = [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input]
    outputs = [(o.name, [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim])
               for o in model.graph.output]
    if (inputs != [("input_ids", onnx.TensorProto.INT64),
                   ("attention_mask", onnx.TensorProto.INT64)]
            or len(outputs) != 1 or outputs[0][0] != "logits" or len(outputs[0][1]) != 2
            or outputs[0][1][1] != num_labels):
        raise ModelError(f"{path}: takes {inputs} and gives {outputs}, not int64 input_ids and "
                         f"attention_mask to logits for {num_labels} labels")


def export_key():
    """This machine's key for ONNX records: 32 random bytes kept outside every checkpoint folder
    ($XDG_CONFIG_HOME or ~/.config, bert-classify/export.key, readable by its owner only),
    made the first time export.py needs it."""
    folder = os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"),
                          "bert-classify")
    path = os.path.join(folder, "export.key")
    try:
        if not os.path.isfile(path):
            os.makedirs(folder, exist_ok=True)
            # O_EXCL: two exports at once cannot write two keys; 0o600: no one else reads it
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(secrets.token_bytes(32))
        with open(path, "rb") as f:
            return f.read()
    except FileExistsError:  # the other export made it first
        return export_key()
    except OSError as e:
        raise ModelError(f"{path}: cannot read or make the export key ({e.strerror})") from None


def onnx_seal(file_sha256, weights_sha256):
    """What export.json holds for an ONNX file: an HMAC of the file and the weights under this
    machine's key. Hashes alone anyone can recompute for a forged graph (a Loop of 2^62 trips, a
    50,000 x 50,000 constant); a seal only this machine's export.py can write."""
    key = export_key()
    return hmac.new(key, f"{file_sha256}:{weights_sha256}".encode(), "sha256").hexdigest()


class OnnxClassifier:
    """An exported classifier run by onnxruntime, called as BERTClassifier is."""

    def __init__(self, path, threads=0):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            self.session = onnxruntime.InferenceSession(path, options,
                                                        providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own errors: a graph it cannot run
            raise ModelError(f"{path}: onnxruntime cannot run it "
                             f"({str(e).splitlines()[0][:200]})") from None

    def __call__(self, input_ids, attention_mask):
        logits, = self.session.run(["logits"], {"input_ids": input_ids.numpy(),
                                                "attention_mask": attention_mask.numpy()})
        return torch.from_numpy(logits)
