"""CUDA IPC hand-off: share a GPU tensor with another process on the same GPU without copying it.

`export_cuda` turns a CUDA tensor into a JSON-able locator: the fields torch's own CUDA tensor
sharing sends (`UntypedStorage._share_cuda_`: the allocation's cudaIpcMemHandle, the storage's
offset and size in it, torch's IPC reference counter and the event a reader waits on) plus the
tensor's view (dtype, shape, stride, offset) and the GPU's UUID. `import_cuda` maps it in the
consumer (`UntypedStorage._new_shared_cuda`, as `torch.multiprocessing`'s `rebuild_cuda_tensor`
does) on the local device with that UUID, so differing CUDA_VISIBLE_DEVICES orders still match.
No pickle: a record from a shared folder can only name a dtype and numbers, never code.

The producer must keep the tensor alive until the consumer has copied it (`PinLedger`); torch's IPC
reference counter additionally keeps the allocation while a consumer still maps it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {name} cannot be handed off; accepted: {', '.join(_DTYPES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} cannot be handed off; accepted: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def local_device_for(uuid: str, local_uuids: Sequence[str]) -> int:
    """The local CUDA device index whose UUID is `uuid`; ValueError if this process cannot see it."""
    for index, local in enumerate(local_uuids):
        if local == uuid:
            return index
    raise ValueError(f"the fused KV is on GPU {uuid}, which this process does not see ({len(local_uuids)} visible)")


def export_cuda(tensor: torch.Tensor) -> dict:
    """A JSON-able locator of `tensor` (on CUDA) for `import_cuda` in another process."""
    if tensor.device.type != "cuda":
        raise ValueError(f"CUDA IPC needs a CUDA tensor, got one on {tensor.device}")
    (device, handle, size, offset, rc_handle, rc_offset, event, event_sync) = tensor.untyped_storage()._share_cuda_()
    return {
        "device_uuid": device_uuid(device),
        "handle": bytes(handle).hex(),
        "storage_size": int(size),
        "storage_offset": int(offset),
        "ref_counter_handle": bytes(rc_handle).hex(),
        "ref_counter_offset": int(rc_offset),
        "event_handle": bytes(event).hex() if event else "",
        "event_sync_required": bool(event_sync),
        "dtype": dtype_name(tensor.dtype),
        "shape": list(tensor.shape),
        "stride": list(tensor.stride()),
        "offset": int(tensor.storage_offset()),
    }


def check_locator(loc: dict) -> dict:
    """The locator's fields, type-checked (ValueError naming the first bad one)."""
    want = {
        "device_uuid": str,
        "handle": str,
        "storage_size": int,
        "storage_offset": int,
        "ref_counter_handle": str,
        "ref_counter_offset": int,
        "event_handle": str,
        "event_sync_required": bool,
        "dtype": str,
        "shape": list,
        "stride": list,
        "offset": int,
    }
    for name, kind in want.items():
        if not isinstance(loc.get(name), kind):
            raise ValueError(f"CUDA IPC locator field {name!r} must be a {kind.__name__}, got {loc.get(name)!r}")
    for name in ("handle", "ref_counter_handle", "event_handle"):
        bytes.fromhex(loc[name])  # ValueError if not hex
    torch_dtype(loc["dtype"])
    if len(loc["shape"]) != len(loc["stride"]) or not all(isinstance(v, int) for v in loc["shape"] + loc["stride"]):
        raise ValueError(f"CUDA IPC locator shape {loc['shape']} and stride {loc['stride']} must be int lists")
    return loc


def import_cuda(loc: dict) -> torch.Tensor:
    """Map the tensor a producer exported (this process must not be the producer: CUDA refuses to
    open an IPC handle in the process that made it)."""
    loc = check_locator(loc)
    uuids = [device_uuid(i) for i in range(torch.cuda.device_count())]
    device = local_device_for(loc["device_uuid"], uuids)
    torch.cuda._lazy_init()
    storage = torch.UntypedStorage._new_shared_cuda(
        device,
        bytes.fromhex(loc["handle"]),
        loc["storage_size"],
        loc["storage_offset"],
        bytes.fromhex(loc["ref_counter_handle"]),
        loc["ref_counter_offset"],
        bytes.fromhex(loc["event_handle"]),
        loc["event_sync_required"],
    )
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch_dtype(loc["dtype"]), _internal=True)
    return torch._utils._rebuild_tensor(typed, loc["offset"], tuple(loc["shape"]), tuple(loc["stride"]))
