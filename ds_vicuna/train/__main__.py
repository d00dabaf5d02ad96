"""`python -m ds_vicuna.train CONFIG [--key value ...]`: the trainer under any launcher.

    deepspeed --num_gpus 8 --module ds_vicuna.train configs/vicuna_7b.yaml
    torchrun --nproc_per_node 8 -m ds_vicuna.train configs/vicuna_7b.yaml
    srun python -m ds_vicuna.train configs/vicuna_7b.yaml
"""
import sys

from ds_vicuna.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
