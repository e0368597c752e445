"""A stand-in for a GPU on a machine without one, for device-placement tests.

Inside ``with OtherDevice() as dev:`` tensors placed on ``dev.device`` (``meta``) hold real CPU
values but behave, towards the code under test, like tensors of another device:

- ``.to(dev.device)`` / ``.to(dev.device)`` of a module, and factory calls with ``device=`` that
  device, give such tensors; ``.cpu()`` / ``.to("cpu")`` brings values back (counted as a copy
  to the host);
- an operation that mixes them with CPU tensors (other than 0-dim scalars and index tensors,
  which CUDA accepts too) raises ``RuntimeError("Expected all tensors to be on the same device ...")``, as CUDA does;
- reads of a value to the host (``.item()``, ``bool(t)``, ``int(t)``: ``_local_scalar_dense``)
  are counted in :attr:`OtherDevice.host_reads`.

So code that runs correctly here keeps data-side tensors on the CPU and moves batches to the
model's device explicitly, as it must on a GPU. Numbers are computed on the CPU, so results must
equal a CPU run exactly. ``x.device.type`` is ``"meta"``: code that branches on ``"cpu"`` takes
its non-CPU path. Not intercepted: ``torch.tensor(data, device=...)``, which builds its tensor with
Python dispatch off and so gives a plain ``meta`` tensor without values (any read of it fails
loudly); code under test uses ``torch.full`` / ``.to(device)`` instead.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

DEVICE = torch.device("meta")


class OnDevice(torch.Tensor):
    """A CPU tensor (:attr:`inner`) presenting itself as a tensor of :data:`DEVICE`."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        with torch.inference_mode(inner.is_inference()):  # an inference tensor iff its values are one
            t = torch.Tensor._make_wrapper_subclass(
                cls,
                inner.shape,
                strides=inner.stride(),
                storage_offset=inner.storage_offset(),
                dtype=inner.dtype,
                device=DEVICE,
                requires_grad=inner.requires_grad,
            )
        t.inner = inner
        return t

    def __repr__(self):
        return f"OnDevice({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func}: OnDevice tensors only work inside `with OtherDevice():`")


# advanced indexing accepts CPU index tensors on CUDA too (``x[:, [1, 2]]`` builds them on the CPU)
_CPU_INDICES_ALLOWED = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put_.default,
    torch.ops.aten.index_put.default,
    torch.ops.aten._index_put_impl_.default,
}


def _is_other(device) -> bool:
    return device is not None and torch.device(device).type == DEVICE.type


class OtherDevice(TorchDispatchMode):
    """Dispatch mode that simulates a second device; see the module docstring."""

    device = DEVICE

    def __init__(self):
        super().__init__()
        self.host_reads: list[str] = []
        self.moves_to_device = 0

    def __enter__(self):
        # ``module.double()`` etc. must replace parameters (and their values), not assign ``.data``
        self._swap = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.__future__.set_swap_module_params_on_conversion(self._swap)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_device = [a for a in tensors if isinstance(a, OnDevice)]
        unwrap = lambda a: a.inner if isinstance(a, OnDevice) else a  # noqa: E731
        if (
            func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.device, torch.ops.aten.to.dtype_layout)
            and "device" in kwargs
        ):
            target = kwargs["device"]
            out = func(unwrap(args[0]), *args[1:], **{**kwargs, "device": torch.device("cpu")})
            if _is_other(target):
                self.moves_to_device += not on_device
                return OnDevice(out)
            if on_device:
                self.host_reads.append("copy to host")
            return out
        if any(a.device.type == DEVICE.type and not isinstance(a, OnDevice) for a in tensors):
            raise RuntimeError(
                f"{func}: a plain {DEVICE.type} tensor without values reached an operation (made by "
                f"torch.tensor(..., device=) or a Python scalar assigned into a device tensor); "
                f"build it with torch.full or on the CPU and move it"
            )
        if (
            on_device
            and func not in _CPU_INDICES_ALLOWED
            and any(not isinstance(a, OnDevice) and a.dim() > 0 for a in tensors)
        ):
            devices = sorted({str(a.device) for a in tensors})
            raise RuntimeError(
                f"{func}: Expected all tensors to be on the same device, but found at least two "
                f"devices, {' and '.join(devices)}!"
            )
        if on_device and func in (
            torch.ops.aten._local_scalar_dense.default,
            torch.ops.aten.is_nonzero.default,
            torch.ops.aten.item.default,
            torch.ops.aten.equal.default,
        ):
            self.host_reads.append(str(func))
        factory = _is_other(kwargs.get("device"))
        args, kwargs = tree_map(unwrap, (args, kwargs))
        if factory:
            kwargs["device"] = torch.device("cpu")
        out = func(*args, **kwargs)
        if on_device or factory:
            return tree_map(
                lambda o: OnDevice(o) if isinstance(o, torch.Tensor) and not isinstance(o, OnDevice) else o, out
            )
        return out
