"""Entry point for every launcher:

    deepspeed --num_gpus 8 [--hostfile launchers/hostfile.example] launchers/train.py --config configs/x.yaml
    accelerate launch --config_file launchers/accelerate/zero2.yaml launchers/train.py --config configs/x.yaml
    torchrun --nproc_per_node 8 launchers/train.py --config configs/x.yaml

`record` (torchelastic's): an unexpected exception's traceback becomes the rank's root cause in
torchrun's failure summary; a user's mistake is one line there already (training/main.py).
"""

from torch.distributed.elastic.multiprocessing.errors import record

from alignvl_scale.training.main import main

if __name__ == "__main__":
    record(main)()
