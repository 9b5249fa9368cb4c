"""File formats of our own and the small readers and writers around them:

- ``fisher``: Fisher files (safetensors with per-tensor power-of-two scales), lazy reader;
- ``examples``: the Fisher's JSONL validation rows, streamed and checked;
- ``checkpoint``: a checkpoint's tensor names and shapes, from the files' headers;
- ``atomic``: writing a file whole or not at all (every report, recipe and JSONL the
  commands write).

It is not the only code that touches disk: checkpoints are read and written by
mergekit and vLLM (``decompose``, the engines), the toy family by ``toy``, query files
by ``search.queries``, the analysis streams tensors itself (``analysis.stream``), and
Optuna keeps the studies.
"""
