"""The digit classifier whose 64-d hidden layer is the toy's Frechet-distance feature space, and the real digits it learns from."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.data.datasets import digits_arrays
from engine.evaluation.probe import stratified_split
from engine.experiments.settings import NUM_CLASSES, ToyConfig, log


class DigitClassifier(nn.Module):
    """Two conv stages and a 64-d hidden layer on (N, 1, 16, 16) digits in [-1, 1]."""

    FEATURES = 64

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, self.FEATURES)
        self.fc2 = nn.Linear(self.FEATURES, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, 16, 8, 8)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (N, 32, 4, 4)
        return F.relu(self.fc1(h.flatten(1)))  # (N, 64): the FD feature space

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))  # (N, 10)


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (background -1 filled in): a little robustness."""
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
    out = torch.roll(x, (dy, dx), dims=(2, 3))
    if dy:
        out[:, :, (0 if dy > 0 else -1)] = -1.0
    if dx:
        out[:, :, :, (0 if dx > 0 else -1)] = -1.0
    return out


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> DigitClassifier:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = DigitClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 64):
            idx = order[start:start + 64]
            loss = F.cross_entropy(net(random_shift(x[idx], gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@dataclass
class RealData:
    x: torch.Tensor  # (1797, 1, 16, 16) in [-1, 1]
    y: torch.Tensor  # (1797,)
    train: np.ndarray  # indices of the classifier's (and FD reference's) split
    test: np.ndarray  # held-out indices


def real_digits(seed: int) -> RealData:
    x, y = digits_arrays(16)
    train, test = stratified_split(y, 2 / 3, seed)
    return RealData(torch.from_numpy(x), torch.from_numpy(y), train, test)


def get_classifier(root: Path, cfg: ToyConfig, real: RealData) -> tuple[DigitClassifier, float]:
    """The cached classifier (retrained when its settings differ) and its held-out accuracy."""
    path = root / "classifier.pt"
    settings = {"epochs": cfg.classifier_epochs, "seed": cfg.seed, "arch": "conv16-conv32-fc64", "split": "2/3"}
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("settings") == settings:
            net = DigitClassifier()
            net.load_state_dict(saved["state_dict"])
            return net.eval(), float(saved["heldout_acc"])
    log(f"training the digit classifier ({cfg.classifier_epochs} epochs)")
    net = train_classifier(real.x[real.train], real.y[real.train], cfg.classifier_epochs, cfg.seed)
    with torch.no_grad():
        acc = float((net(real.x[real.test]).argmax(1) == real.y[real.test]).float().mean())
    root.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "settings": settings, "heldout_acc": acc}, path)
    return net, acc


@torch.no_grad()
def classifier_features(net: DigitClassifier, x: torch.Tensor) -> np.ndarray:
    return torch.cat([net.features(x[i:i + 512]) for i in range(0, len(x), 512)]).double().numpy()
