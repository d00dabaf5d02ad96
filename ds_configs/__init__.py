"""DeepSpeed engine settings, installed as `ds_vicuna.ds_configs`: `train.deepspeed: zero3` names zero3.json here."""
