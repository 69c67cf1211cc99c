"""Build a zoo of 17 small randomly initialised ONNX models from torch, transformers and
torchvision architectures (BERT, DistilBERT, RoBERTa, GPT-2, T5 and Whisper encoders, ViT, Swin,
ConvNeXt, ResNet-18, MobileNetV3, EfficientNet-B0, ShuffleNet with a Softmax, a U-Net, LSTM and GRU
classifiers, a Conv+BN depthwise-residual net), from both torch exporters, for bench/zoo_sweep.py.
No weights are downloaded: every model is built from a config.

Needs torch, which onnxopt never depends on: run it in a venv of its own (see bench/README.md).

    python bench/zoo/build_zoo.py all [--out DIR]      (default DIR: bench/.cache/zoo)
    python bench/zoo/build_zoo.py vit_tiny_64 gpt2_lm_tiny

Each model is exported, checked in onnxruntime (CPUExecutionProvider) against torch, and saved
as DIR/<name>.onnx, <name>.npz (1 sample), <name>_calib.npz (16 samples stacked along axis 0)
and a record DIR/_meta/<name>.json.
"""
import sys
import types

# The PyPI torchvision 0.28.0 wheel is a CUDA build whose _C.so cannot load against
# torch 2.13.0+cpu (libc10_cuda.so missing). Its C ops (nms, roi_align, ...) are not
# needed here; skip the fake-kernel registration module that would otherwise crash
# `import torchvision` (and therefore `import transformers`).
sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")

import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(2)

ROOT = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(ROOT), ".cache", "zoo")  # --out
META = os.path.join(OUT, "_meta")

SEQ = 32          # sequence length used for the saved text samples
NCALIB = 16
VOCAB = 1000


# ----------------------------------------------------------------------------- helpers
def seed_all(s):
    torch.manual_seed(s)
    np.random.seed(s)


def text_inputs(rng, batch, seq, names, vocab=VOCAB, type_vocab=2):
    d = {}
    for n in names:
        if n == "input_ids":
            d[n] = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
        elif n == "attention_mask":
            d[n] = np.ones((batch, seq), dtype=np.int64)
        elif n == "token_type_ids":
            d[n] = rng.integers(0, type_vocab, size=(batch, seq), dtype=np.int64)
        else:
            raise KeyError(n)
    return d


def image_inputs(rng, batch, shape, name="pixel_values"):
    return {name: rng.standard_normal((batch,) + tuple(shape)).astype(np.float32)}


# ----------------------------------------------------------------------------- hand-written nets
class UNetSmall(nn.Module):
    """Tiny U-Net: encoder convs+maxpool, decoder with one ConvTranspose2d and one
    bilinear Resize upsampling, Concat skip connections, per-pixel class logits."""

    def __init__(self, cin=3, ncls=4, c=16):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True))
        self.e1, self.e2, self.e3 = block(cin, c), block(c, 2 * c), block(2 * c, 4 * c)
        self.bott = block(4 * c, 8 * c)
        self.up3 = nn.ConvTranspose2d(8 * c, 4 * c, 2, stride=2)
        self.d3 = block(8 * c, 4 * c)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.red2 = nn.Conv2d(4 * c, 2 * c, 1)
        self.d2 = block(4 * c, 2 * c)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.d1 = block(2 * c, c)
        self.head = nn.Conv2d(c, ncls, 1)

    def forward(self, x):
        s1 = self.e1(x)
        s2 = self.e2(F.max_pool2d(s1, 2))
        s3 = self.e3(F.max_pool2d(s2, 2))
        b = self.bott(F.max_pool2d(s3, 2))
        y = self.d3(torch.cat([self.up3(b), s3], 1))
        y = self.d2(torch.cat([self.red2(self.up2(y)), s2], 1))
        y = self.d1(torch.cat([self.up1(y), s1], 1))
        return self.head(y)


class LSTMTextClassifier(nn.Module):
    def __init__(self, vocab=VOCAB, emb=128, hidden=128, ncls=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb, padding_idx=0)
        self.lstm = nn.LSTM(emb, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, ncls)

    def forward(self, input_ids):
        h, _ = self.lstm(self.emb(input_ids))
        return self.fc(h.mean(dim=1))


class GRUTextClassifier(nn.Module):
    def __init__(self, vocab=VOCAB, emb=96, hidden=128, ncls=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.gru = nn.GRU(emb, hidden, num_layers=1, batch_first=True)
        self.fc = nn.Linear(hidden, ncls)

    def forward(self, input_ids):
        _, h = self.gru(self.emb(input_ids))
        return self.fc(h[-1])


class DWResBlock(nn.Module):
    """Conv1x1-BN-ReLU6 -> depthwise Conv3x3-BN-ReLU6 -> Conv1x1-BN, + residual Add."""

    def __init__(self, c, expand=4):
        super().__init__()
        h = c * expand
        self.pw1, self.bn1 = nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h)
        self.dw, self.bn2 = nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h)
        self.pw2, self.bn3 = nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu6(self.bn1(self.pw1(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        y = self.bn3(self.pw2(y))
        return x + y


class DWResNet(nn.Module):
    def __init__(self, ncls=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.s1 = nn.Sequential(DWResBlock(32), DWResBlock(32))
        self.down = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.s2 = nn.Sequential(DWResBlock(64), DWResBlock(64))
        self.fc = nn.Linear(64, ncls)

    def forward(self, x):
        x = self.s2(self.down(self.s1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class WithSoftmax(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return torch.softmax(self.m(x), dim=-1)


class HFWrap(nn.Module):
    """Positional-args wrapper returning a single named tensor from an HF model."""

    def __init__(self, m, in_names, out_attr):
        super().__init__()
        self.m, self.in_names, self.out_attr = m, list(in_names), out_attr

    def forward(self, *args):
        out = self.m(**dict(zip(self.in_names, args)))
        return getattr(out, self.out_attr)


class HFWrap2(HFWrap):
    def __init__(self, m, in_names, out_attrs):
        super().__init__(m, in_names, None)
        self.out_attrs = out_attrs

    def forward(self, *args):
        out = self.m(**dict(zip(self.in_names, args)))
        return tuple(getattr(out, a) for a in self.out_attrs)


# ----------------------------------------------------------------------------- model specs
# Each spec: builder() -> (module, input_names, output_names, kind, sample_fn(rng,batch) -> dict, dyn)
# kind: "text" (dims: batch, sequence) or "image"/"audio" (dim 0 = batch)

def tv():
    import torchvision  # noqa: F401 (shim above)
    return torchvision.models


def hf_eager(cfg_cls, **kw):
    cfg = cfg_cls(**kw)
    try:
        cfg._attn_implementation = "eager"
    except Exception:
        pass
    return cfg


def spec_bert():
    from transformers import BertConfig, BertModel
    cfg = hf_eager(BertConfig, vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=512, max_position_embeddings=128, type_vocab_size=2)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    m = HFWrap2(BertModel(cfg), names, ["last_hidden_state", "pooler_output"])
    return dict(model=m, inputs=names, outputs=["last_hidden_state", "pooler_output"], kind="text",
                desc="BertModel encoder (hidden 128, 2 layers, 4 heads, vocab 1000), outputs last_hidden_state + "
                     "pooler_output")


def spec_distilbert():
    from transformers import DistilBertConfig, DistilBertModel
    cfg = hf_eager(DistilBertConfig, vocab_size=VOCAB, dim=128, n_layers=2, n_heads=4, hidden_dim=512,
                   max_position_embeddings=128)
    names = ["input_ids", "attention_mask"]
    return dict(model=HFWrap(DistilBertModel(cfg), names, "last_hidden_state"), inputs=names,
                outputs=["last_hidden_state"], kind="text",
                desc="DistilBertModel encoder (dim 128, 2 layers, 4 heads, vocab 1000)")


def spec_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification
    cfg = hf_eager(RobertaConfig, vocab_size=VOCAB, hidden_size=192, num_hidden_layers=3, num_attention_heads=6,
                   intermediate_size=768, max_position_embeddings=130, type_vocab_size=1, num_labels=3)
    names = ["input_ids", "attention_mask"]
    return dict(model=HFWrap(RobertaForSequenceClassification(cfg), names, "logits"), inputs=names,
                outputs=["logits"], kind="text", vocab_lo=3,
                desc="RobertaForSequenceClassification (hidden 192, 3 layers, 6 heads, 3 labels)")


def spec_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = hf_eager(GPT2Config, vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=4, n_positions=128, use_cache=False)
    names = ["input_ids"]
    return dict(model=HFWrap(GPT2LMHeadModel(cfg), names, "logits"), inputs=names, outputs=["logits"],
                kind="text", fixed_batch=False,
                desc="GPT2LMHeadModel (n_embd 128, 2 layers, 4 heads, vocab 1000, use_cache=False), outputs logits")


def spec_t5enc():
    from transformers import T5Config, T5EncoderModel
    cfg = hf_eager(T5Config, vocab_size=VOCAB, d_model=128, d_kv=32, d_ff=512, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", use_cache=False)
    names = ["input_ids", "attention_mask"]
    return dict(model=HFWrap(T5EncoderModel(cfg), names, "last_hidden_state"), inputs=names,
                outputs=["last_hidden_state"], kind="text",
                desc="T5EncoderModel (d_model 128, 2 layers, 4 heads, gated-gelu FFN, relative position bias)")


def spec_whisper():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    cfg = hf_eager(WhisperConfig, vocab_size=VOCAB, num_mel_bins=80, d_model=128, encoder_layers=2,
                   encoder_attention_heads=4, encoder_ffn_dim=512, decoder_layers=1, decoder_attention_heads=4,
                   decoder_ffn_dim=512, max_source_positions=250, max_target_positions=64)
    names = ["input_features"]
    return dict(model=HFWrap(WhisperEncoder(cfg), names, "last_hidden_state"), inputs=names,
                outputs=["last_hidden_state"], kind="audio", shape=(80, 500),
                desc="WhisperEncoder (d_model 128, 2 layers, 4 heads) on 80-bin log-mel, 500 frames (5 s)")


def spec_vit():
    from transformers import ViTConfig, ViTForImageClassification
    cfg = hf_eager(ViTConfig, image_size=64, patch_size=8, hidden_size=192, num_hidden_layers=3,
                   num_attention_heads=3, intermediate_size=768, num_labels=10)
    names = ["pixel_values"]
    return dict(model=HFWrap(ViTForImageClassification(cfg), names, "logits"), inputs=names, outputs=["logits"],
                kind="image", shape=(3, 64, 64),
                desc="ViTForImageClassification (64x64, patch 8, hidden 192, 3 layers, 3 heads, 10 classes)")


def spec_swin():
    from transformers import SwinConfig, SwinForImageClassification
    cfg = hf_eager(SwinConfig, image_size=64, patch_size=4, embed_dim=48, depths=[2, 2], num_heads=[3, 6],
                   window_size=4, num_labels=10)
    names = ["pixel_values"]
    return dict(model=HFWrap(SwinForImageClassification(cfg), names, "logits"), inputs=names, outputs=["logits"],
                kind="image", shape=(3, 64, 64),
                desc="SwinForImageClassification (64x64, patch 4, embed 48, depths [2,2], window 4, 10 classes)")


def spec_convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification
    cfg = ConvNextConfig(num_channels=3, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1], num_labels=10,
                         image_size=64)
    names = ["pixel_values"]
    return dict(model=HFWrap(ConvNextForImageClassification(cfg), names, "logits"), inputs=names,
                outputs=["logits"], kind="image", shape=(3, 64, 64),
                desc="ConvNextForImageClassification (64x64, hidden [32,64,128,256], depths [1,1,2,1], LayerNorm, "
                     "GELU)")


def spec_resnet18():
    return dict(model=tv().resnet18(weights=None, num_classes=10), inputs=["input"], outputs=["logits"],
                kind="image", shape=(3, 96, 96), keep_bn=True,
                desc="torchvision resnet18 (weights=None, 10 classes), 96x96; BatchNormalization kept unfused")


def spec_mobilenetv3():
    return dict(model=tv().mobilenet_v3_small(weights=None, num_classes=10), inputs=["input"], outputs=["logits"],
                kind="image", shape=(3, 96, 96),
                desc="torchvision mobilenet_v3_small (weights=None, 10 classes; hardswish, SE), 96x96")


def spec_efficientnet():
    return dict(model=tv().efficientnet_b0(weights=None, num_classes=10), inputs=["input"], outputs=["logits"],
                kind="image", shape=(3, 96, 96),
                desc="torchvision efficientnet_b0 (weights=None, 10 classes; SiLU, SE), 96x96")


def spec_shufflenet_softmax():
    return dict(model=WithSoftmax(tv().shufflenet_v2_x0_5(weights=None, num_classes=10)), inputs=["input"],
                outputs=["probs"], kind="image", shape=(3, 96, 96),
                desc="torchvision shufflenet_v2_x0_5 (weights=None, 10 classes; channel shuffle) + final Softmax, "
                     "96x96")


def spec_unet():
    return dict(model=UNetSmall(), inputs=["image"], outputs=["seg_logits"], kind="image", shape=(3, 64, 64),
                desc="hand-written U-Net (3 down / 3 up: 2x ConvTranspose + 1 bilinear Resize, Concat skips, BN), "
                     "64x64 -> 4-class map")


def spec_lstm():
    return dict(model=LSTMTextClassifier(), inputs=["input_ids"], outputs=["logits"], kind="text",
                desc="hand-written Embedding(1000,128) + 2-layer bidirectional LSTM(128) + mean-pool + Linear(5)")


def spec_gru():
    return dict(model=GRUTextClassifier(), inputs=["input_ids"], outputs=["logits"], kind="text",
                desc="hand-written Embedding(1000,96) + 1-layer GRU(128), last hidden state + Linear(3)")


def spec_dwres():
    return dict(model=DWResNet(), inputs=["input"], outputs=["logits"], kind="image", shape=(3, 64, 64), keep_bn=True,
                desc="hand-written Conv+BN stems and inverted-residual blocks (1x1 Conv-BN-ReLU6, depthwise 3x3 "
                     "Conv-BN-ReLU6, 1x1 Conv-BN, residual Add), 64x64; exported with optimize=False so "
                     "BatchNormalization stays unfused")


# name -> (spec fn, exporter, opset)
MODELS = {
    "bert_tiny":            (spec_bert, "legacy", 14),
    "distilbert_tiny":      (spec_distilbert, "dynamo", 18),
    "roberta_cls_tiny":     (spec_roberta, "legacy", 17),
    "gpt2_lm_tiny":         (spec_gpt2, "dynamo", 18),
    "t5_encoder_tiny":      (spec_t5enc, "legacy", 13),
    "whisper_encoder_tiny": (spec_whisper, "dynamo", 18),
    "vit_tiny_64":          (spec_vit, "dynamo", 18),
    "swin_tiny_64":         (spec_swin, "dynamo", 18),
    "convnext_tiny_64":     (spec_convnext, "legacy", 17),
    "resnet18_96":          (spec_resnet18, "legacy", 13),
    "mobilenetv3_small_96": (spec_mobilenetv3, "dynamo", 18),
    "efficientnet_b0_96":   (spec_efficientnet, "legacy", 17),
    "shufflenet_softmax_96": (spec_shufflenet_softmax, "legacy", 14),
    "unet_small_64":        (spec_unet, "dynamo", 18),
    "lstm_textcls":         (spec_lstm, "legacy", 14),
    "gru_textcls":          (spec_gru, "dynamo", 18),
    "dwres_bn_64":          (spec_dwres, "dynamo", 18),
}


def make_inputs(spec, rng, batch, seq=SEQ):
    if spec["kind"] == "text":
        d = text_inputs(rng, batch, seq, spec["inputs"])
        lo = spec.get("vocab_lo", 0)
        if lo and "input_ids" in d:   # RoBERTa: avoid padding id 1 so position ids stay well-defined
            d["input_ids"] = rng.integers(lo, VOCAB, size=(batch, seq), dtype=np.int64)
        return d
    return image_inputs(rng, batch, spec["shape"], spec["inputs"][0])


def calibrate_bn(model, spec, seed):
    """Random-init nets have BN running stats (0, 1) that do not match their activations, so
    deep ones (MobileNetV3, EfficientNet, ShuffleNet) produce ~1e-10 outputs. Re-estimate the
    running stats on random inputs from the sample distribution and give BN affine params a
    little randomness, so outputs are O(1) and input-dependent. Returns True if any BN exists."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return False
    g = torch.Generator().manual_seed(seed)
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        with torch.no_grad():
            m.weight.copy_(torch.empty_like(m.weight).uniform_(0.7, 1.3, generator=g))
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    rng = np.random.default_rng(seed)
    model.train()
    with torch.no_grad():
        for _ in range(8):
            x = make_inputs(spec, rng, 8)
            model(*[torch.from_numpy(x[n]) for n in spec["inputs"]])
    model.eval()
    return True


def build(name):
    fn, exporter, opset = MODELS[name]
    seed = 1000 + sorted(MODELS).index(name)
    seed_all(seed)
    spec = fn()
    model = spec["model"].eval()
    bn_calibrated = calibrate_bn(model, spec, seed + 3)
    in_names, out_names, kind = spec["inputs"], spec["outputs"], spec["kind"]
    text = kind == "text"
    path = os.path.join(OUT, name + ".onnx")

    # Export example: batch 2 (and seq 16 for text) so the dynamo exporter does not
    # specialise dynamic dims to 1 / 32; ORT is then checked at batch 1, seq 32.
    rng_ex = np.random.default_rng(seed + 7)
    ex = make_inputs(spec, rng_ex, 2, 16)
    ex_t = tuple(torch.from_numpy(ex[n]) for n in in_names)

    t0 = time.time()
    if exporter == "legacy":
        dyn = {}
        for n in in_names:
            dyn[n] = {0: "batch", 1: "sequence"} if text else {0: "batch"}
        for n in out_names:
            dyn[n] = {0: "batch"}
            if (text and name in ("bert_tiny", "distilbert_tiny", "t5_encoder_tiny", "gpt2_lm_tiny")
                    and n != "pooler_output"):
                dyn[n][1] = "sequence"
        kw = {}
        if spec.get("keep_bn"):
            # model is in eval mode; PRESERVE skips the eval-mode peephole pass that fuses BN into Conv
            kw["training"] = torch.onnx.TrainingMode.PRESERVE
        torch.onnx.export(model, ex_t, path, dynamo=False, opset_version=opset, input_names=in_names,
                          output_names=out_names, dynamic_axes=dyn, do_constant_folding=True, **kw)
    else:
        from torch.export import Dim
        batch = Dim("batch", min=1, max=64)
        seqd = Dim("sequence", min=2, max=128)
        ds = tuple(({0: batch, 1: seqd} if text else {0: batch}) for _ in in_names)
        if isinstance(model, HFWrap):  # forward(*args): one varargs parameter
            ds = (ds,)
        prog = torch.onnx.export(model, ex_t, None, dynamo=True, opset_version=opset, input_names=in_names,
                                 output_names=out_names, dynamic_shapes=ds, external_data=False,
                                 optimize=not spec.get("keep_bn", False))
        prog.save(path, external_data=False)
    export_s = time.time() - t0

    # sanity: no external data files
    import onnx
    mp = onnx.load(path)
    onnx.checker.check_model(mp)
    real_opset = [o.version for o in mp.opset_import if o.domain in ("", "ai.onnx")][0]

    # ORT check on batch-1 sample
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    ort_in = [(i.name, i.shape, i.type) for i in sess.get_inputs()]
    ort_out = [(o.name, o.shape, o.type) for o in sess.get_outputs()]
    assert [n for n, _, _ in ort_in] == in_names, (ort_in, in_names)

    rng = np.random.default_rng(seed)
    sample = make_inputs(spec, rng, 1)
    calib_list = [make_inputs(spec, rng, 1) for _ in range(NCALIB)]
    calib = {n: np.concatenate([c[n] for c in calib_list], 0) for n in in_names}

    res = sess.run(None, sample)
    with torch.no_grad():
        ref = model(*[torch.from_numpy(sample[n]) for n in in_names])
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    maxdiff = max(float(np.max(np.abs(r.numpy() - o))) for r, o in zip(ref, res))
    out_absmean = float(np.mean(np.abs(res[0])))
    finite = all(np.isfinite(o).all() for o in res)

    # Run the whole calibration set as one batch (exercises the dynamic batch axis)
    calib_batch_ok = None
    try:
        cres = sess.run(None, calib)
        calib_batch_ok = all(np.isfinite(o).all() for o in cres) and cres[0].shape[0] == NCALIB
        # per-sample consistency with batched run
        one = sess.run(None, {n: calib[n][3:4] for n in in_names})
        calib_batch_ok = calib_batch_ok and bool(np.allclose(one[0], cres[0][3:4], atol=1e-4, rtol=1e-3))
    except Exception as e:  # noqa
        calib_batch_ok = "error: " + str(e).splitlines()[0][:200]

    # dynamic-sequence check for text models: run at a different length
    seq_check = None
    if text:
        try:
            s2 = make_inputs(spec, np.random.default_rng(seed + 99), 1, 20)
            r2 = sess.run(None, s2)
            seq_check = bool(all(np.isfinite(o).all() for o in r2))
        except Exception as e:  # noqa
            seq_check = "error: " + str(e).splitlines()[0][:200]

    np.savez(os.path.join(OUT, name + ".npz"), **sample)
    np.savez(os.path.join(OUT, name + "_calib.npz"), **calib)

    ops = sorted({n.op_type for n in mp.graph.node})
    rec = dict(name=name, desc=spec["desc"], exporter=exporter, opset_requested=opset, opset=real_opset,
               inputs=[dict(name=n, shape=s, dtype=t) for n, s, t in ort_in],
               outputs=[dict(name=n, shape=s, dtype=t) for n, s, t in ort_out],
               sample_shapes={n: [list(sample[n].shape), str(sample[n].dtype)] for n in in_names},
               calib_shapes={n: list(calib[n].shape) for n in in_names},
               size_bytes=os.path.getsize(path), nodes=len(mp.graph.node), op_types=ops,
               params=int(sum(p.numel() for p in model.parameters())),
               max_abs_diff_vs_torch=maxdiff, out0_absmean=out_absmean, bn_recalibrated=bn_calibrated,
               outputs_finite=bool(finite), calib_batch_run_ok=calib_batch_ok,
               other_seq_len_ok=seq_check, export_seconds=round(export_s, 1), seed=seed)
    with open(os.path.join(META, name + ".json"), "w") as f:
        json.dump(rec, f, indent=1, default=str)
    print(f"OK {name}: {exporter} opset {real_opset}, {rec['size_bytes']/1e6:.2f} MB, {rec['nodes']} nodes, "
          f"maxdiff {maxdiff:.2e}, |out0| {out_absmean:.3g}, calib_batch {calib_batch_ok}, seq {seq_check}, "
          f"export {export_s:.1f}s")


if __name__ == "__main__":
    names = sys.argv[1:]
    if "--out" in names:
        k = names.index("--out")
        OUT = os.path.abspath(names[k + 1])
        META = os.path.join(OUT, "_meta")
        del names[k:k + 2]
    os.makedirs(META, exist_ok=True)
    if names == ["all"]:
        names = list(MODELS)
    rc = 0
    for n in names:
        try:
            build(n)
        except Exception as e:
            rc = 1
            tb = traceback.format_exc()
            print(f"FAIL {n}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            print(tb[-3000:])
            with open(os.path.join(META, n + ".fail.txt"), "w") as f:
                f.write(tb)
    sys.exit(rc)
