"""Run a one-process ZeRO-3 training (real reader, DataLoader workers > 0) and fail if any
tensor that a DataLoader worker touches was created inside `deepspeed.zero.Init`.

On a GPU, zero.Init puts every tensor created inside it on cuda:0; a worker that then
mixes it with CPU pixels dies ("cuda:0 and cpu"). On CPU the accelerator *is* the CPU, so
the mistake is invisible; here every tensor created inside the context is recorded (a
TorchFunctionMode), and the decoder's tensors (found by pickling it, as the DataLoader
does for its workers) must not be among them.

    python tests/scripts/zero3_scope.py --config RUN.yaml [key=value ...]
"""

import contextlib
import io
import pickle
import sys
import weakref

import torch
from torch.overrides import TorchFunctionMode

import alignvl_scale.training.build as build
import alignvl_scale.training.main as main
import alignvl_scale.training.trainer as train
from alignvl_scale.training.engine import zero_stage

created: dict[int, weakref.ref] = {}  # id -> weak reference (tensors define ==, so no WeakSet)


def was_created_inside(t: torch.Tensor) -> bool:
    ref = created.get(id(t))
    return ref is not None and ref() is t


class RecordCreated(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                created[id(t)] = weakref.ref(t)
        return out


real_zero3_init = build.zero3_init


@contextlib.contextmanager
def recording_zero3_init(ds_config):
    with real_zero3_init(ds_config), RecordCreated():
        yield


def tensors_in(obj) -> list[torch.Tensor]:
    found = []

    class Finder(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, torch.Tensor):
                found.append(o)
            return None

    Finder(io.BytesIO()).dump(obj)
    return found


real_run = train.Trainer.run


def checked_run(self):
    assert zero_stage(self.ds_config) == 3, "this check is for ZeRO-3"
    assert self.cfg.data.workers > 0
    tensors = tensors_in(self.stream.decode)
    assert tensors, "the decoder holds no tensor: the check would prove nothing"
    inside = [t for t in tensors if was_created_inside(t)]
    if inside:
        print(f"ZERO3-SCOPE-FAIL: {len(inside)} of the decoder's {len(tensors)} tensors were created inside "
              "zero.Init", flush=True)
        sys.exit(3)
    if not all(t.device.type == "cpu" for t in tensors):
        print("ZERO3-SCOPE-FAIL: a decoder tensor is not on the CPU", flush=True)
        sys.exit(3)
    print(f"ZERO3-SCOPE-OK: {len(tensors)} decoder tensors, none from zero.Init", flush=True)
    return real_run(self)


if __name__ == "__main__":
    build.zero3_init = recording_zero3_init
    train.Trainer.run = checked_run
    main.main(sys.argv[1:])
