"""Data stage: raw ShareGPT / OpenAI conversations -> clean, deduplicated, split training files.

    ds-vicuna data clean sharegpt.json clean.jsonl --skip-bad --report clean.json
    ds-vicuna data split clean.jsonl split.jsonl --model embedded --max-length 2048
    ds-vicuna data stats split.jsonl
    ds-vicuna data overlap split.jsonl --questions mt_bench

Modules: formats (read/write conversation files), clean, split, stats, overlap (contamination check),
question_sets (the bundled eval sets by name, shared with ds_vicuna.eval), jsonl (the strict JSONL reader of
eval files), parallel (ordered process map, hash index), cli. Bundled files: sharegpt_sample.json,
blocked_words.txt.
"""
