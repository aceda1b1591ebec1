"""Where training and inference run: the device, and batches of replayed views."""
import torch


def device() -> torch.device:
    """The accelerator if there is one (under torchrun, this rank's), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def loader(dataset, items, batch_size: int, workers: int):
    """Batches of ``(items, pixels...)`` for the given flat items, in order."""
    return batched(dataset, [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)], workers)


def batched(dataset, batches: list, workers: int):
    """``(items, pixels...)`` for each list of items in ``batches``, in order."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                       pin_memory=torch.cuda.is_available())
