"""Example training configs, installed as `ds_vicuna.configs`: `ds-vicuna train demo` reads demo.yaml here."""
