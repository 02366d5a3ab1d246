"""The Inception-v3 of the FID protocol (TF's inception-2015-12-05 graph) in PyTorch.

ADM's evaluator (openai/guided-diffusion, evaluations/) runs TF's 2015 Inception graph and
reads three things from it; this module computes the same three from a PyTorch port of the
graph's weights:

  pool     (N, 2048)  ``pool_3``: global average of the last block (FID, precision/recall)
  spatial  (N, 2023)  ``mixed_6/conv``: the ReLU output of the 1x1 branch of the 4th 17x17
                      block (Mixed_6d.branch1x1), channels 0..6 only, flattened in the graph's
                      NHWC order (h, w, c) = 17 * 17 * 7, so precomputed ``mu_s``/``sigma_s``
                      line up (sFID)
  logits   (N, 1008)  ``pool @ W^T`` with the graph's 2048 x 1008 softmax weights and NO bias,
                      as ADM builds its softmax (Inception Score)

Input: float images (N, 3, H, W) with values in [0, 255] (uint8 images cast), any size. The
graph resizes to 299 x 299 with TF1's legacy bilinear resize (no half-pixel centres; see
``tf1_resize_bilinear``) and maps pixels with (x - 128) / 128.

The architecture is the torchvision-style Inception-v3 with the blocks the TF graph actually
has (the "FID Inception" of pytorch-fid / torch-fidelity): average pools that exclude padding
from the count, and a max pool in the last block's pooling branch. Parameter names follow
torchvision, so the ported weights file loads strictly:

    pt_inception-2015-12-05-6726825d.pth   (pytorch-fid's release "fid_weights"; torch-fidelity
                                            ships the same port as weights-inception-2015-12-05-6726825d.pth)

Nothing is downloaded: ``load_inception(path)`` reads the file the user supplies (or the path in
``$DISP_INCEPTION_WEIGHTS``) and fails with a message saying what to fetch and from where.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

WEIGHTS_ENV = "DISP_INCEPTION_WEIGHTS"
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
INPUT_SIZE = 299
NUM_LOGITS = 1008  # the 2015 graph's classifier: 1000 ImageNet classes + 8 unused
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 of mixed_6/conv's 192 channels
SPATIAL_GRID = 17
SPATIAL_DIM = SPATIAL_GRID * SPATIAL_GRID * SPATIAL_CHANNELS  # 2023
BN_EPS = 1e-3  # the TF graph's batch-norm epsilon


class InceptionWeightsError(FileNotFoundError):
    """The Inception weights file is missing or is not the FID port; the message says what to get."""


class InceptionFeatures(NamedTuple):
    pool: Tensor  # (N, 2048)
    spatial: Tensor  # (N, 2023)
    logits: Tensor  # (N, 1008)


# ---------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------


def tf1_resize_bilinear(x: Tensor, size: int) -> Tensor:
    """TF1 ``ResizeBilinear`` (align_corners=False, half_pixel_centers=False) of (N, C, H, W).

    Output pixel i samples the input at ``i * in / out`` (no half-pixel offset, unlike
    ``F.interpolate``), interpolating between floor and floor + 1 clamped to the edge.
    """
    n, c, h, w = x.shape

    def axis(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        pos = torch.arange(size, device=x.device, dtype=torch.float64) * (n_in / size)
        lo = pos.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        frac = (pos - lo.to(torch.float64)).to(x.dtype)
        return lo, hi, frac

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    top = x[:, :, y0, :]  # (N, C, S, W)
    bottom = x[:, :, y1, :]
    rows = top + (bottom - top) * fy.view(1, 1, -1, 1)  # (N, C, S, W)
    left = rows[:, :, :, x0]  # (N, C, S, S)
    right = rows[:, :, :, x1]
    return left + (right - left) * fx.view(1, 1, 1, -1)  # (N, C, S, S)


# ---------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU: every conv layer of the graph."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: Tensor) -> Tensor:
    # TF's SAME average pooling divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, in_ch: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([a, b, c, d], 1)  # (N, 224 + pool_features, 35, 35)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: stride-2 3x3 | 1x1-3x3-stride-2 3x3 | max pool."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        c = F.max_pool2d(x, 3, stride=2)
        return torch.cat([a, b, c], 1)  # (N, 480 + in_ch, 17, 17)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1)."""

    def __init__(self, in_ch: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x: Tensor, taps: dict[str, Tensor] | None = None) -> Tensor:
        a = self.branch1x1(x)  # (N, 192, 17, 17)
        if taps is not None:
            taps["branch1x1"] = a
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([a, b, c, d], 1)  # (N, 768, 17, 17)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        c = F.max_pool2d(x, 3, stride=2)
        return torch.cat([a, b, c], 1)  # (N, 512 + in_ch, 8, 8)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; ``pool`` is "avg" (Mixed_7b) or "max" (Mixed_7c:
    the TF graph's last block pools with a max, where torchvision's port has an average)."""

    def __init__(self, in_ch: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)  # (N, 320, 8, 8)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)  # (N, 768, 8, 8)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)  # (N, 768, 8, 8)
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        d = self.branch_pool(pooled)  # (N, 192, 8, 8)
        return torch.cat([a, b, c, d], 1)  # (N, 2048, 8, 8)


# ---------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in TF's 2015 graph; ``forward`` returns ``InceptionFeatures``.

    Build it, then load the ported weights (``load_inception`` does both). Random weights are
    only good for shape and plumbing tests.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)

    def preprocess(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) pixels in [0, 255] -> (N, 3, 299, 299) in about [-1, 1], as the graph does."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W), got {tuple(images.shape)}")
        x = images.to(self.fc.weight.dtype)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = tf1_resize_bilinear(x, INPUT_SIZE)
        return (x - 128.0) / 128.0

    def forward(self, images: Tensor) -> InceptionFeatures:
        x = self.preprocess(images)  # (N, 3, 299, 299)
        x = self.Conv2d_1a_3x3(x)  # (N, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (N, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (N, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6c(self.Mixed_6b(x))  # (N, 768, 17, 17)
        taps: dict[str, Tensor] = {}
        x = self.Mixed_6d(x, taps)  # (N, 768, 17, 17); taps["branch1x1"] is mixed_6/conv
        x = self.Mixed_6e(x)  # (N, 768, 17, 17)
        x = self.Mixed_7a(x)  # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048): pool_3
        spatial = taps["branch1x1"][:, :SPATIAL_CHANNELS]  # (N, 7, 17, 17)
        spatial = spatial.permute(0, 2, 3, 1).reshape(spatial.shape[0], -1)  # (N, 2023), NHWC order
        logits = pool @ self.fc.weight.T  # (N, 1008): ADM's softmax input has no bias
        return InceptionFeatures(pool, spatial, logits)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


WHERE_TO_GET = (f"The ADM/FID protocol needs the PyTorch port of TF's inception-2015-12-05 graph: "
                f"download {WEIGHTS_FILENAME} from {WEIGHTS_URL} (or torch-fidelity's "
                f"weights-inception-2015-12-05-6726825d.pth, the same port) and pass its path "
                f"(--inception PATH) or set ${WEIGHTS_ENV}. Nothing is downloaded at run time.")


def missing_weights_message(path: str | os.PathLike | None) -> str:
    where = f"not found at {path}" if path else f"not given (no path and ${WEIGHTS_ENV} is not set)"
    return f"Inception weights file {where}. {WHERE_TO_GET}"


def resolve_weights_path(path: str | os.PathLike | None = None) -> Path:
    """The weights path from the argument or ``$DISP_INCEPTION_WEIGHTS``; InceptionWeightsError if absent."""
    chosen = path if path is not None else os.environ.get(WEIGHTS_ENV) or None
    if chosen is None or not Path(chosen).is_file():
        raise InceptionWeightsError(missing_weights_message(chosen))
    return Path(chosen)


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID Inception with the ported weights from ``path``, in eval mode on ``device``."""
    weights = resolve_weights_path(path)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InceptionWeightsError(f"{weights} does not hold a state_dict (got {type(state).__name__})")
    # Files saved by newer torch carry BN step counters; they play no part in inference.
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = FIDInceptionV3()
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or misshaped:
        def head(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" ... ({len(items)} in all)" if len(items) > 5 else "")
        parts = [f"{name}: {head(items)}" for name, items in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if items]
        raise InceptionWeightsError(f"{weights} is not the FID Inception port ({'; '.join(parts)}). "
                                    f"{WHERE_TO_GET}")
    model.load_state_dict(state, strict=False)  # strictness checked above (step counters aside)
    return model.eval().to(device)


__all__ = ["FIDInceptionV3", "InceptionFeatures", "InceptionWeightsError", "NUM_LOGITS", "POOL_DIM",
           "SPATIAL_DIM", "WEIGHTS_ENV", "WEIGHTS_FILENAME", "WEIGHTS_URL", "load_inception",
           "missing_weights_message", "resolve_weights_path", "tf1_resize_bilinear"]
