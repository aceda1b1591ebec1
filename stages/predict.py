"""Running a student over evaluation views, shared by training-time validation and evaluate."""
import numpy as np
import torch

from data.images import ReplayImages


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def loader(dataset: ReplayImages, items, batch_size: int, workers: int):
    """Batches of ``(items, pixels)`` for the given flat items, in order."""
    batches = [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                       pin_memory=torch.cuda.is_available())


@torch.inference_mode()
def predict_labels(predict, dataset: ReplayImages, rows, batch_size: int = 128,
                   workers: int = 0) -> np.ndarray:
    """Predicted class of every row's evaluation view (view 0)."""
    items = np.asarray(rows) * dataset.n_views
    predictions = []
    for _, pixels in loader(dataset, items, batch_size, workers):
        predictions.append(predict(pixels.to(device(), non_blocking=True)).argmax(dim=-1).cpu())
    return torch.cat(predictions).numpy() if predictions else np.zeros(0, np.int64)


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    return float((predicted == labels).mean()) if len(labels) else float("nan")
