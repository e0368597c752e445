"""Encoder latency and training cost of reuse configurations (the paper's Table 3), measured honestly.

    python -m analysis.latency [--reuse "1(H4)x16" "4(H4)x4" ...] [--lengths 128 256 512 768]
        [--batch-size 1] [--dtype fp32|fp16|bf16 [--precision-mode weights|autocast]] [--device cpu|cuda]
        [--include-frontend] [--engine torch|onnxruntime] [--peer torchaudio espnet]
        [--compile [--compile-backend inductor]] [--cuda-graphs] [--train-length 512 --train-batch 8]
        [--json F] [--png F]

The paper: Shim, Choi and Sung, "Understanding the Role of Self Attention for Efficient Speech
Recognition", ICLR 2022, Table 3 (encoder latency of attention-map reuse configurations).

Inference: random (seeded) encoder inputs ``(B, T, d)`` after the front end (``--include-frontend``
times from fbank features of :func:`data.framing.input_frames` frames instead),
``torch.inference_mode``, warm-up, then the median and spread of many runs, interleaved over the
rows (:mod:`~analysis.latency.timing`). Rows (:mod:`~analysis.latency.modules`):

- our ``1x16`` on its fused path (SDPA; every row of the table) and on the materialised path
  (``+materialised``: maps computed explicitly, as a reuse model must for its computing layers);
- ``torchaudio.models.Conformer`` of the same width, depth, heads, FFN and kernel (absolute
  positions, no rel-pos): the peer (``torchaudio``). Its layers run with no padding mask, which is
  its ``forward`` on inputs of full length (all of ours are) without the host read of
  ``lengths.max()`` by which that builds its mask; with ``--include-frontend`` behind a front end
  like ours, so that every row times front end + encoder;
- with ``--peer espnet`` (espnet importable; with ``--include-frontend``, as espnet2's encoder
  starts with its own Conv2d front end), espnet2's ``ConformerEncoder`` of the same architecture
  (relative positions, macaron FFN, the same convolution module) carrying the weights of our
  plan-free baseline ``1(H{peer-heads})x{num-layers}`` (the same random draw as the ``1(H4)x16``
  row's), mapped by :func:`models.espnet.espnet_peer`: its output is checked equal to ours in fp32
  (within :data:`~analysis.latency.benchmark.PEER_ATOL`) before any timing, or the run stops
  (``peer_check`` in the JSON), so the row times the same function as our baseline (``espnet``).
  Our first row's speed-up over each peer (the peer's time over ours) is printed and kept
  (``speedup_over_peer``).

Precision (``--dtype``): ``bf16`` / ``fp16`` run the rows with their weights and inputs cast
(``--precision-mode weights``, the default) or under ``torch.autocast`` with fp32 weights
(``autocast``); see :mod:`models.precision` for which is faster and how accurate each is.

Engine (``--engine``, :mod:`~analysis.latency.engines`): ``torch`` (eager, or ``--compile`` /
``--cuda-graphs``) or ``onnxruntime``: each row exported with torch's dynamo exporter and run by an
ONNX Runtime CPU session with ``--threads`` intra-op threads, fp32 only, each checked against
PyTorch before timing (``onnx_max_abs_diff`` in the JSON). The ``+materialised`` row is left out (a
graph has no fused kernel to compare it with). A row's GFLOP counts what the graph computes: the
positional projection, cached by PyTorch eager, at every call, and all ``T x (2T - 1)`` positional
scores of each computing layer in one chunk, where eager on CPU takes the query rows in chunks (the
model run on the exporter's path, :func:`models.export.as_exported`).

Work: the GFLOP of one forward at each length (:func:`models.flops.count_flops`: matrix products,
convolutions and attention kernels; element-wise work is not counted), beside the times, so that a
ratio can be read against the arithmetic it saves.

Training cost: one optimiser step (forward + CTC loss + backward + AdamW) on a fixed padded batch,
median time, and peak GPU memory.

Modules: :mod:`~analysis.latency.config` (the typed :class:`BenchConfig`),
:mod:`~analysis.latency.bench` (:class:`Bench`: models, inputs, timed callables),
:mod:`~analysis.latency.benchmark` (:func:`run`: one run's record), :mod:`~analysis.latency.output`
(table, plot, JSON), :mod:`~analysis.latency.cli` (:func:`main`).
"""

from analysis.latency.bench import Bench
from analysis.latency.benchmark import PEER_ATOL, check_peer, run
from analysis.latency.cli import main, parse_config, parser
from analysis.latency.config import PAPER, BenchConfig
from analysis.latency.modules import EspnetRow, Peer, Timed, espnet_importable

__all__ = [
    "PAPER",
    "PEER_ATOL",
    "Bench",
    "BenchConfig",
    "EspnetRow",
    "Peer",
    "Timed",
    "check_peer",
    "espnet_importable",
    "main",
    "parse_config",
    "parser",
    "run",
]
