"""`python -m ds_vicuna.serve all --model embedded` = `ds-vicuna serve all --model embedded`."""
import sys

from ds_vicuna.serve.cli import main

sys.exit(main())
