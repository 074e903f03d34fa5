"""ImageNet sources, WebDataset shards and their loader (pixelgen.data.shards, .loader: these need
webdataset); the pixel conversion here needs torch alone, so the engine imports nothing heavier."""

import torch


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> contiguous float32 [-1, 1]; call it after moving the batch to the device."""
    return images_uint8.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)
